//! Catalog anti-entropy: push-pull with one random peer per round, digests first.
//!
//! 1. The initiator sends `Gossip`: heartbeats and one digest per site it trusts.
//! 2. The responder answers with heartbeats, and for each author both trust whose digests
//!    differ, its `Entries` (kind, key, version, tag of each record).
//! 3. The initiator sends the `Records` the responder lacks or holds older, and a `Want`
//!    for those it lacks itself; the responder answers a `Want` with `Records`.
//!
//! A converged pair exchanges two small messages: heartbeats and a u64 per trusted site.
//!
//! Every step is gated by `relays_to`: a record goes only to a peer whose site its author
//! lets see it (`Catalog::may_see_record`), so a partner's records never reach a site the
//! partner does not trust, whichever node holds them.

use std::collections::BTreeMap;

use super::message::{
    Beat, Message, DIGESTS_PER_MESSAGE_MAX, ENTRIES_PER_MESSAGE_MAX, RECORDS_PER_MESSAGE_MAX,
};
use super::Engine;
use crate::catalog::{Entry, RecordKey};
use crate::identity::{NodeId, SiteId};
use crate::record::TrustView;
use crate::record::{Record, RecordKind};

impl Engine {
    pub(super) fn gossip_round(&mut self, now_ms: u64) {
        let Some(peer) = self.gossip_target() else {
            return;
        };
        let beats = self.beats_to_send(now_ms);
        let digests = self.trusted_digests(peer);
        self.send(
            peer,
            Message::Gossip {
                beats,
                digests,
                reply: false,
            },
        );
    }

    /// True when this node may send `record` to a node of `site`: the record's author
    /// lets `site` see it (or `site` is this node's own), and lets this site see it too
    /// (a site that was revoked keeps the revocation, not the rest, and never passes on
    /// what it held from before).
    pub fn relays_to(&self, record: &Record, site: SiteId) -> bool {
        let ours = record.author == self.site || self.catalog.may_see_record(record, self.site);
        ours && (site == self.site || self.catalog.may_see_record(record, site))
    }

    /// The digest of `author`'s records that `site` may get from this node.
    fn digest_for(&self, author: SiteId, site: SiteId) -> u64 {
        if self.relays_all_to(author, site) {
            return if site == author || site == self.site {
                self.catalog.digest(&author)
            } else {
                self.catalog.shared_digest(&author)
            };
        }
        self.catalog
            .digest_of(author, |record| self.relays_to(record, site))
    }

    /// True when every record of `author` passes `relays_to(_, site)`, but those only the
    /// author's own site sees (`catalog::site_private`), which `site` never gets from
    /// anyone: the common case, which keeps a converged round at one kept-up-to-date u64
    /// per author.
    fn relays_all_to(&self, author: SiteId, site: SiteId) -> bool {
        let ours = author == self.site || self.catalog.may_see(author, self.site);
        ours && (site == self.site || self.catalog.may_see(author, site))
    }

    fn peer_site(&self, node: NodeId) -> Option<SiteId> {
        self.peers.get(&node).map(|p| p.site)
    }

    /// The digests `peer` may compare: of the trusted sites whose records it may see.
    fn trusted_digests(&self, peer: NodeId) -> Vec<(SiteId, u64)> {
        let Some(peer_site) = self.peer_site(peer) else {
            return Vec::new();
        };
        let mut sites = vec![self.trust.own];
        sites.extend(self.trust.partners.iter().copied());
        // Authors the peer may see nothing of are not named to it at all.
        sites.retain(|site| {
            self.relays_all_to(*site, peer_site)
                || self
                    .catalog
                    .by_author(*site)
                    .any(|record| self.relays_to(record, peer_site))
        });
        sites.truncate(DIGESTS_PER_MESSAGE_MAX);
        sites
            .into_iter()
            .map(|site| (site, self.digest_for(site, peer_site)))
            .collect()
    }

    pub(super) fn on_gossip(
        &mut self,
        from: NodeId,
        beats: Vec<Beat>,
        digests: Vec<(SiteId, u64)>,
        reply: bool,
        now_ms: u64,
    ) {
        self.merge_beats(&beats, now_ms);
        if reply {
            return;
        }
        let beats = self.beats_to_send(now_ms);
        self.send(
            from,
            Message::Gossip {
                beats,
                digests: Vec::new(),
                reply: true,
            },
        );
        let Some(from_site) = self.peer_site(from) else {
            return;
        };
        for (author, digest) in digests {
            let equal = self.digest_for(author, from_site) == digest;
            self.gc_heard_digest(from_site, author, equal);
            if self.trust.is_trusted(&author) && !equal {
                let mut entries: Vec<Entry> = self
                    .catalog
                    .by_author(author)
                    .filter(|record| self.relays_to(record, from_site))
                    .map(Entry::of)
                    .collect();
                entries.truncate(ENTRIES_PER_MESSAGE_MAX);
                self.send(from, Message::Entries { author, entries });
            }
        }
    }

    pub(super) fn on_entries(&mut self, from: NodeId, author: SiteId, entries: Vec<Entry>) {
        let Some(from_site) = self.peer_site(from) else {
            return;
        };
        if !self.trust.is_trusted(&author) {
            return;
        }
        let theirs: BTreeMap<(RecordKind, [u8; 32]), Entry> =
            entries.into_iter().map(|e| ((e.kind, e.key), e)).collect();
        let mut give: Vec<Record> = Vec::new();
        let mut want: Vec<(RecordKind, [u8; 32])> = Vec::new();
        for record in self.catalog.by_author(author) {
            if !self.relays_to(record, from_site) {
                continue;
            }
            match theirs.get(&(record.kind, record.key)) {
                Some(entry) if entry.beats(record) => {}
                Some(entry) if entry.version == record.version && Entry::of(record) == *entry => {}
                _ => give.push(record.clone()),
            }
        }
        for (key, entry) in &theirs {
            let ours = self.catalog.get(&RecordKey {
                author,
                kind: key.0,
                key: key.1,
            });
            if ours.is_none_or(|record| entry.beats(record)) {
                want.push(*key);
            }
        }
        self.send_records(from, give);
        if !want.is_empty() {
            self.send(from, Message::Want { author, keys: want });
        }
    }

    pub(super) fn on_want(
        &mut self,
        from: NodeId,
        author: SiteId,
        keys: Vec<(RecordKind, [u8; 32])>,
    ) {
        let Some(from_site) = self.peer_site(from) else {
            return;
        };
        if !self.trust.is_trusted(&author) {
            return;
        }
        let records: Vec<Record> = keys
            .into_iter()
            .filter_map(|(kind, key)| self.catalog.get(&RecordKey { author, kind, key }))
            .filter(|record| self.relays_to(record, from_site))
            .cloned()
            .collect();
        self.send_records(from, records);
    }

    fn send_records(&mut self, to: NodeId, mut records: Vec<Record>) {
        let Some(to_site) = self.peer_site(to) else {
            return;
        };
        records.retain(|record| self.relays_to(record, to_site));
        for batch in records.chunks(RECORDS_PER_MESSAGE_MAX) {
            self.send(
                to,
                Message::Records {
                    records: batch.to_vec(),
                },
            );
        }
    }
}

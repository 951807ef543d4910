//! Catalog anti-entropy: push-pull with one random peer per round, digests first.
//!
//! 1. The initiator sends `Gossip`: heartbeats and one digest per site it trusts.
//! 2. The responder answers with heartbeats, and for each author both trust whose digests
//!    differ, its `Entries` (kind, key, version, tag of each record).
//! 3. The initiator sends the `Records` the responder lacks or holds older, and a `Want`
//!    for those it lacks itself; the responder answers a `Want` with `Records`.
//!
//! A converged pair exchanges two small messages: heartbeats and a u64 per trusted site.

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
        let digests = self.trusted_digests();
        self.send(
            peer,
            Message::Gossip {
                beats,
                digests,
                reply: false,
            },
        );
    }

    fn trusted_digests(&self) -> Vec<(SiteId, u64)> {
        let mut sites = vec![self.trust.own];
        sites.extend(self.trust.partners.iter().copied());
        sites.extend(self.trust.vouched.iter().copied());
        sites.truncate(DIGESTS_PER_MESSAGE_MAX);
        sites
            .into_iter()
            .map(|site| (site, self.catalog.digest(&site)))
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
        for (author, digest) in digests {
            if self.trust.is_trusted(&author) && self.catalog.digest(&author) != digest {
                let mut entries = self.catalog.entries(author);
                entries.truncate(ENTRIES_PER_MESSAGE_MAX);
                self.send(from, Message::Entries { author, entries });
            }
        }
    }

    pub(super) fn on_entries(&mut self, from: NodeId, author: SiteId, entries: Vec<Entry>) {
        if !self.trust.is_trusted(&author) {
            return;
        }
        let theirs: BTreeMap<(RecordKind, [u8; 32]), Entry> =
            entries.into_iter().map(|e| ((e.kind, e.key), e)).collect();
        let mut give: Vec<Record> = Vec::new();
        let mut want: Vec<(RecordKind, [u8; 32])> = Vec::new();
        for record in self.catalog.by_author(author) {
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
        if !self.trust.is_trusted(&author) {
            return;
        }
        let records: Vec<Record> = keys
            .into_iter()
            .filter_map(|(kind, key)| self.catalog.get(&RecordKey { author, kind, key }).cloned())
            .collect();
        self.send_records(from, records);
    }

    fn send_records(&mut self, to: NodeId, records: Vec<Record>) {
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

//! The catalog: the set of signed records a node holds, merged as a CRDT. For each
//! (author, kind, key) the record that `supersedes` the others wins, so merging is
//! commutative, associative and idempotent, and every node that has seen the same records
//! holds the same catalog whatever the order they arrived in.
//!
//! Anti-entropy compares catalogs author by author: `digest(author)` is an XOR of hashes of
//! that author's records, kept up to date on every change, so two converged nodes prove it
//! by exchanging one u64 per author.
//!
//! Trust is read from the catalog itself (see `TrustSets`): which sites this site stores
//! for and which it revoked. Who may receive an author's records is the author's own
//! choice (`may_see`).

use std::collections::{BTreeMap, BTreeSet};

use crate::identity::SiteId;
use crate::record::{NodeCert, Record, RecordKind, TrustGrant, TrustView};

/// How many records one catalog holds; a gossip peer cannot grow it past this.
pub const CATALOG_RECORDS_MAX: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RecordKey {
    pub author: SiteId,
    pub kind: RecordKind,
    pub key: [u8; 32],
}

impl RecordKey {
    pub fn of(record: &Record) -> RecordKey {
        RecordKey {
            author: record.author,
            kind: record.kind,
            key: record.key,
        }
    }
}

/// What anti-entropy exchanges about one record before sending it: enough to tell which
/// side's copy wins without the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: RecordKind,
    pub key: [u8; 32],
    pub version: u64,
    /// The first bytes of the signature: breaks ties between two records of one version.
    pub tag: u64,
}

impl Entry {
    pub fn of(record: &Record) -> Entry {
        Entry {
            kind: record.kind,
            key: record.key,
            version: record.version,
            tag: signature_tag(&record.signature),
        }
    }

    /// True when a record with this entry would replace `record` (see `Record::supersedes`,
    /// which compares whole signatures; the tag decides all but 1 in 2^64 ties the same way).
    pub fn beats(&self, record: &Record) -> bool {
        (self.version, self.tag) > (record.version, signature_tag(&record.signature))
    }
}

fn signature_tag(signature: &[u8; 64]) -> u64 {
    u64::from_be_bytes(signature[..8].try_into().expect("8 bytes"))
}

fn record_hash(record: &Record) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&record.author.0);
    hasher.update(&[record.kind as u8]);
    hasher.update(&record.key);
    hasher.update(&record.version.to_le_bytes());
    hasher.update(&record.signature);
    u64::from_le_bytes(
        hasher.finalize().as_bytes()[..8]
            .try_into()
            .expect("8 bytes"),
    )
}

#[derive(Debug, PartialEq, Eq)]
pub enum Insert {
    /// The catalog had no record under this key.
    New,
    /// The record replaced an older one.
    Replaced,
    /// The catalog already had this record or a newer one; nothing changed.
    Stale,
    /// The catalog is full; nothing changed.
    Full,
}

#[derive(Clone, Debug, Default)]
pub struct Catalog {
    records: BTreeMap<RecordKey, Record>,
    digests: BTreeMap<SiteId, u64>,
    /// `digests` over Snapshot records only, tombstones included: garbage collection's
    /// basis (`crate::gc`), which ties a statement to every snapshot its signer knew.
    snapshot_digests: BTreeMap<SiteId, u64>,
    /// `digests` without the records only the author's own site sees (`site_private`):
    /// what a partner holding all it may have of an author compares, kept up to date so a
    /// converged round with a partner stays one u64 per author.
    shared_digests: BTreeMap<SiteId, u64>,
    /// Every TrustGrant record decoded, by (author, record key): trust is read from the
    /// grants on every gossip round and placement, far more often than they change.
    /// `None` for a body that does not decode. Mirrors `records` exactly.
    grants: BTreeMap<(SiteId, [u8; 32]), Option<TrustGrant>>,
}

/// Records no site but their author's may see: where its snapshots are.
pub fn site_private(kind: RecordKind) -> bool {
    kind == RecordKind::SnapshotCopies
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Merges one record, which the caller has validated.
    pub fn insert(&mut self, record: Record) -> Insert {
        let key = RecordKey::of(&record);
        let old_hash = match self.records.get(&key) {
            Some(old) if !record.supersedes(old) => return Insert::Stale,
            Some(old) => Some(record_hash(old)),
            None if self.records.len() >= CATALOG_RECORDS_MAX => return Insert::Full,
            None => None,
        };
        let change = old_hash.unwrap_or(0) ^ record_hash(&record);
        *self.digests.entry(record.author).or_insert(0) ^= change;
        if record.kind == RecordKind::Snapshot {
            *self.snapshot_digests.entry(record.author).or_insert(0) ^= change;
        }
        if !site_private(record.kind) {
            *self.shared_digests.entry(record.author).or_insert(0) ^= change;
        }
        if record.kind == RecordKind::TrustGrant {
            self.grants.insert(
                (record.author, record.key),
                TrustGrant::decode(&record.body).ok(),
            );
        }
        self.records.insert(key, record);
        if old_hash.is_some() {
            Insert::Replaced
        } else {
            Insert::New
        }
    }

    pub fn get(&self, key: &RecordKey) -> Option<&Record> {
        self.records.get(key)
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    pub fn by_author(&self, author: SiteId) -> impl Iterator<Item = &Record> {
        let lo = RecordKey {
            author,
            kind: RecordKind::NodeCert,
            key: [0; 32],
        };
        self.records
            .range(lo..)
            .take_while(move |(k, _)| k.author == author)
            .map(|(_, r)| r)
    }

    pub fn authors(&self) -> impl Iterator<Item = SiteId> + '_ {
        self.digests.keys().copied()
    }

    /// XOR of the hashes of `author`'s records; 0 when there are none.
    pub fn digest(&self, author: &SiteId) -> u64 {
        self.digests.get(author).copied().unwrap_or(0)
    }

    /// `digest` over `author`'s Snapshot records (kept and forgotten); 0 when there are
    /// none. Two nodes with equal snapshot digests know the same snapshots of `author`.
    pub fn snapshot_digest(&self, author: &SiteId) -> u64 {
        self.snapshot_digests.get(author).copied().unwrap_or(0)
    }

    /// `digest` over the records of `author` that sites other than its own may see.
    pub fn shared_digest(&self, author: &SiteId) -> u64 {
        self.shared_digests.get(author).copied().unwrap_or(0)
    }

    /// `digest` over the records of `author` that pass `keep`: what a peer that may see
    /// only those compares.
    pub fn digest_of(&self, author: SiteId, keep: impl Fn(&Record) -> bool) -> u64 {
        self.by_author(author)
            .filter(|r| keep(r))
            .fold(0, |digest, r| digest ^ record_hash(r))
    }

    pub fn entries(&self, author: SiteId) -> Vec<Entry> {
        self.by_author(author).map(Entry::of).collect()
    }

    /// Drops every record of `author` (a site no longer trusted); returns how many.
    pub fn remove_author(&mut self, author: SiteId) -> usize {
        let keys: Vec<RecordKey> = self.by_author(author).map(RecordKey::of).collect();
        for key in &keys {
            self.records.remove(key);
        }
        self.digests.remove(&author);
        self.snapshot_digests.remove(&author);
        self.shared_digests.remove(&author);
        let grant_keys: Vec<(SiteId, [u8; 32])> = self
            .grants
            .range((author, [0; 32])..=(author, [0xff; 32]))
            .map(|(key, _)| *key)
            .collect();
        for key in grant_keys {
            self.grants.remove(&key);
        }
        keys.len()
    }

    pub fn grant(&self, author: SiteId, grantee: SiteId) -> Option<TrustGrant> {
        let grant = self.grants.get(&(author, grantee.0))?.clone();
        debug_assert_eq!(
            grant,
            self.records
                .get(&RecordKey {
                    author,
                    kind: RecordKind::TrustGrant,
                    key: grantee.0,
                })
                .and_then(|r| TrustGrant::decode(&r.body).ok()),
            "the decoded grants mirror the records"
        );
        grant
    }

    /// `author`'s grants in record key order.
    pub fn grants_by(&self, author: SiteId) -> impl Iterator<Item = TrustGrant> + '_ {
        self.grants
            .range((author, [0; 32])..=(author, [0xff; 32]))
            .filter_map(|(_, grant)| grant.clone())
    }

    pub fn node_certs(&self) -> impl Iterator<Item = NodeCert> + '_ {
        self.records
            .values()
            .filter(|r| r.kind == RecordKind::NodeCert)
            .filter_map(|r| NodeCert::decode(&r.body).ok())
    }

    /// Who this site trusts, read from its own grants alone: a site this site stores for
    /// is a partner, a site it revoked is not. A partner's partners are not trusted: only
    /// this site's own grants decide who may connect to its nodes and whose records they
    /// keep (a site D that only our partner C trusts is refused).
    pub fn trust(&self, own: SiteId) -> TrustSets {
        let mut partners = BTreeSet::new();
        let mut revoked = BTreeSet::new();
        for grant in self.grants_by(own) {
            if grant.revoked {
                revoked.insert(grant.grantee);
            } else {
                partners.insert(grant.grantee);
            }
        }
        TrustSets {
            own,
            partners,
            revoked,
        }
    }

    /// True when `site` may receive `author`'s records: the author's own site, and the
    /// sites the author stores for (its partners, by its own grant). The author decides
    /// who sees its records, whichever node relays them. See `may_see_record` for the one
    /// record a site may see beyond that.
    pub fn may_see(&self, author: SiteId, site: SiteId) -> bool {
        site == author || self.grant(author, site).is_some_and(|g| !g.revoked)
    }

    /// `may_see` for one record, plus the grant that names `site`: a site learns what
    /// another site granted it (a quota, or a revocation), so both sides agree on whether
    /// it stores for the author. No other record of a site goes to a site it never
    /// trusted. Where a site's snapshots are (`SnapshotCopies`) is for its own nodes only.
    pub fn may_see_record(&self, record: &Record, site: SiteId) -> bool {
        if site_private(record.kind) {
            return site == record.author;
        }
        self.may_see(record.author, site)
            || (record.kind == RecordKind::TrustGrant && record.key == site.0)
    }

    /// The sites that may hold `owner`'s chunks, with the quota each grants it: the owner
    /// itself (unbounded) and every site that grants it storage and that the owner has
    /// not revoked. Both sides must agree: a stranger cannot join an owner's placement by
    /// granting it storage.
    pub fn storers_for(&self, owner: SiteId) -> Vec<(SiteId, u64)> {
        let mut out = vec![(owner, u64::MAX)];
        for grant in self.grants_by(owner) {
            if grant.revoked {
                continue;
            }
            if let Some(back) = self.grant(grant.grantee, owner) {
                if !back.revoked && back.quota_bytes > 0 {
                    out.push((grant.grantee, back.quota_bytes));
                }
            }
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustSets {
    pub own: SiteId,
    pub partners: BTreeSet<SiteId>,
    pub revoked: BTreeSet<SiteId>,
}

impl TrustView for TrustSets {
    fn is_trusted(&self, site: &SiteId) -> bool {
        *site == self.own || self.partners.contains(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    fn key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    fn grant(author: u8, grantee: u8, version: u64, quota: u64, revoked: bool) -> Record {
        let grantee = SiteId(key(grantee).verifying_key().to_bytes());
        let body = TrustGrant {
            grantee,
            quota_bytes: quota,
            revoked,
        }
        .encode();
        Record::sign(
            &key(author),
            RecordKind::TrustGrant,
            grantee.0,
            version,
            body,
        )
    }

    fn site(i: u8) -> SiteId {
        SiteId(key(i).verifying_key().to_bytes())
    }

    #[test]
    fn where_a_sites_snapshots_are_is_for_its_own_nodes_and_not_in_partner_digests() {
        let body = crate::record::SnapshotCopies {
            acknowledged_unix_ms: 1,
            replication_target: 2,
            chunks: 3,
            sites: vec![],
        }
        .encode();
        let copies = Record::sign(&key(1), RecordKind::SnapshotCopies, [4; 32], 1, body);
        let mut catalog = merged(&[grant(1, 2, 1, 10, false), grant(2, 1, 1, 10, false)]);
        let shared_before = catalog.shared_digest(&site(1));
        assert_eq!(shared_before, catalog.digest(&site(1)));
        catalog.insert(copies.clone());
        assert!(catalog.may_see_record(&copies, site(1)));
        assert!(!catalog.may_see_record(&copies, site(2)), "a partner");
        assert!(catalog.may_see(site(1), site(2)));
        // A partner holding every other record of site 1 compares equal.
        assert_eq!(catalog.shared_digest(&site(1)), shared_before);
        assert_ne!(catalog.digest(&site(1)), shared_before);
        catalog.remove_author(site(1));
        assert_eq!(catalog.shared_digest(&site(1)), 0);
    }

    fn merged(records: &[Record]) -> Catalog {
        let mut catalog = Catalog::default();
        for r in records {
            catalog.insert(r.clone());
        }
        catalog
    }

    /// A snapshot record of `author` under key `snap`, or its tombstone.
    fn snapshot(author: u8, snap: u8, version: u64, forgotten: bool) -> Record {
        let (version, body) = if forgotten {
            let body = crate::record::Tombstone {
                forgotten_unix_ms: u64::from(snap),
            };
            (crate::record::TOMBSTONE_VERSION, body.encode())
        } else {
            (version, vec![snap; 8])
        };
        Record::sign(
            &key(author),
            RecordKind::Snapshot,
            [snap; 32],
            version,
            body,
        )
    }

    type Summary = (Vec<Record>, Vec<(SiteId, u64, u64)>);

    fn summary(c: &Catalog) -> Summary {
        (
            c.records().cloned().collect(),
            c.authors()
                .map(|a| (a, c.digest(&a), c.snapshot_digest(&a)))
                .collect(),
        )
    }

    fn arb_records() -> impl Strategy<Value = Vec<Record>> {
        let grants =
            prop::collection::vec((1u8..4, 1u8..4, 1u64..4, 0u64..3, any::<bool>()), 0..12)
                .prop_map(|xs| {
                    xs.into_iter()
                        .filter(|(a, b, ..)| a != b)
                        .map(|(a, b, v, q, r)| grant(a, b, v, q, r))
                        .collect::<Vec<_>>()
                });
        let snapshots = prop::collection::vec((1u8..4, 1u8..4, 1u64..4, any::<bool>()), 0..8)
            .prop_map(|xs| {
                xs.into_iter()
                    .map(|(a, k, v, t)| snapshot(a, k, v, t))
                    .collect::<Vec<_>>()
            });
        (grants, snapshots).prop_map(|(mut g, s)| {
            g.extend(s);
            g
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn merge_is_commutative_associative_idempotent(
            a in arb_records(), b in arb_records(), c in arb_records()
        ) {
            let ab: Vec<Record> = a.iter().chain(&b).cloned().collect();
            let ba: Vec<Record> = b.iter().chain(&a).cloned().collect();
            prop_assert_eq!(summary(&merged(&ab)), summary(&merged(&ba)));
            let ab_c: Vec<Record> = ab.iter().chain(&c).cloned().collect();
            let bc: Vec<Record> = b.iter().chain(&c).cloned().collect();
            let a_bc: Vec<Record> = a.iter().chain(&bc).cloned().collect();
            prop_assert_eq!(summary(&merged(&ab_c)), summary(&merged(&a_bc)));
            let aa: Vec<Record> = a.iter().chain(&a).cloned().collect();
            prop_assert_eq!(summary(&merged(&aa)), summary(&merged(&a)));
            // The digest is exactly a function of the merged contents.
            let rebuilt = merged(&merged(&ab).records().cloned().collect::<Vec<_>>());
            prop_assert_eq!(summary(&rebuilt), summary(&merged(&ab)));
            // The snapshot digest is the digest over Snapshot records alone.
            let c_ab = merged(&ab);
            for author in c_ab.authors() {
                prop_assert_eq!(
                    c_ab.snapshot_digest(&author),
                    c_ab.digest_of(author, |r| r.kind == RecordKind::Snapshot)
                );
            }
        }
    }

    #[test]
    fn the_snapshot_digest_moves_with_snapshots_and_tombstones_only() {
        let mut catalog = merged(&[grant(1, 2, 1, 10, false)]);
        assert_eq!(catalog.snapshot_digest(&site(1)), 0);
        catalog.insert(snapshot(1, 7, 1, false));
        let one = catalog.snapshot_digest(&site(1));
        assert_ne!(one, 0);
        catalog.insert(grant(1, 2, 2, 20, false));
        assert_eq!(
            catalog.snapshot_digest(&site(1)),
            one,
            "a grant does not move it"
        );
        catalog.insert(snapshot(1, 7, 0, true));
        assert_ne!(catalog.snapshot_digest(&site(1)), one, "a tombstone does");
        assert_eq!(catalog.insert(snapshot(1, 7, 1, false)), Insert::Stale);
        catalog.remove_author(site(1));
        assert_eq!(catalog.snapshot_digest(&site(1)), 0);
    }

    #[test]
    fn revocation_wins_and_changes_trust() {
        let mut catalog = merged(&[grant(1, 2, 1, 10, false), grant(2, 3, 1, 10, false)]);
        let trust = catalog.trust(site(1));
        assert!(trust.partners.contains(&site(2)));
        assert!(
            !trust.is_trusted(&site(3)),
            "a partner's partner is not trusted"
        );
        assert_eq!(catalog.insert(grant(1, 2, 2, 0, true)), Insert::Replaced);
        assert_eq!(catalog.insert(grant(1, 2, 1, 50, false)), Insert::Stale);
        let trust = catalog.trust(site(1));
        assert!(trust.revoked.contains(&site(2)));
        assert!(!trust.is_trusted(&site(2)));
    }

    #[test]
    fn an_authors_records_are_seen_by_its_partners_only() {
        // 1 and 2 are partners, 2 and 3 are partners; 1 never trusted 3.
        let catalog = merged(&[
            grant(1, 2, 1, 10, false),
            grant(2, 1, 1, 10, false),
            grant(2, 3, 1, 10, false),
            grant(3, 2, 1, 10, false),
        ]);
        assert!(catalog.may_see(site(1), site(1)));
        assert!(catalog.may_see(site(1), site(2)));
        assert!(
            !catalog.may_see(site(1), site(3)),
            "1's records never reach 3"
        );
        assert!(catalog.may_see(site(2), site(3)));
        let one_to_two = grant(1, 2, 1, 10, false);
        assert!(!catalog.may_see_record(&one_to_two, site(3)));
        // A grant naming a site reaches it, even once revoked.
        let revoked = merged(&[grant(1, 2, 2, 0, true)]);
        assert!(!revoked.may_see(site(1), site(2)));
        assert!(revoked.may_see_record(&grant(1, 2, 2, 0, true), site(2)));
    }

    #[test]
    fn storers_need_both_sides() {
        let catalog = merged(&[
            grant(2, 1, 1, 500, false),
            grant(3, 1, 1, 700, false),
            grant(1, 2, 1, 0, false),
        ]);
        // Site 3 offers storage but site 1 never accepted it.
        assert_eq!(
            catalog.storers_for(site(1)),
            vec![(site(1), u64::MAX), (site(2), 500)]
        );
    }
}

//! Signed records: the facts sites state about themselves and each other, and what the
//! catalog gossip of the mesh will carry. Every record has one canonical encoding, and its
//! signature covers all of it but the signature.
//!
//! Record format, version 1:
//!
//! ```text
//! u8 RECORD_VERSION | [32] author site id | u8 kind | [32] key | u64 version
//! | u32 body length | body | [64] ed25519 signature
//! ```
//!
//! The signature is over `SIGNING_CONTEXT` followed by every byte before the signature.
//! For one (author, kind, key) the record with the highest version wins; a revocation is a
//! trust grant with `revoked` set at a higher version, so it wins over every older grant.

use ed25519_dalek::SigningKey;
use thiserror::Error;

use crate::codec::{DecodeError, Reader, Writer};
use crate::identity::{sign, NodeId, SiteId};

pub const RECORD_VERSION: u8 = 1;
pub const RECORD_BODY_BYTES_MAX: u32 = 16 << 10;
pub const ADDRESSES_MAX: usize = 16;
pub const ADDRESS_BYTES_MAX: usize = 256;
/// Site and node names: what a person recognises, bounded like everything else.
pub const NAME_BYTES_MAX: usize = 64;
const SIGNING_CONTEXT: &[u8] = b"cairn 2026-11 record v1\0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    /// "node N belongs to site S", with its name, address hints and offered capacity.
    /// Key: node id.
    NodeCert = 1,
    /// "site A stores data for site B up to Q bytes" (or revokes that). Key: B's site id.
    TrustGrant = 2,
    /// The site and vault keys, sealed under the recovery key. Key: all zeros.
    WrappedKeys = 3,
    /// A snapshot of one of the author's images, sealed with its vault key so only the
    /// site can read it; partners carry it so a recovered site can find its snapshots.
    /// Key: the snapshot id, zero-padded.
    Snapshot = 4,
    /// What the site's garbage collection asks holders to delete (`crate::gc`): the
    /// batches of chunk ids in force and the snapshot digest they were computed from.
    /// Key: all zeros (one per site).
    GcStatement = 5,
    /// Where a snapshot's chunks were when the node that made it saw every one at R sites
    /// (`SnapshotCopies`), so the site's other nodes can show it. Only the author's own
    /// site sees it (`Catalog::may_see_record`). Key: the snapshot's record key.
    SnapshotCopies = 6,
}

impl RecordKind {
    pub fn from_u8(value: u8) -> Option<RecordKind> {
        match value {
            1 => Some(RecordKind::NodeCert),
            2 => Some(RecordKind::TrustGrant),
            3 => Some(RecordKind::WrappedKeys),
            4 => Some(RecordKind::Snapshot),
            5 => Some(RecordKind::GcStatement),
            6 => Some(RecordKind::SnapshotCopies),
            _ => None,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("malformed record")]
    Decode(#[from] DecodeError),
    #[error("record signature does not verify: forged or altered")]
    BadSignature,
    #[error("record from site {0}, which no one here trusts")]
    UntrustedAuthor(SiteId),
    #[error("record not allowed: {0}")]
    NotAllowed(String),
    #[error("bad address hints: {0}")]
    BadAddresses(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub author: SiteId,
    pub kind: RecordKind,
    pub key: [u8; 32],
    pub version: u64,
    pub body: Vec<u8>,
    pub signature: [u8; 64],
}

impl Record {
    /// Signs a record with the site key of its author.
    pub fn sign(
        site_key: &SigningKey,
        kind: RecordKind,
        key: [u8; 32],
        version: u64,
        body: Vec<u8>,
    ) -> Record {
        assert!(
            body.len() <= RECORD_BODY_BYTES_MAX as usize,
            "callers bound record bodies"
        );
        let mut record = Record {
            author: SiteId(site_key.verifying_key().to_bytes()),
            kind,
            key,
            version,
            body,
            signature: [0; 64],
        };
        record.signature = sign(
            site_key,
            SIGNING_CONTEXT,
            &record.unsigned_encoding().finish(),
        );
        record
    }

    fn unsigned_encoding(&self) -> Writer {
        let mut w = Writer::with_capacity(150 + self.body.len());
        w.u8(RECORD_VERSION);
        w.array(&self.author.0);
        w.u8(self.kind as u8);
        w.array(&self.key);
        w.u64(self.version);
        w.u32(self.body.len() as u32);
        w.array(&self.body);
        w
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = self.unsigned_encoding();
        w.array(&self.signature);
        let bytes = w.finish();
        debug_assert_eq!(Record::decode(&bytes).as_ref(), Ok(self));
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("record", RECORD_VERSION)?;
        let author = SiteId(r.array()?);
        let kind_byte = r.u8()?;
        let kind = RecordKind::from_u8(kind_byte).ok_or(DecodeError::Invalid {
            what: "record kind",
            why: format!("unknown kind {kind_byte}"),
        })?;
        let key = r.array()?;
        let version = r.u64()?;
        let n_body = r.u32()?;
        if n_body > RECORD_BODY_BYTES_MAX {
            return Err(DecodeError::TooMany {
                what: "record body bytes",
                count: u64::from(n_body),
                max: u64::from(RECORD_BODY_BYTES_MAX),
            });
        }
        let body = r.take(n_body as usize)?.to_vec();
        let signature = r.array()?;
        r.finish()?;
        Ok(Record {
            author,
            kind,
            key,
            version,
            body,
            signature,
        })
    }

    pub fn verify_signature(&self) -> Result<(), RecordError> {
        let message = self.unsigned_encoding().finish();
        if self
            .author
            .verifies(SIGNING_CONTEXT, &message, &self.signature)
        {
            Ok(())
        } else {
            Err(RecordError::BadSignature)
        }
    }

    /// True for a forgotten snapshot's record: a Snapshot record at [`TOMBSTONE_VERSION`].
    /// `validate` lets that version mean nothing else.
    pub fn is_tombstone(&self) -> bool {
        self.kind == RecordKind::Snapshot && self.version == TOMBSTONE_VERSION
    }

    /// True when `self` replaces `other` for the same (author, kind, key): a higher
    /// version, or the same version and the larger signature, so every node picks the
    /// same winner.
    pub fn supersedes(&self, other: &Record) -> bool {
        debug_assert_eq!(
            (self.author, self.kind, self.key),
            (other.author, other.kind, other.key)
        );
        (self.version, self.signature) > (other.version, other.signature)
    }
}

/// What a validator needs to know about trust.
pub trait TrustView {
    fn is_trusted(&self, site: &SiteId) -> bool;
}

/// Checks a record before it changes anything: signature, a trusted author, and a body
/// that decodes and is allowed for its kind and key.
pub fn validate(record: &Record, trust: &impl TrustView) -> Result<(), RecordError> {
    record.verify_signature()?;
    validate_signed(record, trust)
}

/// `validate` for a record whose signature is already known good.
fn validate_signed(record: &Record, trust: &impl TrustView) -> Result<(), RecordError> {
    if !trust.is_trusted(&record.author) {
        return Err(RecordError::UntrustedAuthor(record.author));
    }
    match record.kind {
        RecordKind::NodeCert => {
            let cert = NodeCert::decode(&record.body)?;
            if cert.site != record.author {
                return Err(RecordError::NotAllowed(
                    "a site may only certify its own nodes".into(),
                ));
            }
            if cert.node.0 != record.key {
                return Err(RecordError::NotAllowed(
                    "node certificate stored under another node's key".into(),
                ));
            }
        }
        RecordKind::TrustGrant => {
            let grant = TrustGrant::decode(&record.body)?;
            if grant.grantee == record.author {
                return Err(RecordError::NotAllowed(
                    "a site cannot grant trust to itself".into(),
                ));
            }
            if grant.grantee.0 != record.key {
                return Err(RecordError::NotAllowed(
                    "trust grant stored under another site's key".into(),
                ));
            }
        }
        RecordKind::WrappedKeys => {
            crate::wrap::WrappedKeys::decode(&record.body)?;
            if record.key != [0; 32] {
                return Err(RecordError::NotAllowed(
                    "wrapped keys must use the all-zero key".into(),
                ));
            }
        }
        // Sealed: only the author's site can check a live record's body; its size is
        // bounded above. A tombstone's body is plain and must decode.
        RecordKind::Snapshot => {
            if record.version == TOMBSTONE_VERSION {
                Tombstone::decode(&record.body)?;
            }
        }
        RecordKind::GcStatement => {
            crate::gc::GcStatement::decode(&record.body)?;
            if record.key != [0; 32] {
                return Err(RecordError::NotAllowed(
                    "a gc statement must use the all-zero key".into(),
                ));
            }
        }
        RecordKind::SnapshotCopies => {
            SnapshotCopies::decode(&record.body)?;
        }
    }
    Ok(())
}

/// The version of a forgotten snapshot's record. `supersedes` compares versions first, so
/// nothing but another tombstone of the same key can replace it: a replayed record or an
/// old disk's copy of the live snapshot is stale wherever the tombstone is known.
pub const TOMBSTONE_VERSION: u64 = u64::MAX;

const TOMBSTONE_FORMAT: u8 = 1;

/// The body of a tombstone: when the owner forgot the snapshot. Plain, so partners that
/// cannot read the sealed snapshot can still tell it is gone and replace its body with
/// this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub forgotten_unix_ms: u64,
}

impl Tombstone {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(9);
        w.u8(TOMBSTONE_FORMAT);
        w.u64(self.forgotten_unix_ms);
        w.finish()
    }

    pub fn decode(bytes: &[u8]) -> Result<Tombstone, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("tombstone", TOMBSTONE_FORMAT)?;
        let forgotten_unix_ms = r.u64()?;
        r.finish()?;
        Ok(Tombstone { forgotten_unix_ms })
    }
}

/// Records a `RecordVerifier` remembers having verified.
pub const VERIFIED_RECORDS_MAX: usize = 4096;

/// `verify_signature` and `validate` for a node that sees the same records again and
/// again (relayed by every peer, presented at every reconnect): it remembers the last
/// `VERIFIED_RECORDS_MAX` records whose signature held, by a hash over every signed byte
/// and the signature. The other checks are cheap and run every time, against the trust
/// of the moment.
pub struct RecordVerifier {
    verified: crate::memo::VerifiedMemo,
}

impl Default for RecordVerifier {
    fn default() -> RecordVerifier {
        RecordVerifier {
            verified: crate::memo::VerifiedMemo::remembering(VERIFIED_RECORDS_MAX),
        }
    }
}

impl RecordVerifier {
    /// The same answer as `record.verify_signature()`, usually faster.
    pub fn verify_signature(&mut self, record: &Record) -> Result<(), RecordError> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&record.unsigned_encoding().finish());
        hasher.update(&record.signature);
        let digest = *hasher.finalize().as_bytes();
        if self.verified.contains(&digest) {
            return Ok(());
        }
        record.verify_signature()?;
        self.verified.insert(digest);
        Ok(())
    }

    /// The same answer as `validate`, usually faster.
    pub fn validate(&mut self, record: &Record, trust: &impl TrustView) -> Result<(), RecordError> {
        self.verify_signature(record)?;
        validate_signed(record, trust)
    }
}

/// Checks an address list against the limits its encoding enforces, so input from a
/// person is refused with a message instead of tripping the encoder's assertion.
pub fn check_addresses(addresses: &[String]) -> Result<(), RecordError> {
    if addresses.len() > ADDRESSES_MAX {
        return Err(RecordError::BadAddresses(format!(
            "{} given, at most {ADDRESSES_MAX}",
            addresses.len()
        )));
    }
    match addresses
        .iter()
        .find(|a| a.is_empty() || a.len() > ADDRESS_BYTES_MAX || a.chars().any(char::is_control))
    {
        Some(bad) => Err(RecordError::BadAddresses(format!(
            "address {bad:?} must be 1 to {ADDRESS_BYTES_MAX} printable bytes"
        ))),
        None => Ok(()),
    }
}

/// True for a name a site or node may have: 1 to `NAME_BYTES_MAX` bytes, no control
/// characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= NAME_BYTES_MAX && !name.chars().any(char::is_control)
}

pub(crate) fn put_name(w: &mut Writer, name: &str) {
    assert!(is_valid_name(name), "callers check names");
    w.short_bytes(name.as_bytes());
}

pub(crate) fn get_name(r: &mut Reader<'_>, what: &'static str) -> Result<String, DecodeError> {
    let bytes = r.short_bytes()?;
    let name = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
        what,
        why: "not UTF-8".into(),
    })?;
    if !is_valid_name(name) {
        return Err(DecodeError::Invalid {
            what,
            why: format!("must be 1 to {NAME_BYTES_MAX} printable bytes"),
        });
    }
    Ok(name.to_owned())
}

pub(crate) fn put_addresses(w: &mut Writer, addresses: &[String]) {
    assert!(
        addresses.len() <= ADDRESSES_MAX,
        "callers bound address lists"
    );
    w.u8(addresses.len() as u8);
    for address in addresses {
        assert!(
            address.len() <= ADDRESS_BYTES_MAX,
            "callers bound addresses"
        );
        w.short_bytes(address.as_bytes());
    }
}

pub(crate) fn get_addresses(r: &mut Reader<'_>) -> Result<Vec<String>, DecodeError> {
    let n = usize::from(r.u8()?);
    if n > ADDRESSES_MAX {
        return Err(DecodeError::TooMany {
            what: "addresses",
            count: n as u64,
            max: ADDRESSES_MAX as u64,
        });
    }
    let mut addresses = Vec::with_capacity(n);
    for _ in 0..n {
        let bytes = r.short_bytes()?;
        if bytes.len() > ADDRESS_BYTES_MAX {
            return Err(DecodeError::Invalid {
                what: "address",
                why: "too long".into(),
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
            what: "address",
            why: "not UTF-8".into(),
        })?;
        addresses.push(text.to_owned());
    }
    Ok(addresses)
}

/// Body of a `NodeCert` record:
///
/// ```text
/// [32] node id | [32] site id | u16 + name | addresses (u8 count, u16 + each)
/// | u64 capacity offered (bytes; 0 = not stated)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCert {
    pub node: NodeId,
    pub site: SiteId,
    /// What people call the machine, e.g. "front desk PC".
    pub name: String,
    pub addresses: Vec<String>,
    pub capacity_bytes: u64,
}

impl NodeCert {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.array(&self.node.0);
        w.array(&self.site.0);
        put_name(&mut w, &self.name);
        put_addresses(&mut w, &self.addresses);
        w.u64(self.capacity_bytes);
        w.finish()
    }
    pub fn decode(bytes: &[u8]) -> Result<NodeCert, DecodeError> {
        let mut r = Reader::new(bytes);
        let cert = NodeCert {
            node: NodeId(r.array()?),
            site: SiteId(r.array()?),
            name: get_name(&mut r, "node name")?,
            addresses: get_addresses(&mut r)?,
            capacity_bytes: r.u64()?,
        };
        r.finish()?;
        Ok(cert)
    }
}

/// Body of a `TrustGrant` record: the author stores for `grantee` up to `quota_bytes`,
/// unless `revoked`.
///
/// ```text
/// [32] grantee | u64 quota | u8 revoked | optional: u16 + the grantee's name
/// ```
///
/// The name is what the author calls the grantee (learnt from its invite, or from its
/// completion), so every node of the author's site names the partner alike, also one
/// that joined the site after the partner was added. Grants signed before it existed end
/// after `revoked`; a build from before it refuses a grant that carries one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustGrant {
    pub grantee: SiteId,
    pub quota_bytes: u64,
    pub revoked: bool,
}

impl TrustGrant {
    pub fn encode(&self) -> Vec<u8> {
        self.writer().finish()
    }

    /// `encode`, with the grantee's name after the grant (left out when it is not a
    /// valid name).
    pub fn encode_named(&self, grantee_name: &str) -> Vec<u8> {
        let mut w = self.writer();
        if is_valid_name(grantee_name) {
            put_name(&mut w, grantee_name);
        }
        w.finish()
    }

    fn writer(&self) -> Writer {
        let mut w = Writer::default();
        w.array(&self.grantee.0);
        w.u64(self.quota_bytes);
        w.u8(u8::from(self.revoked));
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<TrustGrant, DecodeError> {
        Ok(TrustGrant::decode_named(bytes)?.0)
    }

    /// The grant and the grantee's name, when the grant carries one.
    pub fn decode_named(bytes: &[u8]) -> Result<(TrustGrant, Option<String>), DecodeError> {
        let mut r = Reader::new(bytes);
        let grantee = SiteId(r.array()?);
        let quota_bytes = r.u64()?;
        let revoked = match r.u8()? {
            0 => false,
            1 => true,
            other => {
                return Err(DecodeError::Invalid {
                    what: "trust grant",
                    why: format!("revoked flag {other}"),
                })
            }
        };
        let name = if r.remaining() > 0 {
            Some(get_name(&mut r, "partner name")?)
        } else {
            None
        };
        r.finish()?;
        let grant = TrustGrant {
            grantee,
            quota_bytes,
            revoked,
        };
        Ok((grant, name))
    }
}

/// Sites one `SnapshotCopies` record names (R is rarely past 5).
pub const SNAPSHOT_COPIES_SITES_MAX: usize = 64;
const SNAPSHOT_COPIES_FORMAT: u8 = 1;

/// Body of a `SnapshotCopies` record: when the node that made a snapshot saw each of its
/// `chunks` at `replication_target` sites or more, and how many of them, of how many
/// sealed bytes, each site held then.
///
/// ```text
/// u8 format (1) | u64 acknowledged at (unix ms) | u32 R | u64 chunks
/// | u8 count, then per site: [32] site id | u64 chunks | u64 bytes
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotCopies {
    pub acknowledged_unix_ms: u64,
    pub replication_target: u32,
    pub chunks: u64,
    pub sites: Vec<SiteCopyCount>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteCopyCount {
    pub site: SiteId,
    pub chunks: u64,
    pub bytes: u64,
}

impl SnapshotCopies {
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.sites.len() <= SNAPSHOT_COPIES_SITES_MAX,
            "callers bound the sites"
        );
        let mut w = Writer::default();
        w.u8(SNAPSHOT_COPIES_FORMAT);
        w.u64(self.acknowledged_unix_ms);
        w.u32(self.replication_target);
        w.u64(self.chunks);
        w.u8(self.sites.len() as u8);
        for site in &self.sites {
            w.array(&site.site.0);
            w.u64(site.chunks);
            w.u64(site.bytes);
        }
        let bytes = w.finish();
        debug_assert_eq!(SnapshotCopies::decode(&bytes).as_ref(), Ok(self));
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<SnapshotCopies, DecodeError> {
        let mut r = Reader::new(bytes);
        r.version("snapshot copies", SNAPSHOT_COPIES_FORMAT)?;
        let acknowledged_unix_ms = r.u64()?;
        let replication_target = r.u32()?;
        let chunks = r.u64()?;
        let n_sites = usize::from(r.u8()?);
        if n_sites > SNAPSHOT_COPIES_SITES_MAX {
            return Err(DecodeError::TooMany {
                what: "sites in snapshot copies",
                count: n_sites as u64,
                max: SNAPSHOT_COPIES_SITES_MAX as u64,
            });
        }
        let mut sites = Vec::with_capacity(n_sites);
        for _ in 0..n_sites {
            sites.push(SiteCopyCount {
                site: SiteId(r.array()?),
                chunks: r.u64()?,
                bytes: r.u64()?,
            });
        }
        r.finish()?;
        Ok(SnapshotCopies {
            acknowledged_unix_ms,
            replication_target,
            chunks,
            sites,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct TrustAll;
    impl TrustView for TrustAll {
        fn is_trusted(&self, _: &SiteId) -> bool {
            true
        }
    }
    struct TrustNone;
    impl TrustView for TrustNone {
        fn is_trusted(&self, _: &SiteId) -> bool {
            false
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_tombstone_beats_every_version_of_its_snapshot_and_means_only_forgotten() {
        let site = key(7);
        let snapshot = [9; 32];
        let live =
            |version| Record::sign(&site, RecordKind::Snapshot, snapshot, version, vec![1; 40]);
        let body = Tombstone {
            forgotten_unix_ms: 1_714_521_600_000,
        }
        .encode();
        let tombstone = Record::sign(
            &site,
            RecordKind::Snapshot,
            snapshot,
            TOMBSTONE_VERSION,
            body.clone(),
        );
        assert!(tombstone.is_tombstone());
        assert_eq!(validate(&tombstone, &TrustAll), Ok(()));
        assert_eq!(
            Tombstone::decode(&tombstone.body)
                .unwrap()
                .forgotten_unix_ms,
            1_714_521_600_000
        );
        for version in [1, 2, u64::MAX - 1] {
            assert!(!live(version).is_tombstone());
            assert!(tombstone.supersedes(&live(version)));
            assert!(!live(version).supersedes(&tombstone));
        }
        // At the tombstone's version a sealed body is refused: u64::MAX means forgotten.
        let sealed_at_max = live(TOMBSTONE_VERSION);
        assert!(matches!(
            validate(&sealed_at_max, &TrustAll),
            Err(RecordError::Decode(_))
        ));
        let mut trailing = body;
        trailing.push(0);
        let padded = Record::sign(
            &site,
            RecordKind::Snapshot,
            snapshot,
            TOMBSTONE_VERSION,
            trailing,
        );
        assert!(validate(&padded, &TrustAll).is_err());
        // Other kinds are not tombstones at any version.
        let keys = Record::sign(
            &site,
            RecordKind::WrappedKeys,
            [0; 32],
            TOMBSTONE_VERSION,
            vec![],
        );
        assert!(!keys.is_tombstone());
    }

    fn grant(
        author: &SigningKey,
        grantee: SiteId,
        version: u64,
        quota_bytes: u64,
        revoked: bool,
    ) -> Record {
        let body = TrustGrant {
            grantee,
            quota_bytes,
            revoked,
        }
        .encode();
        Record::sign(author, RecordKind::TrustGrant, grantee.0, version, body)
    }

    fn site(key: &SigningKey) -> SiteId {
        SiteId(key.verifying_key().to_bytes())
    }

    #[test]
    fn a_grant_carries_the_partners_name_and_one_without_still_reads() {
        let grant = TrustGrant {
            grantee: SiteId([3; 32]),
            quota_bytes: 5 << 30,
            revoked: false,
        };
        let old = grant.encode();
        assert_eq!(TrustGrant::decode_named(&old), Ok((grant.clone(), None)));
        let named = grant.encode_named("Smith IT");
        assert_eq!(
            TrustGrant::decode_named(&named),
            Ok((grant.clone(), Some("Smith IT".into())))
        );
        assert_eq!(TrustGrant::decode(&named), Ok(grant.clone()));
        // Not a name: left out rather than signed.
        assert_eq!(grant.encode_named("bad\nname"), old);
        let record = Record::sign(&key(1), RecordKind::TrustGrant, [3; 32], 1, named.clone());
        assert_eq!(validate(&record, &TrustAll), Ok(()));
        let mut garbage = named;
        garbage.push(0);
        assert!(TrustGrant::decode_named(&garbage).is_err());
    }

    proptest! {
        #[test]
        fn snapshot_copies_round_trip(at: u64, r: u32, chunks: u64, n_sites in 0usize..8, seed: u8) {
            let copies = SnapshotCopies {
                acknowledged_unix_ms: at,
                replication_target: r,
                chunks,
                sites: (0..n_sites)
                    .map(|i| SiteCopyCount {
                        site: SiteId([seed.wrapping_add(i as u8); 32]),
                        chunks: chunks / (i as u64 + 1),
                        bytes: at / (i as u64 + 1),
                    })
                    .collect(),
            };
            let bytes = copies.encode();
            prop_assert_eq!(SnapshotCopies::decode(&bytes), Ok(copies.clone()));
            let record = Record::sign(&key(seed), RecordKind::SnapshotCopies, [seed; 32], 1, bytes.clone());
            prop_assert!(validate(&record, &TrustAll).is_ok());
            let truncated = Record::sign(&key(seed), RecordKind::SnapshotCopies, [seed; 32], 1, bytes[..bytes.len() - 1].to_vec());
            prop_assert!(validate(&truncated, &TrustAll).is_err());
        }

        #[test]
        fn records_round_trip_and_verify(version: u64, quota: u64, revoked: bool, seed: u8) {
            let record = grant(&key(seed), site(&key(seed.wrapping_add(1))), version, quota, revoked);
            let decoded = Record::decode(&record.encode()).unwrap();
            prop_assert_eq!(&decoded, &record);
            prop_assert!(validate(&decoded, &TrustAll).is_ok());
        }

        #[test]
        fn any_flipped_bit_is_rejected(bit: usize, seed: u8) {
            let record = grant(&key(seed), site(&key(seed.wrapping_add(1))), 3, 500 << 30, false);
            let mut bytes = record.encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let accepted = Record::decode(&bytes).map(|r| validate(&r, &TrustAll).is_ok()).unwrap_or(false);
            prop_assert!(!accepted);
        }

        #[test]
        fn the_remembering_verifier_agrees_with_validate_after_the_genuine_record(bit: usize, seed: u8) {
            // The genuine record is remembered first, so a flipped bit that the memo
            // mistook for it would be accepted here.
            let record = grant(&key(seed), site(&key(seed.wrapping_add(1))), 3, 500 << 30, false);
            let mut verifier = RecordVerifier::default();
            prop_assert!(verifier.validate(&record, &TrustAll).is_ok());
            prop_assert!(verifier.validate(&record, &TrustAll).is_ok());
            let mut bytes = record.encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            if let Ok(altered) = Record::decode(&bytes) {
                prop_assert_eq!(verifier.validate(&altered, &TrustAll), validate(&altered, &TrustAll));
                prop_assert!(verifier.validate(&altered, &TrustAll).is_err());
            }
            // Trust is checked every time, not remembered.
            prop_assert_eq!(
                verifier.validate(&record, &TrustNone),
                Err(RecordError::UntrustedAuthor(record.author))
            );
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Record::decode(&bytes);
            let _ = NodeCert::decode(&bytes);
            let _ = TrustGrant::decode(&bytes);
        }

        #[test]
        fn node_certs_round_trip(node: [u8; 32], capacity: u64, name in "[a-zA-Z0-9 ]{1,64}", addresses in proptest::collection::vec("[a-z0-9/.:]{1,40}", 0..4)) {
            prop_assert!(check_addresses(&addresses).is_ok());
            let cert = NodeCert { node: NodeId(node), site: SiteId([1; 32]), name, addresses, capacity_bytes: capacity };
            prop_assert_eq!(NodeCert::decode(&cert.encode()).unwrap(), cert);
        }
    }

    #[test]
    fn a_revocation_wins_over_every_older_grant() {
        let (a, b) = (key(1), site(&key(2)));
        let raised = grant(&a, b, 5, 2 << 40, false);
        let revoked = grant(&a, b, 6, 0, true);
        assert!(revoked.supersedes(&raised));
        assert!(!raised.supersedes(&revoked));
    }

    #[test]
    fn untrusted_and_disallowed_records_are_rejected() {
        let a = key(1);
        let record = grant(&a, site(&key(2)), 1, 1, false);
        assert_eq!(
            validate(&record, &TrustNone),
            Err(RecordError::UntrustedAuthor(site(&a)))
        );
        let to_self = grant(&a, site(&a), 1, 1, false);
        assert!(matches!(
            validate(&to_self, &TrustAll),
            Err(RecordError::NotAllowed(_))
        ));
        // A site certifying another site's node.
        let cert = NodeCert {
            node: NodeId([9; 32]),
            site: site(&key(2)),
            name: "front desk".into(),
            addresses: vec![],
            capacity_bytes: 0,
        };
        let forged = Record::sign(&a, RecordKind::NodeCert, [9; 32], 1, cert.encode());
        assert!(matches!(
            validate(&forged, &TrustAll),
            Err(RecordError::NotAllowed(_))
        ));
        // A record re-signed by someone else under the author's name.
        let mut stolen = record.clone();
        stolen.signature = grant(&key(3), site(&key(2)), 1, 1, false).signature;
        assert_eq!(validate(&stolen, &TrustAll), Err(RecordError::BadSignature));
    }

    #[test]
    fn a_gc_statement_needs_the_zero_key_and_a_body_that_decodes() {
        let a = key(1);
        let body = crate::gc::GcStatement {
            basis: 1,
            grace_ms: 2,
            batches: vec![],
        }
        .encode();
        let good = Record::sign(&a, RecordKind::GcStatement, [0; 32], 1, body.clone());
        assert_eq!(validate(&good, &TrustAll), Ok(()));
        assert_eq!(Record::decode(&good.encode()), Ok(good));
        let keyed = Record::sign(&a, RecordKind::GcStatement, [1; 32], 1, body);
        assert!(matches!(
            validate(&keyed, &TrustAll),
            Err(RecordError::NotAllowed(_))
        ));
        let garbage = Record::sign(&a, RecordKind::GcStatement, [0; 32], 1, vec![1, 2]);
        assert!(matches!(
            validate(&garbage, &TrustAll),
            Err(RecordError::Decode(_))
        ));
    }

    #[test]
    fn names_and_addresses_are_checked_before_encoding() {
        assert!(is_valid_name("front desk PC"));
        for bad in ["", "tab\there", &"x".repeat(NAME_BYTES_MAX + 1)] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        assert!(check_addresses(&["/ip4/10.0.0.2/udp/4001/quic-v1".into()]).is_ok());
        assert!(check_addresses(&[String::new()]).is_err());
        assert!(check_addresses(&["x".repeat(ADDRESS_BYTES_MAX + 1)]).is_err());
        assert!(check_addresses(&vec!["a".into(); ADDRESSES_MAX + 1]).is_err());
    }
}

//! Trust between sites, from this site's side: invites it sends, invites it accepts, the
//! grants it signs (quota changes and revocations are new versions of the same grant), and
//! the partners that result. Everything is a signed record (see `records`) or a small
//! catalog entry in the store's index; the mesh will gossip the records.

use cairn_protocol::identity::{Fingerprint, SiteId};
use cairn_protocol::record::{
    check_addresses, is_valid_name, Record, RecordError, RecordKind, TrustGrant,
};
use cairn_protocol::token::{InviteToken, TokenError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

use crate::datadir::random_bytes;
use crate::records;
use crate::store::{IndexBatch, StoreError};
use crate::units;
use crate::vault::Vault;

pub const INVITE_QUOTA_DEFAULT_BYTES: u64 = 100_000_000_000;
pub const INVITE_EXPIRES_DEFAULT_MS: u64 = 7 * 86_400_000;

const KEY_PARTNER: &[u8] = b"partner/";
const KEY_USED_TOKEN: &[u8] = b"used-invite/";
const KEY_SENT_INVITE: &[u8] = b"sent-invite/";

#[derive(Debug, Error)]
pub enum TrustError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "this invite is from your own site ({0}); send it to the partner who should accept it"
    )]
    OwnSite(SiteId),
    #[error("this invite was already accepted here; ask {0} for a new one")]
    Reused(String),
    #[error("site {0} is not a partner of this site (`cairn trust list` shows partners)")]
    UnknownSite(SiteId),
    #[error(transparent)]
    BadSiteId(cairn_protocol::codec::DecodeError),
    #[error("no partner has the site id, fingerprint or a name starting with {0:?} (`cairn trust list` shows partners)")]
    NoSuchPartner(String),
    #[error("{text:?} could be any of {candidates}: give more of the name, or the fingerprint")]
    AmbiguousPartner { text: String, candidates: String },
    #[error("this site never sent that invite (or it is from another site)")]
    NotOurInvite,
    #[error("a site cannot revoke itself")]
    RevokeSelf,
    #[error("this node already holds {} for {name}; a quota of {} would be below that: give at least that much, or revoke them", units::bytes(*held_bytes), units::bytes(*quota_bytes))]
    QuotaBelowHeld {
        name: String,
        quota_bytes: u64,
        held_bytes: u64,
    },
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("partner data in the store is damaged: {0}")]
    Damaged(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What this site knows about a partner besides the grants.
#[derive(Serialize, Deserialize)]
struct PartnerEntry {
    name: String,
    addresses: Vec<String>,
    /// What the partner's invite offered to store for us.
    offered_quota_bytes: u64,
    /// The signed invite, kept as the partner's word for that offer.
    invite: String,
    /// Why the inviter refused to complete the invite this site accepted (it will
    /// never trust this site through it); None while it is complete or pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
}

/// A partner as `cairn trust list` shows it.
#[derive(Debug, Serialize)]
pub struct Partner {
    pub site_id: String,
    pub name: String,
    pub fingerprint: String,
    /// Where the partner said it can be reached, in its invite.
    pub addresses: Vec<String>,
    /// Quota: what the partner offered to store for this site, in its signed invite.
    pub they_store_for_us_bytes: u64,
    /// Quota: what this site grants the partner; 0 when revoked.
    pub we_store_for_them_bytes: u64,
    /// Used: sealed bytes of the partner's chunks in this node's store.
    pub we_hold_for_them_bytes: u64,
    /// Used: sealed bytes of this site's chunks the partner has confirmed it holds.
    pub they_hold_for_us_bytes: u64,
    /// When this node last heard from the partner; None until the mesh has.
    pub last_seen_unix_ms: Option<u64>,
    pub revoked: bool,
    /// Version of this site's grant: raised by every quota change or revocation.
    pub grant_version: u64,
    /// The inviter refused to complete the invite this site accepted, and why: it is
    /// not a partner and never will be through that invite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// Signs and sends nothing yet: returns a token for the caller to print, and remembers it
/// so a future acceptance can be matched to it once. `addresses` are hints where this
/// site's nodes can be reached.
pub fn invite(
    vault: &Vault,
    quota_bytes: u64,
    addresses: Vec<String>,
    expires_ms: u64,
    now_unix_ms: u64,
) -> Result<InviteToken, TrustError> {
    check_addresses(&addresses)?;
    let token = InviteToken::sign(
        &vault.dir.site_key,
        &vault.dir.site_name,
        addresses,
        quota_bytes,
        now_unix_ms.saturating_add(expires_ms),
        random_bytes(),
    );
    let key = [KEY_SENT_INVITE, &token.token_id].concat();
    vault.store.index().commit(IndexBatch {
        catalog: vec![(key, token.expires_unix_ms.to_le_bytes().to_vec())],
        ..IndexBatch::default()
    })?;
    Ok(token)
}

/// Parses and checks an invite before anything is shown or changed: signature, expiry,
/// not our own, not used here before.
pub fn check_invite(
    vault: &Vault,
    text: &str,
    now_unix_ms: u64,
) -> Result<InviteToken, TrustError> {
    let token = InviteToken::from_text(text, now_unix_ms)?;
    if token.inviter == vault.dir.site_id() {
        return Err(TrustError::OwnSite(token.inviter));
    }
    if vault
        .store
        .index()
        .catalog_get(&[KEY_USED_TOKEN, &token.token_id].concat())?
        .is_some()
    {
        return Err(TrustError::Reused(token.inviter_name.clone()));
    }
    Ok(token)
}

/// Accepts a checked invite: records the inviter as a partner with the offer it signed,
/// signs this site's grant to it for `quota_bytes`, and marks the invite used, together.
pub fn accept(vault: &Vault, token: &InviteToken, quota_bytes: u64) -> Result<(), TrustError> {
    let entry = PartnerEntry {
        name: token.inviter_name.clone(),
        addresses: token.addresses.clone(),
        offered_quota_bytes: token.quota_bytes,
        invite: token.to_text(),
        refused: None,
    };
    let entry = serde_json::to_vec(&entry).expect("partner entry serialises");
    let mut batch = grant_batch(
        vault,
        token.inviter,
        &token.inviter_name,
        quota_bytes,
        false,
    )?;
    batch
        .catalog
        .push(([KEY_PARTNER, &token.inviter.0].concat(), entry));
    batch
        .catalog
        .push(([KEY_USED_TOKEN, &token.token_id].concat(), Vec::new()));
    vault.store.index().commit(batch)?;
    Ok(())
}

/// The invite text this site accepted from `inviter`, when it was the acceptor (the
/// node sends it back to the inviter to complete the partnership).
pub fn accepted_invite(vault: &Vault, inviter: &SiteId) -> Result<Option<String>, TrustError> {
    match known_partner(vault, inviter) {
        Ok(entry) if !entry.invite.is_empty() => Ok(Some(entry.invite)),
        Ok(_) | Err(TrustError::UnknownSite(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The inviter's side of an accepted invite, when the acceptor's node reaches it: the
/// invite must be one this site sent and not used by another site; the acceptor's grant
/// must be signed and name this site. Signs this site's grant to the acceptor (the
/// quota the invite offered) and records the partner. Asked again by the same acceptor
/// (an answer lost on the way), it returns the same grant.
pub fn complete_invite(
    vault: &Vault,
    token: &InviteToken,
    acceptor_grant: &Record,
    acceptor_name: &str,
) -> Result<Record, TrustError> {
    let own = vault.dir.site_id();
    if token.inviter != own {
        return Err(TrustError::NotOurInvite);
    }
    let index = vault.store.index();
    if index
        .catalog_get(&[KEY_SENT_INVITE, &token.token_id].concat())?
        .is_none()
    {
        return Err(TrustError::NotOurInvite);
    }
    if acceptor_grant.kind != RecordKind::TrustGrant || acceptor_grant.key != own.0 {
        return Err(TrustError::Record(RecordError::NotAllowed(
            "an invite is completed with the acceptor's grant to the inviter".into(),
        )));
    }
    acceptor_grant.verify_signature()?;
    let grant =
        TrustGrant::decode(&acceptor_grant.body).map_err(|e| TrustError::Damaged(e.to_string()))?;
    let acceptor = acceptor_grant.author;
    if acceptor == own {
        return Err(TrustError::OwnSite(own));
    }
    let used_key = [KEY_USED_TOKEN, &token.token_id].concat();
    if let Some(used_by) = index.catalog_get(&used_key)? {
        if used_by == acceptor.0 {
            if let Some((record, _)) = our_grant(vault, &acceptor)? {
                return Ok(record);
            }
        }
        return Err(TrustError::Reused(vault.dir.site_name.clone()));
    }
    let name = if is_valid_name(acceptor_name) {
        acceptor_name.to_string()
    } else {
        format!("site {}", acceptor.fingerprint())
    };
    let mut batch = grant_batch(vault, acceptor, &name, token.quota_bytes, false)?;
    let entry = PartnerEntry {
        name,
        addresses: Vec::new(),
        offered_quota_bytes: if grant.revoked { 0 } else { grant.quota_bytes },
        invite: String::new(),
        refused: None,
    };
    let record = Record::decode(&batch.catalog[0].1).expect("just encoded");
    batch.catalog.push((
        [KEY_PARTNER, &acceptor.0].concat(),
        serde_json::to_vec(&entry).expect("partner entry serialises"),
    ));
    batch.catalog.push((used_key, acceptor.0.to_vec()));
    index.commit(batch)?;
    Ok(record)
}

fn our_grant(vault: &Vault, site: &SiteId) -> Result<Option<(Record, TrustGrant)>, TrustError> {
    let own = vault.dir.site_id();
    let Some(record) = records::get(vault.store.index(), &own, RecordKind::TrustGrant, &site.0)?
    else {
        return Ok(None);
    };
    let grant = TrustGrant::decode(&record.body).map_err(|e| TrustError::Damaged(e.to_string()))?;
    Ok(Some((record, grant)))
}

/// A batch holding this site's grant to `site`, one version past the last. The grant
/// carries the partner's name, so the site's other nodes name it too.
fn grant_batch(
    vault: &Vault,
    site: SiteId,
    name: &str,
    quota_bytes: u64,
    revoked: bool,
) -> Result<IndexBatch, TrustError> {
    let body = TrustGrant {
        grantee: site,
        quota_bytes,
        revoked,
    }
    .encode_named(name);
    let record = records::sign_next(vault, RecordKind::TrustGrant, site.0, body)?;
    Ok(IndexBatch {
        catalog: vec![records::entry(&record)],
        ..IndexBatch::default()
    })
}

/// Records that the inviter refused to complete the invite this site accepted: the
/// node stops asking, and `trust list` shows the partner as refused.
pub fn mark_refused(vault: &Vault, site: &SiteId, why: &str) -> Result<(), TrustError> {
    let mut entry = known_partner(vault, site)?;
    entry.refused = Some(why.to_string());
    vault.store.index().commit(IndexBatch {
        catalog: vec![(
            [KEY_PARTNER, &site.0].concat(),
            serde_json::to_vec(&entry).expect("partner entry serialises"),
        )],
        ..IndexBatch::default()
    })?;
    Ok(())
}

fn known_partner(vault: &Vault, site: &SiteId) -> Result<PartnerEntry, TrustError> {
    let entry = vault
        .store
        .index()
        .catalog_get(&[KEY_PARTNER, &site.0].concat())?
        .ok_or(TrustError::UnknownSite(*site))?;
    serde_json::from_slice(&entry).map_err(|e| TrustError::Damaged(e.to_string()))
}

/// Raises or lowers what this site stores for a partner (also un-revokes it), but never
/// below what this node already holds for it.
pub fn set_quota(vault: &Vault, site: &SiteId, quota_bytes: u64) -> Result<(), TrustError> {
    let partner = known_partner(vault, site)?;
    let held_bytes = vault.store.usage(site)?.held_for_them_bytes;
    if quota_bytes < held_bytes {
        return Err(TrustError::QuotaBelowHeld {
            name: partner.name,
            quota_bytes,
            held_bytes,
        });
    }
    vault.store.index().commit(grant_batch(
        vault,
        *site,
        &partner.name,
        quota_bytes,
        false,
    )?)?;
    Ok(())
}

/// Revokes a partner: a new version of the grant that wins over every older one.
pub fn revoke(vault: &Vault, site: &SiteId) -> Result<(), TrustError> {
    if *site == vault.dir.site_id() {
        return Err(TrustError::RevokeSelf);
    }
    let partner = known_partner(vault, site)?;
    vault
        .store
        .index()
        .commit(grant_batch(vault, *site, &partner.name, 0, true)?)?;
    Ok(())
}

/// The partner a person means by `text`: a site id, a fingerprint (as `trust list` shows
/// it), or the start of a partner's name, in any case. A site id is taken as it is, partner
/// or not, so the caller's own check names it; a name prefix that fits several partners is
/// refused, naming each, unless one name is exactly `text`.
pub fn resolve_partner(vault: &Vault, text: &str) -> Result<SiteId, TrustError> {
    let not_an_id = match text.parse::<SiteId>() {
        Ok(site) => return Ok(site),
        Err(e) => e,
    };
    let partners = partners(vault)?;
    if let Ok(fingerprint) = text.parse::<Fingerprint>() {
        let fingerprint = fingerprint.to_string();
        return partners
            .iter()
            .find(|p| p.fingerprint == fingerprint)
            .map(partner_site)
            .unwrap_or_else(|| Err(TrustError::NoSuchPartner(text.to_owned())));
    }
    let wanted = text.trim().to_lowercase();
    if wanted.is_empty() {
        return Err(TrustError::NoSuchPartner(text.to_owned()));
    }
    let mut fits: Vec<&Partner> = partners
        .iter()
        .filter(|p| p.name.to_lowercase().starts_with(&wanted))
        .collect();
    fits.sort_by(|a, b| a.name.cmp(&b.name));
    let exact: Vec<&Partner> = fits
        .iter()
        .copied()
        .filter(|p| p.name.to_lowercase() == wanted)
        .collect();
    match (fits.as_slice(), exact.as_slice()) {
        // Shaped like a site id (8 groups of 7): its own error names the typo.
        ([], _) if looks_like_site_id(text) => Err(TrustError::BadSiteId(not_an_id)),
        ([], _) => Err(TrustError::NoSuchPartner(text.to_owned())),
        ([one], _) | (_, [one]) => partner_site(one),
        (several, _) => Err(TrustError::AmbiguousPartner {
            text: text.to_owned(),
            candidates: several
                .iter()
                .map(|p| format!("{:?} ({})", p.name, p.fingerprint))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

fn looks_like_site_id(text: &str) -> bool {
    let chars: Vec<char> = text
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect();
    chars.len() == 56 && chars.iter().all(char::is_ascii_alphanumeric)
}

fn partner_site(partner: &Partner) -> Result<SiteId, TrustError> {
    partner
        .site_id
        .parse()
        .map_err(|_| TrustError::Damaged(format!("partner site id {}", partner.site_id)))
}

/// What this site calls each partner, on any of its nodes: the name this node learnt
/// when it accepted or completed the invite, else the name in the site's grant (signed on
/// whichever node of the site added the partner, and gossiped to the others).
pub fn partner_names(vault: &Vault) -> Result<BTreeMap<SiteId, String>, TrustError> {
    let own = vault.dir.site_id();
    let mut names = BTreeMap::new();
    for record in records::scan(vault.store.index(), &own, RecordKind::TrustGrant)? {
        if let Ok((grant, Some(name))) = TrustGrant::decode_named(&record.body) {
            names.insert(grant.grantee, name);
        }
    }
    for (key, value) in vault.store.index().catalog_scan(KEY_PARTNER)? {
        let Ok(site) = <[u8; 32]>::try_from(&key[KEY_PARTNER.len()..]) else {
            continue;
        };
        if let Ok(entry) = serde_json::from_slice::<PartnerEntry>(&value) {
            names.insert(SiteId(site), entry.name);
        }
    }
    Ok(names)
}

pub fn partners(vault: &Vault) -> Result<Vec<Partner>, TrustError> {
    let mut out = Vec::new();
    for (key, value) in vault.store.index().catalog_scan(KEY_PARTNER)? {
        let site = SiteId(
            key[KEY_PARTNER.len()..]
                .try_into()
                .map_err(|_| TrustError::Damaged("partner key".into()))?,
        );
        let entry: PartnerEntry =
            serde_json::from_slice(&value).map_err(|e| TrustError::Damaged(e.to_string()))?;
        let (record, grant) = our_grant(vault, &site)?
            .ok_or_else(|| TrustError::Damaged(format!("no grant for {site}")))?;
        let usage = vault.store.usage(&site)?;
        out.push(Partner {
            site_id: site.to_string(),
            name: entry.name,
            fingerprint: site.fingerprint().to_string(),
            addresses: entry.addresses,
            they_store_for_us_bytes: entry.offered_quota_bytes,
            we_store_for_them_bytes: if grant.revoked { 0 } else { grant.quota_bytes },
            we_hold_for_them_bytes: usage.held_for_them_bytes,
            they_hold_for_us_bytes: usage.held_by_them_bytes,
            last_seen_unix_ms: usage.last_seen_unix_ms,
            revoked: grant.revoked,
            grant_version: record.version,
            refused: entry.refused,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn a_quota_below_what_is_held_is_refused_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::init(&tmp.path().join("d"), "Jones").unwrap();
        let smith_key = SigningKey::from_bytes(&[7; 32]);
        let smith = SiteId(smith_key.verifying_key().to_bytes());
        let invite = InviteToken::sign(&smith_key, "Smith", vec![], 1 << 40, u64::MAX, [1; 16]);
        let invite = check_invite(&vault, &invite.to_text(), 0).unwrap();
        accept(&vault, &invite, 5 << 30).unwrap();
        // What the mesh will do as it stores Smith's chunks here.
        vault.store.add_held_for(&smith, 3 << 30).unwrap();

        let err = set_quota(&vault, &smith, 2 << 30).unwrap_err();
        assert_eq!(
            err.to_string(),
            "this node already holds 3.0 GiB for Smith; a quota of 2.0 GiB would be below \
             that: give at least that much, or revoke them"
        );
        let row = &partners(&vault).unwrap()[0];
        assert_eq!(row.we_store_for_them_bytes, 5 << 30);
        assert_eq!(row.grant_version, 1);
        assert_eq!(row.we_hold_for_them_bytes, 3 << 30);
        assert_eq!(row.last_seen_unix_ms, None);

        // Exactly what is held is allowed, and so is revoking.
        set_quota(&vault, &smith, 3 << 30).unwrap();
        assert_eq!(partners(&vault).unwrap()[0].grant_version, 2);
        revoke(&vault, &smith).unwrap();
        assert!(partners(&vault).unwrap()[0].revoked);
    }

    fn partner(vault: &Vault, seed: u8, name: &str) -> SiteId {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let invite = InviteToken::sign(&key, name, vec![], 1 << 40, u64::MAX, [seed; 16]);
        let invite = check_invite(vault, &invite.to_text(), 0).unwrap();
        accept(vault, &invite, 5 << 30).unwrap();
        SiteId(key.verifying_key().to_bytes())
    }

    #[test]
    fn the_sites_other_nodes_name_a_partner_from_the_grant() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::init(&tmp.path().join("d"), "Jones").unwrap();
        let smith = partner(&vault, 7, "Smith IT");
        set_quota(&vault, &smith, 6 << 30).unwrap();
        // Another node of the site has the grant (gossiped) but not this node's entry.
        vault
            .store
            .index()
            .commit(IndexBatch {
                removed_catalog: vec![[KEY_PARTNER, &smith.0].concat()],
                ..IndexBatch::default()
            })
            .unwrap();
        let names = partner_names(&vault).unwrap();
        assert_eq!(names.get(&smith).map(String::as_str), Some("Smith IT"));
        let own = vault.dir.site_id();
        let record = records::get(vault.store.index(), &own, RecordKind::TrustGrant, &smith.0)
            .unwrap()
            .unwrap();
        let (grant, name) = TrustGrant::decode_named(&record.body).unwrap();
        assert_eq!(
            (grant.quota_bytes, name.as_deref()),
            (6 << 30, Some("Smith IT"))
        );
    }

    #[test]
    fn a_partner_is_named_by_site_id_fingerprint_or_unique_name_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let vault = Vault::init(&tmp.path().join("d"), "Jones").unwrap();
        let smith = partner(&vault, 7, "Smith IT");
        let smithers = partner(&vault, 8, "Smithers & Co");
        let brown = partner(&vault, 9, "Brown");
        assert_eq!(resolve_partner(&vault, &smith.to_string()).unwrap(), smith);
        let fingerprint = smith.fingerprint().to_string();
        assert_eq!(resolve_partner(&vault, &fingerprint).unwrap(), smith);
        assert_eq!(
            resolve_partner(&vault, &fingerprint.to_lowercase().replace('-', "")).unwrap(),
            smith
        );
        assert_eq!(resolve_partner(&vault, "br").unwrap(), brown);
        assert_eq!(resolve_partner(&vault, "smithers").unwrap(), smithers);
        assert_eq!(resolve_partner(&vault, "smith it").unwrap(), smith);
        assert_eq!(
            resolve_partner(&vault, "Smith").unwrap_err().to_string(),
            format!(
                "\"Smith\" could be any of \"Smith IT\" ({}), \"Smithers & Co\" ({}): give more of the name, or the fingerprint",
                smith.fingerprint(),
                smithers.fingerprint()
            )
        );
        assert_eq!(
            resolve_partner(&vault, "Green").unwrap_err().to_string(),
            "no partner has the site id, fingerprint or a name starting with \"Green\" (`cairn trust list` shows partners)"
        );
        let stranger = SiteId(SigningKey::from_bytes(&[10; 32]).verifying_key().to_bytes());
        assert!(matches!(
            resolve_partner(&vault, &stranger.fingerprint().to_string()),
            Err(TrustError::NoSuchPartner(_))
        ));
        set_quota(&vault, &resolve_partner(&vault, "brown").unwrap(), 6 << 30).unwrap();
    }
}

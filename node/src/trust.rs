//! Trust between sites, from this site's side: invites it sends, invites it accepts, the
//! grants it signs (quota changes and revocations are new versions of the same grant), and
//! the partners that result. Everything is a signed record or a small catalog entry in the
//! store's index; the mesh will gossip the records.

use cairn_protocol::identity::SiteId;
use cairn_protocol::record::{validate, Record, RecordKind, TrustGrant, TrustView};
use cairn_protocol::token::{InviteToken, TokenError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::datadir::random_bytes;
use crate::store::{IndexBatch, StoreError};
use crate::vault::Vault;

pub const INVITE_QUOTA_DEFAULT_BYTES: u64 = 100_000_000_000;
pub const INVITE_EXPIRES_DEFAULT_MS: u64 = 7 * 86_400_000;

const KEY_RECORD: &[u8] = b"rec/";
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
    #[error("a site cannot revoke itself")]
    RevokeSelf,
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
}

/// A partner as `cairn trust list` shows it.
#[derive(Debug, Serialize)]
pub struct Partner {
    pub site_id: String,
    pub name: String,
    pub fingerprint: String,
    /// What the partner offered to store for this site, in its signed invite.
    pub they_store_for_us_bytes: u64,
    /// What this site grants the partner; 0 when revoked.
    pub we_store_for_them_bytes: u64,
    pub revoked: bool,
    /// Version of this site's grant: raised by every quota change or revocation.
    pub grant_version: u64,
}

fn record_key(author: &SiteId, kind: RecordKind, key: &[u8; 32]) -> Vec<u8> {
    [KEY_RECORD, &author.0, &[kind as u8], key].concat()
}

/// Trust as this site sees it: itself and the partners it has a grant for.
struct LocalTrust {
    own: SiteId,
    partners: Vec<SiteId>,
}

impl TrustView for LocalTrust {
    fn is_trusted(&self, site: &SiteId) -> bool {
        *site == self.own || self.partners.contains(site)
    }
}

/// Signs and sends nothing yet: returns a token for the caller to print, and remembers it
/// so a future acceptance can be matched to it once.
pub fn invite(
    vault: &Vault,
    quota_bytes: u64,
    expires_ms: u64,
    now_unix_ms: u64,
) -> Result<InviteToken, TrustError> {
    let token = InviteToken::sign(
        &vault.dir.site_key,
        &vault.dir.site_name,
        Vec::new(),
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
    };
    let entry = serde_json::to_vec(&entry).expect("partner entry serialises");
    let mut batch = grant_batch(vault, token.inviter, quota_bytes, false)?;
    batch
        .catalog
        .push(([KEY_PARTNER, &token.inviter.0].concat(), entry));
    batch
        .catalog
        .push(([KEY_USED_TOKEN, &token.token_id].concat(), Vec::new()));
    vault.store.index().commit(batch)?;
    Ok(())
}

fn our_grant(vault: &Vault, site: &SiteId) -> Result<Option<(Record, TrustGrant)>, TrustError> {
    let key = record_key(&vault.dir.site_id(), RecordKind::TrustGrant, &site.0);
    let Some(bytes) = vault.store.index().catalog_get(&key)? else {
        return Ok(None);
    };
    let record = Record::decode(&bytes).map_err(|e| TrustError::Damaged(e.to_string()))?;
    let grant = TrustGrant::decode(&record.body).map_err(|e| TrustError::Damaged(e.to_string()))?;
    Ok(Some((record, grant)))
}

/// A batch holding this site's grant to `site`, one version past the last.
fn grant_batch(
    vault: &Vault,
    site: SiteId,
    quota_bytes: u64,
    revoked: bool,
) -> Result<IndexBatch, TrustError> {
    let version = our_grant(vault, &site)?.map_or(1, |(record, _)| record.version + 1);
    let body = TrustGrant {
        grantee: site,
        quota_bytes,
        revoked,
    }
    .encode();
    let record = Record::sign(
        &vault.dir.site_key,
        RecordKind::TrustGrant,
        site.0,
        version,
        body,
    );
    let trust = LocalTrust {
        own: vault.dir.site_id(),
        partners: vec![site],
    };
    validate(&record, &trust).expect("records this site signs are valid");
    let key = record_key(&record.author, record.kind, &record.key);
    Ok(IndexBatch {
        catalog: vec![(key, record.encode())],
        ..IndexBatch::default()
    })
}

fn known_partner(vault: &Vault, site: &SiteId) -> Result<(), TrustError> {
    if vault
        .store
        .index()
        .catalog_get(&[KEY_PARTNER, &site.0].concat())?
        .is_none()
    {
        return Err(TrustError::UnknownSite(*site));
    }
    Ok(())
}

/// Raises or lowers what this site stores for a partner (also un-revokes it).
pub fn set_quota(vault: &Vault, site: &SiteId, quota_bytes: u64) -> Result<(), TrustError> {
    known_partner(vault, site)?;
    vault
        .store
        .index()
        .commit(grant_batch(vault, *site, quota_bytes, false)?)?;
    Ok(())
}

/// Revokes a partner: a new version of the grant that wins over every older one.
pub fn revoke(vault: &Vault, site: &SiteId) -> Result<(), TrustError> {
    if *site == vault.dir.site_id() {
        return Err(TrustError::RevokeSelf);
    }
    known_partner(vault, site)?;
    vault
        .store
        .index()
        .commit(grant_batch(vault, *site, 0, true)?)?;
    Ok(())
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
        out.push(Partner {
            site_id: site.to_string(),
            name: entry.name,
            fingerprint: site.fingerprint().to_string(),
            they_store_for_us_bytes: entry.offered_quota_bytes,
            we_store_for_them_bytes: if grant.revoked { 0 } else { grant.quota_bytes },
            revoked: grant.revoked,
            grant_version: record.version,
        });
    }
    Ok(out)
}

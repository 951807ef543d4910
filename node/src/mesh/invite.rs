//! Completing invites: the acceptor's request and the inviter's grant back.

use super::*;

impl Node {
    pub(super) fn send_accept(&mut self, peer: PeerId, inviter: SiteId) {
        let payload = match accept_payload(&self.vault, &self.own_cert, &inviter) {
            Ok(payload) => payload,
            Err(e) => {
                warn!("cannot complete the invite of {inviter}: {e:#}");
                return;
            }
        };
        let id = self
            .swarm
            .behaviour_mut()
            .cairn
            .send_request(&peer, Frame::new(Kind::Accept, payload));
        self.accepts.insert(id, inviter);
    }

    /// The inviter's side: checks the invite is one this site sent and still open,
    /// signs this site's grant to the acceptor, and answers with it.
    pub(super) fn on_accept(&mut self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let now = now_ms();
        let request: AcceptRequest =
            serde_json::from_slice(payload).map_err(|_| "malformed invite completion")?;
        let token = InviteToken::from_text(&request.invite, now).map_err(|e| e.to_string())?;
        let grant = Record::decode(&request.grant).map_err(|e| e.to_string())?;
        let ours = trust::complete_invite(&self.vault, &token, &grant, &request.site_name)
            .map_err(|e| e.to_string())?;
        self.local_records(vec![ours.clone(), grant]);
        if let Ok(cert) = Record::decode(&request.cert) {
            let _ = self.engine.handle_local_record(cert, now);
        }
        info!(
            "{} accepted this site's invite: it is now a partner",
            request.site_name
        );
        Ok(Message::Records {
            records: vec![ours, self.own_cert.clone()],
        }
        .encode())
    }

    pub(super) fn on_accept_answer(&mut self, peer: PeerId, inviter: SiteId, answer: Frame) {
        if answer.kind != ANSWER_OK {
            warn!(
                "the inviter {inviter} refused to complete its invite: {}",
                String::from_utf8_lossy(&answer.payload)
            );
            return;
        }
        let Ok(Message::Records { records }) = Message::decode(&answer.payload) else {
            warn!("a malformed invite completion from {inviter}");
            return;
        };
        let now = now_ms();
        for record in records {
            if record.author == inviter {
                if let Err(e) = self.engine.handle_local_record(record, now) {
                    warn!("the inviter's record was refused: {e}");
                }
            }
        }
        info!("the invite of {inviter} is complete: it is now a partner");
        self.send_hello(peer);
    }
}

/// What an acceptor sends its inviter to complete an invite.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct AcceptRequest {
    invite: String,
    site_name: String,
    /// The acceptor's grant to the inviter, encoded.
    grant: Vec<u8>,
    /// The acceptor node's certificate, encoded.
    cert: Vec<u8>,
}

pub(super) fn accept_payload(vault: &Vault, cert: &Record, inviter: &SiteId) -> Result<Vec<u8>> {
    let invite = trust::accepted_invite(vault, inviter)?
        .ok_or_else(|| anyhow::anyhow!("no accepted invite from {inviter}"))?;
    let grant = records::get(
        vault.store.index(),
        &vault.dir.site_id(),
        RecordKind::TrustGrant,
        &inviter.0,
    )?
    .ok_or_else(|| anyhow::anyhow!("no grant to {inviter}"))?;
    Ok(serde_json::to_vec(&AcceptRequest {
        invite,
        site_name: vault.dir.site_name.clone(),
        grant: grant.encode(),
        cert: cert.encode(),
    })?)
}

/// Partners whose invite this site accepted but whose grant back has not arrived, with
/// the addresses their invite gave.
pub(super) fn pending_invites(
    vault: &Vault,
    engine: &Engine,
) -> Result<Vec<(SiteId, Vec<Multiaddr>)>> {
    let own = vault.dir.site_id();
    let mut out = Vec::new();
    for partner in trust::partners(vault)? {
        let Ok(site) = partner.site_id.parse::<SiteId>() else {
            continue;
        };
        if partner.revoked || partner.addresses.is_empty() {
            continue;
        }
        let key = cairn_protocol::catalog::RecordKey {
            author: site,
            kind: RecordKind::TrustGrant,
            key: own.0,
        };
        if engine.catalog().get(&key).is_some() {
            continue;
        }
        if trust::accepted_invite(vault, &site)?.is_none() {
            continue; // a partner this site invited: it completes the invite, not us
        }
        let addresses = partner
            .addresses
            .iter()
            .filter_map(|a| net::multiaddr(a).ok())
            .collect();
        out.push((site, addresses));
    }
    Ok(out)
}

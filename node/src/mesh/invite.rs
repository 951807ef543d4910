//! Completing invites: the acceptor's request and the inviter's grant back. When to ask
//! (on any connection to the inviting site, again after a failure, never after a
//! refusal) is admission's (`cairn_protocol::admission`); this file only builds and
//! reads the requests.

use cairn_protocol::admission::AcceptAnswer;
use cairn_protocol::engine::{Engine, Message};
use cairn_protocol::identity::SiteId;
use cairn_protocol::record::{Record, RecordKind};
use cairn_protocol::token::InviteToken;
use libp2p::{Multiaddr, PeerId};
use tracing::{debug, info, warn};

use super::net::{self, Frame, Kind, ANSWER_ELSEWHERE, ANSWER_OK};
use super::{now_ms, AddressDial, MeshError, Node};
use crate::records;
use crate::trust::{self, TrustError};
use crate::vault::Vault;

impl Node {
    pub(super) fn send_accept(&mut self, peer: PeerId, inviter: SiteId) {
        let payload = match accept_payload(&self.vault, &self.own_cert, &inviter) {
            Ok(payload) => payload,
            Err(e) => {
                warn!("cannot complete the invite of {inviter}: {e}");
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

    /// Dials the addresses the inviter's invite gave, to ask it to complete.
    pub(super) fn dial_inviter(&mut self, inviter: SiteId) {
        let addresses = match pending_invites(&self.vault, &self.engine) {
            Ok(pending) => pending
                .into_iter()
                .find(|(site, _)| *site == inviter)
                .map(|(_, a)| a)
                .unwrap_or_default(),
            Err(e) => {
                warn!("cannot read accepted invites: {e}");
                return;
            }
        };
        for addr in addresses {
            self.dial_address(addr, AddressDial::Accept(inviter));
        }
    }

    /// The inviter will never complete the invite: remembered, so `trust list` says so
    /// and the node stops asking.
    pub(super) fn invite_refused(&mut self, inviter: SiteId, why: &str) {
        warn!("the inviter {inviter} refused to complete the invite this site accepted: {why}; it is not a partner (`cairn trust list` shows it refused)");
        if let Err(e) = trust::mark_refused(&self.vault, &inviter, why) {
            warn!("cannot record that {inviter} refused: {e}");
        }
    }

    /// The inviter's side: checks the invite is one this site sent and still open,
    /// signs this site's grant to the acceptor, and answers with it. `Err(true, ..)`: a
    /// definite refusal; `Err(false, ..)`: this node cannot tell (the invite is another
    /// site's, or another node of this site made it), ask elsewhere.
    pub(super) fn on_accept(&mut self, payload: &[u8]) -> Result<Vec<u8>, (bool, String)> {
        let now = now_ms();
        let request: AcceptRequest = serde_json::from_slice(payload)
            .map_err(|_| (true, "malformed invite completion".to_string()))?;
        let token =
            InviteToken::from_text(&request.invite, now).map_err(|e| (true, e.to_string()))?;
        let grant = Record::decode(&request.grant).map_err(|e| (true, e.to_string()))?;
        let ours = trust::complete_invite(&self.vault, &token, &grant, &request.site_name)
            .map_err(|e| match e {
                TrustError::NotOurInvite => (
                    false,
                    "this node did not make that invite (it may be another site's, or another node's of this site)".to_string(),
                ),
                e => (true, e.to_string()),
            })?;
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
        let now = now_ms();
        let why = String::from_utf8_lossy(&answer.payload).into_owned();
        let verdict = match answer.kind {
            ANSWER_OK => match Message::decode(&answer.payload) {
                Ok(Message::Records { records }) => {
                    for record in records {
                        if record.author == inviter {
                            if let Err(e) = self.engine.handle_local_record(record, now) {
                                warn!("the inviter's record was refused: {e}");
                            }
                        }
                    }
                    info!("the invite of {inviter} is complete: it is now a partner");
                    AcceptAnswer::Completed
                }
                _ => {
                    warn!("a malformed invite completion from {inviter}");
                    AcceptAnswer::Failed
                }
            },
            ANSWER_ELSEWHERE => {
                let name = self.name_peer(&peer);
                debug!("{name} cannot complete the invite of {inviter}: {why}");
                AcceptAnswer::Failed
            }
            _ => AcceptAnswer::Refused(why),
        };
        self.admission.accept_answered(now, inviter, verdict);
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

pub(super) fn accept_payload(
    vault: &Vault,
    cert: &Record,
    inviter: &SiteId,
) -> Result<Vec<u8>, MeshError> {
    let invite =
        trust::accepted_invite(vault, inviter)?.ok_or(MeshError::NoAcceptedInvite(*inviter))?;
    let grant = records::get(
        vault.store.index(),
        &vault.dir.site_id(),
        RecordKind::TrustGrant,
        &inviter.0,
    )?
    .ok_or(MeshError::NoGrant(*inviter))?;
    Ok(serde_json::to_vec(&AcceptRequest {
        invite,
        site_name: vault.dir.site_name.clone(),
        grant: grant.encode(),
        cert: cert.encode(),
    })
    .expect("an accept request serialises"))
}

/// Partners whose invite this site accepted but whose grant back has not arrived and
/// who have not refused, with the addresses their invite gave.
pub(super) fn pending_invites(
    vault: &Vault,
    engine: &Engine,
) -> Result<Vec<(SiteId, Vec<Multiaddr>)>, TrustError> {
    let own = vault.dir.site_id();
    let mut out = Vec::new();
    for partner in trust::partners(vault)? {
        let Ok(site) = partner.site_id.parse::<SiteId>() else {
            continue;
        };
        if partner.revoked || partner.refused.is_some() {
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

//! `/cairn/1` requests and answers: which kind goes where.

use std::time::Duration;

use cairn_protocol::admission::AcceptAnswer;
use cairn_protocol::engine::Message;
use cairn_protocol::identity::SiteId;
use cairn_protocol::record::RecordKind;
use libp2p::{request_response, PeerId};
use tracing::{debug, warn};

use super::net::{self, Frame, Kind, ANSWER_OK, ANSWER_REFUSED};
use super::{is_bulk, message_name, now_ms, Node};

impl Node {
    pub(super) fn on_cairn(&mut self, event: request_response::Event<Frame, Frame>) {
        use request_response::{Event as E, Message as M};
        match event {
            E::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                let answer = self.on_request(peer, request);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .cairn
                    .send_response(channel, answer);
            }
            E::ResponseSent { peer, .. } => self.refusal_sent(peer),
            E::InboundFailure { peer, error, .. } => {
                debug!("answer to {} failed: {error}", self.name_peer(&peer));
                self.refusal_sent(peer);
            }
            E::Message {
                peer,
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(peer) = self.hellos.remove(&request_id) {
                    if response.kind != ANSWER_OK {
                        warn!(
                            "{} refused this node: {}",
                            self.name_peer(&peer),
                            String::from_utf8_lossy(&response.payload)
                        );
                        let _ = self.swarm.disconnect_peer_id(peer);
                    } else if let Err(why) = self.check_hello(peer, &response.payload) {
                        self.refuse(peer, &why);
                    }
                } else if let Some(site) = self.accepts.remove(&request_id) {
                    self.on_accept_answer(peer, site, response);
                }
            }
            E::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.hellos.remove(&request_id);
                if let Some(site) = self.accepts.remove(&request_id) {
                    self.admission
                        .accept_answered(now_ms(), site, AcceptAnswer::Failed);
                }
                debug!("request to {} failed: {error}", self.name_peer(&peer));
            }
        }
    }

    pub(super) fn on_request(&mut self, peer: PeerId, request: Frame) -> Frame {
        let now = now_ms();
        let refused = |why: &str| Frame {
            kind: ANSWER_REFUSED,
            payload: why.as_bytes().to_vec(),
        };
        match Kind::from_u8(request.kind) {
            Some(Kind::Hello) => match self.check_hello(peer, &request.payload) {
                Ok(node) => {
                    let site = self
                        .engine
                        .peers()
                        .find(|(n, _, _)| *n == node)
                        .map(|(_, s, _)| s);
                    Frame {
                        kind: ANSWER_OK,
                        payload: self.hello_payload(site),
                    }
                }
                Err(why) => {
                    self.refuse_after_answer(peer, &why);
                    refused(&why)
                }
            },
            Some(Kind::Mesh) => {
                let Some(node) = self
                    .links
                    .get(&peer)
                    .filter(|l| l.ready)
                    .and_then(|l| l.node)
                else {
                    self.messages_refused += 1;
                    return refused("say hello first");
                };
                let link = self.links.get_mut(&peer).expect("checked above");
                link.bytes_received += request.payload.len() as u64;
                link.last_seen_unix_ms = Some(now);
                self.note_seen(node, now);
                match Message::decode(&request.payload) {
                    Ok(message) => {
                        tracing::trace!(
                            "from {}: {}",
                            self.name_node(&node),
                            message_name(&message)
                        );
                        let wait = if is_bulk(&message) {
                            self.download
                                .take(request.payload.len() as u64, std::time::Instant::now())
                        } else {
                            Duration::ZERO
                        };
                        if wait.is_zero() && self.downloads.is_empty() || !is_bulk(&message) {
                            self.engine.handle_message(node, message, now);
                        } else {
                            let at = tokio::time::Instant::now() + wait;
                            let at = self.downloads.back().map_or(at, |last| at.max(last.0));
                            self.downloads.push_back((at, node, message));
                        }
                        Frame {
                            kind: ANSWER_OK,
                            payload: Vec::new(),
                        }
                    }
                    Err(e) => {
                        // The engine counts it against the peer and cuts off a peer
                        // that keeps sending them.
                        self.messages_refused += 1;
                        debug!("malformed message from {}: {e}", self.name_node(&node));
                        self.engine
                            .handle_message_bytes(node, &request.payload, now);
                        refused("malformed message")
                    }
                }
            }
            Some(Kind::WrappedKeys) => {
                let Ok(site) = <[u8; 32]>::try_from(&request.payload[..]) else {
                    return refused("a site id is 32 bytes");
                };
                let site = SiteId(site);
                match self
                    .engine
                    .catalog()
                    .by_author(site)
                    .find(|r| r.kind == RecordKind::WrappedKeys)
                {
                    Some(record) => Frame {
                        kind: ANSWER_OK,
                        payload: record.encode(),
                    },
                    None => refused("this node holds no wrapped keys for that site"),
                }
            }
            Some(Kind::Accept) => match self.on_accept(&request.payload) {
                Ok(payload) => Frame {
                    kind: ANSWER_OK,
                    payload,
                },
                Err((true, why)) => {
                    warn!(
                        "an invite completion from {} was refused: {why}",
                        self.name_peer(&peer)
                    );
                    refused(&why)
                }
                Err((false, why)) => {
                    debug!("an invite completion asked of this node: {why}");
                    Frame {
                        kind: net::ANSWER_ELSEWHERE,
                        payload: why.into_bytes(),
                    }
                }
            },
            None => refused("unknown request kind"),
        }
    }
}

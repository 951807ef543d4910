//! `cairn recover --bootstrap`: fetching a site's wrapped keys from partners as a stranger.

use std::time::Duration;

use cairn_protocol::identity::SiteId;
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{request_response, Multiaddr};

use super::net::{self, BehaviourEvent, Frame, Kind, ANSWER_OK};
use super::peer_name::PeerName;

/// Why `cairn recover --bootstrap` got no wrapped keys.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("--bootstrap")]
    Address(#[source] net::AddressError),
    #[error("cannot start the network for the partners")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the network for the partners")]
    Net(#[source] net::NetError),
    #[error("no node answered at {addresses} within {secs}s")]
    NoAnswer { addresses: String, secs: u64 },
    #[error("no node there holds this site's wrapped keys ({0})")]
    NotHeld(String),
}

/// How long `cairn recover --bootstrap` waits for the nodes it was given.
pub(super) const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks partner nodes for a site's wrapped-keys record, for `cairn recover` on a fresh
/// machine. Uses a throwaway identity: the machine has no node certificate yet, and the
/// record is all a node serves to a stranger.
pub fn fetch_wrapped_keys(site: &SiteId, addresses: &[String]) -> Result<Vec<u8>, RecoverError> {
    let addresses: Vec<Multiaddr> = addresses
        .iter()
        .map(|a| net::multiaddr(a).map_err(RecoverError::Address))
        .collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RecoverError::Runtime)?;
    runtime.block_on(async {
        let key = ed25519_dalek::SigningKey::from_bytes(&crate::datadir::random_bytes());
        let mut swarm = net::swarm(&key, false).map_err(RecoverError::Net)?;
        for addr in &addresses {
            let _ = swarm.dial(addr.clone());
        }
        let mut refusals = Vec::new();
        let mut failures = 0;
        let deadline = tokio::time::sleep(RECOVER_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                event = swarm.select_next_some() => event,
                _ = &mut deadline => break,
            };
            match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    swarm
                        .behaviour_mut()
                        .cairn
                        .send_request(&peer_id, Frame::new(Kind::WrappedKeys, site.0.to_vec()));
                }
                SwarmEvent::Behaviour(BehaviourEvent::Cairn(
                    request_response::Event::Message {
                        peer,
                        message: request_response::Message::Response { response, .. },
                        ..
                    },
                )) => {
                    if response.kind == ANSWER_OK {
                        return Ok(response.payload);
                    }
                    refusals.push(format!(
                        "{}: {}",
                        PeerName::of(&peer),
                        String::from_utf8_lossy(&response.payload)
                    ));
                }
                SwarmEvent::OutgoingConnectionError { .. }
                | SwarmEvent::Behaviour(BehaviourEvent::Cairn(
                    request_response::Event::OutboundFailure { .. },
                )) => failures += 1,
                _ => {}
            }
            if refusals.len() + failures >= addresses.len() {
                break;
            }
        }
        if refusals.is_empty() {
            return Err(RecoverError::NoAnswer {
                addresses: addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                secs: RECOVER_TIMEOUT.as_secs(),
            });
        }
        Err(RecoverError::NotHeld(refusals.join("; ")))
    })
}

//! `cairn recover --bootstrap`: fetching a site's wrapped keys from partners as a stranger.

use super::*;

/// How long `cairn recover --bootstrap` waits for the nodes it was given.
pub(super) const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks partner nodes for a site's wrapped-keys record, for `cairn recover` on a fresh
/// machine. Uses a throwaway identity: the machine has no node certificate yet, and the
/// record is all a node serves to a stranger.
pub fn fetch_wrapped_keys(site: &SiteId, addresses: &[String]) -> Result<Vec<u8>> {
    let addresses: Vec<Multiaddr> = addresses
        .iter()
        .map(|a| net::multiaddr(a).with_context(|| format!("--bootstrap {a}")))
        .collect::<Result<_>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let key = ed25519_dalek::SigningKey::from_bytes(&crate::datadir::random_bytes());
        let mut swarm = net::swarm(&key, false)?;
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
                        "{peer}: {}",
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
            anyhow::bail!(
                "no node answered at {} within {}s",
                addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                RECOVER_TIMEOUT.as_secs()
            );
        }
        anyhow::bail!(
            "no node there holds this site's wrapped keys ({})",
            refusals.join("; ")
        )
    })
}

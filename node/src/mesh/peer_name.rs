//! One name for a peer in every log line of the mesh: its node id as `cairn status` shows
//! it (the first group), and its site's name where this node knows it, e.g.
//! `node KMWLAOF (Office C)`. libp2p's PeerId never appears: a cairn node's PeerId is its
//! node key, so the node id is always at hand, and a reader of the log should not have
//! to match two spellings of one peer.

use std::fmt;

use cairn_protocol::identity::{NodeId, SiteId};
use libp2p::PeerId;

use super::Node;
use crate::trust;

/// How a log line names a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerName {
    /// None: the peer's key is not an ed25519 key, so it is no cairn node.
    node: Option<NodeId>,
    site_name: Option<String>,
}

impl PeerName {
    pub fn node(node: NodeId) -> PeerName {
        PeerName {
            node: Some(node),
            site_name: None,
        }
    }

    /// A peer known only by its libp2p identity.
    pub fn of(peer: &PeerId) -> PeerName {
        PeerName {
            node: node_of_peer(peer),
            site_name: None,
        }
    }

    pub fn with_site(mut self, site_name: Option<String>) -> PeerName {
        self.site_name = site_name;
        self
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(node) = &self.node else {
            return f.write_str("a peer that is not a cairn node (not an ed25519 key)");
        };
        write!(f, "node {}", crate::status::short_node_id(node))?;
        if let Some(site) = &self.site_name {
            // Site names come from other sites' certificates: no control characters.
            let site: String = site
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            write!(f, " ({site})")?;
        }
        Ok(())
    }
}

impl Node {
    /// A peer's name for the log, with its site's name once its certificate is known.
    pub(super) fn name_peer(&self, peer: &PeerId) -> PeerName {
        match node_of_peer(peer) {
            Some(node) => self.name_node(&node),
            None => PeerName::of(peer),
        }
    }

    pub(super) fn name_node(&self, node: &NodeId) -> PeerName {
        let site = self
            .engine
            .peers()
            .find(|(n, _, _)| n == node)
            .map(|(_, site, _)| site);
        PeerName::node(*node).with_site(site.and_then(|site| self.site_name(&site)))
    }

    /// What this site calls `site`: its own name, or the partner's name in `trust list`.
    pub(super) fn site_name(&self, site: &SiteId) -> Option<String> {
        if *site == self.vault.dir.site_id() {
            return Some(self.vault.dir.site_name.clone());
        }
        let partners = trust::partners(&self.vault).ok()?;
        let wanted = site.to_string();
        partners
            .into_iter()
            .find(|p| p.site_id == wanted)
            .map(|p| p.name)
    }
}

/// The node key inside a PeerId: an ed25519 key is short enough that libp2p writes it
/// into the id itself (an identity multihash of the protobuf-encoded key).
pub fn node_of_peer(peer: &PeerId) -> Option<NodeId> {
    let bytes = peer.to_bytes();
    // Identity multihash: code 0, then the digest's length (one varint byte here).
    let [0x00, len, digest @ ..] = bytes.as_slice() else {
        return None;
    };
    if usize::from(*len) != digest.len() {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(digest).ok()?;
    Some(NodeId(key.try_into_ed25519().ok()?.to_bytes()))
}

#[cfg(test)]
mod tests {
    use cairn_protocol::identity::NodeId;
    use libp2p::PeerId;

    use super::{node_of_peer, PeerName};

    fn node(seed: u8) -> (NodeId, PeerId) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let node = NodeId(key.verifying_key().to_bytes());
        let peer = super::super::net::peer_id(&node).expect("an ed25519 point");
        (node, peer)
    }

    #[test]
    fn a_peer_is_named_by_its_node_id_as_status_shows_it_and_its_site() {
        let (node, peer) = node(3);
        let first_group = crate::status::short_node_id(&node);
        assert_eq!(first_group.len(), 7);
        assert_eq!(
            PeerName::node(node).to_string(),
            format!("node {first_group}")
        );
        assert_eq!(
            PeerName::of(&peer)
                .with_site(Some("Office C".into()))
                .to_string(),
            format!("node {first_group} (Office C)")
        );
        assert_eq!(node_of_peer(&peer), Some(node));
        assert!(!PeerName::of(&peer).to_string().contains(&peer.to_string()));
        assert_eq!(
            PeerName::node(node)
                .with_site(Some("Evil\n2026 INFO fake".into()))
                .to_string(),
            format!("node {first_group} (Evil?2026 INFO fake)")
        );
    }

    #[test]
    fn a_peer_without_an_ed25519_key_is_not_named_by_its_peer_id() {
        let peer = PeerId::random();
        let name = PeerName::of(&peer).to_string();
        assert_eq!(name, "a peer that is not a cairn node (not an ed25519 key)");
    }

    /// The tracing lines of every mesh file: none may format a
    /// libp2p PeerId, a swarm event (whose Debug text is full of them), or a node id in
    /// any form but `PeerName`.
    #[test]
    fn no_mesh_log_line_prints_a_raw_peer_id() {
        let files = [
            ("mod.rs", include_str!("mod.rs")),
            ("events.rs", include_str!("events.rs")),
            ("hello.rs", include_str!("hello.rs")),
            ("requests.rs", include_str!("requests.rs")),
            ("transmit.rs", include_str!("transmit.rs")),
            ("publish.rs", include_str!("publish.rs")),
            ("status.rs", include_str!("status.rs")),
            ("storage.rs", include_str!("storage.rs")),
            ("recover.rs", include_str!("recover.rs")),
            ("lag.rs", include_str!("lag.rs")),
            ("dial.rs", include_str!("dial.rs")),
            ("invite.rs", include_str!("invite.rs")),
            ("admit.rs", include_str!("admit.rs")),
            ("net.rs", include_str!("net.rs")),
        ];
        let forbidden = [
            "{peer}",
            "{peer:?}",
            "{peer_id}",
            "{peer_id:?}",
            "{other:?}",
            "{node}",
            "{from}",
            "{to}",
            ", peer)",
            ", peer_id)",
            "short(&",
        ];
        let mut n_lines = 0;
        for (file, text) in files {
            for call in tracing_calls(text) {
                n_lines += 1;
                for pattern in forbidden {
                    assert!(
                        !call.contains(pattern),
                        "{file}: a log line formats {pattern}: {call}"
                    );
                }
            }
        }
        assert!(n_lines > 20, "the scan found the log lines ({n_lines})");
    }

    /// The text of every `trace!`/`debug!`/`info!`/`warn!`/`error!` call, to its closing
    /// parenthesis.
    fn tracing_calls(text: &str) -> Vec<&str> {
        let mut calls = Vec::new();
        for level in ["trace!(", "debug!(", "info!(", "warn!(", "error!("] {
            let mut rest = text;
            while let Some(at) = rest.find(level) {
                let call = &rest[at..];
                let mut depth = 0;
                let mut end = call.len();
                for (i, c) in call.char_indices() {
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                calls.push(&call[..end]);
                rest = &call[level.len()..];
            }
        }
        calls
    }
}

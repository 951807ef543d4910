//! Sending: engine messages to connected peers, queued behind a dial or the upload limit.

use cairn_protocol::engine::Message;
use cairn_protocol::identity::NodeId;
use libp2p::PeerId;

use super::net::{Frame, Kind};
use super::{is_bulk, message_name, now_ms, Node, OUTBOX_MESSAGES_MAX};

impl Node {
    pub(super) fn transmit(&mut self, to: NodeId, message: Message) {
        tracing::trace!("to {}: {}", self.name_node(&to), message_name(&message));
        if let Some(peer) = self.peer_of_node.get(&to).copied() {
            if self.links.get(&peer).is_some_and(|l| l.ready) {
                self.send_mesh(peer, &message);
                return;
            }
        }
        if !self.dial_node(to) {
            self.unreachable(to, message);
            return;
        }
        let outbox = self.outbox.entry(to).or_default();
        if outbox.len() >= OUTBOX_MESSAGES_MAX {
            // The engine retries what matters; a peer this far behind gets the newest.
            outbox.pop_front();
        }
        outbox.push_back(message);
    }

    /// A message that cannot reach its node. A fetch is answered for it at once with
    /// "not here", as a holder without the chunk would, so a restore moves on to the
    /// next holder instead of waiting out the request timeout.
    pub(super) fn unreachable(&mut self, to: NodeId, message: Message) {
        if let Message::Fetch { owner, id } = message {
            let reply = Message::FetchReply {
                owner,
                id,
                sealed: None,
            };
            self.engine.handle_message(to, reply, now_ms());
        }
    }

    pub(super) fn send_mesh(&mut self, peer: PeerId, message: &Message) {
        let bytes = message.encode();
        if is_bulk(message) {
            let wait = self
                .upload
                .take(bytes.len() as u64, std::time::Instant::now());
            if !wait.is_zero() || !self.uploads.is_empty() {
                let at = tokio::time::Instant::now() + wait;
                let at = self.uploads.back().map_or(at, |last| at.max(last.0));
                self.uploads.push_back((at, peer, bytes));
                return;
            }
        }
        self.send_bytes(peer, bytes);
    }

    /// Sends and handles the chunk messages whose time under the limits has come.
    pub(super) fn release_bulk(&mut self) {
        let now = tokio::time::Instant::now();
        while self.uploads.front().is_some_and(|u| u.0 <= now) {
            let (_, peer, bytes) = self.uploads.pop_front().expect("checked");
            self.send_bytes(peer, bytes);
        }
        while self.downloads.front().is_some_and(|d| d.0 <= now) {
            let (_, node, message) = self.downloads.pop_front().expect("checked");
            self.engine.handle_message(node, message, now_ms());
        }
    }

    pub(super) fn send_bytes(&mut self, peer: PeerId, bytes: Vec<u8>) {
        if let Some(link) = self.links.get_mut(&peer) {
            link.bytes_sent += bytes.len() as u64;
        }
        self.swarm
            .behaviour_mut()
            .cairn
            .send_request(&peer, Frame::new(Kind::Mesh, bytes));
    }

    /// Sends a message to every peer that said hello.
    pub(super) fn send_to_peers(&mut self, message: &Message) {
        let ready: Vec<PeerId> = self
            .links
            .iter()
            .filter(|(_, l)| l.ready)
            .map(|(p, _)| *p)
            .collect();
        for peer in ready {
            self.send_mesh(peer, message);
        }
    }
}

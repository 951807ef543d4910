//! The node's libp2p stack: QUIC (quinn underneath) for every peer, a relay client and
//! DCUtR hole punching for offices behind NAT, mDNS on the LAN, identify to keep
//! addresses current, ping for round-trip times, and one request-response protocol,
//! `/cairn/1`, that carries everything cairn says: each request is a kind byte and a
//! payload, each answer the same. Streams are QUIC streams, so many chunks are in flight
//! on one connection at once.

use std::io;
use std::time::Duration;

use cairn_protocol::identity::NodeId;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::core::multiaddr::Protocol;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, connection_limits, dcutr, identify, mdns, ping, relay, request_response,
    Multiaddr, PeerId, StreamProtocol, Swarm,
};

/// Why the libp2p stack cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the node key is not a libp2p identity")]
    Identity(#[source] libp2p::identity::DecodingError),
    #[error("cannot build the libp2p stack")]
    Build(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Why an address someone wrote is not one to dial or listen on.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("{text:?} is not a multiaddr")]
    NotMultiaddr {
        text: String,
        #[source]
        source: libp2p::multiaddr::Error,
    },
    #[error("{text:?} is not HOST:PORT")]
    NotHostPort {
        text: String,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} resolves to no address")]
    NoAddress(String),
}

/// The one protocol cairn speaks to peers.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/cairn/1");
/// Largest request or answer: a full chunk message with room to spare.
pub const FRAME_BYTES_MAX: usize = 40 << 20;
/// QUIC streams one connection may have open at once: chunks in flight per peer.
pub const STREAMS_PER_CONNECTION_MAX: usize = 512;
/// A request not answered in this long fails (a chunk over a slow office uplink).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// QUIC handshakes from others under way at once.
pub const PENDING_INCOMING_MAX: u32 = 64;
/// Connections others opened to this node, at once.
pub const ESTABLISHED_INCOMING_MAX: u32 = 512;
/// Connections to one peer at once.
pub const CONNECTIONS_PER_PEER_MAX: u32 = 4;
/// Connections with no open streams are closed after this long.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);

/// What a request is; the answer to each kind is described beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The dialer's node certificate and the grants it holds between the two sites;
    /// answered with the listener's, or a refusal. Nothing else is served before it.
    Hello = 1,
    /// An engine message; answered with nothing.
    Mesh = 2,
    /// A site id; answered with that site's wrapped-keys record (ciphertext under its
    /// recovery key), which is all an unknown node can ask for.
    WrappedKeys = 3,
    /// An accepted invite and the acceptor's grant; answered with the inviter's grant.
    Accept = 4,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Mesh,
            3 => Kind::WrappedKeys,
            4 => Kind::Accept,
            _ => return None,
        })
    }
}

/// One request or answer on the wire: a kind (or status) byte and a payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(kind: Kind, payload: Vec<u8>) -> Frame {
        Frame {
            kind: kind as u8,
            payload,
        }
    }
}

/// Answer status bytes.
pub const ANSWER_OK: u8 = 0;
pub const ANSWER_REFUSED: u8 = 1;
/// Not refused, but this node cannot answer it (an invite completion asked of a node
/// that did not make the invite): ask another.
pub const ANSWER_ELSEWHERE: u8 = 2;

/// Length-prefixed frames, bounded by `FRAME_BYTES_MAX`.
#[derive(Clone, Default)]
pub struct FrameCodec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Frame> {
    let mut head = [0u8; 5];
    io.read_exact(&mut head).await?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the {FRAME_BYTES_MAX} limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[0],
        payload,
    })
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    frame: Frame,
) -> io::Result<()> {
    if frame.payload.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame over the limit",
        ));
    }
    let mut head = [0u8; 5];
    head[0] = frame.kind;
    head[1..].copy_from_slice(&(frame.payload.len() as u32).to_le_bytes());
    io.write_all(&head).await?;
    io.write_all(&frame.payload).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Frame;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Frame>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        frame: Frame,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, frame).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        frame: Frame,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, frame).await
    }
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Bounds on connections before any cairn code sees them: handshakes under way and
    /// connections established, so a dial flood cannot grow the node without bound
    /// (per remote address and per hello, admission bounds them further).
    pub limits: connection_limits::Behaviour,
    /// Peers refused at hello are blocked for a while: their connections are denied.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub cairn: request_response::Behaviour<FrameCodec>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub relay: relay::client::Behaviour,
    pub dcutr: dcutr::Behaviour,
}

/// Builds the swarm for a node key. `mdns` is off in tests: it multicasts on every
/// interface.
pub fn swarm(
    node_key: &ed25519_dalek::SigningKey,
    mdns: bool,
) -> Result<Swarm<Behaviour>, NetError> {
    let keypair = Keypair::ed25519_from_bytes(node_key.to_bytes()).map_err(NetError::Identity)?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic_config(|mut config| {
            // Windows sized for office WAN links with many chunks in flight.
            config.max_concurrent_stream_limit = STREAMS_PER_CONNECTION_MAX as u32;
            config.max_stream_data = 16 << 20;
            config.max_connection_data = 64 << 20;
            config.keep_alive_interval = Duration::from_secs(10);
            config
        })
        .with_relay_client(libp2p::noise::Config::new, libp2p::yamux::Config::default)
        .map_err(|e| NetError::Build(Box::new(e)))?
        .with_behaviour(|key, relay| {
            let peer_id = key.public().to_peer_id();
            let cairn = request_response::Behaviour::with_codec(
                FrameCodec,
                [(PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(REQUEST_TIMEOUT)
                    .with_max_concurrent_streams(STREAMS_PER_CONNECTION_MAX),
            );
            let mdns = if mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_pending_incoming(Some(PENDING_INCOMING_MAX))
                        .with_max_established_incoming(Some(ESTABLISHED_INCOMING_MAX))
                        .with_max_established_per_peer(Some(CONNECTIONS_PER_PEER_MAX)),
                ),
                blocked: Default::default(),
                cairn,
                identify: identify::Behaviour::new(
                    // No version: a stranger learns no more than that this is cairn.
                    identify::Config::new("/cairn/id/1".into(), key.public())
                        .with_agent_version("cairn".into()),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(15)),
                ),
                mdns: mdns.into(),
                relay,
                dcutr: dcutr::Behaviour::new(peer_id),
            })
        })
        .map_err(|e| NetError::Build(Box::new(e)))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}

/// The libp2p peer id of a node: its node key is its libp2p identity. None for bytes
/// that are not an ed25519 point.
pub fn peer_id(node: &NodeId) -> Option<PeerId> {
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&node.0).ok()?;
    Some(libp2p::identity::PublicKey::from(key).to_peer_id())
}

/// Turns what people write (`host:port`, `[v6]:port`, or a multiaddr) into the QUIC
/// multiaddr to dial or listen on. Host names are resolved now.
pub fn multiaddr(text: &str) -> Result<Multiaddr, AddressError> {
    if text.starts_with('/') {
        return text.parse().map_err(|source| AddressError::NotMultiaddr {
            text: text.into(),
            source,
        });
    }
    use std::net::ToSocketAddrs;
    let socket = text
        .to_socket_addrs()
        .map_err(|source| AddressError::NotHostPort {
            text: text.into(),
            source,
        })?
        .next()
        .ok_or_else(|| AddressError::NoAddress(text.into()))?;
    let ip = match socket.ip() {
        std::net::IpAddr::V4(ip) => Protocol::Ip4(ip),
        std::net::IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Ok(Multiaddr::empty()
        .with(ip)
        .with(Protocol::Udp(socket.port()))
        .with(Protocol::QuicV1))
}

/// The peer id a multiaddr ends with, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use cairn_protocol::identity::NodeId;
    use libp2p::identity::Keypair;

    use super::{multiaddr, peer_id, AddressError};

    #[test]
    fn addresses_people_write_become_quic_multiaddrs() {
        assert_eq!(
            multiaddr("127.0.0.1:7420").unwrap().to_string(),
            "/ip4/127.0.0.1/udp/7420/quic-v1"
        );
        assert_eq!(
            multiaddr("[::1]:9").unwrap().to_string(),
            "/ip6/::1/udp/9/quic-v1"
        );
        assert_eq!(
            multiaddr("/ip4/10.0.0.1/udp/1/quic-v1")
                .unwrap()
                .to_string(),
            "/ip4/10.0.0.1/udp/1/quic-v1"
        );
    }

    #[test]
    fn an_address_error_names_the_text_once_and_its_cause_after_it() {
        let error = multiaddr("/not/a/multiaddr").unwrap_err();
        let line = crate::units::chain(&error);
        assert!(
            line.starts_with("\"/not/a/multiaddr\" is not a multiaddr: "),
            "{line}"
        );
        assert_eq!(line.matches("not/a/multiaddr").count(), 1, "{line}");
        let error = multiaddr("nonsense").unwrap_err();
        assert!(matches!(error, AddressError::NotHostPort { .. }));
        let line = crate::units::chain(&error);
        assert!(
            line.starts_with("\"nonsense\" is not HOST:PORT: "),
            "{line}"
        );
        assert_eq!(line.matches("nonsense").count(), 1, "{line}");
    }

    #[test]
    fn a_node_id_is_its_peer_id() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let node = NodeId(key.verifying_key().to_bytes());
        let keypair = Keypair::ed25519_from_bytes(key.to_bytes()).unwrap();
        assert_eq!(peer_id(&node), Some(keypair.public().to_peer_id()));
    }
}

//! Admission end to end (issue 14, item 3b): a stock libp2p peer of no site, built here,
//! dials a real node. It must be cut off within the hello deadline, identify must tell it
//! no version, and a bounded flood of such dials must leave the node's memory bounded
//! and its partner served. Loopback only; every loop is bounded in count and time.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn::mesh::{at_r, wait_for, Mesh};
use futures::StreamExt;
use libp2p::swarm::{dial_opts::DialOpts, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, ping, Multiaddr, Swarm};

#[derive(NetworkBehaviour)]
struct Stranger {
    ping: ping::Behaviour,
    identify: identify::Behaviour,
}

fn stranger() -> Result<Swarm<Stranger>> {
    Ok(libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|key| Stranger {
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(1))),
            identify: identify::Behaviour::new(identify::Config::new(
                "/ipfs/id/1.0.0".into(),
                key.public(),
            )),
        })?
        // The stranger would stay as long as it likes: only the node may close.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build())
}

fn quic(address: &str) -> Result<Multiaddr> {
    let (host, port) = address.rsplit_once(':').context("HOST:PORT")?;
    Ok(format!("/ip4/{host}/udp/{port}/quic-v1").parse()?)
}

/// What one stranger saw: the agent identify gave, and how long it stayed connected
/// (None: still connected when the wait ended).
async fn visit(addr: Multiaddr, wait: Duration) -> Result<(Option<String>, Option<Duration>)> {
    let mut swarm = stranger()?;
    swarm.dial(DialOpts::unknown_peer_id().address(addr).build())?;
    let end = tokio::time::Instant::now() + wait;
    let mut agent = None;
    let mut connected_at = None;
    loop {
        let event = tokio::select! {
            e = swarm.select_next_some() => e,
            _ = tokio::time::sleep_until(end) => return Ok((agent, None)),
        };
        match event {
            SwarmEvent::ConnectionEstablished { .. } => connected_at = Some(Instant::now()),
            SwarmEvent::Behaviour(StrangerEvent::Identify(identify::Event::Received {
                info,
                ..
            })) => agent = Some(info.agent_version),
            SwarmEvent::ConnectionClosed { .. } => {
                return Ok((agent, connected_at.map(|t| t.elapsed())));
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                anyhow::bail!("the stranger could not connect: {error}")
            }
            _ => {}
        }
    }
}

#[test]
fn a_stranger_is_cut_off_and_a_dial_flood_leaves_the_node_serving() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut configure = |node: &mut cairn::mesh::Node| {
        node.extra_args = vec!["--replication".into(), "2".into()];
    };
    let mesh = Mesh::build_with(root.path(), 2, 1, &mut configure, &mut |s| eprintln!("{s}"))?;
    let a1 = &mesh.sites[0][0];
    let addr = quic(&a1.address())?;
    let runtime = tokio::runtime::Runtime::new()?;

    // One stranger: the node closes its connection at the hello deadline (5 s), far
    // sooner than the 30 s it would otherwise stay.
    let (agent, stayed) = runtime.block_on(visit(addr.clone(), Duration::from_secs(30)))?;
    let stayed = stayed.context("the node kept a stranger connected for 30 s")?;
    eprintln!("a stranger stayed connected {stayed:?}; identify said {agent:?}");
    ensure!(
        agent.as_deref().is_none_or(|a| !a.contains('/')),
        "identify told a stranger the version: {agent:?}"
    );

    // A flood: 200 connections from strangers, 50 at a time, each bounded to 20 s.
    let rss_before = a1.rss_bytes().context("the node's RSS")?;
    let started = Instant::now();
    let mut n_closed = 0;
    let mut n_refused = 0;
    runtime.block_on(async {
        for _ in 0..4 {
            let visits: Vec<_> = (0..50)
                .map(|_| tokio::spawn(visit(addr.clone(), Duration::from_secs(20))))
                .collect();
            for v in visits {
                match v.await.expect("a stranger task") {
                    Ok((_, Some(_))) => n_closed += 1,
                    Ok((_, None)) => {}
                    Err(_) => n_refused += 1,
                }
            }
        }
    });
    let rss_after = a1.rss_bytes().context("the node's RSS")?;
    eprintln!(
        "flood of 200 stranger connections in {:?}: {n_closed} closed by the node, {n_refused} refused, RSS {} -> {} KiB",
        started.elapsed(),
        rss_before / 1024,
        rss_after / 1024
    );
    ensure!(
        n_closed + n_refused == 200,
        "{} strangers stayed connected 20 s",
        200 - n_closed - n_refused
    );
    ensure!(
        rss_after < rss_before + (64 << 20),
        "the node grew from {rss_before} to {rss_after} bytes under a dial flood"
    );

    // The partner is still served: a small backup reaches it.
    let image = root.path().join("small.img");
    std::fs::write(&image, cairn::random_bytes(1 << 20, 7))?;
    a1.ok(&["backup", "small", image.to_str().context("utf-8")?])?;
    wait_for(Duration::from_secs(60), "the backup at both sites", || {
        Ok(at_r(&a1.status()?, "small"))
    })?;
    Ok(())
}

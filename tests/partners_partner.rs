//! Issue 14 item 3 end to end: a site trusted only by one of our partners (a partner's
//! partner) is refused by our nodes and never gets our records. Sites A, B and C are
//! partners (the harness partners every pair); D is C's partner alone and dials every
//! node of the mesh.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn::mesh::{peer_state, wait_for, Mesh, Node};
use cairn_protocol::identity::NodeId;

fn id_bytes(node: &Node) -> Result<[u8; 32]> {
    let id: NodeId = node.node_id()?.parse()?;
    Ok(id.0)
}

/// True when any file under `dir` holds `needle` (a record stored there names it).
fn dir_contains(dir: &Path, needle: &[u8]) -> Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if dir_contains(&path, needle)? {
                return Ok(true);
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn token(output: &str, prefix: &str) -> Result<String> {
    Ok(output
        .split_whitespace()
        .find(|w| w.starts_with(prefix))
        .context("a token in the output")?
        .to_owned())
}

#[test]
fn a_partners_partner_is_refused_and_gets_none_of_this_sites_records() {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-partners-partner-")
        .tempdir()
        .expect("temp dir");
    let started = Instant::now();
    let mut step = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());
    let mut d = None;
    let result = (|| -> Result<()> {
        let mesh = Mesh::build(tmp.path(), 3, 1, &mut step)?;
        let (a, c) = (&mesh.sites[0][0], &mesh.sites[2][0]);
        let d = d.insert(mesh.stranger("d1", "Office D")?);
        let all: Vec<String> = mesh.nodes().map(Node::address).collect();
        d.start(&[])?;
        let invite = c.ok(&[
            "trust",
            "invite",
            "--quota",
            "50GB",
            "--address",
            &c.address(),
        ])?;
        let invite = token(&invite, "cairn-invite-")?;
        d.ok(&["trust", "accept", &invite, "--quota", "50GB", "--yes"])?;
        let d_id = d.node_id()?;
        wait_for(Duration::from_secs(60), "C and D to be live peers", || {
            Ok(peer_state(&c.status()?, &d_id).as_deref() == Some("live"))
        })?;
        // Now D dials every node of the mesh, A's among them.
        d.stop();
        d.start(&all)?;
        step("D is C's partner and knows every address of the mesh");
        let a_id = a.node_id()?;
        let a_bytes = id_bytes(a)?;
        // On the old rules A took D for a peer within a few gossip rounds; give it ample.
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            let a_status = a.status()?;
            ensure!(
                peer_state(&a_status, &d_id).is_none(),
                "A lists D as a peer: {}",
                a_status["peers"]
            );
            let d_status = d.status()?;
            ensure!(
                peer_state(&d_status, &a_id).is_none(),
                "D knows A's node: {}",
                d_status["peers"]
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        ensure!(
            !dir_contains(&d.data_dir, &a_bytes)?,
            "D's data dir holds a record naming A's node"
        );
        ensure!(
            dir_contains(&c.data_dir, &a_bytes)?,
            "the check is blind: C's data dir should hold A's node certificate"
        );
        step("A refused D, and D holds nothing of A's");
        Ok(())
    })();
    if let Err(e) = result {
        let logs = d.as_ref().map(Node::log_tail).unwrap_or_default();
        panic!("failed: {e:#}\n--- d1\n{logs}");
    }
}

//! Invites end to end (issue 14, items 6 and 7): an invite made as the README shows it
//! (no `--address`) completes, and a second site accepting a used invite is told it is
//! refused once, sees it in `trust list`, and stops asking.

use std::time::Duration;

use anyhow::{Context, Result};
use cairn::mesh::{wait_for, Mesh, Node};

fn token(text: &str) -> Result<String> {
    Ok(text
        .split_whitespace()
        .find(|w| w.starts_with("cairn-invite-"))
        .context("trust invite prints a token")?
        .to_owned())
}

fn partners(node: &Node) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &node.ok(&["trust", "list", "--json"])?,
    )?)
}

fn n_peers(node: &Node) -> usize {
    node.status()
        .map_or(0, |s| s["peers"].as_array().map_or(0, |p| p.len()))
}

#[test]
fn an_invite_without_address_completes_and_a_second_acceptor_is_refused_once() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mesh = Mesh::build(root.path(), 1, 1, &mut |s| eprintln!("{s}"))?;
    let a1 = &mesh.sites[0][0];
    let mut b1 = mesh.stranger("b1", "Bravo")?;
    b1.start(&[])?;
    let mut c1 = mesh.stranger("c1", "Charlie")?;
    c1.start(&[])?;

    // As the README shows it: no --address. The invite offers where A's node listens.
    let invite = a1.ok(&["trust", "invite", "--quota", "1GB"])?;
    let token = token(&invite)?;
    let said = b1.ok(&["trust", "accept", &token, "--quota", "1GB", "--yes"])?;
    eprintln!("accept said: {said}");
    wait_for(Duration::from_secs(60), "the invite to complete", || {
        Ok(partners(a1)?.as_array().map_or(0, |l| l.len()) == 1
            && n_peers(a1) == 1
            && n_peers(&b1) == 1)
    })
    .with_context(|| format!("{}\n{}", a1.log_tail(), b1.log_tail()))?;
    eprintln!("an invite without --address completed");

    // The same invite accepted by a third site: refused, shown, and not asked again.
    c1.ok(&["trust", "accept", &token, "--quota", "1GB", "--yes"])?;
    wait_for(Duration::from_secs(60), "the refusal in trust list", || {
        Ok(partners(&c1)?
            .as_array()
            .and_then(|l| l.first())
            .is_some_and(|p| p["refused"].is_string()))
    })
    .with_context(|| c1.log_tail())?;
    // Three retry intervals: on main it asked (and warned) every 5 s.
    std::thread::sleep(Duration::from_secs(16));
    let n_warned = c1
        .log_text()
        .lines()
        .filter(|l| l.contains("refused to complete"))
        .count();
    assert_eq!(n_warned, 1, "{}", c1.log_tail());
    let listed = c1.ok(&["trust", "list"])?;
    assert!(listed.contains("refused:"), "{listed}");
    Ok(())
}

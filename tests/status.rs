//! `cairn status` on every node of a site: the site's second node shows where a snapshot
//! made on the first one is and names partners as the first does, also a partner added
//! after it joined; and no node ever says 100.0% while a chunk is below R.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cairn::mesh::{image_status, wait_for, Mesh, Node};
use cairn::{random_bytes, text_bytes, write};

#[test]
fn every_node_of_a_site_shows_its_snapshots_copies_and_partners_by_name() {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-status-")
        .tempdir()
        .expect("temp dir");
    if let Err(e) = run(tmp.path()) {
        panic!("{e:#}");
    }
}

/// The image's row of `cairn status` text, and its JSON row just after; fails when the
/// text says 100.0% of the image's chunks are at R and the JSON does not count them all.
fn check_percent(node: &Node, image: &str) -> Result<serde_json::Value> {
    let text = node.ok(&["status"])?;
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{image} ")))
        .unwrap_or_default()
        .to_owned();
    let status = node.status()?;
    if row.contains("100.0%") {
        let json = image_status(&status, image).unwrap_or_default();
        ensure!(
            json["chunks_at_target"] == json["chunks"],
            "{} says 100.0% while chunks are below R:\n{row}\n{json}",
            node.name
        );
    }
    Ok(status)
}

fn site_name_of<'a>(status: &'a serde_json::Value, list: &str, site_id: &str) -> Vec<&'a str> {
    status[list]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["site_id"] == site_id)
        .filter_map(|entry| entry["site_name"].as_str())
        .collect()
}

fn run(root: &Path) -> Result<()> {
    let mut step = |what: &str| eprintln!("status: {what}");
    let mut configure = |node: &mut Node| {
        node.extra_args = vec!["--replication".into(), "2".into()];
    };
    let mesh = Mesh::build_with(root, 2, 2, &mut configure, &mut step)?;
    let (a1, a2) = (&mesh.sites[0][0], &mesh.sites[0][1]);
    let (site_a, site_b) = (&mesh.site_ids[0], &mesh.site_ids[1]);
    let mut bytes = text_bytes(4 << 20, 5);
    bytes.extend(random_bytes(4 << 20, 6));
    let image = root.join("fs.img");
    write(&image, &bytes);
    a1.ok(&["backup", "fs", image.to_str().context("utf-8 temp path")?])?;
    step("a1 backed up 8 MiB");

    // a2 made nothing, holds part of the image at most, and still shows it reach R, with
    // its copies at both sites and the partner by the name it accepted the invite under.
    let mut seen_below_r = false;
    wait_for(Duration::from_secs(120), "a2 to show fs at R", || {
        check_percent(a1, "fs")?;
        let status = check_percent(a2, "fs")?;
        let Some(fs) = image_status(&status, "fs") else {
            return Ok(false);
        };
        let chunks = fs["chunks"].as_u64().unwrap_or(0);
        let at_r = chunks > 0 && fs["chunks_at_target"] == fs["chunks"];
        seen_below_r |= !at_r;
        let at = |site: &str| {
            fs["copies"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["site_id"] == site)
                .and_then(|c| c["chunks"].as_u64())
                .unwrap_or(0)
        };
        Ok(at_r && at(site_a) == chunks && at(site_b) == chunks)
    })
    .with_context(|| format!("a2 status: {:#}", a2.status().unwrap_or_default()))?;
    let status = a2.status()?;
    let fs = image_status(&status, "fs").context("fs on a2")?;
    ensure!(
        fs["replication_target"] == 2 && fs["chunks_checking"] == 0,
        "a2: {fs}"
    );
    let names = site_name_of(&fs, "copies", site_b);
    ensure!(names == ["Office B"], "a2 names site B {names:?}: {fs}");
    let names = site_name_of(&status, "peers", site_b);
    ensure!(
        !names.is_empty() && names.iter().all(|n| *n == "Office B"),
        "a2 names B's nodes' site {names:?}"
    );
    step(&format!(
        "a2 shows fs at R ({} chunks; below R seen: {seen_below_r}), B as Office B",
        fs["chunks"]
    ));

    // A partner added on a1 after a2 joined: a2 names it too, from the grant.
    let mut c1 = mesh.stranger("c1", "Office C")?;
    c1.extra_args = vec!["--replication".into(), "2".into()];
    c1.start(&[])?;
    let invite = a1.ok(&[
        "trust",
        "invite",
        "--quota",
        "50GB",
        "--address",
        &a1.address(),
    ])?;
    let token = invite
        .split_whitespace()
        .find(|w| w.starts_with("cairn-invite-"))
        .context("trust invite prints a token")?
        .to_owned();
    c1.ok(&["trust", "accept", &token, "--quota", "50GB", "--yes"])?;
    let c1_status = c1.status()?;
    let site_c = c1_status["site_id"].as_str().context("c1's site id")?;
    wait_for(Duration::from_secs(90), "a2 to name Office C", || {
        let status = a2.status()?;
        let names = site_name_of(&status, "peers", site_c);
        ensure!(
            names.iter().all(|n| *n == "Office C"),
            "a2 names C's node's site {names:?}"
        );
        Ok(!names.is_empty())
    })?;
    step("a2 names Office C, added on a1 after a2 joined");
    Ok(())
}

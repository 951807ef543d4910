//! `cairn forget`: a retention policy or one named snapshot, on a vault without a node and
//! through a running site of two nodes, where the tombstone reaches the other node.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cairn::mesh::{wait_for, Mesh};
use cairn::{random_bytes, write, Site};
use serde_json::Value;

fn snapshot_ids(site: &Site) -> Vec<String> {
    let listed: Value = serde_json::from_str(&site.ok(&["snapshots", "fs", "--json"])).unwrap();
    listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s["snapshot"].as_str().expect("an id").to_owned())
        .collect()
}

#[test]
fn forget_keeps_what_the_policy_keeps_and_names_what_it_forgot() {
    let site = Site::new();
    let image = site.path("fs.img");
    let mut made = Vec::new();
    for seed in 0..3 {
        write(&image, &random_bytes(300_000, seed));
        made.push(
            site.backup("fs", &image)["snapshot"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = snapshot_ids(&site);
    assert_eq!(before.len(), 3);

    // Refused: no rule and no policy in node.toml (it would forget everything), and a rule
    // with a named snapshot.
    let none = site.fails(&["forget", "fs"]);
    assert!(
        none.contains("give --keep-* rules, or a policy as [retention.fs]"),
        "{none}"
    );
    let both = site.fails(&["forget", &format!("fs@{}", before[0]), "--keep-last", "1"]);
    assert_eq!(
        both,
        "error: give either IMAGE@SNAPSHOT or --keep-* rules for IMAGE, not both"
    );
    let newest = site.fails(&["forget", "fs@"]);
    assert!(newest.contains("has no snapshot"), "{newest}");

    // A dry run says what would go and why, and changes nothing.
    let dry: Value = serde_json::from_str(&site.ok(&[
        "forget",
        "fs",
        "--keep-last",
        "1",
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["forgotten"], 2);
    assert_eq!(dry["kept"], 1);
    assert_eq!(dry["snapshots"][0]["reasons"], serde_json::json!(["last"]));
    assert_eq!(snapshot_ids(&site), before);

    let text = site.ok(&["forget", "fs", "--keep-last", "1"]);
    assert!(
        text.ends_with("fs: forgot 2 snapshot(s), 1 kept\n"),
        "{text}"
    );
    let after = snapshot_ids(&site);
    assert_eq!(after, vec![before[2].clone()]);

    // A forgotten snapshot is reported as forgotten, not as unknown.
    let out = site.path("out.img");
    let gone = site.fails(&[
        "restore",
        &format!("fs@{}", before[0]),
        out.to_str().unwrap(),
    ]);
    assert!(gone.contains("was forgotten at"), "{gone}");
    // The kept snapshot still restores.
    site.ok(&["restore", "fs", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
}

#[test]
fn a_snapshot_forgotten_on_one_node_is_gone_from_the_sites_other_node() {
    let tmp = tempfile::Builder::new()
        .prefix("cairn-forget-")
        .tempdir()
        .expect("temp dir");
    if let Err(e) = in_a_site(tmp.path()) {
        panic!("{e:#}");
    }
}

fn in_a_site(root: &Path) -> Result<()> {
    let mut step = |what: &str| eprintln!("forget: {what}");
    let mesh = Mesh::build(root, 1, 2, &mut step)?;
    let (a1, a2) = (&mesh.sites[0][0], &mesh.sites[0][1]);
    let image = root.join("fs.img");
    let path = image.to_str().context("utf-8 temp path")?;
    for seed in 0..2 {
        write(&image, &random_bytes(1 << 20, seed));
        a1.ok(&["backup", "fs", path])?;
    }
    let listed = |node: &cairn::mesh::Node| -> Result<usize> {
        let out: Value = serde_json::from_str(&node.ok(&["snapshots", "fs", "--json"])?)?;
        Ok(out.as_array().map_or(0, Vec::len))
    };
    wait_for(Duration::from_secs(60), "a2 to list both snapshots", || {
        Ok(a2.ok(&["snapshots", "fs"]).is_ok() && listed(a2)? == 2)
    })?;
    step("a2 lists both snapshots of a1");
    let first: Value = serde_json::from_str(&a1.ok(&["snapshots", "fs", "--json"])?)?;
    let oldest = first[0]["snapshot"].as_str().context("an id")?.to_owned();
    a1.ok(&["forget", &format!("fs@{oldest}")])?;
    ensure!(listed(a1)? == 1, "a1 still lists the forgotten snapshot");
    wait_for(
        Duration::from_secs(60),
        "a2 to drop the forgotten snapshot",
        || Ok(listed(a2)? == 1),
    )?;
    let err = a2.run(&["restore", &format!("fs@{oldest}"), "/nonexistent/out.img"]);
    let stderr = String::from_utf8_lossy(&err.stderr);
    ensure!(
        stderr.contains("was forgotten at"),
        "a2 does not know the snapshot was forgotten: {stderr}"
    );
    Ok(())
}

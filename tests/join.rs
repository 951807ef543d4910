//! A second office PC joins its site by pasting text: `cairn join` shows the new machine's
//! node id, `cairn site add-node` on a node of the site prints a token sealed to it, and
//! `cairn join TOKEN` makes it a node holding the same keys. Every bad token or request
//! gets one line and changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cairn::{assert_same_file, random_bytes, text_bytes, write, Site};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).expect("--json prints JSON")
}

/// `cairn join` without a token: the node id of the (new or waiting) data dir.
fn node_id(site: &Site) -> String {
    json(&site.ok(&["join", "--json"]))["node_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn add_node(site: &Site, node: &str, args: &[&str]) -> String {
    let mut all = vec!["site", "add-node", node, "--yes", "--json"];
    all.extend_from_slice(args);
    json(&site.ok(&all))["token"].as_str().unwrap().to_owned()
}

fn site_show(site: &Site) -> serde_json::Value {
    json(&site.ok(&["site", "show", "--json"]))
}

/// Still waiting to join: other commands are refused with a pointer to `cairn join`.
fn assert_still_joining(site: &Site, node: &str) {
    let line = site.fails(&["snapshots"]);
    assert!(
        line.contains("waiting to join") && line.contains("cairn join TOKEN"),
        "{line}"
    );
    assert_eq!(node_id(site), node);
    assert!(!site.data_dir().join("keys/vault.key").exists());
}

/// Replaces `to`'s store with a copy of `from`'s, as the mesh will bring chunks and
/// snapshot records from other nodes.
fn copy_store(from: &Site, to: &Site) {
    let target = to.data_dir().join("store");
    std::fs::remove_dir_all(&target).unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from.data_dir().join("store"))
        .arg(&target)
        .status()
        .unwrap();
    assert!(status.success());
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_second_pc_joins_and_reads_the_sites_backups() {
    let (office, desk) = (Site::new(), Site::empty());
    let node = node_id(&desk);
    assert_eq!(
        node.split('-').count(),
        8,
        "node ids print in 8 groups: {node}"
    );
    // Asking again shows the same id: one node key per machine.
    let human = desk.ok(&["join"]);
    assert!(
        human.contains(&format!("cairn site add-node {node}")),
        "{human}"
    );
    assert_eq!(mode(&desk.data_dir().join("keys/node.key")), 0o600);
    assert_still_joining(&desk, &node);

    let token = add_node(
        &office,
        &node,
        &[
            "--name",
            "front desk",
            "--capacity",
            "2TB",
            "--address",
            "/ip4/10.0.0.7/udp/4001/quic-v1",
            "--address",
            "/ip6/fd00::7/udp/4001/quic-v1",
        ],
    );
    assert!(token.starts_with("cairn-join-"), "{token}");
    let office_info = site_show(&office);
    let nodes = office_info["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{office_info}");
    let listed = nodes
        .iter()
        .find(|n| n["node_id"] == node.as_str())
        .unwrap();
    assert_eq!(listed["name"], "front desk");
    assert_eq!(listed["capacity_bytes"], 2_000_000_000_000u64);
    assert_eq!(listed["this_machine"], false);
    assert_eq!(
        listed["addresses"],
        serde_json::json!([
            "/ip4/10.0.0.7/udp/4001/quic-v1",
            "/ip6/fd00::7/udp/4001/quic-v1"
        ])
    );
    let human = office.ok(&["site", "show"]);
    assert!(
        human.contains("front desk") && human.contains("/ip4/10.0.0.7/udp/4001/quic-v1"),
        "{human}"
    );

    // Without a terminal and without --yes, nothing is joined.
    let line = desk.fails(&["join", &token]);
    assert!(line.contains("pass --yes"), "{line}");
    assert_still_joining(&desk, &node);

    let joined = json(&desk.ok(&["join", &token, "--yes", "--json"]));
    assert_eq!(joined["site_id"], office_info["site_id"]);
    assert_eq!(joined["node_id"], node.as_str());
    assert_eq!(joined["node_name"], "front desk");
    let desk_info = site_show(&desk);
    for field in ["site_id", "site_name", "fingerprint"] {
        assert_eq!(desk_info[field], office_info[field], "{field}");
    }
    let me = &desk_info["nodes"][0];
    assert_eq!(me["node_id"], node.as_str());
    assert_eq!(
        (&me["name"], &me["this_machine"]),
        (&"front desk".into(), &true.into())
    );
    for key in ["site.key", "vault.key", "node.key"] {
        assert_eq!(
            mode(&desk.data_dir().join("keys").join(key)),
            0o600,
            "{key}"
        );
    }
    assert!(desk.data_dir().join("wrapped-keys.rec").exists());
    assert_eq!(node_id_after_join(&desk), node);

    // Same vault key: a snapshot backed up at the office restores on the desk PC from the
    // office's chunks, and backing the image up there again finds every chunk known.
    let mut bytes = text_bytes(2 << 20, 3);
    bytes.extend(random_bytes(2 << 20, 4));
    let image = office.path("fs.img");
    write(&image, &bytes);
    office.backup("fileserver", &image);
    copy_store(&office, &desk);
    let restored = desk.path("fs.img");
    desk.ok(&["restore", "fileserver", restored.to_str().unwrap()]);
    assert_same_file(&image, &restored);
    let again = desk.backup("fileserver", &image);
    assert_eq!(again["n_chunks_new"], 0, "{again}");

    // A site with other keys cannot read the same chunks: the check above can fail.
    let stranger = Site::new();
    copy_store(&office, &stranger);
    let line = stranger.fails(&[
        "restore",
        "fileserver",
        stranger.path("x").to_str().unwrap(),
    ]);
    assert!(line.contains("no image named"), "{line}");
}

/// The node id `site show` gives for this machine once joined.
fn node_id_after_join(site: &Site) -> String {
    let info = site_show(site);
    let me = info["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["this_machine"] == true)
        .unwrap()
        .clone();
    me["node_id"].as_str().unwrap().to_owned()
}

#[test]
fn bad_tokens_and_requests_change_nothing() {
    let (office, desk, other) = (Site::new(), Site::empty(), Site::empty());
    let node = node_id(&desk);
    let other_node = node_id(&other);
    let before = site_show(&office);
    let office_node = before["nodes"][0]["node_id"].as_str().unwrap().to_owned();

    // add-node: a typo in the node id, this machine's own id, no terminal, bad hints.
    let mut typo = node.clone().into_bytes();
    typo[9] = if typo[9] == b'A' { b'B' } else { b'A' };
    let line = office.fails(&[
        "site",
        "add-node",
        std::str::from_utf8(&typo).unwrap(),
        "--yes",
    ]);
    assert!(line.contains("typo"), "{line}");
    let line = office.fails(&["site", "add-node", &office_node, "--yes"]);
    assert!(line.contains("own node id"), "{line}");
    let line = office.fails(&["site", "add-node", &node]);
    assert!(line.contains("pass --yes"), "{line}");
    let line = office.fails(&["site", "add-node", &node, "--address", "", "--yes"]);
    assert!(line.contains("bad address hints"), "{line}");
    assert_eq!(site_show(&office), before);

    let token = add_node(&office, &node, &[]);
    let for_other = add_node(&office, &other_node, &[]);

    // Tampered: one character of the body changed.
    let mut tampered = token.clone().into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'a' { b'b' } else { b'a' };
    let line = desk.fails(&["join", std::str::from_utf8(&tampered).unwrap(), "--yes"]);
    assert!(
        line.contains("altered") || line.contains("damaged"),
        "{line}"
    );
    // Truncated.
    let line = desk.fails(&["join", &token[..token.len() - 9], "--yes"]);
    assert!(
        line.contains("damaged or truncated") || line.contains("altered"),
        "{line}"
    );
    // Not a join token.
    let line = desk.fails(&["join", "cairn-invite-abcd", "--yes"]);
    assert!(line.contains("not a cairn join token"), "{line}");
    // Sealed to another machine.
    let line = desk.fails(&["join", &for_other, "--yes"]);
    assert!(
        line.contains(&format!("sealed to node {other_node}")) && line.contains(&node),
        "{line}"
    );
    // Expired.
    let short = add_node(&office, &node, &["--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let line = desk.fails(&["join", &short, "--yes"]);
    assert!(line.contains("expired"), "{line}");
    assert_still_joining(&desk, &node);

    // A data dir that is already a site's, or that never ran `cairn join`.
    let line = office.fails(&["join"]);
    assert!(line.contains("already belongs to a site"), "{line}");
    let line = office.fails(&["join", &token, "--yes"]);
    assert!(line.contains("already belongs to a site"), "{line}");
    let fresh = Site::empty();
    let line = fresh.fails(&["join", &token, "--yes"]);
    assert!(
        line.contains("run `cairn join` without a token first"),
        "{line}"
    );
    assert!(!fresh.data_dir().exists());
    let line = desk.fails(&["init", "--site-name", "x"]);
    assert!(line.contains("waiting to join"), "{line}");
    assert_still_joining(&desk, &node);

    // The real token still works after all that, once.
    desk.ok(&["join", &token, "--yes"]);
    desk.ok(&["snapshots"]);
    let line = desk.fails(&["join", &token, "--yes"]);
    assert!(line.contains("already belongs to a site"), "{line}");
}

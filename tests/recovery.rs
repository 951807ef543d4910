//! A site whose keys are lost comes back from its recovery key alone, and restores
//! byte for byte; wrong keys, typos and other sites' records are refused.

use cairn::{assert_same_file, random_bytes, text_bytes, write, Site};

fn init(site: &Site) -> (String, String) {
    let out: serde_json::Value =
        serde_json::from_str(&site.ok(&["init", "--site-name", "Harbour Road", "--json"])).unwrap();
    (
        out["site_id"].as_str().unwrap().to_owned(),
        out["recovery_key"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn lost_keys_come_back_from_the_recovery_key() {
    let site = Site::empty();
    let (site_id, recovery_key) = init(&site);
    assert_eq!(
        site_id.split('-').count(),
        8,
        "site ids print in 8 groups: {site_id}"
    );
    let mut bytes = text_bytes(3 << 20, 1);
    bytes.extend(random_bytes(2 << 20, 2));
    let image = site.path("dc.img");
    write(&image, &bytes);
    site.backup("dc01", &image);

    // The office burns: the keys are gone, the store survives (or comes from the mesh).
    std::fs::remove_dir_all(site.data_dir().join("keys")).unwrap();
    let line = site.fails(&["snapshots"]);
    assert!(line.contains("keys/site.key"), "{line}");

    // Another site's recovery key, and a typo, are refused without changing anything.
    let other = Site::empty();
    let (other_id, other_key) = init(&other);
    let line = site.fails(&["recover", "--site", &site_id, "--recovery-key", &other_key]);
    assert!(line.contains("wrong recovery key"), "{line}");
    let mut typo = recovery_key.clone().into_bytes();
    typo[3] = if typo[3] == b'A' { b'B' } else { b'A' };
    let line = site.fails(&[
        "recover",
        "--site",
        &site_id,
        "--recovery-key",
        std::str::from_utf8(&typo).unwrap(),
    ]);
    assert!(line.contains("typo"), "{line}");
    let line = site.fails(&["recover", "--site", &other_id, "--recovery-key", &other_key]);
    assert!(line.contains("belong to site"), "{line}");
    assert!(!site.data_dir().join("keys/site.key").exists());

    // The right key, typed in lower case without dashes, brings the site back.
    let typed = recovery_key.replace('-', "").to_lowercase();
    let out: serde_json::Value = serde_json::from_str(&site.ok(&[
        "recover",
        "--site",
        &site_id,
        "--recovery-key",
        &typed,
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["site_id"], site_id.as_str());
    assert_eq!(out["site_name"], "Harbour Road");
    let restored = site.path("dc.out");
    site.ok(&["restore", "dc01", restored.to_str().unwrap()]);
    assert_same_file(&image, &restored);
    assert!(site.run(&["verify"]).status.success());
    let line = site.fails(&[
        "recover",
        "--site",
        &site_id,
        "--recovery-key",
        &recovery_key,
    ]);
    assert!(line.contains("nothing to recover"), "{line}");

    // A fresh machine: a new data dir, the record read from the old one.
    let fresh = Site::empty();
    let from = site.data_dir();
    let out: serde_json::Value = serde_json::from_str(&fresh.ok(&[
        "recover",
        "--site",
        &site_id,
        "--recovery-key",
        &recovery_key,
        "--from",
        from.to_str().unwrap(),
        "--site-name",
        "Harbour Road (rebuilt)",
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["site_id"], site_id.as_str());
    let sheet = fresh.ok(&["key", "recovery-sheet", "--yes"]);
    assert!(
        sheet.contains(&recovery_key) && sheet.contains(&site_id),
        "{sheet}"
    );
}

#[test]
fn the_recovery_sheet_needs_confirmation() {
    let site = Site::empty();
    let (_, recovery_key) = init(&site);
    let line = site.fails(&["key", "recovery-sheet"]);
    assert!(line.contains("pass --yes"), "{line}");
    let sheet = site.ok(&["key", "recovery-sheet", "--yes"]);
    assert!(sheet.contains(&recovery_key));
    // init printed it once, for people, with the advice to keep it offline.
    let other = Site::empty();
    let human = other.ok(&["init", "--site-name", "x"]);
    assert!(
        human.contains("RECOVERY KEY") && human.contains("offline"),
        "{human}"
    );
}

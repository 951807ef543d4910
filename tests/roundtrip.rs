//! Back up generated images with the real binary and restore them byte for byte.

use cairn::{assert_same_file, random_bytes, text_bytes, write, Site};

const MIB: usize = 1 << 20;

#[test]
fn random_zeros_and_text_images_round_trip() {
    let site = Site::new();
    let mut mixed = random_bytes(3 * MIB, 1);
    mixed.extend(vec![0u8; 5 * MIB]);
    mixed.extend(text_bytes(4 * MIB, 2));
    mixed.extend(random_bytes(12345, 3)); // an odd tail
    let cases: [(&str, Vec<u8>); 5] = [
        ("random", random_bytes(6 * MIB + 77, 4)),
        ("zeros", vec![0u8; 9 * MIB]),
        ("text", text_bytes(8 * MIB, 5)),
        ("mixed", mixed),
        ("empty", Vec::new()),
    ];
    for (name, bytes) in &cases {
        let source = site.path(&format!("{name}.img"));
        write(&source, bytes);
        let summary = site.backup(name, &source);
        assert_eq!(summary["size_bytes"], bytes.len() as u64, "{name}");
        if *name == "text" {
            // Log-like text compresses well; random data is stored at its size.
            let (new, stored) = (
                summary["new_bytes"].as_u64().unwrap(),
                summary["stored_bytes"].as_u64().unwrap(),
            );
            assert!(stored * 4 < new, "text stored as {stored} of {new} bytes");
        }
        let out = site.path(&format!("{name}.restored"));
        site.ok(&["restore", name, out.to_str().unwrap()]);
        assert_same_file(&source, &out);
    }
    // Zeros are never stored: the all-zero image stored no chunk at all.
    let zeros = site.backup("zeros", &site.path("zeros.img"));
    assert_eq!(zeros["zero_bytes"], 9 * MIB as u64);
    assert_eq!(zeros["n_chunks"], 0);
    // The same content under another image name stores nothing new.
    let text = site.backup("text2", &site.path("text.img"));
    assert_eq!(
        text["n_chunks_new"], 0,
        "same content as `text`: nothing new to store"
    );
}

#[test]
fn holes_restore_as_holes() {
    let site = Site::new();
    let source = site.path("sparse.img");
    let file = std::fs::File::create(&source).unwrap();
    file.set_len(256 * MIB as u64).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&random_bytes(MIB, 9), 100 * MIB as u64)
        .unwrap();
    drop(file);
    let summary = site.backup("sparse", &source);
    assert!(
        summary["read_bytes"].as_u64().unwrap() < 32 * MIB as u64,
        "holes were read: {summary}"
    );
    let out = site.path("sparse.out");
    site.ok(&["restore", "sparse", out.to_str().unwrap()]);
    assert_same_file(&source, &out);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 8 * MIB as u64,
        "restore wrote {allocated} bytes for 1 MiB of data"
    );
}

#[test]
fn inserted_bytes_only_change_nearby_chunks() {
    let site = Site::new();
    let original = random_bytes(12 * MIB, 11);
    let source = site.path("v1.img");
    write(&source, &original);
    let first = site.backup("shifted", &source);
    let mut shifted = original.clone();
    for (at, n) in [(MIB / 3, 17), (5 * MIB, 4096), (9 * MIB + 1, 1)] {
        shifted.splice(at..at, random_bytes(n, at as u64));
    }
    let source2 = site.path("v2.img");
    write(&source2, &shifted);
    let second = site.backup("shifted", &source2);
    let (n_chunks, n_new) = (
        second["n_chunks"].as_u64().unwrap(),
        second["n_chunks_new"].as_u64().unwrap(),
    );
    assert!(first["n_chunks_new"].as_u64().unwrap() > 10);
    // Three insertions touch at most two chunks each, plus segment-boundary effects.
    assert!(
        n_new <= 9,
        "{n_new} of {n_chunks} chunks new after three small insertions"
    );
    assert!(
        second["new_bytes"].as_u64().unwrap() < 6 * MIB as u64,
        "{second}"
    );

    // Both snapshots restore exactly, by explicit id.
    let listed: serde_json::Value =
        serde_json::from_str(&site.ok(&["snapshots", "shifted", "--json"])).unwrap();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    for (id, expected) in ids.iter().zip([&source, &source2]) {
        let out = site.path(&format!("{id}.out"));
        site.ok(&[
            "restore",
            &format!("shifted@{}", &id[..8]),
            out.to_str().unwrap(),
        ]);
        assert_same_file(expected, &out);
    }
}

#[test]
fn stdin_backups_match_file_backups() {
    let site = Site::new();
    let bytes = text_bytes(3 * MIB, 21);
    let source = site.path("piped.img");
    write(&source, &bytes);
    let mut child = site
        .command(&["backup", "piped", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["size_bytes"], bytes.len() as u64);
    let again = site.backup("piped", &source);
    assert_eq!(again["n_chunks_new"], 0, "the file holds what stdin held");
    let restored = site.path("piped.out");
    site.ok(&["restore", "piped", restored.to_str().unwrap()]);
    assert_same_file(&source, &restored);
}

#[test]
fn listing_and_verify_speak_json() {
    let site = Site::new();
    let source = site.path("a.img");
    write(&source, &random_bytes(2 * MIB, 30));
    site.backup("alpha", &source);
    site.backup("beta", &source);
    let rows: serde_json::Value = serde_json::from_str(&site.ok(&["snapshots", "--json"])).unwrap();
    let images: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image"].as_str().unwrap())
        .collect();
    assert_eq!(images, ["alpha", "beta"]);
    let human = site.ok(&["snapshots"]);
    assert!(
        human.contains("alpha") && human.contains("2.0 MiB"),
        "{human}"
    );
    let report: serde_json::Value = serde_json::from_str(&site.ok(&["verify", "--json"])).unwrap();
    assert_eq!(report["n_snapshots"], 2);
    assert!(report["damage"].as_array().unwrap().is_empty());
    assert!(report["n_chunks_checked"].as_u64().unwrap() >= 2);
}

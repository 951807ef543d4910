//! A flipped byte in a pack is found by verify, named by image and byte offset, and refused
//! by restore. (Chunks moved under another id are covered in protocol's seal tests.)

use std::fs;
use std::os::unix::fs::FileExt;

use cairn::{random_bytes, write, Site};

const MIB: usize = 1 << 20;

#[test]
fn a_flipped_byte_is_named_by_image_and_offset() {
    let site = Site::new();
    // 1 MiB of data at the start, zeros after: the first pack entry is the chunk at byte 0.
    let mut bytes = random_bytes(MIB, 5);
    bytes.extend(vec![0u8; 3 * MIB]);
    let source = site.path("db.img");
    write(&source, &bytes);
    let first = site.backup("accounting", &source)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = site.backup("accounting", &source)["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    let pack = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(site.data_dir().join("store/packs/00000001.pack"))
        .unwrap();
    // Pack header (16) + entry head (40) + sealed header (26) lands in the first chunk's
    // ciphertext; flip a byte a little further in.
    let at = 16 + 40 + 26 + 1000;
    let mut byte = [0u8; 1];
    pack.read_exact_at(&mut byte, at).unwrap();
    pack.write_all_at(&[byte[0] ^ 0x20], at).unwrap();

    let out = site.run(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(3), "verify must fail on damage");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let damage = report["damage"].as_array().unwrap();
    // The damaged chunk is used by both snapshots, at offset 0 in each.
    assert_eq!(damage.len(), 2, "{report}");
    let mut named: Vec<&str> = damage
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap())
        .collect();
    named.sort();
    let mut expected = [first.as_str(), second.as_str()];
    expected.sort();
    assert_eq!(named, expected);
    for d in damage {
        assert_eq!(d["image"], "accounting");
        assert_eq!(d["offset"], 0);
        assert!(d["why"].as_str().unwrap().contains("authentication"), "{d}");
    }
    let human = String::from_utf8(site.run(&["verify", "accounting"]).stdout).unwrap();
    assert!(
        human.contains(&format!("DAMAGED accounting@{first} bytes 0..")),
        "{human}"
    );

    let line = site.fails(&[
        "restore",
        "accounting",
        site.path("out.img").to_str().unwrap(),
    ]);
    assert!(line.contains("at byte 0 of accounting@"), "{line}");
}

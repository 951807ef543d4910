//! Every bad input gets one line on stderr, a non-zero exit, no panic, and leaves the store
//! as it was.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use cairn::{random_bytes, write, Site};

fn site_with_one_backup() -> (Site, String) {
    let site = Site::new();
    let source = site.path("disk.img");
    write(&source, &random_bytes(3 << 20, 1));
    let summary = site.backup("fileserver", &source);
    (site, summary["snapshot"].as_str().unwrap().to_owned())
}

/// The store still restores the one good snapshot.
fn still_restores(site: &Site) {
    let out = site.path(&format!("check-{}.img", rand_suffix()));
    site.ok(&["restore", "fileserver", out.to_str().unwrap()]);
    cairn::assert_same_file(&site.path("disk.img"), &out);
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn bad_sources_images_and_snapshots() {
    let (site, snapshot) = site_with_one_backup();
    let line = site.fails(&["backup", "fileserver", "/nonexistent/disk.img"]);
    assert!(
        line.contains("/nonexistent/disk.img") && line.contains("No such file"),
        "{line}"
    );
    let line = site.fails(&["backup", "fileserver", "/dev/cairn-no-such-disk"]);
    assert!(line.contains("/dev/cairn-no-such-disk"), "{line}");
    let line = site.fails(&["backup", "fileserver", "/"]);
    assert!(line.contains("is a directory"), "{line}");
    let line = site.fails(&[
        "backup",
        "bad/name",
        site.path("disk.img").to_str().unwrap(),
    ]);
    assert!(line.contains("image name"), "{line}");

    let line = site.fails(&["restore", "nosuchimage", site.path("x").to_str().unwrap()]);
    assert!(line.contains("no image named \"nosuchimage\""), "{line}");
    let line = site.fails(&[
        "restore",
        "fileserver@ffffffff",
        site.path("x").to_str().unwrap(),
    ]);
    assert!(line.contains("no snapshot \"ffffffff\""), "{line}");
    let line = site.fails(&[
        "restore",
        "fileserver",
        site.tmp.path().to_str().unwrap(),
        "--force",
    ]);
    assert!(line.contains("is a directory"), "{line}");
    let line = site.fails(&["snapshots", "nosuchimage"]);
    assert!(line.contains("no image named"), "{line}");
    let line = site.fails(&["verify", "nosuchimage"]);
    assert!(line.contains("no image named"), "{line}");
    assert!(!site.path("x").exists());

    // Restore never overwrites without --force, and never leaves a partial file behind.
    let existing = site.path("existing.img");
    write(&existing, b"precious");
    let line = site.fails(&[
        "restore",
        &format!("fileserver@{snapshot}"),
        existing.to_str().unwrap(),
    ]);
    assert!(line.contains("exists; pass --force"), "{line}");
    assert_eq!(fs::read(&existing).unwrap(), b"precious");
    site.ok(&[
        "restore",
        "fileserver",
        existing.to_str().unwrap(),
        "--force",
    ]);
    cairn::assert_same_file(&site.path("disk.img"), &existing);
    still_restores(&site);
}

#[test]
fn data_dir_problems() {
    let empty = Site::empty();
    let line = empty.fails(&["snapshots"]);
    assert!(
        line.contains("no cairn data dir") && line.contains("cairn init"),
        "{line}"
    );

    let (site, _) = site_with_one_backup();
    let line = site.fails(&["init", "--site-name", "again"]);
    assert!(line.contains("already a cairn data dir"), "{line}");

    let format = site.data_dir().join("FORMAT");
    let original = fs::read(&format).unwrap();
    fs::write(&format, "cairn data dir format 7\n").unwrap();
    let line = site.fails(&["snapshots"]);
    assert!(
        line.contains("format 7") && line.contains("upgrade cairn"),
        "{line}"
    );
    fs::write(&format, original).unwrap();

    let key = site.data_dir().join("keys/vault.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let line = site.fails(&["snapshots"]);
    assert!(line.contains("chmod 600"), "{line}");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    still_restores(&site);
}

#[test]
fn a_second_process_is_refused_while_the_first_writes() {
    let (site, _) = site_with_one_backup();
    // Hold the store with a backup that waits on stdin.
    let mut holder = site
        .command(&["backup", "held", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the holder has the lock (it writes its pid there), without polling with
    // cairn itself, which could take the lock first.
    let lock_file = site.data_dir().join("lock");
    let pid = holder.id().to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fs::read_to_string(&lock_file).unwrap_or_default().trim() != pid {
        assert!(
            std::time::Instant::now() < deadline,
            "holder never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let line = site.fails(&["snapshots"]);
    assert!(line.contains("in use by another cairn process"), "{line}");
    assert!(line.contains(&format!("(pid {pid})")), "{line}");
    let line = site.fails(&["backup", "other", site.path("disk.img").to_str().unwrap()]);
    assert!(line.contains("in use by another cairn process"), "{line}");
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    assert!(site.ok(&["snapshots"]).contains("held"));
}

#[test]
fn a_truncated_pack_is_reported_and_named_by_verify() {
    let (site, snapshot) = site_with_one_backup();
    let pack = site.data_dir().join("store/packs/00000001.pack");
    let len = fs::metadata(&pack).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let out = site.run(&["verify"]);
    assert_eq!(out.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was truncated"), "{stderr}");
    assert!(
        stdout.contains(&format!("DAMAGED fileserver@{snapshot} bytes ")),
        "{stdout}"
    );
    let line = site.fails(&[
        "restore",
        "fileserver",
        site.path("r.img").to_str().unwrap(),
    ]);
    assert!(
        line.contains("at byte") && line.contains("fileserver@"),
        "{line}"
    );
    assert!(!site.path("r.img").exists() && !site.path("r.img.cairn-partial").exists());
    // The lost chunks were forgotten, so backing up again stores them and restores exactly.
    site.backup("fileserver", &site.path("disk.img"));
    still_restores(&site);
}

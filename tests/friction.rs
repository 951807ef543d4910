//! What a consultant types and reads: each error's causes printed once on one line, zero
//! and out-of-range values refused, tokens pasted as mail wraps and case-folds them.

use cairn::Site;

fn invite(site: &Site, args: &[&str]) -> String {
    let mut all = vec!["trust", "invite", "--json"];
    all.extend_from_slice(args);
    let out: serde_json::Value = serde_json::from_str(&site.ok(&all)).unwrap();
    out["token"].as_str().unwrap().to_owned()
}

#[test]
fn a_truncated_token_names_its_cause_once() {
    let (smith, jones) = (Site::new(), Site::new());
    let token = invite(&smith, &[]);
    // The prefix and 16 base32 characters: the token's first 10 bytes, cut mid-header.
    let cut = &token[.."cairn-invite-".len() + 16];
    let line = jones.fails(&["trust", "accept", cut, "--yes"]);
    assert_eq!(
        line,
        "error: invite token is damaged or truncated: truncated: needed 23 more bytes"
    );
}

#[test]
fn a_port_in_use_names_its_cause_once() {
    let site = Site::new();
    // QUIC listens on UDP: hold the port first.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let line = site.fails(&["node", "run", "--no-mdns", "--listen", &listen]);
    assert_eq!(
        line,
        format!(
            "error: cannot listen on /ip4/127.0.0.1/udp/{port}/quic-v1: Address already in use (os error 98)"
        )
    );
}

/// The first line of a clap usage error (clap adds a blank line and a `--help` hint).
fn usage_error(site: &Site, args: &[&str]) -> String {
    let out = site.run(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "cairn {args:?} should be refused"
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    stderr.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn zero_limits_quotas_and_durations_are_refused_with_what_to_write() {
    let site = Site::new();
    assert_eq!(
        usage_error(&site, &["trust", "invite", "--quota", "0"]),
        "error: invalid value '0' for '--quota <QUOTA>': a quota of \"0\" is 0: to stop storing for a partner use `cairn trust revoke`"
    );
    assert_eq!(
        usage_error(&site, &["trust", "invite", "--expires", "0s"]),
        "error: invalid value '0s' for '--expires <EXPIRES>': \"0s\" is no time at all: give a duration like 7d, 12h, 30m or 90s"
    );
    assert_eq!(
        usage_error(&site, &["trust", "invite", "--expires", "99999999999d"]),
        "error: invalid value '99999999999d' for '--expires <EXPIRES>': \"99999999999d\" is longer than 100 years: give a duration like 7d, 12h, 30m or 90s"
    );
    assert_eq!(
        usage_error(&site, &["trust", "quota", "anyone", "0GB"]),
        "error: invalid value '0GB' for '<SIZE>': a quota of \"0GB\" is 0: to stop storing for a partner use `cairn trust revoke`"
    );
    let zero = "a limit of \"0\" is 0, which cairn refuses: write unlimited for no limit (there is no pause; the smallest limit is 1B/s)";
    for flag in ["--upload-limit", "--download-limit"] {
        let line = site.fails(&[
            "node",
            "run",
            "--no-mdns",
            "--listen",
            "127.0.0.1:0",
            flag,
            "0",
        ]);
        assert_eq!(line, format!("error: {zero}"), "{flag}");
    }
    let line = site.fails(&[
        "node",
        "run",
        "--no-mdns",
        "--listen",
        "127.0.0.1:0",
        "--schedule",
        "Mon-Fri upload=0",
    ]);
    assert!(line.contains(zero), "{line}");
    std::fs::write(site.data_dir().join("node.toml"), "upload_limit = \"0\"\n").unwrap();
    let line = site.fails(&["node", "run", "--no-mdns", "--listen", "127.0.0.1:0"]);
    assert!(line.contains(zero), "{line}");
}

#[test]
fn tokens_pasted_wrapped_or_upper_cased_are_read_and_garbage_is_not_a_token() {
    let (smith, jones) = (Site::new(), Site::new());
    let token = invite(&smith, &[]);
    let (head, tail) = token.split_at(50);
    let wrapped = format!("{}\n{}", head.to_uppercase(), tail);
    let out: serde_json::Value =
        serde_json::from_str(&jones.ok(&["trust", "accept", &wrapped, "--yes", "--json"])).unwrap();
    assert!(out.is_object(), "{out}");
    // Garbage after the prefix, whose first byte reads as version 7.
    let line = jones.fails(&["trust", "accept", "cairn-invite-a4aaaaaaaaaaaaaa", "--yes"]);
    assert_eq!(
        line,
        "error: not a cairn token: what follows cairn-invite- is no invite; copy the whole token again"
    );
}

#[test]
fn partners_are_named_by_fingerprint_or_name_prefix() {
    let (smith, jones) = (Site::new(), Site::new());
    jones.ok(&["trust", "accept", &invite(&smith, &[]), "--yes"]);
    let list: serde_json::Value =
        serde_json::from_str(&jones.ok(&["trust", "list", "--json"])).unwrap();
    let row = &list
        .as_array()
        .map(|a| a[0].clone())
        .unwrap_or_else(|| list["partners"][0].clone());
    let fingerprint = row["fingerprint"].as_str().unwrap().to_owned();
    jones.ok(&["trust", "quota", &fingerprint, "7GB"]);
    jones.ok(&["trust", "quota", "TEST", "8GB"]);
    let line = jones.fails(&["trust", "revoke", "nobody"]);
    assert_eq!(
        line,
        "error: no partner has the site id, fingerprint or a name starting with \"nobody\" (`cairn trust list` shows partners)"
    );
    jones.ok(&["trust", "revoke", "test off"]);
}

/// A data dir bind-mounted read-only over itself; unmounted on drop.
struct ReadOnlyMount(std::path::PathBuf);

impl ReadOnlyMount {
    fn new(dir: &std::path::Path) -> Option<ReadOnlyMount> {
        let run = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let path = dir.to_str().unwrap();
        if !run(&["--bind", path, path]) {
            return None;
        }
        let mount = ReadOnlyMount(dir.to_owned());
        run(&["-o", "remount,bind,ro", path]).then_some(mount)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_data_dir_still_lists_verifies_and_restores() {
    let site = Site::new();
    let source = site.path("disk.img");
    let image: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &image).unwrap();
    site.backup("pc", &source);
    let Some(_mount) = ReadOnlyMount::new(&site.data_dir()) else {
        eprintln!("skipped: cannot bind-mount the data dir read-only here (needs root and mount)");
        return;
    };
    assert!(
        std::fs::write(site.data_dir().join("probe"), b"x").is_err(),
        "the mount should be read-only"
    );
    assert!(site.ok(&["snapshots"]).contains("pc"));
    site.ok(&["verify"]);
    site.ok(&["site", "show"]);
    let out = site.path("restored.img");
    site.ok(&["restore", "pc", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == image,
        "restored bytes differ"
    );
    let line = site.fails(&["trust", "invite"]);
    assert!(line.contains("the data dir is read-only"), "{line}");
}

//! Every command explains itself. (This test also makes `cargo test --workspace` build the
//! `cairn` binary that the workspace's end-to-end tests in ../tests drive.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .arg("--help")
        .output()
        .expect("cairn runs");
    assert!(out.status.success(), "cairn {args:?} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

#[test]
fn every_command_has_help() {
    let top = help(&[]);
    for command in [
        "init",
        "backup",
        "snapshots",
        "restore",
        "verify",
        "site",
        "key",
        "recover",
        "join",
    ] {
        assert!(
            top.contains(command),
            "top-level help does not list {command}"
        );
        let text = help(&[command]);
        assert!(
            text.contains("Usage: cairn"),
            "{command} --help has no usage line"
        );
    }
    assert!(help(&["backup"]).contains("- for stdin"));
    assert!(help(&["restore"]).contains("--force"));
    assert!(help(&["site", "show"]).contains("--json"));
    let add_node = help(&["site", "add-node"]);
    for flag in ["--name", "--expires", "--capacity", "--address", "--yes"] {
        assert!(add_node.contains(flag), "site add-node --help lacks {flag}");
    }
    assert!(help(&["join"]).contains("[TOKEN]"));
    assert!(help(&["trust", "invite"]).contains("--address"));
    assert!(help(&["key", "recovery-sheet"]).contains("--yes"));
    for command in ["invite", "accept", "list", "quota", "revoke"] {
        assert!(
            help(&["trust", command]).contains("Usage: cairn trust"),
            "trust {command} --help"
        );
    }
}

#[test]
fn usage_errors_exit_2_without_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["backup"])
        .output()
        .expect("cairn runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("required") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

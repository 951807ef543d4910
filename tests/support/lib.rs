//! Shared helpers for the workspace end-to-end tests: find the real `cairn` binary, run it
//! against a temporary data dir, and make test images.

pub mod mesh;
pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `cairn` binary that `cargo test --workspace` built beside the test executables.
pub fn cairn_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CAIRN_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("cairn");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p cairn-node`) first",
        bin.display()
    );
    bin
}

/// A scratch data dir and the means to run `cairn` against it.
pub struct Site {
    pub tmp: tempfile::TempDir,
}

impl Site {
    /// A new, uninitialised scratch space.
    pub fn empty() -> Site {
        Site {
            tmp: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A scratch space with `cairn init` done.
    pub fn new() -> Site {
        let site = Site::empty();
        site.ok(&["init", "--site-name", "test office"]);
        site
    }

    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(cairn_bin());
        command
            .args(args)
            .env("CAIRN_DATA_DIR", self.data_dir())
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("cairn runs")
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs and requires failure with exactly one line on stderr; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "cairn {args:?} succeeded but should fail"
        );
        assert!(
            !stderr.contains("panicked"),
            "cairn {args:?} panicked: {stderr}"
        );
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("warning:"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "cairn {args:?} should print one error line, got: {stderr}"
        );
        lines[0].to_owned()
    }

    /// `cairn backup --json`, parsed.
    pub fn backup(&self, image: &str, source: &Path) -> serde_json::Value {
        let out = self.ok(&[
            "backup",
            image,
            source.to_str().expect("utf-8 path"),
            "--json",
        ]);
        serde_json::from_str(&out).expect("backup --json prints JSON")
    }
}

impl Default for Site {
    fn default() -> Site {
        Site::new()
    }
}

/// Deterministic incompressible bytes.
pub fn random_bytes(n_bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n_bytes + 8);
    while out.len() < n_bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n_bytes);
    out
}

/// Deterministic compressible text, like logs.
pub fn text_bytes(n_bytes: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n_bytes + 100);
    let mut line = seed;
    while out.len() < n_bytes {
        line += 1;
        out.extend_from_slice(
            format!(
                "2026-11-22 request {line} served to client {} in {} ms\n",
                line % 97,
                line % 13
            )
            .as_bytes(),
        );
    }
    out.truncate(n_bytes);
    out
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write test image");
}

/// Files equal byte for byte (without printing megabytes on failure).
pub fn assert_same_file(a: &Path, b: &Path) {
    let (a_bytes, b_bytes) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert_eq!(
        a_bytes.len(),
        b_bytes.len(),
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    if let Some(at) = a_bytes.iter().zip(&b_bytes).position(|(x, y)| x != y) {
        panic!("{} and {} differ at byte {at}", a.display(), b.display());
    }
}

//! Block devices as source and restore target, through loop devices. Needs root and
//! losetup; elsewhere the test says why it did not run and returns.

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn::{random_bytes, text_bytes, write, Site};

const MIB: usize = 1 << 20;

/// A loop device over `file`, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop(PathBuf::from(
            String::from_utf8(out.stdout).ok()?.trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn back_up_from_and_restore_onto_block_devices() {
    let site = Site::new();
    let mut bytes = text_bytes(6 * MIB, 1);
    bytes.extend(vec![0u8; 4 * MIB]);
    bytes.extend(random_bytes(6 * MIB, 2));
    let image = site.path("disk.img");
    write(&image, &bytes);
    let Some(source) = Loop::attach(&image) else {
        eprintln!("skipped: needs root and a free loop device (losetup) to test block devices");
        return;
    };
    let summary = site.backup("vm", &source.0);
    assert_eq!(summary["size_bytes"], bytes.len() as u64);
    // Zeros on a device are found by content (chunks at the edges of the zero run are mixed).
    assert!(
        summary["zero_bytes"].as_u64().unwrap() >= 2 * MIB as u64,
        "{summary}"
    );

    // Restore onto a device that holds other data: zero extents must be written, not skipped.
    let target_file = site.path("target.img");
    write(&target_file, &vec![0xee; bytes.len()]);
    let Some(target) = Loop::attach(&target_file) else {
        eprintln!("skipped: no second loop device");
        return;
    };
    let line = site.fails(&["restore", "vm", target.0.to_str().unwrap()]);
    assert!(
        line.contains("exists; pass --force"),
        "a device is overwritten only with --force: {line}"
    );
    site.ok(&["restore", "vm", target.0.to_str().unwrap(), "--force"]);
    drop(target);
    drop(source);
    let restored = std::fs::read(&target_file).unwrap();
    assert!(restored == bytes, "device restore differs from the source");
}

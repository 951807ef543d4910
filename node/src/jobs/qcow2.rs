//! A job's source that is a qcow2 file (a VM's disk): backed up as the guest sees it, not
//! as the container's bytes, which change layout whenever qemu allocates a cluster and
//! would dedup badly and restore to something only qemu reads.
//!
//! `qemu-img convert -U -f qcow2 -O raw` writes the guest view to a sparse raw file in the
//! data dir's `job-scratch/`, which the backup then reads as any sparse file (its holes
//! are never read); the file is removed after the run. Chosen over a pipe because
//! qemu-img (7.2) refuses a pipe as its output (it resizes and seeks its target), and over
//! a qcow2 reader of our own or a crate because qemu-img follows every qcow2 feature
//! (compressed clusters, backing files, subclusters, encryption) that qemu writes; a
//! crate that missed one would back up wrong bytes silently. The cost is scratch space
//! for the guest's allocated data while the job runs. `-U` reads a disk a running VM
//! holds locked; for a consistent view, freeze or snapshot the guest in `before`
//! (`virsh domfsfreeze`, or an external snapshot read through `source_during`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The first bytes of every qcow2 file.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// What `qemu-img`'s error output keeps for the job's error line.
const QEMU_ERROR_BYTES_MAX: usize = 512;

/// True when `path` is a regular file that starts as qcow2 does.
pub fn is_qcow2(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    meta.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == QCOW2_MAGIC
}

/// A raw copy of a qcow2 file's guest view, removed when dropped.
pub struct GuestView {
    pub path: PathBuf,
}

impl Drop for GuestView {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Converts `source` into a sparse raw file under `scratch_dir`, named for `image`.
pub fn guest_view(source: &Path, scratch_dir: &Path, image: &str) -> Result<GuestView, String> {
    std::fs::create_dir_all(scratch_dir)
        .map_err(|e| format!("cannot make {}: {e}", scratch_dir.display()))?;
    let view = GuestView {
        path: scratch_dir.join(format!("{image}.raw")),
    };
    let _ = std::fs::remove_file(&view.path);
    let output = Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(source)
        .arg(&view.path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "{} is a qcow2 image, read through qemu-img, which cannot start ({e}): install qemu-utils",
                source.display()
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let mut line = stderr.trim().replace('\n', "; ");
        if line.len() > QEMU_ERROR_BYTES_MAX {
            let mut end = QEMU_ERROR_BYTES_MAX;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        return Err(format!(
            "qemu-img convert of {} {}: {line}",
            source.display(),
            output.status
        ));
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_file_with_the_magic_is_qcow2() {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("disk.raw");
        std::fs::write(&raw, [0u8; 512]).unwrap();
        assert!(!is_qcow2(&raw));
        let qcow = tmp.path().join("disk.qcow2");
        std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(is_qcow2(&qcow));
        assert!(!is_qcow2(tmp.path()), "a directory");
        assert!(!is_qcow2(&tmp.path().join("missing")));
    }
}

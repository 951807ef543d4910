//! What a restore may do to the place it writes, and what a command does to its caller:
//! never replace a device, FIFO or link with a file; give the output the caller's umask
//! even when a node runs the restore; stop quietly when the reader of stdout is gone.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn::mesh::{free_port, wait_for};
use cairn::{assert_same_file, cairn_bin, random_bytes, write, Site};

/// A site with one small image backed up; the image's path.
fn site_with_image() -> (Site, std::path::PathBuf) {
    let site = Site::new();
    let image = site.path("disk.img");
    write(&image, &random_bytes(300_000, 7));
    site.backup("disk", &image);
    (site, image)
}

#[test]
fn a_restore_onto_dev_null_is_refused_and_dev_null_stays_a_device() {
    let (site, _) = site_with_image();
    let line = site.fails(&["restore", "disk", "/dev/null", "--force"]);
    assert_eq!(
        line,
        "error: /dev/null is a character device, not a file or block device: restore into a file and copy it from there"
    );
    let meta = std::fs::symlink_metadata("/dev/null").expect("/dev/null");
    assert!(
        meta.file_type().is_char_device(),
        "/dev/null is no longer a character device"
    );
    assert!(!Path::new("/dev/null.cairn-partial").exists());
}

#[test]
fn a_restore_onto_a_fifo_is_refused_and_the_fifo_stays() {
    let (site, _) = site_with_image();
    let fifo = site.path("pipe");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    let fifo_text = fifo.to_str().expect("utf-8");
    let line = site.fails(&["restore", "disk", fifo_text, "--force"]);
    assert_eq!(
        line,
        format!("error: {fifo_text} is a FIFO, not a file or block device: restore into a file and copy it from there")
    );
    let meta = std::fs::symlink_metadata(&fifo).expect("fifo");
    assert!(meta.file_type().is_fifo(), "the FIFO was replaced");
}

#[test]
fn a_restore_through_a_symlink_writes_its_target_and_keeps_the_link() {
    let (site, image) = site_with_image();
    let target = site.path("restored.img");
    write(&target, b"old contents");
    let link = site.path("link.img");
    std::os::unix::fs::symlink("restored.img", &link).expect("symlink");
    site.ok(&["restore", "disk", link.to_str().expect("utf-8"), "--force"]);
    let meta = std::fs::symlink_metadata(&link).expect("link");
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    assert_same_file(&image, &target);

    // A link to /dev/null is refused like /dev/null itself.
    let to_null = site.path("null-link");
    std::os::unix::fs::symlink("/dev/null", &to_null).expect("symlink");
    let line = site.fails(&[
        "restore",
        "disk",
        to_null.to_str().expect("utf-8"),
        "--force",
    ]);
    assert!(line.contains("/dev/null is a character device"), "{line}");
    assert!(std::fs::symlink_metadata(&to_null)
        .expect("link")
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata("/dev/null")
        .expect("/dev/null")
        .file_type()
        .is_char_device());
}

/// `cairn node run` on a site's data dir, stopped (SIGKILL) when dropped.
struct RunningNode(Child);

impl RunningNode {
    fn start(site: &Site) -> RunningNode {
        let log = std::fs::File::create(site.path("node.log")).expect("log");
        let child = site
            .command(&["node", "run", "--no-mdns", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start the node");
        let node = RunningNode(child);
        wait_for(Duration::from_secs(30), "the node to start", || {
            Ok(site.run(&["status", "--json"]).status.success())
        })
        .expect("the node starts");
        node
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_restore_inside_the_node_gets_the_callers_umask() {
    let (site, image) = site_with_image();
    let _node = RunningNode::start(&site);
    for (umask, mode) in [("077", 0o600), ("022", 0o644)] {
        let out = site.path(&format!("restored-{umask}.img"));
        let script = format!("umask {umask}; exec \"$0\" restore disk \"$1\"",);
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(cairn_bin())
            .arg(&out)
            .env("CAIRN_DATA_DIR", site.data_dir())
            .stdin(Stdio::null())
            .status()
            .expect("sh runs");
        assert!(status.success(), "restore with umask {umask} failed");
        assert_same_file(&image, &out);
        let got = std::fs::metadata(&out)
            .expect("restored")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(got, mode, "umask {umask}: mode {got:o}, expected {mode:o}");
    }
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let (site, _) = site_with_image();
    let mut fds = [0; 2];
    // SAFETY: pipe fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh descriptors from pipe(2), owned once each.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader); // the reader went away, as `| head -1` does
    let out = site
        .command(&["snapshots"])
        .stdout(Stdio::from(writer))
        .output()
        .expect("cairn runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
}

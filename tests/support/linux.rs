//! A real Linux boot for the VM tests: a small disk whose root filesystem runs an init
//! that remounts itself writable, writes a file, prints a marker on the serial console
//! and powers off, booted by Debian's kernel and initramfs (`linux-image-amd64`) in qemu
//! under TCG. The disk is an MBR with one ext4 partition, made without root or loop
//! devices (`mkfs.ext4 -d` at an offset) around a static busybox (`busybox-static`).
//!
//! `.ci/run` installs every tool and sets `CAIRN_REQUIRE_VM_TOOLS=1`, so a tool missing
//! there fails the test; elsewhere a test without its tools says so and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// What the guest's init prints once it has written to its root filesystem.
pub const MARKER: &str = "CAIRN-LINUX-BOOT-OK";
/// The file the guest writes in its root filesystem.
pub const GUEST_FILE: &str = "/guest-wrote";
/// Where the root partition starts, in bytes.
pub const PARTITION_OFFSET: u64 = 1 << 20;

/// Whether the tools `what` needs are here; when they are not, says which and either
/// fails (CI, where `.ci/run` installs them) or tells the caller to skip.
pub fn tools_or_skip(what: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{what} needs {} (bash .ci/run installs them)",
        missing.join(", ")
    );
    if std::env::var_os("CAIRN_REQUIRE_VM_TOOLS").is_some() {
        panic!("{why}");
    }
    eprintln!("{what} skipped: {why}");
    false
}

/// Debian's kernel and its initramfs, the newest pair in /boot.
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
}

impl Kernel {
    pub fn find() -> Option<Kernel> {
        let mut versions: Vec<String> = std::fs::read_dir("/boot")
            .ok()?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("vmlinuz-")
                    .map(str::to_owned)
            })
            .filter(|v| Path::new(&format!("/boot/initrd.img-{v}")).exists())
            .collect();
        versions.sort();
        let version = versions.pop()?;
        Some(Kernel {
            vmlinuz: format!("/boot/vmlinuz-{version}").into(),
            initrd: format!("/boot/initrd.img-{version}").into(),
        })
    }
}

/// The tools a Linux boot test needs that are missing here.
pub fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    if !runs("qemu-system-x86_64", "--version") {
        missing.push("qemu-system-x86".into());
    }
    if !runs("mkfs.ext4", "-V") {
        missing.push("e2fsprogs".into());
    }
    if busybox().is_none() {
        missing.push("busybox-static".into());
    }
    if Kernel::find().is_none() {
        missing.push("linux-image-amd64 (a kernel and initrd in /boot)".into());
    }
    missing
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Writes a `size_mib` disk at `path`: an MBR whose one partition (type 83, from
/// `PARTITION_OFFSET` to the end) holds an ext4 root filesystem with busybox and the
/// init described in the module's text. The rest stays sparse.
pub fn make_disk(path: &Path, size_mib: u64) -> Result<()> {
    let dir = path.with_extension("root");
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["bin", "sbin", "proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy(busybox().context("busybox")?, dir.join("bin/busybox"))?;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -o remount,rw /\n\
         echo 'written by the guest' > {GUEST_FILE}\n\
         /bin/busybox sync\n\
         echo {MARKER}\n\
         /bin/busybox poweroff -f\n"
    );
    let init_path = dir.join("sbin/init");
    std::fs::write(&init_path, init)?;
    std::fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;

    let size = size_mib << 20;
    let file = std::fs::File::create(path)?;
    file.set_len(size)?;
    let mut mbr = [0u8; 512];
    let start = (PARTITION_OFFSET / 512) as u32;
    let sectors = (size / 512) as u32 - start;
    // Status, CHS first (unused), type 83 (Linux), CHS last (unused), LBA start, sectors.
    mbr[446..454].copy_from_slice(&[0x80, 0xfe, 0xff, 0xff, 0x83, 0xfe, 0xff, 0xff]);
    mbr[454..458].copy_from_slice(&start.to_le_bytes());
    mbr[458..462].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::os::unix::fs::FileExt::write_all_at(&file, &mbr, 0)?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "cairn-root", "-d"])
        .arg(&dir)
        .arg("-E")
        .arg(format!("offset={PARTITION_OFFSET}"))
        .arg(path)
        .arg(format!("{}k", (size - PARTITION_OFFSET) >> 10))
        .output()?;
    ensure!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Where the guest's root filesystem is and what runs on it.
pub struct Guest {
    /// `root=` on the kernel's command line: `/dev/sda1` for `make_disk`'s disk,
    /// `/dev/sda` for a whole-disk filesystem such as `make-images.sh` builds.
    pub root: &'static str,
    /// `init=`, when not /sbin/init.
    pub init: Option<&'static str>,
}

impl Guest {
    /// The disk `make_disk` writes.
    pub const TEST_DISK: Guest = Guest {
        root: "/dev/sda1",
        init: None,
    };
    /// A whole-disk ext4 image given `add_marker_init`.
    pub const WHOLE_DISK_EXT4: Guest = Guest {
        root: "/dev/sda",
        init: Some("/cairn-init"),
    };

    fn append(&self) -> String {
        let mut append = format!("root={} ro console=ttyS0 panic=-1 quiet", self.root);
        if let Some(init) = self.init {
            append.push_str(&format!(" init={init}"));
        }
        append
    }
}

/// Puts `/cairn-init` into the whole-disk ext4 image at `path` (with debugfs, so no
/// mount): a shell script that prints `MARKER` and powers off through sysrq, for an image
/// with no init of its own, booted as `Guest::WHOLE_DISK_EXT4`.
pub fn add_marker_init(path: &Path) -> Result<()> {
    let script = path.with_extension("cairn-init");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho {MARKER}\necho o > /proc/sysrq-trigger\n"),
    )?;
    for request in [
        format!("write {} cairn-init", script.display()),
        "set_inode_field cairn-init mode 0100755".to_owned(),
    ] {
        let out = Command::new("debugfs")
            .args(["-w", "-R", &request])
            .arg(path)
            .output()
            .context("debugfs (e2fsprogs)")?;
        ensure!(
            out.status.success(),
            "debugfs {request}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_file(&script)?;
    Ok(())
}

/// A finished boot: how qemu ended, what the console said, how long it took.
pub struct Booted {
    pub status: ExitStatus,
    pub console: String,
    pub seconds: f64,
}

/// Boots `kernel` with the disk at `drive` (a path or an NBD URI) as its first IDE disk,
/// root and init as `guest` says, under TCG with no network; writes go to qemu's throwaway
/// overlay (`-snapshot`). `after_start` runs once qemu is up (a test stops a holder
/// there). Gives up after `timeout`.
pub fn boot(
    kernel: &Kernel,
    guest: &Guest,
    drive: &str,
    serial: &Path,
    timeout: Duration,
    after_start: impl FnOnce() -> Result<()>,
) -> Result<Booted> {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "1024", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-snapshot", "-nic", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .arg("-append")
        .arg(guest.append())
        .arg("-drive")
        .arg(format!("file={drive},format=raw,if=ide"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("qemu-system-x86_64")?;
    let started = Instant::now();
    let mut after_start = Some(after_start);
    let status = loop {
        if let Some(status) = qemu.try_wait()? {
            break status;
        }
        if let Some(f) = after_start.take() {
            if let Err(e) = f() {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(e);
            }
        }
        if started.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            let console = std::fs::read_to_string(serial).unwrap_or_default();
            bail!("the guest did not power off in {timeout:?}; console:\n{console}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut stderr = String::new();
    if let Some(mut pipe) = qemu.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let console = std::fs::read_to_string(serial).unwrap_or_default();
    ensure!(
        status.success(),
        "qemu exited {status}: {}\nconsole:\n{console}",
        stderr.trim()
    );
    Ok(Booted {
        status,
        console,
        seconds,
    })
}

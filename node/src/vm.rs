//! `cairn vm start|list|stop`: the dead server running again as a VM on this PC, from its
//! snapshot, while nothing of it needs to be restored first.
//!
//! `start` serves the snapshot with the export (`export.rs`) on a socket in
//! `DATA_DIR/vms/IMAGE/`, puts a qcow2 overlay backed by that export beside it (every
//! write of the VM lands there; the snapshot is never touched), and runs qemu on the
//! overlay until the VM stops, `cairn vm stop IMAGE` or Ctrl-C. The overlay is kept: the
//! next `start` of the same snapshot boots the disk as the VM left it, and a `start` of
//! another snapshot is refused until the overlay is moved away, so no work done on the
//! stand-in is ever thrown away silently.
//!
//! Acceleration: KVM when it works, TCG otherwise. `/dev/kvm` existing is not enough (on
//! some machines a KVM guest hangs), so `auto` boots a one-sector probe guest under KVM
//! with a timeout and falls back to TCG when it does not come back.
//!
//! qemu (Debian: qemu-system-x86, and qemu-utils for the overlay) is a runtime dependency
//! of these commands, named when it is missing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cairn_protocol::SnapshotRecord;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cancel::Cancel;
use crate::export::{self, ExportError, Listen};
use crate::fetch::RemoteChunks;
use crate::vault::Vault;

pub const QEMU: &str = "qemu-system-x86_64";
/// How long the KVM probe guest may take; under working KVM it exits in well under 1 s.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
const UEFI_FIRMWARE: &[&str] = &["/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd"];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a probe guest boots under it, else TCG
    #[default]
    Auto,
    Kvm,
    /// Software emulation: slow, works everywhere
    Tcg,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

/// `none`, `user` (qemu's NAT, the office cannot reach the VM) or `bridge:BR`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    None,
    User,
    Bridge(String),
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        match s {
            "none" => Ok(Network::None),
            "user" => Ok(Network::User),
            _ => match s.strip_prefix("bridge:") {
                Some(br)
                    if !br.is_empty()
                        && br
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
                {
                    Ok(Network::Bridge(br.to_owned()))
                }
                _ => Err(format!(
                    "{s:?}: give none, user or bridge:BRIDGE (e.g. bridge:br0)"
                )),
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmOptions {
    /// As qemu's -m: `4G`, `512M`.
    pub memory: String,
    pub cpus: u32,
    /// `HOST:PORT` for the VNC console, port 5900 and up; loopback only.
    pub vnc: Option<String>,
    pub network: Network,
    pub firmware: Firmware,
    pub accel: Accel,
}

#[derive(Debug, Error)]
pub enum VmError {
    #[error("{0} is not installed (Debian: apt-get install qemu-system-x86 qemu-utils)")]
    NoQemu(&'static str),
    #[error("a VM of {image} already runs (pid {pid}); stop it with `cairn vm stop {image}`")]
    AlreadyRunning { image: String, pid: u32 },
    #[error("{overlay} holds the writes of a VM of snapshot {was}, not {now}: move it away to start {now} (or start {was} again)")]
    OverlayOfAnother {
        overlay: PathBuf,
        was: String,
        now: String,
    },
    #[error("--vnc {0:?}: give 127.0.0.1:PORT with PORT 5900 or above (VNC here has no password, so loopback only; reach it with an SSH tunnel)")]
    BadVnc(String),
    #[error("--memory {0:?}: give a size qemu reads, e.g. 4G or 512M")]
    BadMemory(String),
    #[error("--firmware uefi needs OVMF (Debian: apt-get install ovmf)")]
    NoUefi,
    #[error("--accel kvm: KVM does not work here (the probe guest did not boot in {0:?}); use --accel tcg")]
    NoKvm(Duration),
    #[error("no VM of {0} runs here")]
    NotRunning(String),
    #[error("qemu-img create of the overlay failed: {0}")]
    Overlay(String),
    #[error("qemu did not start: {0}")]
    QemuFailed(String),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> VmError + '_ {
    move |source| VmError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `vm list` shows and `vm start` writes as `vm.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmInfo {
    pub image: String,
    pub snapshot: String,
    pub pid: u32,
    pub accel: String,
    pub started_unix_ms: u64,
    pub overlay: String,
    pub console_log: String,
    pub qmp: String,
    pub vnc: Option<String>,
    pub export: String,
    /// The overlay was there from an earlier run: the VM boots with its writes.
    pub overlay_reused: bool,
}

#[derive(Debug, Serialize)]
pub struct VmSummary {
    pub image: String,
    pub snapshot: String,
    pub seconds: f64,
    pub exit: String,
    pub read_bytes: u64,
    pub chunks_opened: u64,
}

pub fn vms_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("vms")
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

/// The VM of `image` recorded in its directory, if its qemu still runs.
fn running(dir: &Path) -> Option<VmInfo> {
    let info: VmInfo = serde_json::from_slice(&fs::read(dir.join("vm.json")).ok()?).ok()?;
    alive(info.pid).then_some(info)
}

/// A one-sector guest that exits qemu through isa-debug-exit with status 33 at once.
fn probe_sector() -> Vec<u8> {
    let mut sector = vec![
        0xba, 0xf4, 0x00, // mov dx, 0xf4
        0xb0, 0x10, // mov al, 0x10
        0xee, // out dx, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ];
    sector.resize(510, 0);
    sector.extend_from_slice(&[0x55, 0xaa]);
    sector
}

/// Whether a guest boots under KVM here: the probe sector must exit in time.
pub fn kvm_works(scratch: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let probe = scratch.join("kvm-probe.img");
    if fs::write(&probe, probe_sector()).is_err() {
        return false;
    }
    let child = Command::new(QEMU)
        .args([
            "-accel", "kvm", "-m", "16", "-display", "none", "-monitor", "none",
        ])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", probe.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let works = match child {
        Ok(mut child) => {
            matches!(wait_until(&mut child, KVM_PROBE_TIMEOUT), Some(s) if s.code() == Some(33))
        }
        Err(_) => false,
    };
    let _ = fs::remove_file(&probe);
    works
}

/// Waits for `child` at most `limit`, killing it then.
fn wait_until(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(POLL);
    }
}

fn check_options(options: &VmOptions) -> Result<(), VmError> {
    let memory = &options.memory;
    let digits = memory.trim_end_matches(['K', 'M', 'G', 'T']);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || digits == "0" {
        return Err(VmError::BadMemory(memory.clone()));
    }
    if let Some(vnc) = &options.vnc {
        match vnc.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() && addr.port() >= 5900 => {}
            _ => return Err(VmError::BadVnc(vnc.clone())),
        }
    }
    Ok(())
}

/// Runs a VM of `record` until it stops or `cancel` is set. `ready` gets its details
/// once qemu runs.
#[allow(clippy::too_many_arguments)]
pub fn start(
    vault: &Vault,
    record: &SnapshotRecord,
    remote: Option<&dyn RemoteChunks>,
    data_dir: &Path,
    options: &VmOptions,
    cancel: &Cancel,
    ready: &dyn Fn(&VmInfo),
) -> Result<VmSummary, VmError> {
    check_options(options)?;
    for program in [QEMU, "qemu-img"] {
        if !have(program) {
            return Err(VmError::NoQemu(if program == QEMU {
                QEMU
            } else {
                "qemu-img"
            }));
        }
    }
    let firmware = match options.firmware {
        Firmware::Bios => None,
        Firmware::Uefi => Some(
            UEFI_FIRMWARE
                .iter()
                .find(|p| Path::new(p).exists())
                .ok_or(VmError::NoUefi)?,
        ),
    };
    let image = record.image.to_string();
    let dir = vms_dir(data_dir).join(&image);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    if let Some(info) = running(&dir) {
        return Err(VmError::AlreadyRunning {
            image,
            pid: info.pid,
        });
    }
    let overlay = dir.join("overlay.qcow2");
    let snapshot_file = dir.join("snapshot");
    let snapshot = record.id.short();
    let overlay_reused = overlay.exists();
    if overlay_reused {
        let was = fs::read_to_string(&snapshot_file).unwrap_or_default();
        if was.trim() != snapshot {
            return Err(VmError::OverlayOfAnother {
                overlay,
                was: format!("{image}@{}", was.trim()),
                now: format!("{image}@{snapshot}"),
            });
        }
    }
    let accel = match options.accel {
        Accel::Tcg => "tcg",
        Accel::Kvm if kvm_works(&dir) => "kvm",
        Accel::Kvm => return Err(VmError::NoKvm(KVM_PROBE_TIMEOUT)),
        Accel::Auto if kvm_works(&dir) => "kvm",
        Accel::Auto => "tcg",
    };

    let listen = Listen::Unix(dir.join("nbd.sock"));
    let (exit, served) = export::serve_during(vault, record, remote, &listen, |uri| {
        if !overlay_reused {
            create_overlay(&overlay, uri)?;
            fs::write(&snapshot_file, &snapshot).map_err(io_err(&snapshot_file))?;
        }
        run_qemu(QemuRun {
            image: &image,
            snapshot: &snapshot,
            dir: &dir,
            overlay: &overlay,
            uri,
            accel,
            firmware: firmware.map(|f| Path::new(*f)),
            options,
            overlay_reused,
            cancel,
            ready,
        })
    })
    .inspect_err(|_| {
        let _ = fs::remove_file(dir.join("vm.json"));
    })?;
    let _ = fs::remove_file(dir.join("vm.json"));
    Ok(VmSummary {
        image,
        snapshot,
        seconds: served.seconds,
        exit,
        read_bytes: served.read_bytes,
        chunks_opened: served.chunks_opened,
    })
}

fn create_overlay(overlay: &Path, uri: &str) -> Result<(), VmError> {
    let partial = overlay.with_extension("qcow2.cairn-partial");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", uri])
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VmError::Overlay(e.to_string()))?;
    if !out.status.success() {
        let _ = fs::remove_file(&partial);
        return Err(VmError::Overlay(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    fs::rename(&partial, overlay).map_err(io_err(overlay))
}

struct QemuRun<'a> {
    image: &'a str,
    snapshot: &'a str,
    dir: &'a Path,
    overlay: &'a Path,
    uri: &'a str,
    accel: &'a str,
    firmware: Option<&'a Path>,
    options: &'a VmOptions,
    overlay_reused: bool,
    cancel: &'a Cancel,
    ready: &'a dyn Fn(&VmInfo),
}

/// Starts qemu and waits for it; returns how it ended.
fn run_qemu(run: QemuRun<'_>) -> Result<String, VmError> {
    let console = run.dir.join("console.log");
    let qmp = run.dir.join("qmp.sock");
    let _ = fs::remove_file(&qmp);
    let mut command = Command::new(QEMU);
    command
        .args(["-name", &format!("cairn-{}", run.image)])
        .args(["-accel", run.accel, "-m", &run.options.memory])
        .args(["-smp", &run.options.cpus.to_string()])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=disk0",
            run.overlay.display()
        ))
        // SATA (AHCI): Windows and Linux servers boot from it with their stock drivers.
        .args([
            "-device",
            "ahci,id=ahci",
            "-device",
            "ide-hd,drive=disk0,bus=ahci.0",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-monitor", "none"]);
    match &run.options.vnc {
        Some(vnc) => {
            let addr: std::net::SocketAddr =
                vnc.parse().map_err(|_| VmError::BadVnc(vnc.clone()))?;
            command.args(["-vnc", &format!("{}:{}", addr.ip(), addr.port() - 5900)]);
        }
        None => {
            command.args(["-display", "none"]);
        }
    }
    match &run.options.network {
        Network::None => command.args(["-nic", "none"]),
        Network::User => command.args(["-nic", "user,model=e1000"]),
        Network::Bridge(br) => command.args(["-nic", &format!("bridge,br={br},model=e1000")]),
    };
    if let Some(firmware) = run.firmware {
        command.arg("-bios").arg(firmware);
    }
    let log = run.dir.join("qemu.log");
    let stderr = fs::File::create(&log).map_err(io_err(&log))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| VmError::QemuFailed(e.to_string()))?;
    // qemu fails fast on a bad option or a disk it cannot open: give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = child.try_wait() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        return Err(VmError::QemuFailed(format!(
            "{status}: {}",
            text.trim().lines().last().unwrap_or("")
        )));
    }
    let info = VmInfo {
        image: run.image.to_owned(),
        snapshot: run.snapshot.to_owned(),
        pid: child.id(),
        accel: run.accel.to_owned(),
        started_unix_ms: crate::units::now_unix_ms(),
        overlay: run.overlay.display().to_string(),
        console_log: console.display().to_string(),
        qmp: qmp.display().to_string(),
        vnc: run.options.vnc.clone(),
        export: run.uri.to_owned(),
        overlay_reused: run.overlay_reused,
    };
    let record = run.dir.join("vm.json");
    fs::write(&record, serde_json::to_vec_pretty(&info).expect("json")).map_err(io_err(&record))?;
    (run.ready)(&info);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status.to_string());
        }
        if run.cancel.is_cancelled() {
            // SIGTERM: qemu quits cleanly, its overlay consistent.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            return Ok(match wait_until(&mut child, Duration::from_secs(10)) {
                Some(status) => format!("stopped ({status})"),
                None => "killed".to_owned(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The VMs running on this data dir.
pub fn list(data_dir: &Path) -> Vec<VmInfo> {
    let mut vms: Vec<VmInfo> = fs::read_dir(vms_dir(data_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| running(&e.path()))
        .collect();
    vms.sort_by(|a, b| a.image.cmp(&b.image));
    vms
}

/// Stops the VM of `image` as a shutdown of its host would (SIGTERM to qemu); the
/// `vm start` that runs it then stops its export and returns.
pub fn stop(data_dir: &Path, image: &str) -> Result<VmInfo, VmError> {
    let dir = vms_dir(data_dir).join(image);
    let info = running(&dir).ok_or_else(|| VmError::NotRunning(image.to_owned()))?;
    // SAFETY: kill(2) on the pid `vm start` recorded and checked alive just now.
    unsafe { libc::kill(info.pid as i32, libc::SIGTERM) };
    let started = Instant::now();
    while alive(info.pid) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(POLL);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_anything_starts() {
        let ok = VmOptions {
            memory: "4G".into(),
            cpus: 2,
            vnc: Some("127.0.0.1:5901".into()),
            network: Network::None,
            firmware: Firmware::Bios,
            accel: Accel::Tcg,
        };
        assert!(check_options(&ok).is_ok());
        for memory in ["", "0", "4X", "G", "-1G"] {
            let bad = VmOptions {
                memory: memory.into(),
                ..ok.clone()
            };
            assert!(
                matches!(check_options(&bad), Err(VmError::BadMemory(_))),
                "{memory}"
            );
        }
        for vnc in ["0.0.0.0:5901", "127.0.0.1:22", "localhost:5901"] {
            let bad = VmOptions {
                vnc: Some(vnc.into()),
                ..ok.clone()
            };
            assert!(
                matches!(check_options(&bad), Err(VmError::BadVnc(_))),
                "{vnc}"
            );
        }
        assert_eq!("bridge:br0".parse(), Ok(Network::Bridge("br0".into())));
        assert_eq!("user".parse(), Ok(Network::User));
        assert!("bridge:".parse::<Network>().is_err());
        assert!("bridge:br0,script=/x".parse::<Network>().is_err());
        assert!("tap".parse::<Network>().is_err());
    }
}

//! `cairn restore IMAGE OUT --format qcow2|vhdx|vmdk`: a restore straight into a VM disk
//! format, so the image opens in qemu/KVM, Hyper-V or VMware with no raw copy between.
//!
//! The snapshot is served on a private unix socket by the export (`export.rs`) and
//! `qemu-img convert` reads it from there: qemu-img writes every one of these formats
//! correctly (a Rust writer exists for qcow2 only, none for VMDK), and the export's block
//! status lets it skip the image's zero runs, so the output is sparse. qemu-img is a
//! runtime dependency of this one command, named when it is missing (Debian:
//! `qemu-utils`).
//!
//! The output is written as `OUT.cairn-partial` and renamed into place when qemu-img
//! succeeds; an interrupted conversion starts over (a VM format has no resumable layout).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_protocol::SnapshotRecord;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cancel::Cancel;
use crate::export::{self, ExportError, Listen};
use crate::fetch::RemoteChunks;
use crate::restore;
use crate::vault::Vault;

const POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum DiskFormat {
    /// A plain image (sparse file) or a block device
    #[default]
    Raw,
    /// qemu/KVM, Proxmox
    Qcow2,
    /// Hyper-V (dynamic)
    Vhdx,
    /// VMware Workstation/Player (monolithic sparse; ESXi imports it with vmkfstools)
    Vmdk,
}

impl DiskFormat {
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vmdk => "vmdk",
        }
    }

    /// qemu-img's `-o` for this format.
    fn options(self) -> Option<&'static str> {
        match self {
            DiskFormat::Vhdx => Some("subformat=dynamic"),
            DiskFormat::Vmdk => Some("subformat=monolithicSparse"),
            DiskFormat::Raw | DiskFormat::Qcow2 => None,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error(
        "--format {0} needs qemu-img, which is not installed (Debian: apt-get install qemu-utils)"
    )]
    NoQemuImg(&'static str),
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("--format {0} writes a file, and {1} is not one: restore raw onto a device")]
    NotAFile(&'static str, PathBuf),
    #[error("cancelled")]
    Cancelled,
    #[error("qemu-img convert failed ({status}): {stderr}")]
    QemuImg { status: String, stderr: String },
    #[error("cannot run qemu-img")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{path}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize)]
pub struct ConvertSummary {
    pub image: String,
    pub snapshot: String,
    pub output: String,
    pub format: &'static str,
    pub size_bytes: u64,
    /// Bytes the output file takes on disk (it is sparse).
    pub file_bytes: u64,
    pub seconds: f64,
}

/// Writes `record` to `out` in `format` (not raw) with qemu-img reading an export.
pub fn convert(
    vault: &Vault,
    record: &SnapshotRecord,
    out: &Path,
    format: DiskFormat,
    force: bool,
    remote: Option<&dyn RemoteChunks>,
    cancel: &Cancel,
) -> Result<ConvertSummary, ConvertError> {
    let started = Instant::now();
    if Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(ConvertError::NoQemuImg(format.name()));
    }
    match std::fs::metadata(out) {
        Ok(meta) if !meta.is_file() => {
            return Err(ConvertError::NotAFile(format.name(), out.to_owned()))
        }
        Ok(_) if !force => return Err(ConvertError::Exists(out.to_owned())),
        _ => {}
    }
    let partial = restore::partial_path(out);
    let output_err = |source| ConvertError::Output {
        path: partial.clone(),
        source,
    };
    let dir = tempfile::Builder::new()
        .prefix("cairn-convert-")
        .tempdir()
        .map_err(output_err)?;
    let listen = Listen::Unix(dir.path().join("nbd.sock"));
    export::serve_during(vault, record, remote, &listen, |uri| {
        qemu_img(uri, &partial, format, cancel)
    })
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    std::fs::rename(&partial, out).map_err(|source| ConvertError::Output {
        path: out.to_owned(),
        source,
    })?;
    let file_bytes = std::fs::metadata(out)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(0);
    Ok(ConvertSummary {
        image: record.image.to_string(),
        snapshot: record.id.short(),
        output: out.display().to_string(),
        format: format.name(),
        size_bytes: record.size_bytes,
        file_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn qemu_img(
    uri: &str,
    partial: &Path,
    format: DiskFormat,
    cancel: &Cancel,
) -> Result<(), ConvertError> {
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-f", "raw", "-O", format.name()]);
    if let Some(options) = format.options() {
        command.args(["-o", options]);
    }
    let mut child = command
        .arg(uri)
        .arg(partial)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ConvertError::Spawn)?;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(ConvertError::Spawn)? {
            break status;
        }
        if cancel.is_cancelled() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ConvertError::Cancelled);
        }
        std::thread::sleep(POLL);
    };
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        return Err(ConvertError::QemuImg {
            status: status.to_string(),
            stderr: stderr.trim().lines().last().unwrap_or("").to_owned(),
        });
    }
    Ok(())
}

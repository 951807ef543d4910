//! The `cairn` command line. Errors from the library become one line on stderr and a
//! non-zero exit; `--json` gives scripts the same facts on stdout.

mod assets;
mod logs;
mod node;
pub mod remote;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_protocol::identity::{NodeId, RecoveryKey, SiteId};
use cairn_protocol::{retention, ChunkId, ImageName};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::backup::{self, BackupOptions, ZSTD_LEVEL_DEFAULT};
use crate::cancel::{Cancel, CancellableReader};
use crate::convert::{self, DiskFormat};
use crate::datadir::DataDir;
use crate::join::{self, NewNode};
use crate::source::Source;
use crate::trust;
use crate::units::{self, parse_duration_ms, parse_quota, parse_size};
use crate::vault::Vault;
use crate::{export, forget, prune, restore, verify, vm};

/// A line of output: stdout here, or the terminal of the command's user when it runs
/// inside a node.
macro_rules! outln {
    ($io:expr) => { $io.out(String::new()) };
    ($io:expr, $($t:tt)*) => { $io.out(format!($($t)*)) };
}

/// A line on stderr (or the command's user's stderr).
macro_rules! errln {
    ($io:expr, $($t:tt)*) => { $io.err(format!($($t)*)) };
}

// After the macros, which it uses.
pub(crate) mod report;

#[derive(Parser)]
#[command(
    name = "cairn",
    version,
    about = "Back up server disk images into an encrypted, deduplicated vault, and rebuild them byte for byte."
)]
struct Cli {
    /// The node's data dir [default: $XDG_DATA_HOME/cairn or ~/.local/share/cairn]
    #[arg(long, env = "CAIRN_DATA_DIR", global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// How log lines look on stderr: text, or json (one object a line, for log shippers)
    #[arg(
        long,
        env = "CAIRN_LOG_FORMAT",
        global = true,
        value_enum,
        default_value_t,
        value_name = "FORMAT"
    )]
    log_format: logs::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of `node run`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Create a new site in the data dir, with fresh site and vault keys
    Init {
        /// A name people will recognise, e.g. "Smith & Co, Main Street office"
        #[arg(long)]
        site_name: String,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Back up a disk image as a new snapshot
    Backup {
        /// The image's name, e.g. fileserver (letters, digits, '.', '_', '-')
        image: String,
        /// A raw image file, a block device, or - for stdin
        source: String,
        /// zstd level for new chunks (1 fastest .. 19 smallest)
        #[arg(long, default_value_t = ZSTD_LEVEL_DEFAULT, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// List snapshots, oldest first
    Snapshots {
        /// Only this image's snapshots
        image: Option<String>,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a snapshot into a file (sparse) or onto a block device
    Restore {
        /// IMAGE for its latest snapshot, or IMAGE@SNAPSHOT (an id or unique prefix)
        snapshot: String,
        /// Where to write it
        out: PathBuf,
        /// Overwrite OUT if it exists
        #[arg(long)]
        force: bool,
        /// Start over instead of resuming what an interrupted restore left in OUT.cairn-partial
        #[arg(long)]
        fresh: bool,
        /// Write OUT as this disk format, sparse (qcow2, vhdx and vmdk need qemu-img)
        #[arg(long, value_enum, default_value_t = DiskFormat::Raw)]
        format: DiskFormat,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Serve a snapshot as an NBD disk (read-only) until stopped, so qemu boots it or
    /// qemu-img reads it without a restore; inside a running node, chunks not stored
    /// here come from the mesh. A VM writes to an overlay of its own: qemu's -snapshot, or
    /// `qemu-img create -f qcow2 -b URI -F raw overlay.qcow2`
    Export {
        /// IMAGE for its latest snapshot, or IMAGE@SNAPSHOT (an id or unique prefix)
        snapshot: String,
        /// Where to listen: unix:PATH, or 127.0.0.1:PORT (loopback only; port 0 picks one)
        #[arg(long, value_name = "ADDR")]
        nbd: String,
        /// Print the URI and, when stopped, the summary as JSON lines, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Forget snapshots: those a retention policy does not keep (restic's --keep-* rules,
    /// buckets in local time; without any, the image's [retention.IMAGE] in node.toml),
    /// or one named as IMAGE@SNAPSHOT. Deletes no data: `prune` gives the space back. A
    /// snapshot not yet at R sites is always kept
    Forget {
        /// IMAGE (with --keep-* rules or a policy in node.toml) or IMAGE@SNAPSHOT (just
        /// that snapshot)
        target: String,
        #[command(flatten)]
        keep: KeepRules,
        /// List what would be forgotten and why, and change nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Give disk back after `forget`: drop this site's chunks no kept snapshot uses,
    /// list them for the partners to give back after their grace, and rewrite packs that
    /// are mostly garbage. Safe to interrupt: a rerun finishes
    Prune {
        /// Say what would be dropped and listed, and change nothing
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Show this site, or add a machine to it as a node
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Run a snapshot as a virtual machine on this PC, straight from the mesh (qemu)
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Invite, accept, limit and revoke partner sites
    Trust {
        #[command(subcommand)]
        command: TrustCommand,
    },
    /// Manage this site's keys
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Bring a site's identity back on a fresh machine from its recovery key
    Recover {
        /// The site id, as `cairn init` or `cairn site show` printed it
        #[arg(long)]
        site: String,
        /// The recovery key from the site's recovery sheet (dashes and case do not matter)
        #[arg(long)]
        recovery_key: String,
        /// The wrapped-keys record: a file, or a data dir holding wrapped-keys.rec
        /// [default: the data dir being recovered into]
        #[arg(long, value_name = "PATH")]
        from: Option<PathBuf>,
        /// Name for the site when recovering into a new data dir
        #[arg(long)]
        site_name: Option<String>,
        /// Fetch the wrapped-keys record from a partner's node at HOST:PORT (repeatable)
        /// instead of a file; the node then also starts from these addresses
        #[arg(long, value_name = "ADDR", conflicts_with = "from")]
        bootstrap: Vec<String>,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Make this machine a node of an existing site: without TOKEN, show its node id to add
    /// with `cairn site add-node`; with the token that prints, join
    Join {
        /// The token from `cairn site add-node` (cairn-join-...)
        token: Option<String>,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Run this machine's node, or manage it
    Node {
        #[command(subcommand)]
        command: node::NodeCommand,
    },
    /// What the running node knows: images and their copies, backup jobs, peers, limits
    Status {
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
        /// Print one line per problem and exit 1 (a failed backup job, a snapshot older
        /// than twice its job's period, data below R for over an hour, a partner unseen
        /// for a day); print nothing and exit 0 when all is well. For monitors and cron
        #[arg(long)]
        check: bool,
        /// How long data may be below R before --check says so [default: 1h]
        #[arg(long, hide = true, value_parser = parse_duration_ms)]
        check_below_r_after: Option<u64>,
        /// How long a partner may go unseen before --check says so [default: 1d]
        #[arg(long, hide = true, value_parser = parse_duration_ms)]
        check_unseen_after: Option<u64>,
    },
    /// Write the man pages and shell completions into DIR (for packaging)
    #[command(hide = true)]
    Assets { dir: PathBuf },
    /// The disaster-recovery report: per image the RPO against its schedule, copies per
    /// site, the RTO of a full restore and of a stand-in boot from the partners' measured
    /// throughput, the last drill, the retention policy, and every gap in words
    Report {
        /// Also write the report as one self-contained, printable HTML file with plots
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Print the report as JSON, for scripts
        #[arg(long)]
        json: bool,
        /// How long a partner may go unseen before the report names it [default: 1d]
        #[arg(long, hide = true, value_parser = parse_duration_ms)]
        unseen_after: Option<u64>,
    },
    /// Read and open every chunk of the given snapshots (default: all) and name any damage
    Verify {
        /// IMAGE (all its snapshots) or IMAGE@SNAPSHOT
        snapshot: Option<String>,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Serialize, Deserialize)]
pub enum SiteCommand {
    /// This site's id, name and fingerprint (read them to partners to compare), and its nodes
    Show {
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Certify a new machine as a node of this site and print the join token that gives it
    /// the site's keys (sealed to its node key, so only that machine can use it)
    AddNode {
        /// The node id `cairn join` printed on the new machine
        node_id: String,
        /// What to call the machine, e.g. "front desk PC" [default: "node" and its id's first group]
        #[arg(long)]
        name: Option<String>,
        /// How long the token stays valid, e.g. 1h or 7d
        #[arg(long, value_parser = parse_duration_ms, default_value = "1h")]
        expires: u64,
        /// Storage the machine offers to the mesh, e.g. 2TB [default: not stated]
        #[arg(long, value_parser = parse_size)]
        capacity: Option<u64>,
        /// Where the machine can be reached (repeat for several), e.g. /ip4/10.0.0.7/udp/4001/quic-v1
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<String>,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Serialize, Deserialize)]
pub enum VmCommand {
    /// Boot a snapshot as a VM and run it until it stops, `cairn vm stop` or Ctrl-C. Its
    /// writes go to an overlay in DATA_DIR/vms/IMAGE/, kept for the next start; the
    /// snapshot is never changed
    Start {
        /// IMAGE for its latest snapshot, or IMAGE@SNAPSHOT
        snapshot: String,
        /// Memory, as qemu reads it
        #[arg(long, default_value = "4G")]
        memory: String,
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
        cpus: u32,
        /// VNC console at 127.0.0.1:PORT (5900 and up; loopback only, reach it over SSH)
        #[arg(long, value_name = "ADDR")]
        vnc: Option<String>,
        /// none, user (qemu's NAT: the VM reaches out, nothing reaches it) or bridge:BR
        /// (on the office LAN, as the server was)
        #[arg(long, default_value = "none", value_parser = |s: &str| s.parse::<vm::Network>())]
        network: vm::Network,
        #[arg(long, value_enum, default_value_t = vm::Firmware::Bios)]
        firmware: vm::Firmware,
        /// KVM, TCG, or KVM when a probe guest boots under it
        #[arg(long, value_enum, default_value_t = vm::Accel::Auto)]
        accel: vm::Accel,
        /// Print the VM's details and, when it stops, the summary as JSON
        #[arg(long)]
        json: bool,
    },
    /// The VMs running from this data dir
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop the VM of IMAGE (qemu quits as on a host shutdown; its overlay is kept)
    Stop { image: String },
}

#[derive(Subcommand, Serialize, Deserialize)]
pub enum TrustCommand {
    /// Print an invite token for a partner consultant to accept
    Invite {
        /// What this site offers to store for the partner, e.g. 500GB or 2TiB
        #[arg(long, value_parser = parse_quota, default_value = "100GB")]
        quota: u64,
        /// How long the invite stays valid, e.g. 7d or 12h
        #[arg(long, value_parser = parse_duration_ms, default_value = "7d")]
        expires: u64,
        /// Where this site's nodes can be reached, for the partner (repeat for several)
        #[arg(long = "address", value_name = "ADDR")]
        addresses: Vec<String>,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Accept a partner's invite: shows who is inviting and asks before trusting them
    Accept {
        /// The token from `cairn trust invite` (cairn-invite-...)
        token: String,
        /// What this site will store for the inviter [default: what they offered]
        #[arg(long, value_parser = parse_quota)]
        quota: Option<u64>,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// List partners: quota and bytes used each way, and when each was last seen
    List {
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Change what this site stores for a partner
    Quota {
        /// The partner: its site id, its fingerprint, or the start of its name
        site: String,
        /// The new quota, e.g. 750GB (to stop storing for them, `trust revoke`)
        #[arg(value_parser = parse_quota)]
        size: u64,
    },
    /// Stop storing for a partner; the revocation wins over every earlier grant
    Revoke {
        /// The partner: its site id, its fingerprint, or the start of its name
        site: String,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print the recovery key again, after confirmation
    RecoverySheet {
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    logs::set_format(cli.log_format);
    match forward_or_run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Each cause once, on one line (error messages never repeat their source).
            logs::print_error(&crate::units::chain_of(e.chain()));
            ExitCode::FAILURE
        }
    }
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("cairn"));
    }
    let home = std::env::var_os("HOME")
        .context("no --data-dir, CAIRN_DATA_DIR or HOME to find the data dir")?;
    Ok(PathBuf::from(home).join(".local/share/cairn"))
}

fn n_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs the command here, or inside the data dir's running node when there is one (it
/// holds the store open). Commands that make or run a data dir always run here; the
/// others become an `Operation`, which runs the same way in both places (`execute`).
fn forward_or_run(cli: Cli) -> Result<u8> {
    let data_dir = match &cli.data_dir {
        Some(dir) => dir.clone(),
        None => default_data_dir()?,
    };
    if !matches!(cli.command, Command::Node { .. }) {
        logs::init(&logs::command_filter())?;
    }
    let caller = remote::Caller::here();
    let operation = match cli.command {
        Command::Node { command } => return node::run(&data_dir, command),
        Command::Assets { dir } => return assets::write(&dir),
        Command::Init { site_name, json } => return run_init(&caller, &data_dir, site_name, json),
        Command::Join { token, yes, json } => {
            return run_join(&caller, &data_dir, token, yes, json)
        }
        Command::Recover {
            site,
            recovery_key,
            from,
            site_name,
            bootstrap,
            json,
        } => {
            let recover = Recover {
                site,
                recovery_key,
                from,
                site_name,
                bootstrap,
                json,
            };
            return run_recover(&caller, &data_dir, recover);
        }
        Command::Backup {
            image,
            source,
            zstd_level,
            json,
        } => Operation::Backup {
            image,
            source,
            zstd_level,
            json,
        },
        Command::Snapshots { image, json } => Operation::Snapshots { image, json },
        Command::Forget {
            target,
            keep,
            dry_run,
            json,
        } => Operation::Forget {
            target,
            keep,
            dry_run,
            json,
        },
        Command::Prune { dry_run, json } => Operation::Prune { dry_run, json },
        Command::Export {
            snapshot,
            nbd,
            json,
        } => Operation::Export {
            snapshot,
            nbd,
            json,
        },
        Command::Restore {
            snapshot,
            out,
            force,
            fresh,
            format,
            json,
        } => Operation::Restore {
            snapshot,
            out,
            force,
            fresh,
            format,
            json,
        },
        Command::Verify { snapshot, json } => Operation::Verify { snapshot, json },
        Command::Report {
            html,
            json,
            unseen_after,
        } => Operation::Report {
            html,
            json,
            unseen_after_ms: unseen_after,
        },
        Command::Status {
            json,
            check,
            check_below_r_after,
            check_unseen_after,
        } => Operation::Status {
            json,
            check: check.then(|| {
                let defaults = crate::status::CheckLimits::default();
                crate::status::CheckLimits {
                    below_target_ms: check_below_r_after.unwrap_or(defaults.below_target_ms),
                    partner_unseen_ms: check_unseen_after.unwrap_or(defaults.partner_unseen_ms),
                }
            }),
        },
        Command::Trust { command } => Operation::Trust(command),
        Command::Vm { command } => Operation::Vm(command),
        Command::Site { command } => Operation::Site(command),
        Command::Key {
            command: KeyCommand::RecoverySheet { yes },
        } => Operation::RecoverySheet { yes },
    };
    if crate::control::probe(&data_dir)? {
        let cwd = std::env::current_dir().context("cannot read the working directory")?;
        return remote::forward(&data_dir, operation.with_paths_from(&cwd));
    }
    if let Operation::Status { .. } = operation {
        return Err(crate::control::ControlError::NotRunning(data_dir).into());
    }
    // Only the long jobs that check the flag; anything else dies on Ctrl-C as before.
    if matches!(
        operation,
        Operation::Backup { .. }
            | Operation::Restore { .. }
            | Operation::Export { .. }
            | Operation::Vm(VmCommand::Start { .. })
    ) {
        cancel_on_interrupt(&caller.cancel);
    }
    execute(&caller, None, &data_dir, operation)
}

/// One operation on a data dir's vault, as a command asks for it: routed to the data
/// dir's node when one runs (`remote::forward`), run here otherwise. Both run `execute`.
#[derive(Serialize, Deserialize)]
pub enum Operation {
    Backup {
        image: String,
        /// A path, or `-` for the command's stdin.
        source: String,
        zstd_level: i32,
        json: bool,
    },
    Snapshots {
        image: Option<String>,
        json: bool,
    },
    Restore {
        snapshot: String,
        out: PathBuf,
        force: bool,
        fresh: bool,
        #[serde(default)]
        format: DiskFormat,
        json: bool,
    },
    Verify {
        snapshot: Option<String>,
        json: bool,
    },
    Status {
        json: bool,
        /// `status --check`, with its thresholds.
        #[serde(default)]
        check: Option<crate::status::CheckLimits>,
    },
    Forget {
        target: String,
        keep: KeepRules,
        dry_run: bool,
        json: bool,
    },
    Report {
        html: Option<PathBuf>,
        json: bool,
        unseen_after_ms: Option<u64>,
    },
    Prune {
        dry_run: bool,
        json: bool,
    },
    Export {
        snapshot: String,
        /// `unix:PATH` with PATH absolute, or `HOST:PORT`.
        nbd: String,
        json: bool,
    },
    Trust(TrustCommand),
    Vm(VmCommand),
    Site(SiteCommand),
    RecoverySheet {
        yes: bool,
    },
}

impl Operation {
    /// The operation's name, for the node's log.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Backup { .. } => "backup",
            Operation::Snapshots { .. } => "snapshots",
            Operation::Restore { .. } => "restore",
            Operation::Verify { .. } => "verify",
            Operation::Status { .. } => "status",
            Operation::Forget { .. } => "forget",
            Operation::Report { .. } => "report",
            Operation::Prune { .. } => "prune",
            Operation::Export { .. } => "export",
            Operation::Vm(_) => "vm",
            Operation::Trust(_) => "trust",
            Operation::Site(_) => "site",
            Operation::RecoverySheet { .. } => "key recovery-sheet",
        }
    }

    /// A backup of `-` reads the command's stdin, which goes to the node with it.
    pub fn reads_stdin(&self) -> bool {
        matches!(self, Operation::Backup { source, .. } if source == "-")
    }

    /// Makes relative paths absolute in `cwd`, the command's working directory, for a
    /// node that runs somewhere else.
    pub fn with_paths_from(self, cwd: &Path) -> Operation {
        match self {
            Operation::Backup {
                image,
                source,
                zstd_level,
                json,
            } if source != "-" => Operation::Backup {
                image,
                source: cwd.join(source).to_string_lossy().into_owned(),
                zstd_level,
                json,
            },
            Operation::Restore {
                snapshot,
                out,
                force,
                fresh,
                format,
                json,
            } => Operation::Restore {
                snapshot,
                out: cwd.join(out),
                force,
                fresh,
                format,
                json,
            },
            Operation::Export {
                snapshot,
                nbd,
                json,
            } => Operation::Export {
                nbd: match nbd.strip_prefix("unix:") {
                    Some(path) if !path.is_empty() => format!("unix:{}", cwd.join(path).display()),
                    _ => nbd,
                },
                snapshot,
                json,
            },
            Operation::Report {
                html,
                json,
                unseen_after_ms,
            } => Operation::Report {
                html: html.map(|path| cwd.join(path)),
                json,
                unseen_after_ms,
            },
            other => other,
        }
    }
}

/// Runs an operation for `caller`: inside the running node (`node` is Some, and its
/// open vault is used) or here on the data dir.
pub(crate) fn execute(
    caller: &remote::Caller,
    node: Option<&remote::InNode>,
    data_dir: &Path,
    operation: Operation,
) -> Result<u8> {
    let open = || -> Result<Arc<Vault>> {
        if let Some(node) = node {
            return Ok(node.vault.clone());
        }
        let vault = Vault::open(data_dir)?;
        for warning in &vault.store.warnings {
            errln!(caller, "warning: {warning}");
        }
        Ok(Arc::new(vault))
    };
    let io = caller;
    match operation {
        Operation::Status { json, check } => {
            let Some(node) = node else {
                return Err(crate::control::ControlError::NotRunning(data_dir.to_owned()).into());
            };
            let status = node::status(&node.vault, &node.mesh)?;
            if let Some(limits) = check {
                let problems = crate::status::problems(&status, &limits);
                if json {
                    print_json(io, &serde_json::json!({ "problems": problems }));
                } else {
                    for line in &problems {
                        outln!(io, "{line}");
                    }
                }
                return Ok(u8::from(!problems.is_empty()));
            }
            if json {
                print_json(io, &status);
            } else {
                outln!(io, "{}", crate::status::render_text(&status).trim_end());
            }
            Ok(0)
        }
        Operation::Trust(command) => run_trust(io, &*open()?, command),
        Operation::Site(command) => run_site(io, &*open()?, command),
        Operation::RecoverySheet { yes } => run_recovery_sheet(io, &*open()?, yes),
        Operation::Backup {
            image,
            source,
            zstd_level,
            json,
        } => {
            let started = std::time::Instant::now();
            let done = run_backup(io, node, &open, &image, source, zstd_level, json);
            log_failed("backup", &image, started, &done);
            done
        }
        Operation::Snapshots { image, json } => run_snapshots(io, &*open()?, image, json),
        Operation::Forget {
            target,
            keep,
            dry_run,
            json,
        } => run_forget(io, node, &*open()?, &target, &keep, dry_run, json),
        Operation::Prune { dry_run, json } => run_prune(io, node, &*open()?, dry_run, json),
        Operation::Restore {
            snapshot,
            out,
            force,
            fresh,
            format,
            json,
        } => {
            let flags = RestoreFlags { force, fresh, json };
            let started = std::time::Instant::now();
            let done = open().and_then(|vault| match format {
                DiskFormat::Raw => run_restore(io, node, &vault, &snapshot, &out, flags),
                _ => run_convert(io, node, &vault, &snapshot, &out, format, force, json),
            });
            log_failed("restore", &snapshot, started, &done);
            done
        }
        Operation::Verify { snapshot, json } => run_verify(io, &*open()?, snapshot, json),
        Operation::Report {
            html,
            json,
            unseen_after_ms,
        } => report::run(io, node, &*open()?, data_dir, html, json, unseen_after_ms),
        Operation::Export {
            snapshot,
            nbd,
            json,
        } => run_export(io, node, &*open()?, &snapshot, &nbd, json),
        Operation::Vm(command) => run_vm(io, node, &open, data_dir, command),
    }
}

/// The structured line of a backup or restore that failed (the one that finished has
/// its own, with the snapshot and bytes): TARGET is IMAGE or IMAGE@SNAPSHOT as typed.
fn log_failed(operation: &str, target: &str, started: std::time::Instant, done: &Result<u8>) {
    if let Err(e) = done {
        let (image, snapshot) = target.split_once('@').unwrap_or((target, ""));
        tracing::warn!(
            operation,
            image,
            snapshot,
            bytes = 0u64,
            duration_ms = started.elapsed().as_millis() as u64,
            result = "failed",
            reason = %units::chain_of(e.chain()),
            "{operation} of {target} failed"
        );
    }
}

fn run_vm(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    open: &dyn Fn() -> Result<Arc<Vault>>,
    data_dir: &Path,
    command: VmCommand,
) -> Result<u8> {
    match command {
        VmCommand::Start {
            snapshot,
            memory,
            cpus,
            vnc,
            network,
            firmware,
            accel,
            json,
        } => {
            let vault = open()?;
            let record = vault.resolve(&snapshot)?;
            let remote = node.map(|node| &node.mesh as &dyn crate::fetch::RemoteChunks);
            let options = vm::VmOptions {
                memory,
                cpus,
                vnc,
                network,
                firmware,
                accel,
            };
            let ready = |info: &vm::VmInfo| {
                if json {
                    print_json(io, info);
                    return;
                }
                outln!(
                    io,
                    "{}@{} runs as a VM (pid {}, {}{})",
                    info.image,
                    info.snapshot,
                    info.pid,
                    info.accel,
                    if info.overlay_reused {
                        ", with the writes of its last run"
                    } else {
                        ""
                    }
                );
                outln!(io, "  serial console: {}", info.console_log);
                if let Some(vnc) = &info.vnc {
                    outln!(io, "  screen: VNC at {vnc}");
                }
                outln!(io, "  its writes: {}", info.overlay);
                outln!(
                    io,
                    "  stop it with Ctrl-C or `cairn vm stop {}`",
                    info.image
                );
            };
            let summary = vm::start(
                &vault, &record, remote, data_dir, &options, &io.cancel, &ready,
            )?;
            if json {
                print_json(io, &summary);
            } else {
                outln!(
                    io,
                    "VM of {}@{} ended after {:.0}s: {}; {} read from the snapshot",
                    summary.image,
                    summary.snapshot,
                    summary.seconds,
                    summary.exit,
                    units::bytes(summary.read_bytes)
                );
            }
            Ok(0)
        }
        VmCommand::List { json } => {
            let vms = vm::list(data_dir);
            if json {
                print_json(io, &vms);
            } else if vms.is_empty() {
                outln!(io, "no VM runs here");
            } else {
                for info in vms {
                    outln!(
                        io,
                        "{}@{}  pid {}  {}  since {}  console {}",
                        info.image,
                        info.snapshot,
                        info.pid,
                        info.accel,
                        units::utc(info.started_unix_ms),
                        info.console_log
                    );
                }
            }
            Ok(0)
        }
        VmCommand::Stop { image } => {
            let info = vm::stop(data_dir, &image)?;
            outln!(
                io,
                "stopped the VM of {}@{} (its overlay is kept)",
                info.image,
                info.snapshot
            );
            Ok(0)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_convert(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    vault: &Vault,
    snapshot: &str,
    out: &Path,
    format: DiskFormat,
    force: bool,
    json: bool,
) -> Result<u8> {
    let record = vault.resolve(snapshot)?;
    let remote = node.map(|node| &node.mesh as &dyn crate::fetch::RemoteChunks);
    let summary = convert::convert(vault, &record, out, format, force, remote, &io.cancel)?;
    tracing::info!(
        operation = "restore",
        image = %summary.image,
        snapshot = %summary.snapshot,
        bytes = summary.size_bytes,
        duration_ms = (summary.seconds * 1000.0) as u64,
        result = "ok",
        "restored {}@{} to {} as {}",
        summary.image,
        summary.snapshot,
        summary.output,
        summary.format
    );
    if json {
        print_json(io, &summary);
    } else {
        outln!(
            io,
            "restored {}@{} to {} as {}: {} image, {} on disk, in {:.1}s",
            summary.image,
            summary.snapshot,
            summary.output,
            summary.format,
            units::bytes(summary.size_bytes),
            units::bytes(summary.file_bytes),
            summary.seconds
        );
    }
    Ok(0)
}

fn run_export(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    vault: &Vault,
    snapshot: &str,
    nbd: &str,
    json: bool,
) -> Result<u8> {
    let listen: export::Listen = nbd.parse()?;
    let record = vault.resolve(snapshot)?;
    let remote = node.map(|node| &node.mesh as &dyn crate::fetch::RemoteChunks);
    let ready = |uri: &str| {
        if json {
            print_json(
                io,
                &serde_json::json!({ "serving": uri, "size_bytes": record.size_bytes }),
            );
        } else {
            outln!(
                io,
                "serving {}@{} ({}, read-only) at {uri}",
                record.image,
                record.id.short(),
                units::bytes(record.size_bytes)
            );
            outln!(
                io,
                "  boot it: qemu-system-x86_64 -m 2G -snapshot -drive file={uri},format=raw"
            );
            outln!(io, "  stop with Ctrl-C");
        }
    };
    let summary = export::serve(vault, &record, remote, &listen, &io.cancel, &ready)?;
    if json {
        print_json(io, &summary);
    } else {
        outln!(
            io,
            "export stopped after {:.0}s: {} connections, {} requests, {} read, {} chunks opened",
            summary.seconds,
            summary.connections,
            summary.requests,
            units::bytes(summary.read_bytes),
            summary.chunks_opened
        );
    }
    Ok(0)
}

/// Sets `cancel` on Ctrl-C, so a backup or restore run here stops cleanly (no snapshot;
/// the partial file kept) instead of dying mid-write. A second Ctrl-C kills the process
/// as usual.
fn cancel_on_interrupt(cancel: &Cancel) {
    static ON_INTERRUPT: std::sync::OnceLock<Cancel> = std::sync::OnceLock::new();
    extern "C" fn on_interrupt(_signal: libc::c_int) {
        if let Some(cancel) = ON_INTERRUPT.get() {
            cancel.cancel();
        }
        // SAFETY: signal() is async-signal-safe; the default action comes back.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    }
    if ON_INTERRUPT.set(cancel.clone()).is_ok() {
        // SAFETY: the handler only reads a set OnceLock, stores to an atomic and resets
        // itself, all async-signal-safe.
        unsafe {
            libc::signal(
                libc::SIGINT,
                on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn run_init(io: &remote::Caller, data_dir: &Path, site_name: String, json: bool) -> Result<u8> {
    let vault = Vault::init(data_dir, &site_name)?;
    let site_id = vault.dir.site_id();
    let recovery_key = vault
        .dir
        .recovery_key
        .clone()
        .expect("init makes a recovery key");
    if json {
        print_json(
            io,
            &serde_json::json!({
                "site_name": site_name,
                "site_id": site_id.to_string(),
                "fingerprint": site_id.fingerprint().to_string(),
                "recovery_key": recovery_key.to_string(),
                "data_dir": data_dir,
            }),
        );
    } else {
        outln!(io, "created site {site_name:?} in {}", data_dir.display());
        outln!(io, "site id:     {site_id}");
        outln!(io, "fingerprint: {}", site_id.fingerprint());
        outln!(io);
        print_recovery_sheet(io, &site_id, &recovery_key);
    }
    Ok(0)
}

/// `cairn recover`'s arguments.
struct Recover {
    site: String,
    recovery_key: String,
    from: Option<PathBuf>,
    site_name: Option<String>,
    bootstrap: Vec<String>,
    json: bool,
}

fn run_recover(io: &remote::Caller, data_dir: &Path, recover: Recover) -> Result<u8> {
    let Recover {
        site,
        recovery_key,
        from,
        site_name,
        bootstrap,
        json,
    } = recover;
    let data_dir = data_dir.to_owned();
    let site: SiteId = site.parse().context("--site")?;
    let recovery_key: RecoveryKey = recovery_key.parse().context("--recovery-key")?;
    let record = if bootstrap.is_empty() {
        let from = from.unwrap_or_else(|| data_dir.clone());
        let record_path = if from.is_dir() {
            from.join("wrapped-keys.rec")
        } else {
            from
        };
        std::fs::read(&record_path).with_context(|| {
            format!(
                "cannot read the wrapped-keys record {}",
                record_path.display()
            )
        })?
    } else {
        crate::mesh::fetch_wrapped_keys(&site, &bootstrap)?
    };
    let dir = DataDir::recover(
        &data_dir,
        &site,
        &recovery_key,
        &record,
        site_name.as_deref(),
    )?;
    if !bootstrap.is_empty() {
        node::remember_bootstrap(&data_dir, &bootstrap)?;
    }
    if json {
        print_json(
            io,
            &serde_json::json!({
                "site_name": dir.site_name,
                "site_id": site.to_string(),
                "data_dir": data_dir,
            }),
        );
    } else {
        outln!(
            io,
            "recovered site {:?} ({site}) into {}",
            dir.site_name,
            data_dir.display()
        );
    }
    Ok(0)
}

fn run_recovery_sheet(io: &remote::Caller, vault: &Vault, yes: bool) -> Result<u8> {
    let Some(recovery_key) = vault.dir.recovery_key.clone() else {
        anyhow::bail!(
                    "this data dir holds no recovery key (it joined its site, or predates recovery keys): print it on the machine that made the site"
                );
    };
    if !yes {
        confirm(
            io,
            "This prints the secret that opens every backup of this site. Print it?",
        )?;
    }
    print_recovery_sheet(io, &vault.dir.site_id(), &recovery_key);
    Ok(0)
}

fn run_backup(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    open: &dyn Fn() -> Result<Arc<Vault>>,
    image: &str,
    source: String,
    zstd_level: i32,
    json: bool,
) -> Result<u8> {
    let image = ImageName::new(image)?;
    let source = if source == "-" {
        // Inside a node, `-` is the command's stdin, which it sent along. Read so that a
        // cancel stops a read that waits on a stalled pipe.
        let stdin: Box<dyn std::io::Read + Send> = if io.is_remote() {
            let stdin = io
                .take_stdin()
                .context("the command's stdin did not reach the node")?;
            Box::new(CancellableReader::new(stdin, io.cancel.clone()))
        } else {
            Box::new(CancellableReader::new(std::io::stdin(), io.cancel.clone()))
        };
        Source::stream("stdin", stdin)
    } else {
        Source::open(&source)?
    };
    let vault = open()?;
    let bar = progress_bar(io, source.size_bytes, "backing up");
    let options = BackupOptions {
        zstd_level,
        ..BackupOptions::default()
    };
    let progress = |done| bar.set_position(done);
    let summary = match node {
        Some(node) => backup_in_node(node, &image, source, options, &io.cancel, &progress),
        None => backup::backup_until(&vault, &image, source, options, &io.cancel, &progress)
            .map_err(anyhow::Error::from),
    };
    bar.finish_and_clear();
    let summary = summary?;
    tracing::info!(
        operation = "backup",
        image = %summary.image,
        snapshot = %summary.snapshot,
        bytes = summary.size_bytes,
        duration_ms = (summary.seconds * 1000.0) as u64,
        result = "ok",
        "backed up {}@{}",
        summary.image,
        summary.snapshot
    );
    if json {
        print_json(io, &summary);
    } else {
        outln!(
            io,
            "backed up {}@{}: {} in {:.1}s ({})",
            summary.image,
            summary.snapshot,
            units::bytes(summary.size_bytes),
            summary.seconds,
            units::rate(summary.size_bytes, summary.seconds)
        );
        outln!(
            io,
            "  read {} ({} zeros or holes, never stored); {} chunks, {} new",
            units::bytes(summary.read_bytes),
            units::bytes(summary.zero_bytes),
            summary.n_chunks,
            summary.n_chunks_new
        );
        if summary.n_chunks_new == 0 {
            outln!(
                io,
                "  nothing new to store: every chunk was already in the vault"
            );
        } else {
            outln!(
                io,
                "  new data {} stored as {}: dedup {:.2}x, compression {:.2}x",
                units::bytes(summary.new_bytes),
                units::bytes(summary.stored_bytes),
                summary.dedup_ratio(),
                summary.compression_ratio()
            );
        }
    }
    Ok(0)
}

/// A backup inside the running node, as `cairn backup` and the node's backup jobs run
/// it: under the write lock (the storage thread, a prune and other backups take turns
/// at the packs), and the new snapshot handed to the mesh before the lock goes.
pub(crate) fn backup_in_node(
    node: &remote::InNode,
    image: &ImageName,
    source: Source,
    options: BackupOptions,
    cancel: &Cancel,
    progress: &dyn Fn(u64),
) -> Result<backup::BackupSummary> {
    let _writing = node
        .mesh
        .write_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let summary = backup::backup_until(&node.vault, image, source, options, cancel, progress)?;
    // The new snapshot goes to the mesh now, not at the node's next start; still under
    // the lock, so a prune never signs between the commit and its restate.
    node::publish(&node.vault, &node.mesh)?;
    Ok(summary)
}

/// A forget inside the running node, as `cairn forget` and a backup job's `keep` run
/// it: one writer at a time, as for a backup; the tombstones reach the engine with the
/// site's other records when the command (or the job's run) ends.
pub(crate) fn forget_in_node(
    node: &remote::InNode,
    selection: &forget::Selection,
    dry_run: bool,
) -> Result<forget::ForgetReport> {
    let _writing = node
        .mesh
        .write_lock
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (report, _tombstones) =
        forget::forget(&node.vault, selection, dry_run, units::now_unix_ms())?;
    Ok(report)
}

/// What `cairn verify` checked, in words: the site's own chunks, those on the site's other
/// nodes, and those held for partners, each with its own verdict.
fn verify_text(
    report: &verify::VerifyReport,
    held: Option<&verify::HeldReport>,
    damaged_records: bool,
) -> Vec<String> {
    let verdict = |n_damaged: usize, what: &str| {
        if n_damaged == 0 {
            "all good".to_string()
        } else {
            format!("{n_damaged} {what}")
        }
    };
    let n_damaged = report.damage.len();
    let mut lines = vec![format!(
        "verified {} snapshots: {} chunks, {} in {:.1}s: {}",
        report.n_snapshots,
        report.n_chunks_checked,
        units::bytes(report.bytes_checked),
        report.seconds,
        if damaged_records && n_damaged == 0 {
            "damaged snapshot records".into()
        } else {
            verdict(n_damaged, "damaged stretches")
        }
    )];
    if report.n_chunks_held_elsewhere > 0 {
        lines.push(format!(
            "  {} chunks ({}) are on the site's other nodes, not this one: not checked here",
            report.n_chunks_held_elsewhere,
            units::bytes(report.bytes_held_elsewhere)
        ));
    }
    if !report.snapshots_held_elsewhere.is_empty() {
        lines.push(format!(
            "  the manifests of {} are on the site's other nodes: checked only as far as this node holds them",
            report.snapshots_held_elsewhere.join(", ")
        ));
    }
    if let Some(held) = held {
        for d in &held.damage {
            lines.push(format!(
                "DAMAGED chunk {} held for site {}: {}",
                &d.chunk[..16.min(d.chunk.len())],
                d.owner,
                d.why
            ));
        }
        if held.n_chunks_checked > 0 || held.n_chunks_lost_here > 0 {
            lines.push(format!(
                "held for partners: {} chunks, {} checked against their owners' signatures: {}",
                held.n_chunks_checked,
                units::bytes(held.bytes_checked),
                verdict(held.damage.len(), "damaged chunks")
            ));
        }
        if held.n_chunks_lost_here > 0 {
            lines.push(format!(
                "  {} chunks held for partners were lost from this store: the running node fetches them again from their other holders",
                held.n_chunks_lost_here
            ));
        }
    }
    lines
}

/// Where this site's nodes said they listen, in their certificates: what an invite
/// without `--address` offers.
fn own_addresses(vault: &Vault) -> Vec<String> {
    use cairn_protocol::record::{NodeCert, RecordKind};
    let site = vault.dir.site_id();
    let mut out: Vec<String> = Vec::new();
    let Ok(records) = crate::records::all(vault.store.index()) else {
        return out;
    };
    for record in records {
        if record.author != site || record.kind != RecordKind::NodeCert {
            continue;
        }
        if let Ok(cert) = NodeCert::decode(&record.body) {
            for address in cert.addresses {
                if !out.contains(&address) {
                    out.push(address);
                }
            }
        }
    }
    out
}

fn run_snapshots(
    io: &remote::Caller,
    vault: &Vault,
    image: Option<String>,
    json: bool,
) -> Result<u8> {
    if let Some(image) = &image {
        ImageName::new(image)?;
    }
    let (records, damaged_records) = vault.snapshots_checked()?;
    for e in &damaged_records {
        errln!(io, "warning: {e}; `cairn verify` reports it too");
    }
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| {
            image
                .as_deref()
                .is_none_or(|image| r.image.as_str() == image)
        })
        .collect();
    if let (Some(image), true) = (&image, records.is_empty()) {
        anyhow::bail!("no image named {image:?} in this vault (`cairn snapshots` lists them)");
    }
    if json {
        #[derive(Serialize)]
        struct Row {
            image: String,
            snapshot: String,
            time_unix_ms: u64,
            size_bytes: u64,
        }
        let rows: Vec<Row> = records
            .iter()
            .map(|r| Row {
                image: r.image.to_string(),
                snapshot: r.id.to_string(),
                time_unix_ms: r.time_unix_ms,
                size_bytes: r.size_bytes,
            })
            .collect();
        print_json(io, &rows);
    } else if records.is_empty() {
        outln!(
            io,
            "no snapshots yet: `cairn backup IMAGE SOURCE` makes one"
        );
    } else {
        outln!(
            io,
            "{:<24} {:<10} {:<20} {:>10}",
            "IMAGE",
            "SNAPSHOT",
            "TIME (UTC)",
            "SIZE"
        );
        for r in &records {
            outln!(
                io,
                "{:<24} {:<10} {:<20} {:>10}",
                r.image.as_str(),
                r.id.short(),
                units::utc(r.time_unix_ms),
                units::bytes(r.size_bytes)
            );
        }
    }
    Ok(0)
}

/// `cairn restore`'s switches.
struct RestoreFlags {
    force: bool,
    fresh: bool,
    json: bool,
}

fn run_restore(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    vault: &Vault,
    snapshot: &str,
    out: &Path,
    flags: RestoreFlags,
) -> Result<u8> {
    let RestoreFlags { force, fresh, json } = flags;
    let record = vault.resolve(snapshot)?;
    let bar = progress_bar(io, Some(record.size_bytes), "restoring");
    let options = restore::RestoreOptions {
        force,
        fresh,
        // Inside a node, what the store lacks comes from the mesh.
        remote: node.map(|node| &node.mesh as &dyn crate::fetch::RemoteChunks),
        // Inside a node, the output gets the command's umask, not the node's.
        file_mode: io.file_mode(),
        cancel: Some(&io.cancel),
        ..restore::RestoreOptions::local(n_workers())
    };
    let summary = restore::restore(vault, &record, out, &options, &|done| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    let summary = summary?;
    tracing::info!(
        operation = "restore",
        image = %summary.image,
        snapshot = %summary.snapshot,
        bytes = summary.size_bytes,
        duration_ms = (summary.seconds * 1000.0) as u64,
        result = "ok",
        "restored {}@{} to {}",
        summary.image,
        summary.snapshot,
        summary.output
    );
    if json {
        print_json(io, &summary);
    } else {
        outln!(
            io,
            "restored {}@{} to {}: {} ({} of data) in {:.1}s ({})",
            summary.image,
            summary.snapshot,
            summary.output,
            units::bytes(summary.size_bytes),
            units::bytes(summary.data_bytes),
            summary.seconds,
            units::rate(summary.size_bytes, summary.seconds)
        );
        outln!(
            io,
            "  {} resumed from an interrupted restore, {} read here, {} fetched from other nodes",
            units::bytes(summary.resumed_bytes),
            units::bytes(summary.local_bytes),
            units::bytes(summary.remote_bytes)
        );
    }
    Ok(0)
}

fn run_verify(
    io: &remote::Caller,
    vault: &Vault,
    snapshot: Option<String>,
    json: bool,
) -> Result<u8> {
    let (all, damaged_records) = vault.snapshots_checked()?;
    let records = match snapshot.as_deref() {
        None => all,
        Some(spec) if spec.contains('@') => vec![vault.resolve(spec)?],
        Some(image) => {
            vault.resolve(image)?;
            vault
                .snapshots()?
                .into_iter()
                .filter(|r| r.image.as_str() == image)
                .collect()
        }
    };
    let bar = progress_bar(io, None, "verifying");
    let report = verify::verify(vault, &records, n_workers(), &|done| bar.set_position(done));
    // Partners' chunks are checked with the whole store, not for one image.
    let held = snapshot
        .is_none()
        .then(|| verify::verify_held(vault, &|done| bar.set_position(report.bytes_checked + done)));
    bar.finish_and_clear();
    let damaged = !report.damage.is_empty()
        || !damaged_records.is_empty()
        || held.as_ref().is_some_and(|h| !h.damage.is_empty());
    for e in &damaged_records {
        errln!(io, "DAMAGED {e}");
    }
    if json {
        let mut value = serde_json::to_value(&report).expect("a report serializes");
        if let Some(held) = &held {
            value["held_for_partners"] = serde_json::to_value(held).expect("a report serializes");
        }
        print_json(io, &value);
    } else {
        for d in &report.damage {
            let chunk = d
                .chunk
                .as_deref()
                .map(|c| format!(" chunk {}", &c[..16]))
                .unwrap_or_default();
            outln!(
                io,
                "DAMAGED {}@{} bytes {}..{}{}: {}",
                d.image,
                d.snapshot,
                d.offset,
                d.offset + d.len_bytes,
                chunk,
                d.why
            );
        }
        for line in verify_text(&report, held.as_ref(), !damaged_records.is_empty()) {
            outln!(io, "{line}");
        }
    }
    if damaged {
        return Ok(3);
    }
    Ok(0)
}

fn run_trust(io: &remote::Caller, vault: &Vault, command: TrustCommand) -> Result<u8> {
    let now = units::now_unix_ms();
    match command {
        TrustCommand::Invite {
            quota,
            expires,
            addresses,
            json,
        } => {
            let addresses = if addresses.is_empty() {
                own_addresses(vault)
            } else {
                addresses
            };
            if addresses.is_empty() {
                errln!(io, "warning: this invite names no address of this site (no node of it has run with --listen); the acceptor cannot complete it unless it reaches this site another way: pass --address HOST:PORT");
            }
            let token = trust::invite(vault, quota, addresses, expires, now)?;
            if json {
                print_json(
                    io,
                    &serde_json::json!({
                        "token": token.to_text(),
                        "expires_unix_ms": token.expires_unix_ms,
                        "quota_bytes": quota,
                    }),
                );
            } else {
                outln!(io, "{}", token.to_text());
                outln!(io);
                outln!(
                    io,
                    "Send this to your partner; it offers {} of storage and expires {} UTC.",
                    units::bytes(quota),
                    units::utc(token.expires_unix_ms)
                );
                outln!(
                    io,
                    "They will see your fingerprint: {}",
                    vault.dir.site_id().fingerprint()
                );
            }
        }
        TrustCommand::Accept {
            token,
            quota,
            yes,
            json,
        } => {
            let token = trust::check_invite(vault, &token, now)?;
            let quota = quota.unwrap_or(token.quota_bytes);
            if !yes {
                require_terminal(io)?;
                errln!(io, "Invite from {:?}", token.inviter_name);
                errln!(io, "  site id:     {}", token.inviter);
                errln!(io, "  fingerprint: {}", token.inviter.fingerprint());
                if !token.addresses.is_empty() {
                    errln!(io, "  addresses:   {}", token.addresses.join(", "));
                }
                errln!(io,
                    "  they offer to store up to {} for this site; this site will store up to {} for them",
                    units::bytes(token.quota_bytes),
                    units::bytes(quota)
                );
                errln!(
                    io,
                    "  they will see this site's node names and addresses, partners and quotas, wrapped keys and snapshot records; their own partners will not, and cannot connect to this site's nodes"
                );
                errln!(
                    io,
                    "Compare the fingerprint with them (by phone) before you accept."
                );
                confirm(io, "Trust this site?")?;
            }
            trust::accept(vault, &token, quota)?;
            if json {
                print_json(
                    io,
                    &serde_json::json!({
                        "site_id": token.inviter.to_string(),
                        "name": token.inviter_name,
                        "fingerprint": token.inviter.fingerprint().to_string(),
                        "they_store_for_us_bytes": token.quota_bytes,
                        "we_store_for_them_bytes": quota,
                    }),
                );
            } else {
                outln!(
                    io,
                    "now partners with {:?} ({}), pending their confirmation: this site's node completes the invite when it reaches theirs (`cairn trust list` shows it refused if they do not)",
                    token.inviter_name,
                    token.inviter.fingerprint()
                );
            }
        }
        TrustCommand::List { json } => {
            let partners = trust::partners(vault)?;
            if json {
                print_json(io, &partners);
            } else if partners.is_empty() {
                outln!(
                    io,
                    "no partners yet: `cairn trust invite` makes an invite to send one"
                );
            } else {
                outln!(
                    io,
                    "{:<24} {:<39} {:>24} {:>24}  LAST SEEN",
                    "PARTNER",
                    "FINGERPRINT",
                    "THEY STORE FOR US",
                    "WE STORE FOR THEM"
                );
                for p in &partners {
                    let ours = if p.revoked {
                        "revoked".into()
                    } else {
                        used_of(p.we_hold_for_them_bytes, p.we_store_for_them_bytes)
                    };
                    outln!(
                        io,
                        "{:<24} {:<39} {:>24} {:>24}  {}",
                        p.name,
                        p.fingerprint,
                        used_of(p.they_hold_for_us_bytes, p.they_store_for_us_bytes),
                        ours,
                        match &p.refused {
                            Some(why) => format!("refused: {why}"),
                            None => p
                                .last_seen_unix_ms
                                .map_or("never".into(), |t| format!("{} UTC", units::utc(t))),
                        }
                    );
                }
                outln!(
                    io,
                    "(used / quota; the mesh fills in use and last seen once nodes connect)"
                );
            }
        }
        TrustCommand::Quota { site, size } => {
            let site = trust::resolve_partner(vault, &site)?;
            trust::set_quota(vault, &site, size)?;
            outln!(
                io,
                "this site now stores up to {} for {site}",
                units::bytes(size)
            );
        }
        TrustCommand::Revoke { site } => {
            let site = trust::resolve_partner(vault, &site)?;
            trust::revoke(vault, &site)?;
            outln!(io, "revoked {site}: this site stores nothing more for it");
        }
    }
    Ok(0)
}

/// "1.2 GiB of 2.0 TiB": bytes used of a quota.
fn used_of(used_bytes: u64, quota_bytes: u64) -> String {
    format!(
        "{} of {}",
        units::bytes(used_bytes),
        units::bytes(quota_bytes)
    )
}

fn run_site(io: &remote::Caller, vault: &Vault, command: SiteCommand) -> Result<u8> {
    match command {
        SiteCommand::Show { json } => show_site(io, vault, json)?,
        SiteCommand::AddNode {
            node_id,
            name,
            expires,
            capacity,
            addresses,
            yes,
            json,
        } => {
            let node: NodeId = node_id.parse().context("NODE_ID")?;
            let new = NewNode {
                node,
                name,
                addresses,
                capacity_bytes: capacity.unwrap_or(0),
            };
            let cert = join::check_new_node(vault, new)?;
            if !yes {
                require_terminal(io)?;
                errln!(io,
                    "Node {node} ({:?}) will get the keys of site {:?} and can read every backup of it.",
                    cert.name, vault.dir.site_name
                );
                errln!(
                    io,
                    "Check that this is the id `cairn join` shows on the new machine."
                );
                confirm(io, "Add this node?")?;
            }
            let token = join::add_node(vault, cert, expires, units::now_unix_ms())?;
            if json {
                print_json(
                    io,
                    &serde_json::json!({
                        "token": token.to_text(),
                        "node_id": node.to_string(),
                        "name": token.node_cert.name,
                        "expires_unix_ms": token.expires_unix_ms,
                    }),
                );
            } else {
                outln!(io, "{}", token.to_text());
                outln!(io);
                outln!(io,
                    "On the new machine, run: cairn join <the token above>. It is sealed to node {node}"
                );
                outln!(
                    io,
                    "({}), no other machine can use it, and it expires {} UTC.",
                    token.node_cert.name,
                    units::utc(token.expires_unix_ms)
                );
            }
        }
    }
    Ok(0)
}

fn show_site(io: &remote::Caller, vault: &Vault, json: bool) -> Result<()> {
    let (site_id, this_node) = (vault.dir.site_id(), vault.dir.node_id());
    let certs = join::site_nodes(vault)?;
    #[derive(Serialize)]
    struct Node {
        node_id: String,
        name: Option<String>,
        addresses: Vec<String>,
        /// 0 when not stated.
        capacity_bytes: u64,
        this_machine: bool,
    }
    let mut nodes: Vec<Node> = certs
        .into_iter()
        .map(|cert| Node {
            node_id: cert.node.to_string(),
            name: Some(cert.name),
            addresses: cert.addresses,
            capacity_bytes: cert.capacity_bytes,
            this_machine: cert.node == this_node,
        })
        .collect();
    if !nodes.iter().any(|n| n.this_machine) {
        // The machine that made the site has no certificate of its own yet.
        nodes.insert(
            0,
            Node {
                node_id: this_node.to_string(),
                name: None,
                addresses: Vec::new(),
                capacity_bytes: 0,
                this_machine: true,
            },
        );
    }
    if json {
        print_json(
            io,
            &serde_json::json!({
                "site_name": vault.dir.site_name,
                "site_id": site_id.to_string(),
                "fingerprint": site_id.fingerprint().to_string(),
                "nodes": nodes,
            }),
        );
        return Ok(());
    }
    outln!(io, "site:        {}", vault.dir.site_name);
    outln!(io, "site id:     {site_id}");
    outln!(io, "fingerprint: {}", site_id.fingerprint());
    outln!(io, "nodes:");
    for node in &nodes {
        let mut about = Vec::new();
        if let Some(name) = &node.name {
            about.push(name.clone());
        }
        if node.this_machine {
            about.push("this machine".into());
        }
        if node.capacity_bytes > 0 {
            about.push(format!("offers {}", units::bytes(node.capacity_bytes)));
        }
        outln!(io, "  {}  ({})", node.node_id, about.join(", "));
        for address in &node.addresses {
            outln!(io, "      {address}");
        }
    }
    Ok(())
}

fn run_join(
    io: &remote::Caller,
    data_dir: &std::path::Path,
    token: Option<String>,
    yes: bool,
    json: bool,
) -> Result<u8> {
    let Some(token) = token else {
        let node = join::begin(data_dir)?;
        if json {
            print_json(
                io,
                &serde_json::json!({
                    "node_id": node.to_string(),
                    "data_dir": data_dir,
                }),
            );
        } else {
            outln!(io, "this machine's node id: {node}");
            outln!(io);
            outln!(
                io,
                "On a node of your site, run: cairn site add-node {node}"
            );
            outln!(
                io,
                "then run `cairn join TOKEN` here with the token it prints."
            );
        }
        return Ok(0);
    };
    let checked = join::check(data_dir, &token, units::now_unix_ms())?;
    let site = checked.token.site;
    if !yes {
        require_terminal(io)?;
        errln!(io, "Join site {:?}", checked.token.site_name);
        errln!(io, "  site id:     {site}");
        errln!(io, "  fingerprint: {}", site.fingerprint());
        errln!(io, "  as node {:?}", checked.token.node_cert.name);
        errln!(
            io,
            "Check the fingerprint against `cairn site show` on a node of the site."
        );
        confirm(io, "Join this site?")?;
    }
    let node_name = checked.token.node_cert.name.clone();
    let vault = join::finish(checked)?;
    if json {
        print_json(
            io,
            &serde_json::json!({
                "site_name": vault.dir.site_name,
                "site_id": site.to_string(),
                "fingerprint": site.fingerprint().to_string(),
                "node_id": vault.dir.node_id().to_string(),
                "node_name": node_name,
            }),
        );
    } else {
        outln!(
            io,
            "this machine is now node {node_name:?} of site {:?} ({})",
            vault.dir.site_name,
            site.fingerprint()
        );
    }
    Ok(0)
}

fn print_recovery_sheet(io: &remote::Caller, site_id: &SiteId, recovery_key: &RecoveryKey) {
    outln!(io, "RECOVERY KEY for site {site_id}:");
    outln!(io);
    outln!(io, "    {recovery_key}");
    outln!(io);
    outln!(
        io,
        "Write it down and keep it offline, away from this office. With the site id and this"
    );
    outln!(
        io,
        "key, `cairn recover` brings the site back on a fresh machine if this one is lost;"
    );
    outln!(
        io,
        "without it, a lost office means lost keys. Anyone holding it can read every backup."
    );
}

/// Refuses, before anything is shown, when there is no terminal to confirm on.
fn require_terminal(io: &remote::Caller) -> Result<()> {
    if !io.info.stdin_terminal {
        anyhow::bail!("no terminal to confirm on: pass --yes to go ahead");
    }
    Ok(())
}

/// Asks on the caller's terminal; refuses when there is none, since nothing could answer.
fn confirm(io: &remote::Caller, question: &str) -> Result<()> {
    require_terminal(io)?;
    if !io.ask(question)? {
        anyhow::bail!("cancelled");
    }
    Ok(())
}

/// `cairn forget`'s --keep-* flags, as they travel to a running node.
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeepRules {
    /// Keep the N newest snapshots ("unlimited" for all)
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_last: Option<Keep>,
    /// Keep the newest snapshot of each of the last N hours that have one
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_hourly: Option<Keep>,
    /// Keep the newest snapshot of each of the last N days that have one
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_daily: Option<Keep>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_weekly: Option<Keep>,
    /// Keep the newest snapshot of each of the last N months that have one
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_monthly: Option<Keep>,
    /// Keep the newest snapshot of each of the last N years that have one
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    keep_yearly: Option<Keep>,
    /// Keep every snapshot newer than the newest one minus DURATION (e.g. 30d, 12h)
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration_ms)]
    keep_within: Option<u64>,
}

/// A --keep-* count: a number, or "unlimited" (also -1, as restic writes it).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub enum Keep {
    Of(u32),
    Unlimited,
}

fn parse_keep(text: &str) -> Result<Keep, String> {
    match text.trim() {
        "unlimited" | "-1" => Ok(Keep::Unlimited),
        n => n
            .parse()
            .map(Keep::Of)
            .map_err(|_| format!("{text:?} is not a count: give a number or \"unlimited\"")),
    }
}

impl KeepRules {
    fn any(&self) -> bool {
        self.policy() != retention::Policy::default()
    }

    fn policy(&self) -> retention::Policy {
        let count = |k: Option<Keep>| {
            k.map(|k| match k {
                Keep::Of(n) => retention::Count::Of(n),
                Keep::Unlimited => retention::Count::Unlimited,
            })
        };
        retention::Policy {
            last: count(self.keep_last),
            hourly: count(self.keep_hourly),
            daily: count(self.keep_daily),
            weekly: count(self.keep_weekly),
            monthly: count(self.keep_monthly),
            yearly: count(self.keep_yearly),
            within_ms: self.keep_within,
        }
    }
}

fn run_forget(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    vault: &Vault,
    target: &str,
    keep: &KeepRules,
    dry_run: bool,
    json: bool,
) -> Result<u8> {
    let selection = match (target.contains('@'), keep.any()) {
        (true, true) => {
            anyhow::bail!("give either IMAGE@SNAPSHOT or --keep-* rules for IMAGE, not both")
        }
        (true, false) => forget::Selection::One {
            spec: target.to_owned(),
        },
        (false, true) => {
            ImageName::new(target)?;
            forget::Selection::Policy {
                image: target.to_owned(),
                policy: keep.policy(),
            }
        }
        (false, false) => {
            ImageName::new(target)?;
            let settings = match node {
                Some(node) => node.mesh.settings.as_ref().clone(),
                None => node::settings(vault.dir.root())?,
            };
            let policy = settings.retention.get(target).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "give --keep-* rules, or a policy as [retention.{target}] in node.toml, or name one snapshot as {target}@SNAPSHOT"
                )
            })?;
            forget::Selection::Policy {
                image: target.to_owned(),
                policy,
            }
        }
    };
    let report = match node {
        Some(node) => forget_in_node(node, &selection, dry_run)?,
        None => forget::forget(vault, &selection, dry_run, units::now_unix_ms())?.0,
    };
    if json {
        print_json(io, &report);
    } else {
        outln!(io, "{}", forget::render(&report).trim_end());
    }
    Ok(0)
}

fn run_prune(
    io: &remote::Caller,
    node: Option<&remote::InNode>,
    vault: &Vault,
    dry_run: bool,
    json: bool,
) -> Result<u8> {
    let settings = match node {
        Some(node) => node.mesh.settings.gc,
        None => node::settings(vault.dir.root())?.gc,
    };
    let mesh = node.map(|n| &n.mesh);
    // Inside a node, the engine takes the statement before the sweep, so the swept
    // chunks are frozen there (rule H3) before they leave the index.
    let on_signed = |signed: &crate::gc::Signed| {
        if let Some(mesh) = mesh {
            let _ = mesh.send(crate::mesh::Command::Gc {
                batches: signed.batches.clone(),
                swept: Vec::new(),
            });
            let _ = mesh.send(crate::mesh::Command::LocalRecords(vec![signed
                .record
                .clone()]));
        }
    };
    let on_swept = |ids: &[ChunkId]| {
        if let Some(mesh) = mesh {
            let _ = mesh.send(crate::mesh::Command::Gc {
                batches: Vec::new(),
                swept: ids.to_vec(),
            });
        }
    };
    let options = prune::PruneOptions {
        dry_run,
        settings,
        remote: mesh.map(|m| m as &dyn crate::fetch::RemoteChunks),
        write_lock: node.map(|n| &*n.mesh.write_lock),
        on_signed: &on_signed,
        on_swept: &on_swept,
        now_unix_ms: units::now_unix_ms(),
    };
    let bar = progress_bar(io, None, "marking");
    let report = prune::prune(vault, &options, &|p| match p {
        prune::PruneProgress::Mark { done, of } => {
            bar.set_message(format!("marking snapshot {}/{of}", done + 1))
        }
        prune::PruneProgress::Waiting => {
            bar.set_message("waiting for a backup to finish".to_string())
        }
        prune::PruneProgress::Sweep { n_chunks } => {
            bar.set_message(format!("dropping {n_chunks} chunks"))
        }
        prune::PruneProgress::Repack(crate::store::RepackProgress::Pack {
            done,
            of,
            bytes_copied,
        }) => bar.set_message(format!(
            "rewriting packs {done}/{of}, {} copied",
            units::bytes(bytes_copied)
        )),
    });
    bar.finish_and_clear();
    let report = report?;
    if json {
        print_json(io, &report);
    } else {
        outln!(io, "{}", prune::render(&report).trim_end());
    }
    Ok(0)
}

fn print_json(io: &remote::Caller, value: &impl Serialize) {
    outln!(
        io,
        "{}",
        serde_json::to_string_pretty(value).expect("summaries serialise")
    );
}

/// A progress bar on the caller's stderr when it is a terminal; hidden otherwise.
fn progress_bar(io: &remote::Caller, total_bytes: Option<u64>, what: &str) -> ProgressBar {
    if !io.info.stderr_terminal {
        return ProgressBar::hidden();
    }
    let bar = match total_bytes {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("template is valid")
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .expect("template is valid"),
        ),
    };
    if let Some(term) = io.remote_term() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::term_like(Box::new(term)));
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

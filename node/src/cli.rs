//! The `cairn` command line. Errors from the library become one line on stderr and a
//! non-zero exit; `--json` gives scripts the same facts on stdout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use cairn_protocol::identity::{RecoveryKey, SiteId};
use cairn_protocol::ImageName;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::backup::{self, BackupOptions, ZSTD_LEVEL_DEFAULT};
use crate::datadir::DataDir;
use crate::source::Source;
use crate::trust;
use crate::units::{self, parse_duration_ms, parse_size};
use crate::vault::Vault;
use crate::{restore, verify};

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
    #[command(subcommand)]
    command: Command,
}

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
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Show this site: name, id, fingerprint, nodes
    Site {
        #[command(subcommand)]
        command: SiteCommand,
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
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
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

#[derive(Subcommand)]
enum SiteCommand {
    /// This site's id, name and fingerprint (read them to partners to compare), and its nodes
    Show {
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Print an invite token for a partner consultant to accept
    Invite {
        /// What this site offers to store for the partner, e.g. 500GB or 2TiB
        #[arg(long, value_parser = parse_size, default_value = "100GB")]
        quota: u64,
        /// How long the invite stays valid, e.g. 7d or 12h
        #[arg(long, value_parser = parse_duration_ms, default_value = "7d")]
        expires: u64,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Accept a partner's invite: shows who is inviting and asks before trusting them
    Accept {
        /// The token from `cairn trust invite` (cairn-invite-...)
        token: String,
        /// What this site will store for the inviter [default: what they offered]
        #[arg(long, value_parser = parse_size)]
        quota: Option<u64>,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// List partners and the quota each way
    List {
        /// Print the result as JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Change what this site stores for a partner
    Quota {
        /// The partner's site id
        site: String,
        /// The new quota, e.g. 750GB
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Stop storing for a partner; the revocation wins over every earlier grant
    Revoke {
        /// The partner's site id
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
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
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

fn run(cli: Cli) -> Result<ExitCode> {
    let data_dir = match cli.data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let open = || -> Result<Vault> {
        let vault = Vault::open(&data_dir)?;
        for warning in &vault.store.warnings {
            eprintln!("warning: {warning}");
        }
        Ok(vault)
    };
    match cli.command {
        Command::Init { site_name, json } => {
            let vault = Vault::init(&data_dir, &site_name)?;
            let site_id = vault.dir.site_id();
            let recovery_key = vault
                .dir
                .recovery_key
                .clone()
                .expect("init makes a recovery key");
            if json {
                print_json(&serde_json::json!({
                    "site_name": site_name,
                    "site_id": site_id.to_string(),
                    "fingerprint": site_id.fingerprint().to_string(),
                    "recovery_key": recovery_key.to_string(),
                    "data_dir": data_dir,
                }));
            } else {
                println!("created site {site_name:?} in {}", data_dir.display());
                println!("site id:     {site_id}");
                println!("fingerprint: {}", site_id.fingerprint());
                println!();
                print_recovery_sheet(&site_id, &recovery_key);
            }
        }
        Command::Trust { command } => return run_trust(&open()?, command),
        Command::Site {
            command: SiteCommand::Show { json },
        } => {
            let vault = open()?;
            let (site_id, node_id) = (vault.dir.site_id(), vault.dir.node_id());
            if json {
                print_json(&serde_json::json!({
                    "site_name": vault.dir.site_name,
                    "site_id": site_id.to_string(),
                    "fingerprint": site_id.fingerprint().to_string(),
                    "nodes": [{ "node_id": node_id.to_string(), "this_machine": true }],
                }));
            } else {
                println!("site:        {}", vault.dir.site_name);
                println!("site id:     {site_id}");
                println!("fingerprint: {}", site_id.fingerprint());
                println!("nodes:");
                println!("  {node_id}  (this machine)");
            }
        }
        Command::Key {
            command: KeyCommand::RecoverySheet { yes },
        } => {
            let vault = open()?;
            let Some(recovery_key) = vault.dir.recovery_key.clone() else {
                anyhow::bail!(
                    "this data dir was made before recovery keys existed; it has none to print"
                );
            };
            if !yes {
                confirm("This prints the secret that opens every backup of this site. Print it?")?;
            }
            print_recovery_sheet(&vault.dir.site_id(), &recovery_key);
        }
        Command::Recover {
            site,
            recovery_key,
            from,
            site_name,
            json,
        } => {
            let site: SiteId = site.parse().context("--site")?;
            let recovery_key: RecoveryKey = recovery_key.parse().context("--recovery-key")?;
            let from = from.unwrap_or_else(|| data_dir.clone());
            let record_path = if from.is_dir() {
                from.join("wrapped-keys.rec")
            } else {
                from
            };
            let record = std::fs::read(&record_path).with_context(|| {
                format!(
                    "cannot read the wrapped-keys record {}",
                    record_path.display()
                )
            })?;
            let dir = DataDir::recover(
                &data_dir,
                &site,
                &recovery_key,
                &record,
                site_name.as_deref(),
            )?;
            if json {
                print_json(&serde_json::json!({
                    "site_name": dir.site_name,
                    "site_id": site.to_string(),
                    "data_dir": data_dir,
                }));
            } else {
                println!(
                    "recovered site {:?} ({site}) into {}",
                    dir.site_name,
                    data_dir.display()
                );
            }
        }
        Command::Backup {
            image,
            source,
            zstd_level,
            json,
        } => {
            let image = ImageName::new(&image)?;
            let source = Source::open(&source)?;
            let vault = open()?;
            let bar = progress_bar(source.size_bytes, "backing up");
            let options = BackupOptions {
                zstd_level,
                ..BackupOptions::default()
            };
            let summary = backup::backup(&vault, &image, source, options, &|done| {
                bar.set_position(done)
            });
            bar.finish_and_clear();
            let summary = summary?;
            if json {
                print_json(&summary);
            } else {
                println!(
                    "backed up {}@{}: {} in {:.1}s ({})",
                    summary.image,
                    summary.snapshot,
                    units::bytes(summary.size_bytes),
                    summary.seconds,
                    units::rate(summary.size_bytes, summary.seconds)
                );
                println!(
                    "  read {} ({} zeros or holes, never stored); {} chunks, {} new",
                    units::bytes(summary.read_bytes),
                    units::bytes(summary.zero_bytes),
                    summary.n_chunks,
                    summary.n_chunks_new
                );
                if summary.n_chunks_new == 0 {
                    println!("  nothing new to store: every chunk was already in the vault");
                } else {
                    println!(
                        "  new data {} stored as {}: dedup {:.2}x, compression {:.2}x",
                        units::bytes(summary.new_bytes),
                        units::bytes(summary.stored_bytes),
                        summary.dedup_ratio(),
                        summary.compression_ratio()
                    );
                }
            }
        }
        Command::Snapshots { image, json } => {
            let vault = open()?;
            if let Some(image) = &image {
                ImageName::new(image)?;
            }
            let (records, damaged_records) = vault.snapshots_checked()?;
            for e in &damaged_records {
                eprintln!("warning: {e}; `cairn verify` reports it too");
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
                anyhow::bail!(
                    "no image named {image:?} in this vault (`cairn snapshots` lists them)"
                );
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
                print_json(&rows);
            } else if records.is_empty() {
                println!("no snapshots yet: `cairn backup IMAGE SOURCE` makes one");
            } else {
                println!(
                    "{:<24} {:<10} {:<20} {:>10}",
                    "IMAGE", "SNAPSHOT", "TIME (UTC)", "SIZE"
                );
                for r in &records {
                    println!(
                        "{:<24} {:<10} {:<20} {:>10}",
                        r.image.as_str(),
                        r.id.short(),
                        units::utc(r.time_unix_ms),
                        units::bytes(r.size_bytes)
                    );
                }
            }
        }
        Command::Restore {
            snapshot,
            out,
            force,
            json,
        } => {
            let vault = open()?;
            let record = vault.resolve(&snapshot)?;
            let bar = progress_bar(Some(record.size_bytes), "restoring");
            let summary = restore::restore(&vault, &record, &out, force, n_workers(), &|done| {
                bar.set_position(done)
            });
            bar.finish_and_clear();
            let summary = summary?;
            if json {
                print_json(&summary);
            } else {
                println!(
                    "restored {}@{} to {}: {} ({} of data) in {:.1}s ({})",
                    summary.image,
                    summary.snapshot,
                    summary.output,
                    units::bytes(summary.size_bytes),
                    units::bytes(summary.data_bytes),
                    summary.seconds,
                    units::rate(summary.size_bytes, summary.seconds)
                );
            }
        }
        Command::Verify { snapshot, json } => {
            let vault = open()?;
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
            let bar = progress_bar(None, "verifying");
            let report = verify::verify(&vault, &records, n_workers(), &|done| {
                bar.set_position(done)
            });
            bar.finish_and_clear();
            let damaged = !report.damage.is_empty() || !damaged_records.is_empty();
            for e in &damaged_records {
                eprintln!("DAMAGED {e}");
            }
            if json {
                print_json(&report);
            } else {
                for d in &report.damage {
                    let chunk = d
                        .chunk
                        .as_deref()
                        .map(|c| format!(" chunk {}", &c[..16]))
                        .unwrap_or_default();
                    println!(
                        "DAMAGED {}@{} bytes {}..{}{}: {}",
                        d.image,
                        d.snapshot,
                        d.offset,
                        d.offset + d.len_bytes,
                        chunk,
                        d.why
                    );
                }
                println!(
                    "verified {} snapshots: {} chunks, {} in {:.1}s: {}",
                    report.n_snapshots,
                    report.n_chunks_checked,
                    units::bytes(report.bytes_checked),
                    report.seconds,
                    if damaged {
                        format!("{} damaged stretches", report.damage.len())
                    } else {
                        "all good".into()
                    }
                );
            }
            if damaged {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_trust(vault: &Vault, command: TrustCommand) -> Result<ExitCode> {
    let now = units::now_unix_ms();
    match command {
        TrustCommand::Invite {
            quota,
            expires,
            json,
        } => {
            let token = trust::invite(vault, quota, expires, now)?;
            if json {
                print_json(&serde_json::json!({
                    "token": token.to_text(),
                    "expires_unix_ms": token.expires_unix_ms,
                    "quota_bytes": quota,
                }));
            } else {
                println!("{}", token.to_text());
                println!();
                println!(
                    "Send this to your partner; it offers {} of storage and expires {} UTC.",
                    units::bytes(quota),
                    units::utc(token.expires_unix_ms)
                );
                println!(
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
                require_terminal()?;
                eprintln!("Invite from {:?}", token.inviter_name);
                eprintln!("  site id:     {}", token.inviter);
                eprintln!("  fingerprint: {}", token.inviter.fingerprint());
                eprintln!(
                    "  they offer to store up to {} for this site; this site will store up to {} for them",
                    units::bytes(token.quota_bytes),
                    units::bytes(quota)
                );
                eprintln!("Compare the fingerprint with them (by phone) before you accept.");
                confirm("Trust this site?")?;
            }
            trust::accept(vault, &token, quota)?;
            if json {
                print_json(&serde_json::json!({
                    "site_id": token.inviter.to_string(),
                    "name": token.inviter_name,
                    "fingerprint": token.inviter.fingerprint().to_string(),
                    "they_store_for_us_bytes": token.quota_bytes,
                    "we_store_for_them_bytes": quota,
                }));
            } else {
                println!(
                    "now partners with {:?} ({})",
                    token.inviter_name,
                    token.inviter.fingerprint()
                );
            }
        }
        TrustCommand::List { json } => {
            let partners = trust::partners(vault)?;
            if json {
                print_json(&partners);
            } else if partners.is_empty() {
                println!("no partners yet: `cairn trust invite` makes an invite to send one");
            } else {
                println!(
                    "{:<24} {:<36} {:>14} {:>14}",
                    "PARTNER", "FINGERPRINT", "THEY STORE", "WE STORE"
                );
                for p in &partners {
                    let ours = if p.revoked {
                        "revoked".into()
                    } else {
                        units::bytes(p.we_store_for_them_bytes)
                    };
                    println!(
                        "{:<24} {:<36} {:>14} {:>14}",
                        p.name,
                        p.fingerprint,
                        units::bytes(p.they_store_for_us_bytes),
                        ours
                    );
                }
            }
        }
        TrustCommand::Quota { site, size } => {
            let site: SiteId = site.parse().context("SITE")?;
            trust::set_quota(vault, &site, size)?;
            println!(
                "this site now stores up to {} for {site}",
                units::bytes(size)
            );
        }
        TrustCommand::Revoke { site } => {
            let site: SiteId = site.parse().context("SITE")?;
            trust::revoke(vault, &site)?;
            println!("revoked {site}: this site stores nothing more for it");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_recovery_sheet(site_id: &SiteId, recovery_key: &RecoveryKey) {
    println!("RECOVERY KEY for site {site_id}:");
    println!();
    println!("    {recovery_key}");
    println!();
    println!("Write it down and keep it offline, away from this office. With the site id and this");
    println!("key, `cairn recover` brings the site back on a fresh machine if this one is lost;");
    println!("without it, a lost office means lost keys. Anyone holding it can read every backup.");
}

/// Refuses, before anything is shown, when there is no terminal to confirm on.
fn require_terminal() -> Result<()> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("no terminal to confirm on: pass --yes to go ahead");
    }
    Ok(())
}

/// Asks on the terminal; refuses when there is none, since nothing could answer.
fn confirm(question: &str) -> Result<()> {
    require_terminal()?;
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        anyhow::bail!("cancelled");
    }
    Ok(())
}

fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("summaries serialise")
    );
}

/// A progress bar on stderr when it is a terminal; hidden otherwise.
fn progress_bar(total_bytes: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
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
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

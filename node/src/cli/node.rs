//! `cairn node run`: starts the mesh daemon on this data dir, its control socket (where
//! every other `cairn` command on the data dir then runs) and, if asked, the Prometheus
//! endpoint. Settings come from flags and from the node's config file (`node.toml` in
//! the data dir); flags win, and list settings add up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use cairn_protocol::engine::EngineConfig;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use super::remote::{self, Request, Response};
use super::Operation;
use cairn_protocol::retention;

use crate::control::ControlServer;
use crate::gc;
use crate::jobs;
use crate::mesh::{self, MeshHandle, NodeOptions};
use crate::schedule::Limits;
use crate::status::{self, NodeStatus};
use crate::units::{now_unix_ms, parse_duration_ms, parse_size};
use crate::vault::Vault;

const CONFIG_FILE: &str = "node.toml";

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Run this machine's node: join the mesh, replicate, repair, serve restores. Runs
    /// until stopped (Ctrl-C or SIGTERM)
    Run(RunArgs),
}

#[derive(Args, Default)]
pub struct RunArgs {
    /// Address to listen on, HOST:PORT or a multiaddr (repeatable) [default: 0.0.0.0:7420]
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// A node to reach at start, HOST:PORT or a multiaddr (repeatable): a partner's, or
    /// another node of this site
    #[arg(long, value_name = "ADDR")]
    bootstrap: Vec<String>,
    /// Do not look for this site's nodes on the LAN with mDNS
    #[arg(long)]
    no_mdns: bool,
    /// A relay to be reachable through when this office is behind NAT: a multiaddr
    /// ending in /p2p/PEER_ID (repeatable)
    #[arg(long, value_name = "MULTIADDR")]
    relay: Vec<String>,
    /// This machine's name in its node certificate
    #[arg(long)]
    name: Option<String>,
    /// Disk this node offers the mesh, e.g. 2TB
    #[arg(long, value_parser = parse_size)]
    capacity: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Serve the status page at http://ADDR/, e.g. 127.0.0.1:7421 (an address other than
    /// loopback needs web_token in node.toml)
    #[arg(long, value_name = "ADDR")]
    web: Option<SocketAddr>,
    /// Upload limit, e.g. 20MiB/s (default: unlimited)
    #[arg(long, value_name = "RATE")]
    upload_limit: Option<String>,
    /// Download limit, e.g. 50MiB/s (default: unlimited)
    #[arg(long, value_name = "RATE")]
    download_limit: Option<String>,
    /// A weekly rule, e.g. "Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s"
    /// (repeatable; later rules win)
    #[arg(long, value_name = "RULE")]
    schedule: Vec<String>,
    /// The config file [default: DATA_DIR/node.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// What to log, as tracing's filter syntax [default: $RUST_LOG or info]
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Replication factor R (every node of the mesh must agree)
    #[arg(long, hide = true)]
    replication: Option<usize>,
    /// Engine timings, for tests and simulations on one machine
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    gossip_interval: Option<u64>,
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    sync_interval: Option<u64>,
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    suspect_after: Option<u64>,
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    dead_after: Option<u64>,
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    trim_grace: Option<u64>,
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    request_timeout: Option<u64>,
    /// How often packs mostly garbage are rewritten [default: 1h]
    #[arg(long, hide = true, value_parser = parse_duration_ms)]
    repack_interval: Option<u64>,
}

/// The node's config file: the same settings as the flags.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default)]
    bootstrap: Vec<String>,
    mdns: Option<bool>,
    #[serde(default)]
    relay: Vec<String>,
    name: Option<String>,
    capacity: Option<String>,
    metrics: Option<SocketAddr>,
    /// The status page's address, and the token it then requires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    web: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    web_token: Option<String>,
    upload_limit: Option<String>,
    download_limit: Option<String>,
    #[serde(default)]
    schedule: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gc: Option<GcConfig>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    retention: BTreeMap<String, RetentionConfig>,
    /// `[[backup]]` jobs, checked by `jobs::Job::parse_all` so a mistake is one line
    /// naming the job and the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    backup: Vec<toml::Table>,
}

/// `[gc]` in node.toml.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcConfig {
    /// What this site asks holders to wait before deleting what it lists, e.g. "1445m".
    grace: Option<String>,
    /// What this node waits at least before deleting what another site lists.
    grace_min: Option<String>,
    /// A pack is rewritten once this share of it is garbage, e.g. "10%".
    repack_unused: Option<String>,
}

/// `[retention.IMAGE]` in node.toml: `cairn forget`'s --keep-* rules, as keys.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionConfig {
    keep_last: Option<KeepValue>,
    keep_hourly: Option<KeepValue>,
    keep_daily: Option<KeepValue>,
    keep_weekly: Option<KeepValue>,
    keep_monthly: Option<KeepValue>,
    keep_yearly: Option<KeepValue>,
    keep_within: Option<String>,
}

/// A count, or "unlimited".
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum KeepValue {
    Count(i64),
    Word(String),
}

impl KeepValue {
    fn count(&self) -> Result<retention::Count, String> {
        match self {
            KeepValue::Count(-1) => Ok(retention::Count::Unlimited),
            KeepValue::Count(n) => u32::try_from(*n)
                .map(retention::Count::Of)
                .map_err(|_| format!("{n} is not a count")),
            KeepValue::Word(w) if w == "unlimited" => Ok(retention::Count::Unlimited),
            KeepValue::Word(w) => Err(format!(
                "{w:?} is not a count: give a number or \"unlimited\""
            )),
        }
    }
}

impl ConfigFile {
    /// The retention and garbage-collection settings, checked.
    fn settings(&self) -> Result<gc::Settings> {
        let mut settings = gc::Settings::default();
        if let Some(config) = &self.gc {
            let ms = |key: &str, text: &Option<String>, default: u64| -> Result<u64> {
                text.as_deref().map_or(Ok(default), |t| {
                    parse_duration_ms(t).map_err(|e| anyhow::anyhow!("[gc] {key}: {e}"))
                })
            };
            settings.gc.grace_ms = ms("grace", &config.grace, settings.gc.grace_ms)?;
            settings.gc.grace_min_ms =
                ms("grace_min", &config.grace_min, settings.gc.grace_min_ms)?;
            if let Some(text) = &config.repack_unused {
                settings.gc.repack_unused_percent = text
                    .trim()
                    .trim_end_matches('%')
                    .trim()
                    .parse()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
                    .ok_or_else(|| {
                        anyhow::anyhow!("[gc] repack_unused: {text:?} is not a share like \"10%\"")
                    })?;
            }
        }
        for (image, config) in &self.retention {
            cairn_protocol::ImageName::new(image)
                .map_err(|e| anyhow::anyhow!("[retention.{image}]: {e}"))?;
            let count = |v: &Option<KeepValue>| -> Result<Option<retention::Count>> {
                v.as_ref()
                    .map(|v| {
                        v.count()
                            .map_err(|e| anyhow::anyhow!("[retention.{image}]: {e}"))
                    })
                    .transpose()
            };
            let policy = retention::Policy {
                last: count(&config.keep_last)?,
                hourly: count(&config.keep_hourly)?,
                daily: count(&config.keep_daily)?,
                weekly: count(&config.keep_weekly)?,
                monthly: count(&config.keep_monthly)?,
                yearly: count(&config.keep_yearly)?,
                within_ms: config
                    .keep_within
                    .as_deref()
                    .map(parse_duration_ms)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("[retention.{image}] keep_within: {e}"))?,
            };
            if policy.is_empty() {
                anyhow::bail!("[retention.{image}] keeps nothing: give at least one keep_* rule");
            }
            settings.retention.insert(image.clone(), policy);
        }
        Ok(settings)
    }
}

/// The retention and garbage-collection settings of a data dir's node.toml, for commands
/// run without a node (a running node uses those it started with).
pub fn settings(data_dir: &Path) -> Result<gc::Settings> {
    read_config(&data_dir.join(CONFIG_FILE), false)?.settings()
}

fn read_config(path: &Path, required: bool) -> Result<ConfigFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            Ok(ConfigFile::default())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Adds bootstrap addresses to the data dir's config file (after `cairn recover`).
pub fn remember_bootstrap(data_dir: &Path, addresses: &[String]) -> Result<()> {
    let path = data_dir.join(CONFIG_FILE);
    let mut config = read_config(&path, false)?;
    for a in addresses {
        if !config.bootstrap.contains(a) {
            config.bootstrap.push(a.clone());
        }
    }
    let text = toml::to_string(&config).expect("config serialises");
    crate::datadir::write_durable(&path, text.as_bytes())?;
    Ok(())
}

pub fn run(data_dir: &Path, command: NodeCommand) -> Result<u8> {
    let NodeCommand::Run(args) = command;
    let config_path = args
        .config
        .clone()
        .unwrap_or_else(|| data_dir.join(CONFIG_FILE));
    let config = read_config(&config_path, args.config.is_some())?;
    let filter = args
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info,libp2p=warn".into());
    super::logs::init(&filter)?;

    let schedule: Vec<&str> = config
        .schedule
        .iter()
        .chain(&args.schedule)
        .map(String::as_str)
        .collect();
    let limits = Limits::parse(
        args.upload_limit
            .as_deref()
            .or(config.upload_limit.as_deref()),
        args.download_limit
            .as_deref()
            .or(config.download_limit.as_deref()),
        &schedule,
    )?;
    let capacity_bytes = match (args.capacity, &config.capacity) {
        (Some(c), _) => c,
        (None, Some(text)) => parse_size(text).map_err(anyhow::Error::msg)?,
        (None, None) => 0,
    };
    let settings = config.settings()?;
    let mut backup_jobs = jobs::Job::parse_all(&config.backup)?;
    for job in &mut backup_jobs {
        // A job without `keep` follows its image's [retention.IMAGE], as `cairn forget
        // IMAGE` does.
        if job.keep.is_none() {
            job.keep = settings.retention.get(job.image.as_str()).copied();
        }
    }
    let defaults = EngineConfig::default();
    let engine = EngineConfig {
        gc_grace_min_ms: settings.gc.grace_min_ms,
        replication_factor: args.replication.unwrap_or(defaults.replication_factor),
        gossip_interval_ms: args.gossip_interval.unwrap_or(defaults.gossip_interval_ms),
        sync_interval_ms: args.sync_interval.unwrap_or(defaults.sync_interval_ms),
        suspect_after_ms: args.suspect_after.unwrap_or(defaults.suspect_after_ms),
        dead_after_ms: args.dead_after.unwrap_or(defaults.dead_after_ms),
        trim_grace_ms: args.trim_grace.unwrap_or(defaults.trim_grace_ms),
        request_timeout_ms: args.request_timeout.unwrap_or(defaults.request_timeout_ms),
        ..defaults
    };
    let mut listen: Vec<String> = config.listen.into_iter().chain(args.listen).collect();
    if listen.is_empty() {
        listen.push("0.0.0.0:7420".into());
    }
    let options = NodeOptions {
        listen,
        bootstrap: config.bootstrap.into_iter().chain(args.bootstrap).collect(),
        mdns: !args.no_mdns && config.mdns.unwrap_or(true),
        relays: config.relay.into_iter().chain(args.relay).collect(),
        name: args.name.or(config.name),
        capacity_bytes,
        limits,
        engine,
        settings,
    };
    let metrics = args.metrics.or(config.metrics);
    let web = args.web.or(config.web);
    if let Some(addr) = web {
        // Refused before anything starts, in one line.
        crate::web::check(addr, config.web_token.as_deref())?;
    }

    // The control socket first: it refuses a second node on the same data dir before the
    // store is touched.
    let control = ControlServer::bind(data_dir)?;
    let vault = Arc::new(Vault::open(data_dir)?);
    for warning in &vault.store.warnings {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mesh = mesh::start(vault.clone(), options, &runtime)?;
    tracing::info!(
        "node {} of site {:?} ({}) running",
        vault.dir.node_id(),
        vault.dir.site_name,
        vault.dir.site_id()
    );
    if let Some(addr) = metrics {
        let (vault, mesh) = (vault.clone(), mesh.clone());
        let (bound, _) = status::serve_metrics(addr, move || {
            status(&vault, &mesh).unwrap_or_else(|_| NodeStatus::empty(&vault, now_unix_ms()))
        })
        .with_context(|| format!("--metrics {addr}"))?;
        tracing::info!("metrics at http://{bound}/metrics");
    }
    if let Some(addr) = web {
        let in_node = remote::InNode {
            vault: vault.clone(),
            mesh: mesh.clone(),
        };
        let facts: crate::web::Facts = Arc::new(move || {
            super::report::page_facts(&in_node).map_err(|e| crate::units::chain_of(e.chain()))
        });
        let bound = crate::web::serve(&runtime, addr, config.web_token.clone(), facts)?;
        tracing::info!("status page at http://{bound}/");
    }
    let repack_every = args
        .repack_interval
        .map_or(REPACK_EVERY, std::time::Duration::from_millis);
    start_repacks(&vault, &mesh, repack_every)?;
    let backup_jobs = Arc::new(backup_jobs);
    let _ = JOBS.set(backup_jobs.clone());
    let host = Arc::new(JobsInNode(remote::InNode {
        vault: vault.clone(),
        mesh: mesh.clone(),
    }));
    jobs::start(host, &backup_jobs)?;
    if !backup_jobs.is_empty() {
        tracing::info!("{} backup jobs scheduled", backup_jobs.len());
    }
    let stopper = control.stopper();
    {
        let (vault, mesh) = (vault.clone(), mesh.clone());
        let answers = Arc::new(remote::Answers::default());
        std::thread::Builder::new()
            .name("cairn-control".into())
            .spawn(move || {
                let served = control.serve(move |request: Request, call, send| {
                    serve(&vault, &mesh, &answers, request, call, send)
                });
                if let Err(e) = served {
                    tracing::error!("the control socket stopped: {}", crate::units::chain(&e));
                }
            })?;
    }
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    tracing::info!("stopping");
    stopper.stop();
    Ok(0)
}

/// The backup jobs this process's node runs (one node per process), for its status.
static JOBS: std::sync::OnceLock<Arc<Vec<jobs::Job>>> = std::sync::OnceLock::new();

/// A backup job runs the node's own `cairn backup` and `cairn forget` paths.
struct JobsInNode(remote::InNode);

impl jobs::JobHost for JobsInNode {
    fn backup(
        &self,
        image: &cairn_protocol::ImageName,
        source: crate::source::Source,
    ) -> Result<crate::backup::BackupSummary, String> {
        let options = crate::backup::BackupOptions::default();
        let cancel = crate::cancel::Cancel::new();
        super::backup_in_node(&self.0, image, source, options, &cancel, &|_| {})
            .map_err(|e| crate::units::chain_of(e.chain()))
    }

    fn forget(
        &self,
        image: &cairn_protocol::ImageName,
        policy: &retention::Policy,
    ) -> Result<u64, String> {
        let selection = crate::forget::Selection::Policy {
            image: image.to_string(),
            policy: *policy,
        };
        let report = super::forget_in_node(&self.0, &selection, false)
            .map_err(|e| crate::units::chain_of(e.chain()))?;
        // The tombstones go to the mesh as they do when a `cairn forget` command ends.
        if let Ok(records) = mesh::own_records(&self.0.vault) {
            let _ = self.0.mesh.send(mesh::Command::LocalRecords(records));
        }
        Ok(report.forgotten as u64)
    }

    fn index(&self) -> &dyn crate::store::MetaIndex {
        self.0.vault.store.index()
    }

    fn scratch_dir(&self) -> PathBuf {
        self.0.vault.dir.root().join("job-scratch")
    }
}

/// How often, by default, a running node looks for packs that partner deletions (rule H4) or its
/// own prunes left mostly garbage.
const REPACK_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// The mesh gives space back on its own: the engine deletes what an owner's statement
/// lists from the index, and this thread rewrites the packs that leaves mostly garbage,
/// taking the write lock a pack at a time, so backups and the storage thread wait for one
/// pack at most.
fn start_repacks(vault: &Arc<Vault>, mesh: &MeshHandle, every: std::time::Duration) -> Result<()> {
    let (vault, lock) = (vault.clone(), mesh.write_lock.clone());
    let unused_min = f64::from(mesh.settings.gc.repack_unused_percent) / 100.0;
    std::thread::Builder::new()
        .name("cairn-repack".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            match vault.store.repack(unused_min, Some(&lock), &|_| {}) {
                Ok(r) if r.packs_rewritten + r.packs_deleted > 0 => tracing::info!(
                    "rewrote {} packs and deleted {}: {} given back",
                    r.packs_rewritten,
                    r.packs_deleted,
                    crate::units::bytes(r.bytes_before.saturating_sub(r.bytes_after))
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot rewrite packs: {}", crate::units::chain(&e)),
            }
        })?;
    Ok(())
}

/// One request on the control socket.
fn serve(
    vault: &Arc<Vault>,
    mesh: &MeshHandle,
    answers: &Arc<remote::Answers>,
    request: Request,
    call: crate::control::Call,
    send: &mut dyn FnMut(Response) -> std::io::Result<()>,
) {
    match request {
        Request::Answer { ticket, yes } => answers.deliver(ticket, yes),
        Request::Status => match status(vault, mesh) {
            Ok(s) => {
                let _ = send(Response::Status(Box::new(s)));
            }
            Err(e) => {
                let _ = send(Response::Err(format!(
                    "error: {}\n",
                    crate::units::chain_of(e.chain())
                )));
            }
        },
        Request::Run { operation, caller } => {
            let (tx, rx) = crossbeam_channel::unbounded();
            let in_node = remote::InNode {
                vault: vault.clone(),
                mesh: mesh.clone(),
            };
            let stdin = call.fd.map(std::fs::File::from);
            let caller =
                remote::Caller::remote(caller, tx, answers.clone(), stdin, call.gone.clone());
            let worker = std::thread::Builder::new()
                .name("cairn-command".into())
                .spawn(move || run_for(&caller, &in_node, operation));
            if worker.is_err() {
                let _ = send(Response::Err("error: cannot start the command\n".into()));
                return;
            }
            for response in rx {
                if send(response).is_err() {
                    // The command is gone; `call.gone` is set, and its job stops.
                    break;
                }
            }
        }
    }
}

/// Runs one operation inside the node for a connected command, printing its error as
/// `main` would, and logging a job its command walked away from.
fn run_for(caller: &remote::Caller, node: &remote::InNode, operation: Operation) {
    let name = operation.name();
    let code = match super::execute(caller, Some(node), node.vault.dir.root(), operation) {
        Ok(code) => code,
        Err(e) => {
            if caller.cancel.is_cancelled() {
                tracing::info!(
                    "{name} cancelled: the command that asked for it (uid {}) went away",
                    caller.info.uid
                );
            }
            caller.err(format!("error: {}", crate::units::chain_of(e.chain())));
            1
        }
    };
    // Whatever the command signed (a grant, a node) goes to the mesh.
    if let Ok(records) = mesh::own_records(&node.vault) {
        let _ = node.mesh.send(mesh::Command::LocalRecords(records));
    }
    caller.send_exit(code);
}

/// Hands snapshots made inside the node to the mesh.
pub fn publish(vault: &Vault, mesh: &MeshHandle) -> Result<()> {
    let published = mesh::snapshots_to_publish(vault, false)?;
    for (record, chunks) in published.snapshots {
        mesh.send(mesh::Command::NewSnapshot { record, chunks })?;
    }
    // With the snapshot, as rule O3 asks: the engine then acts on the new basis at once.
    if !published.statements.is_empty() {
        mesh.send(mesh::Command::LocalRecords(published.statements))?;
    }
    Ok(())
}

/// The node's status: the mesh loop's picture plus the vault's images.
pub fn status(vault: &Vault, mesh: &MeshHandle) -> Result<NodeStatus> {
    let mut status = status::build(vault, &mesh.status()?)?;
    if let Some(jobs) = JOBS.get().filter(|j| !j.is_empty()) {
        let newest = status::newest_at_r(vault)?;
        status.jobs = jobs::status_of(jobs, vault.store.index(), status.now_unix_ms, &|image| {
            newest.get(image.as_str()).copied()
        });
    }
    Ok(status)
}

/// What `cairn report` is made from besides the snapshots: the node's status (inside
/// the running node, the same as `cairn status`; on the data dir alone, built from the
/// index with no mesh, so copies are those confirmed at R) and each image's retention
/// policy (its job's `keep`, else `[retention.IMAGE]`).
pub fn report_facts(
    data_dir: &Path,
    vault: &Vault,
    mesh: Option<&MeshHandle>,
) -> Result<(NodeStatus, BTreeMap<String, retention::Policy>)> {
    let (status, settings, backup_jobs) = match mesh {
        Some(mesh) => (
            status(vault, mesh)?,
            (*mesh.settings).clone(),
            JOBS.get().map(|j| (**j).clone()).unwrap_or_default(),
        ),
        None => {
            let config = read_config(&data_dir.join(CONFIG_FILE), false)?;
            let settings = config.settings()?;
            let backup_jobs = jobs::Job::parse_all(&config.backup)?;
            let offline = mesh::MeshStatus {
                replication_factor: EngineConfig::default().replication_factor,
                throughput: crate::throughput::load(vault.store.index())?,
                ..Default::default()
            };
            let mut status = status::build(vault, &offline)?;
            let newest = status::newest_at_r(vault)?;
            status.jobs = jobs::status_of(
                &backup_jobs,
                vault.store.index(),
                status.now_unix_ms,
                &|image| newest.get(image.as_str()).copied(),
            );
            (status, settings, backup_jobs)
        }
    };
    let mut policies = settings.retention.clone();
    for job in &backup_jobs {
        if let Some(keep) = job.keep {
            policies.insert(job.image.to_string(), keep);
        }
    }
    Ok((status, policies))
}

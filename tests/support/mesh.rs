//! A mesh of real `cairn node run` processes on loopback, for the end-to-end tests and
//! the runnable example: sites made with `cairn init`, partnered with invites, second
//! nodes added with join tokens, every node a process of its own. Only 127.0.0.1 is
//! used (or, when a test asks, addresses inside network namespaces it made), mDNS is
//! off, and every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cairn_bin, random_bytes, text_bytes, write};

/// Engine timings for a mesh on one machine: seconds where offices use minutes.
pub const FAST: &[&str] = &[
    "--gossip-interval",
    "1s",
    "--sync-interval",
    "1s",
    "--suspect-after",
    "4s",
    "--dead-after",
    "12s",
    "--request-timeout",
    "10s",
    "--trim-grace",
    "20s",
];

/// One node: its data dir, its port, and its process while it runs.
pub struct Node {
    pub site: usize,
    pub name: String,
    pub data_dir: PathBuf,
    /// The IP it listens on: 127.0.0.1 unless a test runs it in a network namespace.
    pub host: String,
    pub port: u16,
    /// The network namespace `cairn node run` runs in (`ip netns exec`); the other
    /// commands reach the node through its control socket, a file, from anywhere.
    pub netns: Option<String>,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(cairn_bin());
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("cairn runs")
    }

    /// Runs a command on this node's data dir and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args);
        if !out.status.success() {
            bail!(
                "cairn {args:?} on {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Starts `cairn node run` and waits until its control socket answers.
    pub fn start(&mut self, bootstrap: &[String]) -> Result<()> {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let log = std::fs::File::create(&self.log)?;
        let mut command = match &self.netns {
            None => Command::new(cairn_bin()),
            Some(netns) => {
                // `ip netns exec` execs the binary: the child's pid is the node's.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(cairn_bin());
                command
            }
        };
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["node", "run", "--no-mdns", "--listen"])
            .stdin(Stdio::null());
        command
            .arg(self.address())
            .args(["--name", &self.name])
            .args(FAST)
            .args(&self.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("CAIRN_TEST_LOG").unwrap_or_else(|_| "info,libp2p=warn".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        for b in bootstrap {
            command.args(["--bootstrap", b]);
        }
        self.child = Some(command.spawn().context("start cairn node run")?);
        wait_for(
            Duration::from_secs(30),
            &format!("{} to start", self.name),
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    bail!(
                        "{} exited at start ({status}): {}",
                        self.name,
                        self.log_tail()
                    );
                }
                Ok(self.run(&["status", "--json"]).status.success())
            },
        )
    }

    /// Stops the node the way an admin does (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the node with no warning, as a power cut does.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Resident memory of the running node process, from `/proc/PID/status`.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU time (user and system, every thread) the running node process has used so
    /// far, from Linux's `/proc/PID/stat`; `None` when it is not running or the system
    /// does not say.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.child.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th of the line, the 12th and 13th after it.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let per_sec = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
        Some(Duration::from_millis(ticks * 1000 / per_sec.max(1)))
    }

    /// `cairn status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.ok(&["status", "--json"])?)?)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The node's whole log so far (this run's: `start` truncates it).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node id, as `cairn status --json` prints it.
    pub fn node_id(&self) -> Result<String> {
        let status = self.status()?;
        Ok(status["node_id"]
            .as_str()
            .context("status has node_id")?
            .to_owned())
    }

    /// Damages every chunk in this node's pack files: one byte flipped in the middle of
    /// each entry's sealed bytes, so the packs still parse but no copy matches its
    /// signature. The node must be stopped. Returns how many entries were damaged.
    pub fn corrupt_packs(&self) -> Result<usize> {
        assert!(self.child.is_none(), "{} must be stopped", self.name);
        let dir = self.data_dir.join("store/packs");
        let mut n_damaged = 0;
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "pack") {
                n_damaged += corrupt_pack(&path)?;
            }
        }
        Ok(n_damaged)
    }
}

/// Pack format 1 (node/src/store.rs): a 16-byte header, then entries of
/// `u32 magic | [32] id | u32 sealed_len | sealed | [16] checksum`, little-endian.
fn corrupt_pack(path: &Path) -> Result<usize> {
    const HEADER_BYTES: usize = 16;
    const HEAD_BYTES: usize = 4 + 32 + 4;
    const CHECKSUM_BYTES: usize = 16;
    let mut bytes = std::fs::read(path)?;
    let mut at = HEADER_BYTES;
    let mut n_damaged = 0;
    while at + HEAD_BYTES <= bytes.len() {
        let len_at = at + 4 + 32;
        let sealed_len =
            u32::from_le_bytes(bytes[len_at..len_at + 4].try_into().expect("4 bytes")) as usize;
        let end = at + HEAD_BYTES + sealed_len + CHECKSUM_BYTES;
        if sealed_len == 0 || end > bytes.len() {
            break;
        }
        bytes[at + HEAD_BYTES + sealed_len / 2] ^= 0x5a;
        n_damaged += 1;
        at = end;
    }
    std::fs::write(path, &bytes)?;
    Ok(n_damaged)
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sites, each with its nodes; node 0 of each site made the site.
pub struct Mesh {
    pub root: PathBuf,
    pub sites: Vec<Vec<Node>>,
    pub site_ids: Vec<String>,
    pub recovery_keys: Vec<String>,
}

/// A free UDP port on loopback (asked of the kernel, then released for the node).
pub fn free_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    socket.local_addr().expect("bound").port()
}

pub fn site_name(site: usize) -> String {
    format!("Office {}", (b'A' + site as u8) as char)
}

impl Mesh {
    /// Makes `n_sites` sites of `nodes_per_site` nodes under `root`, every site a partner
    /// of every other, and starts every node. `step` is told what happens.
    pub fn build(
        root: &Path,
        n_sites: usize,
        nodes_per_site: usize,
        step: &mut dyn FnMut(&str),
    ) -> Result<Mesh> {
        Mesh::build_with(root, n_sites, nodes_per_site, &mut |_| {}, step)
    }

    /// As `build`, with `configure` called on every node before it first starts (to set
    /// `extra_args`, `host`, `netns`).
    pub fn build_with(
        root: &Path,
        n_sites: usize,
        nodes_per_site: usize,
        configure: &mut dyn FnMut(&mut Node),
        step: &mut dyn FnMut(&str),
    ) -> Result<Mesh> {
        let mut mesh = Mesh {
            root: root.to_owned(),
            sites: Vec::new(),
            site_ids: Vec::new(),
            recovery_keys: Vec::new(),
        };
        for s in 0..n_sites {
            let mut node = mesh.new_node(s, 0);
            configure(&mut node);
            let init: serde_json::Value = serde_json::from_str(&node.ok(&[
                "init",
                "--site-name",
                &site_name(s),
                "--json",
            ])?)?;
            mesh.site_ids
                .push(init["site_id"].as_str().unwrap_or_default().into());
            mesh.recovery_keys
                .push(init["recovery_key"].as_str().unwrap_or_default().into());
            mesh.sites.push(vec![node]);
        }
        for s in 0..n_sites {
            mesh.sites[s][0].start(&[])?;
        }
        step(&format!("{n_sites} sites made, one node each running"));
        // Every pair of sites: the earlier invites, the later accepts; the nodes finish
        // the handshake over the network.
        for a in 0..n_sites {
            for b in a + 1..n_sites {
                let invite = mesh.sites[a][0].ok(&[
                    "trust",
                    "invite",
                    "--quota",
                    "50GB",
                    "--address",
                    &mesh.sites[a][0].address(),
                ])?;
                let token = invite
                    .split_whitespace()
                    .find(|w| w.starts_with("cairn-invite-"))
                    .context("trust invite prints a token")?
                    .to_owned();
                mesh.sites[b][0].ok(&["trust", "accept", &token, "--quota", "50GB", "--yes"])?;
            }
        }
        wait_for(Duration::from_secs(60), "every invite to complete", || {
            for site in &mesh.sites {
                let list: serde_json::Value =
                    serde_json::from_str(&site[0].ok(&["trust", "list", "--json"])?)?;
                let partners = list.as_array().map_or(0, |l| l.len());
                if partners < n_sites - 1 {
                    return Ok(false);
                }
            }
            // Grants both ways show as peers at every first node.
            Ok(mesh.sites.iter().all(|site| {
                site[0]
                    .status()
                    .is_ok_and(|s| s["peers"].as_array().map_or(0, |p| p.len()) >= n_sites - 1)
            }))
        })?;
        step("every site is a partner of every other");
        for s in 0..n_sites {
            for n in 1..nodes_per_site {
                let mut node = mesh.new_node(s, n);
                configure(&mut node);
                let node_id = node.ok(&["join"])?;
                let node_id = node_id
                    .split_whitespace()
                    .find(|w| w.len() > 50)
                    .context("cairn join prints the node id")?
                    .to_owned();
                let token = mesh.sites[s][0].ok(&[
                    "site",
                    "add-node",
                    &node_id,
                    "--name",
                    &node.name,
                    "--address",
                    &node.address(),
                    "--yes",
                ])?;
                let token = token
                    .split_whitespace()
                    .find(|w| w.starts_with("cairn-join-"))
                    .context("add-node prints a join token")?
                    .to_owned();
                node.ok(&["join", &token, "--yes"])?;
                node.start(&[mesh.sites[s][0].address()])?;
                mesh.sites[s].push(node);
            }
        }
        step(&format!(
            "{} more nodes joined their sites",
            n_sites * (nodes_per_site - 1)
        ));
        Ok(mesh)
    }

    fn new_node(&self, site: usize, n: usize) -> Node {
        let name = format!("{}{}", (b'a' + site as u8) as char, n + 1);
        Node {
            site,
            data_dir: self.root.join(&name),
            log: self.root.join(format!("{name}.log")),
            name,
            host: "127.0.0.1".into(),
            port: free_port(),
            netns: None,
            extra_args: Vec::new(),
            child: None,
        }
    }

    /// A node of a site of its own, made with `cairn init` under `root` and partnered
    /// with no one: it may know every address of the mesh and still be nobody to it.
    pub fn stranger(&self, name: &str, site_name: &str) -> Result<Node> {
        let node = Node {
            site: usize::MAX,
            name: name.into(),
            data_dir: self.root.join(name),
            host: "127.0.0.1".into(),
            port: free_port(),
            netns: None,
            log: self.root.join(format!("{name}.log")),
            extra_args: Vec::new(),
            child: None,
        };
        node.ok(&["init", "--site-name", site_name])?;
        Ok(node)
    }

    /// Every node, site by site.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.sites.iter().flatten()
    }

    /// The last lines of every node's log, for a failure message.
    pub fn log_tails(&self) -> String {
        self.nodes()
            .map(|n| format!("--- {} ({})\n{}", n.name, n.log.display(), n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every node's address but those of `site`.
    pub fn addresses_outside(&self, site: usize) -> Vec<String> {
        self.sites
            .iter()
            .enumerate()
            .filter(|(s, _)| *s != site)
            .flat_map(|(_, nodes)| nodes.iter().map(Node::address))
            .collect()
    }

    /// `recover`, then the node started against the other sites and waited for until it
    /// lists a snapshot of `image`, learnt from the mesh.
    pub fn recover_running(&self, site: usize, dir: &Path, image: &str) -> Result<Node> {
        let mut recovered = self.recover(site, dir)?;
        recovered.start(&self.addresses_outside(site))?;
        wait_for(
            Duration::from_secs(60),
            &format!("the recovered node to learn the snapshots of {image} from the mesh"),
            || {
                Ok(recovered
                    .ok(&["snapshots", image])
                    .is_ok_and(|s| s.contains(image)))
            },
        )?;
        Ok(recovered)
    }

    /// A fresh machine for `site`, recovered from its recovery key through the mesh.
    pub fn recover(&self, site: usize, dir: &Path) -> Result<Node> {
        let mut node = self.new_node(site, 9);
        node.data_dir = dir.to_owned();
        node.name = format!("{}-recovered", node.name);
        node.log = self.root.join(format!("{}.log", node.name));
        let mut args = vec![
            "recover",
            "--site",
            &self.site_ids[site],
            "--recovery-key",
            &self.recovery_keys[site],
            "--site-name",
        ];
        let name = site_name(site);
        args.push(&name);
        let outside = self.addresses_outside(site);
        for a in &outside {
            args.push("--bootstrap");
            args.push(a);
        }
        node.ok(&args)?;
        Ok(node)
    }
}

/// Polls `check` every 200 ms until it says yes, fails, or `limit` passes.
pub fn wait_for(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    while Instant::now() < deadline {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    match last_error {
        Some(e) => bail!("timed out after {limit:?} waiting for {what}: {e:#}"),
        None => bail!("timed out after {limit:?} waiting for {what}"),
    }
}

/// The image's row of a node's `cairn status --json`.
pub fn image_status(status: &serde_json::Value, image: &str) -> Option<serde_json::Value> {
    status["images"]
        .as_array()?
        .iter()
        .find(|i| i["image"] == image)
        .cloned()
}

/// Chunks of `site_id` that a node's status says it stores for that partner site.
pub fn held_for(status: &serde_json::Value, site_id: &str) -> u64 {
    status["held_for_partners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["site_id"] == site_id)
        .map(|p| p["chunks"].as_u64().unwrap_or(0))
        .sum()
}

/// Chunks of an image that a node's status counts at `site_id` (0 when not listed).
pub fn copies_at(status: &serde_json::Value, image: &str, site_id: &str) -> u64 {
    image_status(status, image)
        .and_then(|i| {
            i["copies"]
                .as_array()?
                .iter()
                .find(|c| c["site_id"] == site_id)
                .map(|c| c["chunks"].as_u64().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// The state ("live", "suspect", "dead") a node's status gives a peer, if it lists it.
pub fn peer_state(status: &serde_json::Value, node_id: &str) -> Option<String> {
    status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["node_id"] == node_id)
        .and_then(|p| p["state"].as_str().map(str::to_owned))
}

/// True once every chunk of the image's latest snapshot is at R sites.
pub fn at_r(status: &serde_json::Value, image: &str) -> bool {
    image_status(status, image).is_some_and(|i| {
        i["chunks"].as_u64().unwrap_or(0) > 0 && i["chunks_at_target"] == i["chunks"]
    })
}

/// Runs a test's body in a fresh temporary dir; a failure panics with the error and the
/// tail of every node's log (the nodes are stopped by then: the mesh is dropped).
pub fn scenario(name: &str, body: impl FnOnce(&Path, &mut dyn FnMut(&str)) -> Result<()>) {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("cairn-{name}-"))
        .tempdir()
        .expect("temp dir");
    let started = Instant::now();
    let mut step = |what: &str| {
        eprintln!("[{:6.1}s] {name}: {what}", started.elapsed().as_secs_f64());
    };
    if let Err(e) = body(tmp.path(), &mut step) {
        let logs = log_tails(tmp.path());
        let root = tmp.path().display().to_string();
        if std::env::var_os("CAIRN_TEST_KEEP").is_some() {
            let _ = tmp.keep();
        }
        panic!("{name} failed: {e:#}\n(in {root})\n{logs}");
    }
}

/// The last lines of every `*.log` under `root`.
pub fn log_tails(root: &Path) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out += &format!("--- {}\n", log.display());
        out += &lines[lines.len().saturating_sub(25)..].join("\n");
        out.push('\n');
    }
    out
}

/// A server image of `size_mib`: half log-like text (compresses), half random (does not).
pub fn make_image(root: &Path, name: &str, size_mib: usize, seed: u64) -> PathBuf {
    let half = size_mib << 19;
    let mut bytes = text_bytes(half, seed);
    bytes.extend(random_bytes(half, seed + 1));
    let path = root.join(name);
    write(&path, &bytes);
    path
}

pub fn utf8(path: &Path) -> Result<&str> {
    path.to_str().context("a utf-8 temp path")
}

/// Waits until the owner's node says every chunk of the image is at R sites.
pub fn wait_at_r(node: &Node, image: &str, limit_secs: u64) -> Result<()> {
    wait_for(
        Duration::from_secs(limit_secs),
        &format!("every chunk of {image} at R sites (by {})", node.name),
        || Ok(at_r(&node.status()?, image)),
    )
}

/// Chunks of `site` that the nodes of another site hold between them.
pub fn held_by_site(mesh: &Mesh, holder: usize, site: usize) -> Result<u64> {
    let mut n = 0;
    for node in &mesh.sites[holder] {
        n += held_for(&node.status()?, &mesh.site_ids[site]);
    }
    Ok(n)
}

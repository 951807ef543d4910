//! What a running node tells people and monitoring about itself: `NodeStatus` (the JSON of
//! `cairn status --json`) and its text for `cairn status`; `prometheus` renders it for
//! Prometheus and `metrics` serves that over HTTP.
//!
//! The daemon fills a `NodeStatus` from its engine and store; this module only shows it.
//! Ids are typed and print in their usual text form; bytes, chunks and times are integers
//! with their unit in the field name, so scripts need no parsing. `version` is the format
//! of this JSON: fields may be added within a version, never renamed or removed.
//! Names come from certificates other sites signed, so the text replaces control
//! characters in them rather than let them move a terminal's cursor.

mod build;
mod check;
mod metrics;
mod prometheus;

use std::fmt::{self, Write as _};

use cairn_protocol::identity::{NodeId, SiteId};
use cairn_protocol::{ImageName, SnapshotId};
use serde::{Deserialize, Serialize};

use crate::units;

pub use build::{build, copies_record, newest_at_r, sample_sent};
pub use check::{partner_unseen, problems, snapshot_age_max_ms, CheckLimits};
pub use metrics::{
    serve_metrics, METRICS_CONNECTIONS_MAX, METRICS_REQUEST_BYTES_MAX, METRICS_REQUEST_TIMEOUT_MS,
    METRICS_WRITE_TIMEOUT_MS,
};
pub use prometheus::render_prometheus;

pub const STATUS_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: u32,
    #[serde(with = "as_text")]
    pub node_id: NodeId,
    #[serde(with = "as_text")]
    pub site_id: SiteId,
    pub site_name: String,
    /// As libp2p multiaddrs, e.g. `/ip4/10.0.0.7/udp/4001/quic-v1`.
    pub listen_addresses: Vec<String>,
    /// When this status was taken: what "last seen" is measured against.
    pub now_unix_ms: u64,
    pub uptime_ms: u64,
    /// Chunks of this site in this node's store.
    pub chunks_own: u64,
    /// Chunks of partner sites in this node's store.
    pub chunks_for_partners: u64,
    pub held_for_partners: Vec<PartnerHeld>,
    /// In force now, by the schedule; `null` is unlimited.
    pub upload_limit_bytes_per_sec: Option<u64>,
    pub download_limit_bytes_per_sec: Option<u64>,
    pub images: Vec<ImageStatus>,
    pub peers: Vec<PeerStatus>,
    /// Since start: the longest one event kept the node's loop busy, and which; no peer
    /// is answered meanwhile (a ping waits that long).
    #[serde(default)]
    pub loop_busy_max_ms: u64,
    #[serde(default)]
    pub loop_busy_max_in: Option<String>,
    /// Since start: how late, at worst, the loop served a timer that was due.
    #[serde(default)]
    pub loop_late_max_ms: u64,
    /// Since start: how often the loop waited for the disk itself (0: the storage
    /// thread did all of it).
    #[serde(default)]
    pub loop_disk_waits: u64,
    /// The `[[backup]]` jobs of node.toml, as this node runs them.
    #[serde(default)]
    pub jobs: Vec<crate::jobs::JobStatus>,
    /// The partner sites this site grants storage to, and when each was last heard from
    /// (by this node, over all its runs).
    #[serde(default)]
    pub partners: Vec<PartnerSeen>,
    /// What each holder site delivered to this node's recent chunk fetches (restore,
    /// export, vm, drills), kept over restarts: what `cairn report` estimates a
    /// restore's time from.
    #[serde(default)]
    pub fetch_rates: Vec<FetchRate>,
}

/// One holder site's recent deliveries to this node (`throughput.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRate {
    #[serde(with = "as_text")]
    pub site_id: SiteId,
    pub site_name: String,
    pub bytes: u64,
    pub busy_ms: u64,
    pub samples: u32,
    /// `bytes` over `busy_ms`.
    pub bytes_per_sec: u64,
    pub last_unix_ms: u64,
}

/// A partner site and when this node last heard from any node of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerSeen {
    #[serde(with = "as_text")]
    pub site_id: SiteId,
    pub site_name: String,
    /// `null`: never heard from.
    pub last_seen_unix_ms: Option<u64>,
}

/// What this node stores for one partner site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerHeld {
    #[serde(with = "as_text")]
    pub site_id: SiteId,
    pub site_name: String,
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    #[serde(with = "image_name")]
    pub image: ImageName,
    /// `null` before the first backup.
    pub latest_snapshot: Option<SnapshotSummary>,
    /// R: how many distinct sites should hold each chunk.
    pub replication_target: u32,
    /// Distinct chunks the image's kept snapshots use.
    pub chunks: u64,
    /// Of those, how many are held at `replication_target` sites or more.
    pub chunks_at_target: u64,
    /// Sealed bytes of the chunks below target.
    pub under_replicated_bytes: u64,
    /// Per site holding any of the image's chunks.
    pub copies: Vec<SiteCopies>,
    /// False when part of the snapshot's manifest is not on this node (it is on the
    /// site's other nodes, or a lost pack took it): `chunks` counts what it could list.
    #[serde(default = "yes")]
    pub chunk_list_complete: bool,
    /// Of `chunks`, those whose copies this node does not know yet (made on another node
    /// of the site, or not yet handed to the mesh since a start): "checking", not zero.
    #[serde(default)]
    pub chunks_checking: u64,
    /// Sealed bytes all R copies of the chunks come to, and of those the copies known to
    /// be in place (each chunk counted at most R times).
    #[serde(default)]
    pub copy_bytes_target: u64,
    #[serde(default)]
    pub copy_bytes_done: u64,
    /// While below R: what this node sends to peers, measured over the last minute, and
    /// the time the missing copies take at that rate. `null`: not measured yet, or at R.
    #[serde(default)]
    pub rate_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub eta_ms: Option<u64>,
    /// While below R and not moving: why, when the node can tell.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Set when this node cannot follow the image's copies itself (the snapshot was made
    /// on the site's other node): the copies are those that node confirmed at R, at this
    /// time. `null`: this node's own view.
    #[serde(default)]
    pub copies_acknowledged_unix_ms: Option<u64>,
    /// Since when the image's data is below R, as far as this node can tell: the
    /// snapshot's time while it was never at R, else when this node first saw chunks
    /// of it below R (since its start). `null`: at R, or not known to be below.
    #[serde(default)]
    pub below_target_since_unix_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

impl ImageStatus {
    /// Repair progress: 1.0 when every chunk is at R; 1.0 also for an image with no chunks.
    pub fn fraction_at_target(&self) -> f64 {
        if self.chunks == 0 {
            1.0
        } else {
            self.chunks_at_target as f64 / self.chunks as f64
        }
    }
}

impl NodeStatus {
    /// A node with nothing to say yet: no images, no peers, nothing held.
    pub fn empty(vault: &crate::vault::Vault, now_unix_ms: u64) -> NodeStatus {
        NodeStatus {
            version: STATUS_VERSION,
            node_id: vault.dir.node_id(),
            site_id: vault.dir.site_id(),
            site_name: vault.dir.site_name.clone(),
            listen_addresses: Vec::new(),
            now_unix_ms,
            uptime_ms: 0,
            chunks_own: 0,
            chunks_for_partners: 0,
            held_for_partners: Vec::new(),
            upload_limit_bytes_per_sec: None,
            download_limit_bytes_per_sec: None,
            images: Vec::new(),
            peers: Vec::new(),
            loop_busy_max_ms: 0,
            loop_busy_max_in: None,
            loop_late_max_ms: 0,
            loop_disk_waits: 0,
            jobs: Vec::new(),
            partners: Vec::new(),
            fetch_rates: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    #[serde(with = "as_text")]
    pub id: SnapshotId,
    pub time_unix_ms: u64,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteCopies {
    #[serde(with = "as_text")]
    pub site_id: SiteId,
    pub site_name: String,
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    #[serde(with = "as_text")]
    pub node_id: NodeId,
    #[serde(with = "as_text")]
    pub site_id: SiteId,
    pub site_name: String,
    pub state: PeerState,
    /// `null`: never heard from.
    pub last_seen_unix_ms: Option<u64>,
    /// `null`: not measured yet.
    pub rtt_us: Option<u64>,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    Live,
    Suspect,
    Dead,
}

impl PeerState {
    pub const ALL: [PeerState; 3] = [PeerState::Live, PeerState::Suspect, PeerState::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Live => "live",
            PeerState::Suspect => "suspect",
            PeerState::Dead => "dead",
        }
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ids as their usual text, checked when read back.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

mod image_name {
    use cairn_protocol::ImageName;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(name: &ImageName, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(name.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ImageName, D::Error> {
        let text = String::deserialize(deserializer)?;
        ImageName::new(&text).map_err(serde::de::Error::custom)
    }
}

/// A name from a certificate as safe to print on a terminal: control characters (escape
/// sequences, newlines) become '?'.
pub(crate) fn printable(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The first group of a node id: what tables and metric labels show.
pub fn short_node_id(node_id: &NodeId) -> String {
    node_id.to_string().chars().take(7).collect()
}

/// "45s", "12m 5s", "3h 4m", "2d 5h": the two largest units, for uptimes and ages.
pub(crate) fn duration(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, hours, minutes) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m {}s", secs % 60)
    } else {
        format!("{secs}s")
    }
}

fn rtt(us: u64) -> String {
    if us < 1_000_000 {
        format!("{}.{} ms", us / 1000, us % 1000 / 100)
    } else {
        format!("{}.{:02} s", us / 1_000_000, us % 1_000_000 / 10_000)
    }
}

fn limit(bytes_per_sec: Option<u64>) -> String {
    match bytes_per_sec {
        None | Some(0) => "unlimited".into(),
        Some(rate) => format!("{}/s", units::bytes(rate)),
    }
}

/// "99.9%", rounded down, so that anything short of every chunk never shows 100%.
fn percent_at_target(image: &ImageStatus) -> String {
    if image.chunks == 0 {
        return "-".into();
    }
    let permille =
        u128::from(image.chunks_at_target.min(image.chunks)) * 1000 / u128::from(image.chunks);
    format!("{}.{}%", permille / 10, permille % 10)
}

/// Columns padded to their widest cell, two spaces apart; right-aligned columns are for
/// numbers. The last column is not padded, so no line ends in spaces.
struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            headers: columns.iter().map(|(header, _)| *header).collect(),
            right_aligned: columns.iter().map(|(_, right)| *right).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.headers.len(), "a cell per column");
        self.rows.push(cells);
    }

    fn render(&self, out: &mut String) {
        let width = |column: usize| {
            self.rows
                .iter()
                .map(|row| row[column].chars().count())
                .chain([self.headers[column].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.headers.len()).map(width).collect();
        let headers = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (column, cell) in row.iter().enumerate() {
                let last = column + 1 == row.len();
                let width = widths[column];
                match (self.right_aligned[column], last) {
                    (true, _) => write!(line, "{cell:>width$}"),
                    (false, false) => write!(line, "{cell:<width$}"),
                    (false, true) => write!(line, "{cell}"),
                }
                .expect("writing to a String cannot fail");
                if !last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

/// `cairn status`: this node, its images' replication, and its peers.
pub fn render_text(status: &NodeStatus) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        writeln!(out, "{label:<9} {value}").expect("writing to a String cannot fail");
    };
    line("node", status.node_id.to_string());
    line(
        "site",
        format!("{} ({})", printable(&status.site_name), status.site_id),
    );
    line(
        "listening",
        if status.listen_addresses.is_empty() {
            "nowhere".into()
        } else {
            status.listen_addresses.join(", ")
        },
    );
    line("uptime", duration(status.uptime_ms));
    line(
        "limits",
        format!(
            "upload {}, download {}",
            limit(status.upload_limit_bytes_per_sec),
            limit(status.download_limit_bytes_per_sec)
        ),
    );
    line(
        "chunks",
        format!(
            "{} own, {} for partners",
            status.chunks_own, status.chunks_for_partners
        ),
    );

    if !status.held_for_partners.is_empty() {
        out.push('\n');
        let mut table = Table::new(&[("HELD FOR", false), ("BYTES", true), ("CHUNKS", true)]);
        for partner in &status.held_for_partners {
            table.row(vec![
                printable(&partner.site_name),
                units::bytes(partner.bytes),
                partner.chunks.to_string(),
            ]);
        }
        table.render(&mut out);
    }

    out.push('\n');
    if status.images.is_empty() {
        out.push_str("no images yet: `cairn backup IMAGE SOURCE` makes the first snapshot\n");
    } else {
        render_images(status, &mut out);
    }

    if !status.jobs.is_empty() {
        out.push('\n');
        check::render_jobs(status, &mut out);
    }

    out.push('\n');
    if status.peers.is_empty() {
        out.push_str("no peers yet\n");
    } else {
        render_peers(status, &mut out);
    }
    out
}

fn render_images(status: &NodeStatus, out: &mut String) {
    let mut table = Table::new(&[
        ("IMAGE", false),
        ("LATEST SNAPSHOT", false),
        ("SIZE", true),
        ("R", true),
        ("AT R", true),
        ("UNDER R", true),
        ("REPLICATING", false),
        ("COPIES BY SITE", false),
    ]);
    for image in &status.images {
        let (latest, size) = match &image.latest_snapshot {
            Some(s) => (
                format!("{} UTC {}", units::utc(s.time_unix_ms), s.id.short()),
                units::bytes(s.size_bytes),
            ),
            None => ("none yet".into(), "-".into()),
        };
        let copies = image
            .copies
            .iter()
            .map(|c| format!("{} {}", printable(&c.site_name), units::bytes(c.bytes)))
            .collect::<Vec<_>>()
            .join(", ");
        table.row(vec![
            image.image.to_string(),
            latest,
            size,
            image.replication_target.to_string(),
            at_target(image),
            units::bytes(image.under_replicated_bytes),
            replicating(image),
            if !copies.is_empty() {
                copies
            } else if image.chunks_checking > 0 || !image.chunk_list_complete {
                "checking".into()
            } else {
                "-".into()
            },
        ]);
    }
    table.render(out);
}

/// "99.9% of 100000 chunks"; "checking" while the copies of some are not known yet.
fn at_target(image: &ImageStatus) -> String {
    if image.chunks_checking > 0 || (image.chunks == 0 && !image.chunk_list_complete) {
        let known = image.chunks - image.chunks_checking;
        return if known == 0 {
            "checking".into()
        } else {
            format!("checking, {known} of {} chunks known", image.chunks)
        };
    }
    if image.chunks == 0 {
        return "-".into();
    }
    format!("{} of {} chunks", percent_at_target(image), image.chunks)
}

/// While below R: "1.2 GiB of 3.0 GiB, 2.0 MiB/s, 5m 0s left", or why it is not moving.
fn replicating(image: &ImageStatus) -> String {
    if image.copy_bytes_done >= image.copy_bytes_target || image.chunks_checking > 0 {
        return "-".into();
    }
    let mut text = format!(
        "{} of {}",
        units::bytes(image.copy_bytes_done),
        units::bytes(image.copy_bytes_target)
    );
    match (image.rate_bytes_per_sec, image.eta_ms) {
        (Some(rate), Some(eta)) if rate > 0 => {
            write!(text, ", {}/s, {} left", units::bytes(rate), duration(eta))
        }
        _ => match &image.waiting_for {
            Some(why) => write!(text, ", {}", printable(why)),
            None => write!(text, ", rate not measured yet"),
        },
    }
    .expect("writing to a String cannot fail");
    text
}

fn render_peers(status: &NodeStatus, out: &mut String) {
    let mut table = Table::new(&[
        ("PEER", false),
        ("SITE", false),
        ("STATE", false),
        ("LAST SEEN", true),
        ("RTT", true),
        ("SENT", true),
        ("RECEIVED", true),
    ]);
    for peer in &status.peers {
        let last_seen = match peer.last_seen_unix_ms {
            None => "never".into(),
            Some(t) if t >= status.now_unix_ms => "just now".into(),
            Some(t) => format!("{} ago", duration(status.now_unix_ms - t)),
        };
        table.row(vec![
            short_node_id(&peer.node_id),
            printable(&peer.site_name),
            peer.state.to_string(),
            last_seen,
            peer.rtt_us.map_or("-".into(), rtt),
            units::bytes(peer.sent_bytes),
            units::bytes(peer.received_bytes),
        ]);
    }
    table.render(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const GIB: u64 = 1 << 30;

    pub(super) fn node(seed: u8) -> NodeId {
        NodeId([seed; 32])
    }

    pub(super) fn site(seed: u8) -> SiteId {
        SiteId([seed; 32])
    }

    /// Two images (one fully replicated, one repairing, one never backed up), three peers.
    pub(super) fn sample() -> NodeStatus {
        let now = 1_795_000_000_000;
        NodeStatus {
            version: STATUS_VERSION,
            node_id: node(1),
            site_id: site(10),
            site_name: "Main Street".into(),
            listen_addresses: vec![
                "/ip4/10.0.0.7/udp/4001/quic-v1".into(),
                "/ip6/::1/udp/4001/quic-v1".into(),
            ],
            now_unix_ms: now,
            uptime_ms: (3 * 86_400 + 4 * 3600 + 5 * 60) * 1000,
            chunks_own: 120_000,
            chunks_for_partners: 45_000,
            held_for_partners: vec![PartnerHeld {
                site_id: site(20),
                site_name: "Harbour \"Annex\"".into(),
                chunks: 45_000,
                bytes: 180 * GIB,
            }],
            upload_limit_bytes_per_sec: Some(2 << 20),
            download_limit_bytes_per_sec: None,
            images: vec![
                ImageStatus {
                    image: ImageName::new("fileserver").unwrap(),
                    latest_snapshot: Some(SnapshotSummary {
                        id: SnapshotId([0xab; 16]),
                        time_unix_ms: now - 3_600_000,
                        size_bytes: 500 * GIB,
                    }),
                    replication_target: 3,
                    chunks: 100_000,
                    chunks_at_target: 99_999,
                    under_replicated_bytes: 4 << 20,
                    copies: vec![
                        SiteCopies {
                            site_id: site(10),
                            site_name: "Main Street".into(),
                            chunks: 100_000,
                            bytes: 400 * GIB,
                        },
                        SiteCopies {
                            site_id: site(20),
                            site_name: "Harbour \"Annex\"".into(),
                            chunks: 99_999,
                            bytes: 399 * GIB,
                        },
                    ],
                    chunk_list_complete: true,
                    chunks_checking: 0,
                    copy_bytes_target: 1200 * GIB,
                    copy_bytes_done: 799 * GIB,
                    rate_bytes_per_sec: Some(4 << 20),
                    eta_ms: Some(3_600_000),
                    waiting_for: None,
                    copies_acknowledged_unix_ms: None,
                    below_target_since_unix_ms: None,
                },
                ImageStatus {
                    image: ImageName::new("accounting").unwrap(),
                    latest_snapshot: None,
                    replication_target: 3,
                    chunks: 0,
                    chunks_at_target: 0,
                    under_replicated_bytes: 0,
                    copies: vec![],
                    chunk_list_complete: true,
                    chunks_checking: 0,
                    copy_bytes_target: 0,
                    copy_bytes_done: 0,
                    rate_bytes_per_sec: None,
                    eta_ms: None,
                    waiting_for: None,
                    copies_acknowledged_unix_ms: None,
                    below_target_since_unix_ms: None,
                },
            ],
            peers: vec![
                PeerStatus {
                    node_id: node(2),
                    site_id: site(20),
                    site_name: "Harbour \"Annex\"".into(),
                    state: PeerState::Live,
                    last_seen_unix_ms: Some(now - 2_000),
                    rtt_us: Some(12_345),
                    sent_bytes: 399 * GIB,
                    received_bytes: 1536,
                },
                PeerStatus {
                    node_id: node(3),
                    site_id: site(30),
                    site_name: "Back\\office\nB".into(),
                    state: PeerState::Suspect,
                    last_seen_unix_ms: Some(now - 95_000),
                    rtt_us: Some(1_250_000),
                    sent_bytes: 0,
                    received_bytes: 0,
                },
                PeerStatus {
                    node_id: node(4),
                    site_id: site(30),
                    site_name: "Riverside".into(),
                    state: PeerState::Dead,
                    last_seen_unix_ms: None,
                    rtt_us: None,
                    sent_bytes: 0,
                    received_bytes: 0,
                },
            ],
            loop_busy_max_ms: 3,
            loop_busy_max_in: Some("a swarm event".into()),
            loop_late_max_ms: 4,
            loop_disk_waits: 0,
            jobs: Vec::new(),
            partners: Vec::new(),
            fetch_rates: Vec::new(),
        }
    }

    #[test]
    fn json_round_trips_with_ids_as_text() {
        let status = sample();
        let json = serde_json::to_string_pretty(&status).unwrap();
        assert!(
            json.contains(&format!("\"node_id\": \"{}\"", node(1))),
            "{json}"
        );
        assert!(json.contains("\"image\": \"fileserver\""));
        assert!(json.contains(&format!("\"id\": \"{}\"", SnapshotId([0xab; 16]))));
        assert!(json.contains("\"state\": \"suspect\""));
        assert!(json.contains("\"download_limit_bytes_per_sec\": null"));
        let back: NodeStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
        // Ids are checked on the way in.
        let bad = json.replace(&node(1).to_string(), "AAAA");
        assert!(serde_json::from_str::<NodeStatus>(&bad).is_err());
        let bad = json.replace("\"fileserver\"", "\"../etc\"");
        let error = serde_json::from_str::<NodeStatus>(&bad)
            .unwrap_err()
            .to_string();
        assert!(error.contains("image name"), "{error}");
    }

    #[test]
    fn text_shows_what_an_operator_checks() {
        let text = render_text(&sample());
        let short = |seed| short_node_id(&node(seed));
        let expected = format!(
            r#"node      {node1}
site      Main Street ({site10})
listening /ip4/10.0.0.7/udp/4001/quic-v1, /ip6/::1/udp/4001/quic-v1
uptime    3d 4h
limits    upload 2.0 MiB/s, download unlimited
chunks    120000 own, 45000 for partners

HELD FOR             BYTES  CHUNKS
Harbour "Annex"  180.0 GiB   45000

IMAGE       LATEST SNAPSHOT                        SIZE  R                    AT R  UNDER R  REPLICATING                                  COPIES BY SITE
fileserver  2026-11-18 10:06:40 UTC abababab  500.0 GiB  3  99.9% of 100000 chunks  4.0 MiB  799.0 GiB of 1.2 TiB, 4.0 MiB/s, 1h 0m left  Main Street 400.0 GiB, Harbour "Annex" 399.0 GiB
accounting  none yet                                  -  3                       -      0 B  -                                            -

PEER     SITE             STATE     LAST SEEN      RTT       SENT  RECEIVED
{p2}  Harbour "Annex"  live         2s ago  12.3 ms  399.0 GiB   1.5 KiB
{p3}  Back\office?B    suspect  1m 35s ago   1.25 s        0 B       0 B
{p4}  Riverside        dead          never        -        0 B       0 B
"#,
            node1 = node(1),
            site10 = site(10),
            p2 = short(2),
            p3 = short(3),
            p4 = short(4),
        );
        assert_eq!(text, expected, "got:\n{text}");
    }

    #[test]
    fn text_of_a_fresh_node_says_what_is_missing() {
        let status = NodeStatus {
            listen_addresses: vec![],
            held_for_partners: vec![],
            images: vec![],
            peers: vec![],
            upload_limit_bytes_per_sec: None,
            ..sample()
        };
        let text = render_text(&status);
        assert!(text.contains("listening nowhere\n"), "{text}");
        assert!(text.contains("limits    upload unlimited, download unlimited\n"));
        assert!(text.contains("no images yet: `cairn backup IMAGE SOURCE`"));
        assert!(text.contains("\nno peers yet\n"));
        assert!(!text.contains("HELD FOR"));
    }

    #[test]
    fn copies_not_known_yet_read_checking_never_a_dash() {
        // A restart after a lost pack, or the site's second node: the chunks are listed
        // but where their copies are is not known yet.
        let mut image = sample().images[0].clone();
        image.copies.clear();
        image.chunks_checking = image.chunks;
        image.chunks_at_target = 0;
        assert_eq!(at_target(&image), "checking");
        assert_eq!(replicating(&image), "-");
        image.chunks_checking = 40_000;
        assert_eq!(at_target(&image), "checking, 60000 of 100000 chunks known");
        // Part of the manifest is elsewhere and nothing could be listed yet.
        image.chunks = 0;
        image.chunks_checking = 0;
        image.chunk_list_complete = false;
        assert_eq!(at_target(&image), "checking");
        let status = NodeStatus {
            images: vec![image],
            ..sample()
        };
        let text = render_text(&status);
        let row = text.lines().find(|l| l.starts_with("fileserver")).unwrap();
        assert!(row.ends_with("checking"), "{row}");
    }

    #[test]
    fn below_target_shows_bytes_and_rate_or_why_it_waits() {
        let mut image = sample().images[0].clone();
        assert_eq!(
            replicating(&image),
            "799.0 GiB of 1.2 TiB, 4.0 MiB/s, 1h 0m left"
        );
        image.rate_bytes_per_sec = Some(0);
        image.eta_ms = None;
        image.waiting_for = Some("waiting for Harbour".into());
        assert_eq!(
            replicating(&image),
            "799.0 GiB of 1.2 TiB, waiting for Harbour"
        );
        image.waiting_for = None;
        image.rate_bytes_per_sec = None;
        assert_eq!(
            replicating(&image),
            "799.0 GiB of 1.2 TiB, rate not measured yet"
        );
        image.copy_bytes_done = image.copy_bytes_target;
        assert_eq!(replicating(&image), "-", "at R: nothing to show");
    }

    #[test]
    fn json_of_an_older_node_without_the_new_fields_still_reads() {
        let json = serde_json::to_value(sample()).unwrap();
        let mut old = json.clone();
        for image in old["images"].as_array_mut().unwrap() {
            for field in [
                "chunk_list_complete",
                "chunks_checking",
                "copy_bytes_target",
                "copy_bytes_done",
                "rate_bytes_per_sec",
                "eta_ms",
                "waiting_for",
            ] {
                assert!(
                    image.as_object_mut().unwrap().remove(field).is_some(),
                    "{field}"
                );
            }
        }
        let back: NodeStatus = serde_json::from_value(old).unwrap();
        assert!(back.images[0].chunk_list_complete);
        assert_eq!(back.images[0].chunks, 100_000);
    }

    #[test]
    fn under_target_never_rounds_up_to_a_hundred_percent() {
        let mut image = sample().images[0].clone();
        image.chunks_at_target = image.chunks - 1;
        assert_eq!(percent_at_target(&image), "99.9%");
        // 99.95% and 99.999%: floored, never rounded up to 100.
        image.chunks = 10_000;
        image.chunks_at_target = 9_995;
        assert_eq!(percent_at_target(&image), "99.9%");
        image.chunks = 100_000;
        image.chunks_at_target = 99_999;
        assert_eq!(at_target(&image), "99.9% of 100000 chunks");
        image.chunks_at_target = image.chunks;
        assert_eq!(percent_at_target(&image), "100.0%");
        assert_eq!(image.fraction_at_target(), 1.0);
        image.chunks_at_target = 0;
        assert_eq!(percent_at_target(&image), "0.0%");
        assert_eq!(duration(59_999), "59s");
        assert_eq!(duration(3_600_000), "1h 0m");
        assert_eq!(rtt(800), "0.8 ms");
        assert_eq!(rtt(2_000_000), "2.00 s");
    }
}

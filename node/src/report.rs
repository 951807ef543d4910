//! `cairn report`: the disaster-recovery report a consultant hands to the client. Per
//! image: the RPO (age of the newest snapshot at R sites) against its backup job's
//! schedule, the copies per site, the RTO estimates (a full restore from the partners'
//! measured throughput, a stand-in boot), the last drill, the retention policy, and
//! every gap in words. Rendered as text (stdout), JSON (`--json`) or one self-contained
//! HTML file with plots (`--html FILE`, `report/html.rs`).
//!
//! Every fact comes from the node's `NodeStatus` (what `cairn status` shows, computed
//! once in `status/build.rs`) plus the snapshot history, the retention settings and the
//! drill records; `build` only compares and words them, so it is a pure function the
//! tests call with made-up figures.

pub mod html;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use cairn_protocol::retention::{Count, Policy};
use cairn_protocol::SnapshotRecord;
use serde::{Deserialize, Serialize};

use crate::status::{self, CheckLimits, NodeStatus, SiteCopies};
use crate::units;

/// The format of `cairn report --json`: fields may be added within a version, never
/// renamed or removed.
pub const REPORT_VERSION: u32 = 1;
/// What a stand-in boot is assumed to read when no drill measured it: the bytes a boot
/// reads depend on the guest, so the estimate takes the first 256 MiB of the disk.
pub const BOOT_READ_BYTES_ASSUMED: u64 = 256 << 20;
/// A drill older than this is a gap (until drills carry their own schedule).
pub const DRILL_AGE_MAX_MS: u64 = 30 * 86_400_000;
/// Points of the RPO plot per image: the newest snapshots.
pub const RPO_POINTS_MAX: usize = 512;

/// One restore drill's outcome, as `cairn drill` records it (signed, in the catalog).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillSummary {
    pub image: String,
    /// The snapshot's id as text.
    pub snapshot: String,
    pub when_unix_ms: u64,
    pub took_ms: u64,
    pub passed: bool,
    /// Whether the drill booted the snapshot (`--boot`).
    pub booted: bool,
    /// What failed, one line each; empty when it passed.
    pub failed: Vec<String>,
    /// The display at the end of a boot, as PNG.
    pub screenshot: Option<PathBuf>,
}

/// The drills recorded on this site, newest last.
///
/// The drill records feed this: `cairn drill` (built in parallel) signs each drill's
/// result into the catalog; until it lands there are none to read, so this returns
/// none and the report names "no drill recorded" as a gap for every image.
pub fn drills(vault: &crate::vault::Vault) -> Vec<DrillSummary> {
    let _ = vault;
    Vec::new()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub generated_unix_ms: u64,
    pub site_name: String,
    pub site_id: String,
    /// False when the report was made on the data dir with no node running: copies are
    /// then those confirmed when each snapshot reached R.
    pub node_running: bool,
    pub images: Vec<ImageReport>,
    pub partners: Vec<PartnerReport>,
    /// Every gap, the images' and the site's, in words.
    pub gaps: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageReport {
    pub image: String,
    pub replication_target: u32,
    pub newest_snapshot_unix_ms: Option<u64>,
    pub size_bytes: u64,
    /// Sealed bytes of the newest snapshot's chunks (zero runs are holes, never fetched).
    pub stored_bytes: u64,
    pub newest_at_r_unix_ms: Option<u64>,
    /// Now minus `newest_at_r_unix_ms`.
    pub rpo_ms: Option<u64>,
    pub schedule: Option<String>,
    pub schedule_period_ms: Option<u64>,
    /// "compliant" (RPO within the period), "exceeded" (within 2x), "severely exceeded"
    /// (4x), "critically exceeded", "no schedule", "no snapshot at R".
    pub rpo_compliance: String,
    pub copies: Vec<SiteCopies>,
    /// Sites holding every chunk of the newest snapshot that can be reached (not every
    /// node of theirs declared dead).
    pub sites_with_newest: u32,
    /// Sites that held it and cannot be reached now.
    pub unreachable_holders: Vec<String>,
    pub rto_full: Estimate,
    pub rto_boot: Estimate,
    pub retention: String,
    pub last_drill: Option<DrillSummary>,
    /// Snapshot times, oldest first: the RPO plot.
    pub snapshot_times_unix_ms: Vec<u64>,
    pub gaps: Vec<String>,
}

/// A time estimate and what it is made from, in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// `null`: no figure to estimate from.
    pub ms: Option<u64>,
    pub bytes: u64,
    pub bytes_per_sec: Option<u64>,
    pub sites: Vec<String>,
    pub basis: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartnerReport {
    pub site_id: String,
    pub site_name: String,
    pub last_seen_unix_ms: Option<u64>,
    pub bytes_per_sec: Option<u64>,
    pub fetched_bytes: u64,
    pub samples: u32,
}

/// Everything the report is made from.
pub struct Input<'a> {
    pub status: &'a NodeStatus,
    pub node_running: bool,
    pub snapshots: &'a [SnapshotRecord],
    /// Per image, the newest snapshot at R (`status::newest_at_r`).
    pub newest_at_r: &'a BTreeMap<String, u64>,
    /// Per image, its retention policy (the job's `keep`, else `[retention.IMAGE]`).
    pub retention: &'a BTreeMap<String, Policy>,
    pub drills: &'a [DrillSummary],
    pub limits: CheckLimits,
}

pub fn build(input: &Input) -> Report {
    let status = input.status;
    let mut report = Report {
        version: REPORT_VERSION,
        generated_unix_ms: status.now_unix_ms,
        site_name: status.site_name.clone(),
        site_id: status.site_id.to_string(),
        node_running: input.node_running,
        images: status.images.iter().map(|i| image(input, i)).collect(),
        partners: partners(status),
        gaps: Vec::new(),
    };
    report.gaps = report.images.iter().flat_map(|i| i.gaps.clone()).collect();
    for partner in &status.partners {
        if status::partner_unseen(status, partner, &input.limits) {
            let name = status::printable(&partner.site_name);
            report.gaps.push(match partner.last_seen_unix_ms {
                Some(seen) => format!(
                    "partner {name} unseen for {}",
                    status::duration(status.now_unix_ms.saturating_sub(seen))
                ),
                None => format!("partner {name} never seen"),
            });
        }
    }
    if !input.node_running {
        report
            .gaps
            .push("the node is not running: nothing replicates or repairs".into());
    }
    report
}

fn partners(status: &NodeStatus) -> Vec<PartnerReport> {
    status
        .partners
        .iter()
        .map(|p| {
            let rate = status.fetch_rates.iter().find(|r| r.site_id == p.site_id);
            PartnerReport {
                site_id: p.site_id.to_string(),
                site_name: p.site_name.clone(),
                last_seen_unix_ms: p.last_seen_unix_ms,
                bytes_per_sec: rate.map(|r| r.bytes_per_sec),
                fetched_bytes: rate.map_or(0, |r| r.bytes),
                samples: rate.map_or(0, |r| r.samples),
            }
        })
        .collect()
}

fn image(input: &Input, image: &status::ImageStatus) -> ImageReport {
    let status = input.status;
    let now = status.now_unix_ms;
    let name = image.image.to_string();
    let job = status.jobs.iter().find(|j| j.image == name);
    let newest_at_r = input.newest_at_r.get(&name).copied();
    let rpo_ms = newest_at_r.map(|t| now.saturating_sub(t));
    let period = job.map(|j| j.period_ms);
    let rpo_compliance = match (rpo_ms, period) {
        (None, _) => "no snapshot at R",
        (Some(_), None) => "no schedule",
        (Some(rpo), Some(p)) if rpo <= p => "compliant",
        (Some(rpo), Some(p)) if rpo <= p.saturating_mul(2) => "exceeded",
        (Some(rpo), Some(p)) if rpo <= p.saturating_mul(4) => "severely exceeded",
        _ => "critically exceeded",
    }
    .to_string();
    // Each chunk's bytes once, whether or not its copies are known yet.
    let stored_bytes = image.copy_bytes_target / u64::from(image.replication_target.max(1));
    // A site counts while it can be reached: every node of it this node knows of
    // declared dead leaves its copy out (gone with its office, for all anyone can tell).
    let unreachable = |site: &cairn_protocol::identity::SiteId| {
        let mut nodes = status
            .peers
            .iter()
            .filter(|p| p.site_id == *site)
            .peekable();
        nodes.peek().is_some() && nodes.all(|p| p.state == status::PeerState::Dead)
    };
    let holding: Vec<&SiteCopies> = image
        .copies
        .iter()
        .filter(|c| image.chunks > 0 && c.chunks >= image.chunks)
        .collect();
    let sites_with_newest = holding.iter().filter(|c| !unreachable(&c.site_id)).count() as u32;
    let unreachable_holders: Vec<String> = holding
        .iter()
        .filter(|c| unreachable(&c.site_id))
        .map(|c| status::printable(&c.site_name))
        .collect();
    let mut snapshot_times: Vec<u64> = input
        .snapshots
        .iter()
        .filter(|s| s.image == image.image)
        .map(|s| s.time_unix_ms)
        .collect();
    snapshot_times.sort_unstable();
    let skip = snapshot_times.len().saturating_sub(RPO_POINTS_MAX);
    snapshot_times.drain(..skip);
    let drill = input
        .drills
        .iter()
        .filter(|d| d.image == name)
        .max_by_key(|d| d.when_unix_ms)
        .cloned();
    let holders: Vec<&SiteCopies> = image
        .copies
        .iter()
        .filter(|c| c.site_id != status.site_id && c.chunks > 0 && !unreachable(&c.site_id))
        .collect();
    let rto_full = full_restore(status, &holders, stored_bytes);
    let rto_boot = stand_in_boot(status, &holders, image, stored_bytes, drill.as_ref());
    let policy = input.retention.get(&name);
    let mut report = ImageReport {
        image: name,
        replication_target: image.replication_target,
        newest_snapshot_unix_ms: image.latest_snapshot.as_ref().map(|s| s.time_unix_ms),
        size_bytes: image.latest_snapshot.as_ref().map_or(0, |s| s.size_bytes),
        stored_bytes,
        newest_at_r_unix_ms: newest_at_r,
        rpo_ms,
        schedule: job.map(|j| j.schedule.clone()),
        schedule_period_ms: period,
        rpo_compliance,
        copies: image.copies.clone(),
        sites_with_newest,
        unreachable_holders,
        rto_full,
        rto_boot,
        retention: policy.map_or_else(
            || "none: every snapshot is kept until `cairn forget`".into(),
            policy_words,
        ),
        last_drill: drill,
        snapshot_times_unix_ms: snapshot_times,
        gaps: Vec::new(),
    };
    report.gaps = image_gaps(status, image, &report);
    report
}

/// A full restore after this office is lost: the newest snapshot's stored bytes from
/// the partner sites holding it, at the rates they delivered recently (in parallel,
/// so their rates add up).
fn full_restore(status: &NodeStatus, holders: &[&SiteCopies], stored_bytes: u64) -> Estimate {
    let names: Vec<String> = holders
        .iter()
        .map(|c| status::printable(&c.site_name))
        .collect();
    let rates: Vec<u64> = holders
        .iter()
        .filter_map(|c| {
            status
                .fetch_rates
                .iter()
                .find(|r| r.site_id == c.site_id)
                .map(|r| r.bytes_per_sec)
        })
        .collect();
    let rate: u64 = rates.iter().sum();
    if holders.is_empty() {
        return Estimate {
            ms: None,
            bytes: stored_bytes,
            bytes_per_sec: None,
            sites: names,
            basis: "no partner site holds the newest snapshot: it cannot be restored once this office is lost".into(),
        };
    }
    if rate == 0 {
        return Estimate {
            ms: None,
            bytes: stored_bytes,
            bytes_per_sec: None,
            sites: names.clone(),
            basis: format!(
                "{} to fetch from {}, whose throughput is not measured yet (a restore, export or drill from the mesh measures it)",
                units::bytes(stored_bytes),
                names.join(", ")
            ),
        };
    }
    let ms = stored_bytes.saturating_mul(1000) / rate;
    Estimate {
        ms: Some(ms),
        bytes: stored_bytes,
        bytes_per_sec: Some(rate),
        sites: names.clone(),
        basis: format!(
            "{} to fetch from {} at the {}/s they delivered recently{}",
            units::bytes(stored_bytes),
            names.join(", "),
            units::bytes(rate),
            if rates.len() < holders.len() {
                " (not every holder measured yet)"
            } else {
                ""
            }
        ),
    }
}

/// A stand-in boot from the mesh (`cairn vm start`): a passed boot drill's time when
/// there is one; else the first `BOOT_READ_BYTES_ASSUMED` of the disk at the holders'
/// rate, since what a boot reads is not known until a drill boots it.
fn stand_in_boot(
    status: &NodeStatus,
    holders: &[&SiteCopies],
    image: &status::ImageStatus,
    stored_bytes: u64,
    drill: Option<&DrillSummary>,
) -> Estimate {
    let full = full_restore(status, holders, stored_bytes);
    if let Some(d) = drill.filter(|d| d.passed && d.booted) {
        return Estimate {
            ms: Some(d.took_ms),
            bytes: 0,
            bytes_per_sec: full.bytes_per_sec,
            sites: full.sites,
            basis: format!(
                "the boot drill of {} UTC took that long",
                units::utc(d.when_unix_ms)
            ),
        };
    }
    let size = image.latest_snapshot.as_ref().map_or(0, |s| s.size_bytes);
    // The assumed read, in stored bytes at the image's own ratio of stored to disk size.
    let read = if size == 0 {
        0
    } else {
        let share = BOOT_READ_BYTES_ASSUMED.min(size);
        (u128::from(stored_bytes) * u128::from(share) / u128::from(size)) as u64
    };
    let basis_read = format!(
        "what a boot reads is not known until a drill boots it; estimated as the first {} of the disk ({} stored)",
        units::bytes(BOOT_READ_BYTES_ASSUMED.min(size.max(1))),
        units::bytes(read)
    );
    match full.bytes_per_sec {
        Some(rate) if rate > 0 => Estimate {
            ms: Some(read.saturating_mul(1000) / rate),
            bytes: read,
            bytes_per_sec: Some(rate),
            sites: full.sites.clone(),
            basis: format!(
                "{basis_read}, from {} at {}/s, plus the guest's own boot time",
                full.sites.join(", "),
                units::bytes(rate)
            ),
        },
        _ => Estimate {
            ms: None,
            bytes: read,
            bytes_per_sec: None,
            sites: full.sites,
            basis: format!("{basis_read}; the holders' throughput is not measured yet"),
        },
    }
}

fn image_gaps(
    status: &NodeStatus,
    image: &status::ImageStatus,
    report: &ImageReport,
) -> Vec<String> {
    let name = &report.image;
    let r = report.replication_target;
    let mut gaps = Vec::new();
    if image.latest_snapshot.is_none() {
        gaps.push(format!("{name}: no snapshot yet"));
        return gaps;
    }
    if image.copies.is_empty() && (image.chunks_checking > 0 || !image.chunk_list_complete) {
        gaps.push(format!(
            "{name}: where the newest snapshot's copies are is not known yet"
        ));
    } else if !status.partners.is_empty() && report.sites_with_newest < r {
        gaps.push(format!(
            "{name}: only {} sites hold the newest snapshot{}",
            report.sites_with_newest,
            if report.unreachable_holders.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} held it too and cannot be reached)",
                    report.unreachable_holders.join(", ")
                )
            }
        ));
    }
    match (report.rpo_ms, report.schedule_period_ms) {
        (None, _) => gaps.push(format!("{name}: no snapshot at R sites yet")),
        (Some(rpo), Some(period))
            if rpo > crate::status::snapshot_age_max_ms(period) =>
        {
            gaps.push(format!(
                "{name}: its newest snapshot at R sites is {} old, more than twice its schedule's period ({}, {})",
                status::duration(rpo),
                report.schedule.as_deref().unwrap_or("-"),
                status::duration(period)
            ))
        }
        _ => {}
    }
    if report.schedule.is_none() {
        gaps.push(format!(
            "{name}: no backup job: snapshots are made by hand only"
        ));
    }
    match &report.last_drill {
        None => gaps.push(format!("{name}: no drill recorded")),
        Some(d) if !d.passed => gaps.push(format!(
            "{name}: the last drill ({} UTC) failed: {}",
            units::utc(d.when_unix_ms),
            d.failed.join("; ")
        )),
        Some(d) if status.now_unix_ms.saturating_sub(d.when_unix_ms) > DRILL_AGE_MAX_MS => gaps
            .push(format!(
                "{name}: no drill for {} days",
                status.now_unix_ms.saturating_sub(d.when_unix_ms) / 86_400_000
            )),
        Some(_) => {}
    }
    if report.rto_full.ms.is_none() {
        gaps.push(format!(
            "{name}: the time of a full restore is unknown: {}",
            report.rto_full.basis
        ));
    }
    gaps
}

/// "keep last 7, daily 14, weekly 8, within 30d 0h".
pub fn policy_words(policy: &Policy) -> String {
    let mut parts = Vec::new();
    for (word, count) in [
        ("last", policy.last),
        ("hourly", policy.hourly),
        ("daily", policy.daily),
        ("weekly", policy.weekly),
        ("monthly", policy.monthly),
        ("yearly", policy.yearly),
    ] {
        match count {
            Some(Count::Of(n)) => parts.push(format!("{word} {n}")),
            Some(Count::Unlimited) => parts.push(format!("{word} unlimited")),
            None => {}
        }
    }
    if let Some(ms) = policy.within_ms {
        parts.push(format!("within {}", status::duration(ms)));
    }
    format!("keep {}", parts.join(", "))
}

fn or_dash(ms: Option<u64>) -> String {
    ms.map_or_else(|| "unknown".into(), status::duration)
}

/// The report as text, for a terminal or a mail.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let w = &mut out;
    let line = |w: &mut String, text: String| {
        w.push_str(&text);
        w.push('\n');
    };
    line(
        w,
        format!(
            "Disaster-recovery report for {} ({}), {} UTC",
            status::printable(&report.site_name),
            report.site_id,
            units::utc(report.generated_unix_ms)
        ),
    );
    for image in &report.images {
        line(w, String::new());
        line(w, format!("image {}", image.image));
        line(
            w,
            format!(
                "  RPO        {} ({}){}",
                or_dash(image.rpo_ms),
                image.rpo_compliance,
                match (&image.schedule, image.schedule_period_ms) {
                    (Some(s), Some(p)) => format!(", schedule {s} (every {})", status::duration(p)),
                    _ => String::new(),
                }
            ),
        );
        let copies = image
            .copies
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    status::printable(&c.site_name),
                    units::bytes(c.bytes)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        line(
            w,
            if copies.is_empty() {
                "  copies     not known yet".to_string()
            } else {
                format!(
                    "  copies     {} of {} sites hold the newest snapshot: {copies}",
                    image.sites_with_newest, image.replication_target,
                )
            },
        );
        line(
            w,
            format!(
                "  RTO full   {}: {}",
                or_dash(image.rto_full.ms),
                image.rto_full.basis
            ),
        );
        line(
            w,
            format!(
                "  RTO boot   {}: {}",
                or_dash(image.rto_boot.ms),
                image.rto_boot.basis
            ),
        );
        line(w, format!("  retention  {}", image.retention));
        line(
            w,
            format!(
                "  drill      {}",
                match &image.last_drill {
                    None => "no drill recorded".to_string(),
                    Some(d) => format!(
                        "{} UTC, {}",
                        units::utc(d.when_unix_ms),
                        if d.passed { "passed" } else { "failed" }
                    ),
                }
            ),
        );
    }
    if !report.partners.is_empty() {
        line(w, String::new());
        line(w, "partners".into());
        for p in &report.partners {
            let seen = match p.last_seen_unix_ms {
                None => "never seen".into(),
                Some(t) => format!(
                    "last seen {} ago",
                    status::duration(report.generated_unix_ms.saturating_sub(t))
                ),
            };
            let rate = match p.bytes_per_sec {
                None => "restore throughput not measured".into(),
                Some(r) => format!(
                    "delivered {}/s ({} over {} samples)",
                    units::bytes(r),
                    units::bytes(p.fetched_bytes),
                    p.samples
                ),
            };
            line(
                w,
                format!("  {}: {seen}, {rate}", status::printable(&p.site_name)),
            );
        }
    }
    line(w, String::new());
    if report.gaps.is_empty() {
        line(w, "gaps: none".into());
    } else {
        line(w, "gaps".into());
        for gap in &report.gaps {
            writeln!(w, "  - {}", status::printable(gap)).expect("writing to a String");
        }
    }
    out
}

#[cfg(test)]
mod tests;

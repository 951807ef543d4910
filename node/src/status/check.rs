//! `cairn status --check`: the problems a monitor (Nagios, cron mail) should hear of, one
//! line each, from a `NodeStatus`. The same conditions are Prometheus gauges
//! (prometheus.rs), so both always agree:
//!
//! - a backup job whose last run failed (or was interrupted);
//! - a job whose image's newest snapshot at R sites is older than twice the job's period
//!   (or, with none yet, a node up for longer than that);
//! - an image whose data has been below R for more than `below_target_ms` (1 h), on a
//!   site with partners (without, there is no R to reach);
//! - a partner site not heard from for `partner_unseen_ms` (1 d), or never heard from on
//!   a node up that long.

use std::fmt::Write as _;

use super::{duration, printable, ImageStatus, NodeStatus, PartnerSeen, Table};
use crate::jobs::JobStatus;
use crate::jobs::RunResult;
use crate::units;

/// The thresholds `--check` uses; tests pass shorter ones through hidden flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckLimits {
    pub below_target_ms: u64,
    pub partner_unseen_ms: u64,
}

impl Default for CheckLimits {
    fn default() -> CheckLimits {
        CheckLimits {
            below_target_ms: 3_600_000,
            partner_unseen_ms: 86_400_000,
        }
    }
}

/// How old a job's newest snapshot at R may be before `--check` complains.
pub fn snapshot_age_max_ms(period_ms: u64) -> u64 {
    period_ms.saturating_mul(2)
}

/// How long an image has been below R as of `now`, if it is.
pub fn below_target_for_ms(status: &NodeStatus, image: &super::ImageStatus) -> Option<u64> {
    image
        .below_target_since_unix_ms
        .map(|since| status.now_unix_ms.saturating_sub(since))
}

/// The job's last run failed or was interrupted.
pub fn job_failed(job: &JobStatus) -> bool {
    job.last_run
        .as_ref()
        .is_some_and(|r| r.result != RunResult::Ok)
}

/// The job's newest snapshot at R is older than twice its period (or, with none at R,
/// the node has been up that long).
pub fn job_snapshot_old(status: &NodeStatus, job: &JobStatus) -> bool {
    let age_max_ms = snapshot_age_max_ms(job.period_ms);
    match job.newest_at_r_unix_ms {
        Some(at) => status.now_unix_ms.saturating_sub(at) > age_max_ms,
        None => status.uptime_ms > age_max_ms,
    }
}

/// The images `--check` measures against R: none on a site with no partner, which has
/// no R to reach (as `cairn forget` counts it).
pub fn images_with_r(status: &NodeStatus) -> &[ImageStatus] {
    if status.partners.is_empty() {
        &[]
    } else {
        &status.images
    }
}

pub fn image_below_too_long(
    status: &NodeStatus,
    image: &ImageStatus,
    limits: &CheckLimits,
) -> bool {
    below_target_for_ms(status, image).is_some_and(|ms| ms > limits.below_target_ms)
}

/// Not heard from for the limit, or never on a node up that long.
pub fn partner_unseen(status: &NodeStatus, partner: &PartnerSeen, limits: &CheckLimits) -> bool {
    match partner.last_seen_unix_ms {
        Some(seen) => status.now_unix_ms.saturating_sub(seen) > limits.partner_unseen_ms,
        None => status.uptime_ms > limits.partner_unseen_ms,
    }
}

/// Every problem, one line each; empty when all is well.
pub fn problems(status: &NodeStatus, limits: &CheckLimits) -> Vec<String> {
    let now = status.now_unix_ms;
    let mut lines = Vec::new();
    for job in &status.jobs {
        if let Some(run) = job.last_run.as_ref().filter(|_| job_failed(job)) {
            let how = match run.result {
                RunResult::Interrupted => "was interrupted",
                _ => "failed",
            };
            lines.push(format!(
                "job {}: its last run ({}) {how}: {}",
                job.image,
                units::utc(run.start_unix_ms),
                run.error.as_deref().unwrap_or("no reason recorded")
            ));
        }
        if job_snapshot_old(status, job) {
            lines.push(match job.newest_at_r_unix_ms {
                Some(at) => format!(
                    "job {}: its newest snapshot at R sites is {} old, more than twice its period ({})",
                    job.image,
                    duration(now.saturating_sub(at)),
                    duration(job.period_ms)
                ),
                None => format!(
                    "job {}: no snapshot at R sites yet, {} after the node started (twice its period is {})",
                    job.image,
                    duration(status.uptime_ms),
                    duration(snapshot_age_max_ms(job.period_ms))
                ),
            });
        }
    }
    for image in images_with_r(status) {
        if image_below_too_long(status, image, limits) {
            lines.push(format!(
                "image {}: below R ({} sites) for {}: {} of copies missing",
                image.image,
                image.replication_target,
                duration(below_target_for_ms(status, image).unwrap_or(0)),
                units::bytes(
                    image
                        .copy_bytes_target
                        .saturating_sub(image.copy_bytes_done)
                )
            ));
        }
    }
    for partner in &status.partners {
        if !partner_unseen(status, partner, limits) {
            continue;
        }
        let name = printable(&partner.site_name);
        lines.push(match partner.last_seen_unix_ms {
            Some(seen) => format!(
                "partner {name:?}: not seen for {} (last {})",
                duration(now.saturating_sub(seen)),
                units::utc(seen)
            ),
            None => format!(
                "partner {name:?}: never seen, {} after the node started",
                duration(status.uptime_ms)
            ),
        });
    }
    lines
}

/// The jobs table of `cairn status`.
pub fn render_jobs(status: &NodeStatus, out: &mut String) {
    let now = status.now_unix_ms;
    let ago = |t: u64| format!("{} ago", duration(now.saturating_sub(t)));
    let mut table = Table::new(&[
        ("JOB", false),
        ("SCHEDULE", false),
        ("LAST RUN", false),
        ("RESULT", false),
        ("BYTES", true),
        ("TOOK", true),
        ("NEXT RUN", false),
        ("AT R", false),
    ]);
    for job in &status.jobs {
        let (last, result, bytes, took) = match &job.last_run {
            None => ("never".into(), "-".into(), "-".into(), "-".into()),
            Some(run) => (
                ago(run.start_unix_ms),
                match run.result {
                    RunResult::Ok => "ok".to_string(),
                    RunResult::Failed => format!("failed ({} in a row)", job.failures_in_a_row),
                    RunResult::Interrupted => "interrupted".to_string(),
                },
                units::bytes(run.bytes),
                duration(run.duration_ms),
            ),
        };
        let next = match (job.running_since_unix_ms, job.next_run_unix_ms) {
            (Some(since), _) => format!("running since {}", ago(since)),
            (None, Some(next)) if next <= now => "now".into(),
            (None, Some(next)) => format!("in {}", duration(next - now)),
            (None, None) => "-".into(),
        };
        let at_r = job
            .newest_at_r_unix_ms
            .map_or_else(|| "none yet".into(), ago);
        table.row(vec![
            job.image.clone(),
            job.schedule.clone(),
            last,
            result,
            bytes,
            took,
            next,
            at_r,
        ]);
    }
    table.render(out);
    for job in &status.jobs {
        if let Some(error) = job.last_run.as_ref().and_then(|r| r.error.as_deref()) {
            writeln!(out, "  {}: {}", job.image, printable(error))
                .expect("writing to a String cannot fail");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::jobs::RunRecord;
    use cairn_protocol::identity::{NodeId, SiteId};
    use cairn_protocol::ImageName;

    const NOW: u64 = 1_800_000_000_000;
    const HOUR: u64 = 3_600_000;

    pub(crate) fn healthy() -> NodeStatus {
        let mut status: NodeStatus = serde_json::from_value(serde_json::json!({
            "version": 1,
            "node_id": NodeId([1; 32]).to_string(),
            "site_id": SiteId([2; 32]).to_string(),
            "site_name": "office",
            "listen_addresses": [],
            "now_unix_ms": NOW,
            "uptime_ms": 100 * HOUR,
            "chunks_own": 0,
            "chunks_for_partners": 0,
            "held_for_partners": [],
            "upload_limit_bytes_per_sec": null,
            "download_limit_bytes_per_sec": null,
            "images": [],
            "peers": [],
        }))
        .unwrap();
        status.jobs.push(JobStatus {
            image: "fs".into(),
            schedule: "daily 02:00".into(),
            period_ms: 24 * HOUR,
            last_run: Some(RunRecord {
                start_unix_ms: NOW - HOUR,
                duration_ms: 1000,
                result: RunResult::Ok,
                bytes: 1,
                new_bytes: 1,
                snapshot: Some("abc".into()),
                forgotten: 0,
                error: None,
                hooks: Vec::new(),
            }),
            running_since_unix_ms: None,
            next_run_unix_ms: Some(NOW + HOUR),
            runs: 1,
            failures: 0,
            failures_in_a_row: 0,
            last_success_unix_ms: Some(NOW - HOUR),
            newest_at_r_unix_ms: Some(NOW - HOUR),
        });
        status.images.push(ImageStatus {
            image: ImageName::new("fs").unwrap(),
            latest_snapshot: None,
            replication_target: 2,
            chunks: 10,
            chunks_at_target: 10,
            under_replicated_bytes: 0,
            copies: Vec::new(),
            chunk_list_complete: true,
            chunks_checking: 0,
            copy_bytes_target: 100,
            copy_bytes_done: 100,
            rate_bytes_per_sec: None,
            eta_ms: None,
            waiting_for: None,
            copies_acknowledged_unix_ms: None,
            below_target_since_unix_ms: None,
        });
        status.partners.push(PartnerSeen {
            site_id: SiteId([3; 32]),
            site_name: "Office B".into(),
            last_seen_unix_ms: Some(NOW - HOUR),
        });
        status
    }

    #[test]
    fn a_healthy_node_has_no_problem() {
        assert_eq!(
            problems(&healthy(), &CheckLimits::default()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_condition_is_one_line() {
        let limits = CheckLimits::default();
        let mut s = healthy();
        let run = s.jobs[0].last_run.as_mut().unwrap();
        run.result = RunResult::Failed;
        run.error = Some("the before hook exited with status 1".into());
        let lines = problems(&s, &limits);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("job fs: its last run ("),
            "{}",
            lines[0]
        );
        assert!(lines[0].ends_with("failed: the before hook exited with status 1"));

        let mut s = healthy();
        s.jobs[0].newest_at_r_unix_ms = Some(NOW - 49 * HOUR);
        let lines = problems(&s, &limits);
        assert_eq!(lines, ["job fs: its newest snapshot at R sites is 2d 1h old, more than twice its period (1d 0h)"]);
        s.jobs[0].newest_at_r_unix_ms = Some(NOW - 47 * HOUR);
        assert!(problems(&s, &limits).is_empty());
        s.jobs[0].newest_at_r_unix_ms = None;
        assert_eq!(problems(&s, &limits).len(), 1, "none at R after 100 h up");
        s.uptime_ms = HOUR;
        assert!(problems(&s, &limits).is_empty(), "just started");

        let mut s = healthy();
        s.images[0].below_target_since_unix_ms = Some(NOW - 61 * 60_000);
        s.images[0].copy_bytes_done = 40;
        let lines = problems(&s, &limits);
        assert_eq!(
            lines,
            ["image fs: below R (2 sites) for 1h 1m: 60 B of copies missing"]
        );
        s.images[0].below_target_since_unix_ms = Some(NOW - 59 * 60_000);
        assert!(problems(&s, &limits).is_empty());

        let mut s = healthy();
        s.partners[0].last_seen_unix_ms = Some(NOW - 25 * HOUR);
        let lines = problems(&s, &limits);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("partner \"Office B\": not seen for 1d 1h"),
            "{}",
            lines[0]
        );
        s.partners[0].last_seen_unix_ms = None;
        assert_eq!(
            problems(&s, &limits),
            ["partner \"Office B\": never seen, 4d 4h after the node started"]
        );
    }
}

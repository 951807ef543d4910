//! `NodeStatus` in the Prometheus text exposition format, version 0.0.4.
//!
//! Metrics (gauges unless named `_total`; `node` is the short node id, `site` a site name;
//! per-site series carry `site_id` too, since two partners may share a name and Prometheus
//! refuses a scrape with a repeated series):
//!
//! ```text
//! cairn_node_info{node,node_id,site,site_id}           1
//! cairn_uptime_seconds
//! cairn_chunks_held{owner="own"|"partners"}
//! cairn_partner_held_bytes{site,site_id}, cairn_partner_held_chunks{site,site_id}
//! cairn_rate_limit_bytes_per_second{direction="upload"|"download"}   +Inf when unlimited
//! cairn_image_latest_snapshot_timestamp_seconds{image}, cairn_image_size_bytes{image}
//! cairn_image_replication_target{image}                R
//! cairn_image_chunks{image}, cairn_image_chunks_at_target{image}
//! cairn_image_under_replicated_bytes{image}
//! cairn_image_copy_bytes{image,site,site_id}, cairn_image_copy_chunks{image,site,site_id}
//! cairn_peer_state{node,site,state="live"|"suspect"|"dead"}   1 for the current state
//! cairn_peer_last_seen_timestamp_seconds{node,site}, cairn_peer_rtt_seconds{node,site}
//! cairn_peer_sent_bytes_total{node,site}, cairn_peer_received_bytes_total{node,site}
//! cairn_job_last_run_success{image}                    1 ok, 0 failed or interrupted
//! cairn_job_last_run_{timestamp,duration}_seconds{image}, cairn_job_last_run_bytes{image}
//! cairn_job_next_run_timestamp_seconds{image}, cairn_job_period_seconds{image}
//! cairn_job_newest_at_r_timestamp_seconds{image}
//! cairn_job_runs_total{image}, cairn_job_failures_total{image}
//! cairn_job_snapshot_too_old{image}                    1 past twice the period
//! cairn_image_below_target_seconds{image}              0 at R
//! cairn_partner_last_seen_timestamp_seconds{site,site_id}
//! cairn_check_problems                                 lines `status --check` prints
//! ```

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use super::{short_node_id, ImageStatus, NodeStatus, PeerState, PeerStatus};
use crate::jobs::{JobStatus, RunResult};

/// A label value escaped for the exposition format: backslash, double quote, newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Milliseconds as exact decimal seconds: "1234.567".
fn seconds_from_ms(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// Writes metric families: each one's HELP and TYPE once, then its samples, never
/// interleaved with another family (which the format forbids).
struct Exposition {
    out: String,
    families: BTreeSet<&'static str>,
    current: &'static str,
}

impl Exposition {
    fn family(&mut self, name: &'static str, kind: &str, help: &str) {
        assert!(is_metric_name(name) && name.starts_with("cairn_"), "{name}");
        assert!(self.families.insert(name), "{name} written twice");
        assert!(!help.contains(['\n', '\\']), "help needs no escaping");
        assert!(kind != "counter" || name.ends_with("_total"), "{name}");
        self.current = name;
        writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}")
            .expect("writing to a String cannot fail");
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: impl fmt::Display) {
        self.out.push_str(self.current);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(name, value)| {
                    debug_assert!(is_metric_name(name) && !name.contains(':'), "{name}");
                    format!("{name}=\"{}\"", escape_label(value))
                })
                .collect();
            write!(self.out, "{{{}}}", labels.join(",")).expect("writing to a String");
        }
        writeln!(self.out, " {value}").expect("writing to a String cannot fail");
    }
}

/// The Prometheus text exposition format (version 0.0.4) of `status`.
pub fn render_prometheus(status: &NodeStatus) -> String {
    let mut ex = Exposition {
        out: String::new(),
        families: BTreeSet::new(),
        current: "",
    };
    let node = short_node_id(&status.node_id);
    let (node_id, site_id) = (status.node_id.to_string(), status.site_id.to_string());
    ex.family(
        "cairn_node_info",
        "gauge",
        "This node and its site; always 1.",
    );
    ex.sample(
        &[
            ("node", &node),
            ("node_id", &node_id),
            ("site", &status.site_name),
            ("site_id", &site_id),
        ],
        1,
    );
    ex.family(
        "cairn_uptime_seconds",
        "gauge",
        "Time since the node started.",
    );
    ex.sample(&[], seconds_from_ms(status.uptime_ms));
    ex.family(
        "cairn_chunks_held",
        "gauge",
        "Chunks in this node's store: this site's own, and partners'.",
    );
    ex.sample(&[("owner", "own")], status.chunks_own);
    ex.sample(&[("owner", "partners")], status.chunks_for_partners);
    ex.family(
        "cairn_partner_held_bytes",
        "gauge",
        "Sealed bytes this node stores for a partner site.",
    );
    for partner in &status.held_for_partners {
        let site_id = partner.site_id.to_string();
        ex.sample(
            &[("site", &partner.site_name), ("site_id", &site_id)],
            partner.bytes,
        );
    }
    ex.family(
        "cairn_partner_held_chunks",
        "gauge",
        "Chunks this node stores for a partner site.",
    );
    for partner in &status.held_for_partners {
        let site_id = partner.site_id.to_string();
        ex.sample(
            &[("site", &partner.site_name), ("site_id", &site_id)],
            partner.chunks,
        );
    }
    ex.family(
        "cairn_rate_limit_bytes_per_second",
        "gauge",
        "Transfer limit in force now, by the schedule; +Inf when unlimited.",
    );
    for (direction, rate) in [
        ("upload", status.upload_limit_bytes_per_sec),
        ("download", status.download_limit_bytes_per_sec),
    ] {
        let rate = rate
            .filter(|r| *r > 0)
            .map_or("+Inf".into(), |r| r.to_string());
        ex.sample(&[("direction", direction)], rate);
    }
    prometheus_images(status, &mut ex);
    prometheus_peers(status, &mut ex);
    prometheus_jobs(status, &mut ex);
    ex.out
}

/// Backup jobs, partners' last contact, and `status --check`'s conditions (with its
/// default thresholds), so an alert rule and `--check` always agree.
fn prometheus_jobs(status: &NodeStatus, ex: &mut Exposition) {
    use super::check::{self, CheckLimits};
    let limits = CheckLimits::default();
    type Field = fn(&NodeStatus, &JobStatus) -> Option<String>;
    let ms = |t: Option<u64>| t.map(seconds_from_ms);
    let per_job: [(&'static str, &str, &str, Field); 10] = [
        ("cairn_job_last_run_success", "gauge", "1 when the job's last run succeeded, 0 when it failed or was interrupted.",
            |_, j| j.last_run.as_ref().map(|r| u8::from(r.result == RunResult::Ok).to_string())),
        ("cairn_job_last_run_timestamp_seconds", "gauge", "When the job's last run started.",
            |_, j| j.last_run.as_ref().map(|r| seconds_from_ms(r.start_unix_ms))),
        ("cairn_job_last_run_duration_seconds", "gauge", "How long the job's last run took.",
            |_, j| j.last_run.as_ref().map(|r| seconds_from_ms(r.duration_ms))),
        ("cairn_job_last_run_bytes", "gauge", "Size of the image the job's last run backed up (0 without a snapshot).",
            |_, j| j.last_run.as_ref().map(|r| r.bytes.to_string())),
        ("cairn_job_next_run_timestamp_seconds", "gauge", "When the job runs next (absent while it runs).",
            |_, j| j.next_run_unix_ms.map(seconds_from_ms)),
        ("cairn_job_period_seconds", "gauge", "The longest wait between two scheduled runs of the job.",
            |_, j| Some(seconds_from_ms(j.period_ms))),
        ("cairn_job_newest_at_r_timestamp_seconds", "gauge", "Time of the job's image's newest snapshot at R sites.",
            |_, j| j.newest_at_r_unix_ms.map(seconds_from_ms)),
        ("cairn_job_runs_total", "counter", "Runs of the job, kept over restarts.",
            |_, j| Some(j.runs.to_string())),
        ("cairn_job_failures_total", "counter", "Failed or interrupted runs of the job, kept over restarts.",
            |_, j| Some(j.failures.to_string())),
        ("cairn_job_snapshot_too_old", "gauge", "1 when the newest snapshot at R is older than twice the job's period (status --check).",
            |s, j| Some(u8::from(check::job_snapshot_old(s, j)).to_string())),
    ];
    for (name, kind, help, field) in per_job {
        ex.family(name, kind, help);
        for job in &status.jobs {
            if let Some(value) = field(status, job) {
                ex.sample(&[("image", &job.image)], value);
            }
        }
    }
    ex.family(
        "cairn_image_below_target_seconds",
        "gauge",
        "How long the image's data has been below R (0 at R); only on a site with partners.",
    );
    for image in check::images_with_r(status) {
        let below = check::below_target_for_ms(status, image).unwrap_or(0);
        ex.sample(&[("image", image.image.as_str())], seconds_from_ms(below));
    }
    ex.family(
        "cairn_partner_last_seen_timestamp_seconds",
        "gauge",
        "When this node last heard from any node of a partner site (absent: never).",
    );
    for partner in &status.partners {
        if let Some(value) = ms(partner.last_seen_unix_ms) {
            let site_id = partner.site_id.to_string();
            ex.sample(
                &[("site", &partner.site_name), ("site_id", &site_id)],
                value,
            );
        }
    }
    ex.family(
        "cairn_check_problems",
        "gauge",
        "Lines `cairn status --check` prints with its default thresholds (0: healthy).",
    );
    ex.sample(&[], check::problems(status, &limits).len());
}

fn prometheus_images(status: &NodeStatus, ex: &mut Exposition) {
    type Field = fn(&ImageStatus) -> Option<String>;
    let per_image: [(&'static str, &str, Field); 6] = [
        (
            "cairn_image_latest_snapshot_timestamp_seconds",
            "Time of the image's latest snapshot.",
            |i| {
                i.latest_snapshot
                    .as_ref()
                    .map(|s| seconds_from_ms(s.time_unix_ms))
            },
        ),
        (
            "cairn_image_size_bytes",
            "Size of the image's latest snapshot.",
            |i| i.latest_snapshot.as_ref().map(|s| s.size_bytes.to_string()),
        ),
        (
            "cairn_image_replication_target",
            "R: how many distinct sites should hold each chunk.",
            |i| Some(i.replication_target.to_string()),
        ),
        (
            "cairn_image_chunks",
            "Distinct chunks the image's kept snapshots use.",
            |i| Some(i.chunks.to_string()),
        ),
        (
            "cairn_image_chunks_at_target",
            "Chunks of the image held at R sites or more.",
            |i| Some(i.chunks_at_target.to_string()),
        ),
        (
            "cairn_image_under_replicated_bytes",
            "Sealed bytes of the image's chunks held at fewer than R sites.",
            |i| Some(i.under_replicated_bytes.to_string()),
        ),
    ];
    for (name, help, field) in per_image {
        ex.family(name, "gauge", help);
        for image in &status.images {
            if let Some(value) = field(image) {
                ex.sample(&[("image", image.image.as_str())], value);
            }
        }
    }
    ex.family(
        "cairn_image_copy_bytes",
        "gauge",
        "Sealed bytes of the image's chunks a site holds.",
    );
    for image in &status.images {
        for copy in &image.copies {
            let site_id = copy.site_id.to_string();
            let labels = [
                ("image", image.image.as_str()),
                ("site", &copy.site_name),
                ("site_id", &site_id),
            ];
            ex.sample(&labels, copy.bytes);
        }
    }
    ex.family(
        "cairn_image_copy_chunks",
        "gauge",
        "Chunks of the image a site holds.",
    );
    for image in &status.images {
        for copy in &image.copies {
            let site_id = copy.site_id.to_string();
            let labels = [
                ("image", image.image.as_str()),
                ("site", &copy.site_name),
                ("site_id", &site_id),
            ];
            ex.sample(&labels, copy.chunks);
        }
    }
}

fn prometheus_peers(status: &NodeStatus, ex: &mut Exposition) {
    let peers: Vec<(String, &PeerStatus)> = status
        .peers
        .iter()
        .map(|peer| (short_node_id(&peer.node_id), peer))
        .collect();
    ex.family(
        "cairn_peer_state",
        "gauge",
        "1 for the peer's state as this node sees it, 0 for the others.",
    );
    for (node, peer) in &peers {
        for state in PeerState::ALL {
            let labels = [
                ("node", node.as_str()),
                ("site", &peer.site_name),
                ("state", state.as_str()),
            ];
            ex.sample(&labels, u8::from(peer.state == state));
        }
    }
    type Field = fn(&PeerStatus) -> Option<String>;
    let per_peer: [(&'static str, &str, &str, Field); 4] = [
        (
            "cairn_peer_last_seen_timestamp_seconds",
            "gauge",
            "When this node last heard from the peer.",
            |p| p.last_seen_unix_ms.map(seconds_from_ms),
        ),
        (
            "cairn_peer_rtt_seconds",
            "gauge",
            "Round-trip time to the peer.",
            |p| {
                p.rtt_us
                    .map(|us| format!("{}.{:06}", us / 1_000_000, us % 1_000_000))
            },
        ),
        (
            "cairn_peer_sent_bytes_total",
            "counter",
            "Bytes sent to the peer since this node started.",
            |p| Some(p.sent_bytes.to_string()),
        ),
        (
            "cairn_peer_received_bytes_total",
            "counter",
            "Bytes received from the peer since this node started.",
            |p| Some(p.received_bytes.to_string()),
        ),
    ];
    for (name, kind, help, field) in per_peer {
        ex.family(name, kind, help);
        for (node, peer) in &peers {
            if let Some(value) = field(peer) {
                ex.sample(&[("node", node.as_str()), ("site", &peer.site_name)], value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::{node, sample, site, GIB};
    use std::collections::BTreeMap;

    /// A sample line of the exposition format, parsed strictly.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("bad name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(mut inner) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = inner.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (label, after) = inner.split_once("=\"").ok_or("label without =\"")?;
                if !is_metric_name(label) {
                    return Err(format!("bad label name {label:?}"));
                }
                let mut value = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next().ok_or("unterminated value")? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => return Err(format!("bad escape \\{other}")),
                        },
                        (_, '\n') => return Err("raw newline in a label".into()),
                        (_, c) => value.push(c),
                    }
                };
                if labels.insert(label.to_owned(), value).is_some() {
                    return Err(format!("label {label} twice"));
                }
                inner = &after[end + 1..];
                if let Some(next) = inner.strip_prefix(',') {
                    inner = next;
                } else if !inner.starts_with('}') {
                    return Err("expected , or } after a label".into());
                }
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| format!("bad value {other:?}"))?,
        };
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    /// Checks what Prometheus checks: HELP and TYPE before a family's samples, families
    /// contiguous and not repeated, counters named _total, label values escaped.
    fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
        if !text.ends_with('\n') {
            return Err("no final newline".into());
        }
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = BTreeSet::new();
        let mut current = String::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, _) = help.split_once(' ').ok_or("HELP without text")?;
                if !helped.insert(name.to_owned()) {
                    return Err(format!("HELP for {name} twice"));
                }
                current = name.to_owned();
            } else if let Some(kind) = line.strip_prefix("# TYPE ") {
                let (name, kind) = kind.split_once(' ').ok_or("TYPE without a type")?;
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                    return Err(format!("bad type {kind}"));
                }
                if name != current || typed.insert(name.to_owned(), kind.to_owned()).is_some() {
                    return Err(format!("TYPE for {name} out of place"));
                }
            } else if line.starts_with('#') || line.is_empty() {
                return Err(format!("unexpected line {line:?}"));
            } else {
                let sample = parse_sample(line).map_err(|e| format!("{line:?}: {e}"))?;
                if sample.name != current || !typed.contains_key(&sample.name) {
                    return Err(format!("{} outside its family", sample.name));
                }
                if typed[&sample.name] == "counter" && !sample.name.ends_with("_total") {
                    return Err(format!("counter {} not named _total", sample.name));
                }
                samples.push(sample);
            }
        }
        Ok(samples)
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels.len() == s.labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert_eq!(matching.len(), 1, "{name} {labels:?}: {matching:?}");
        matching[0].value
    }

    #[test]
    fn jobs_and_the_check_conditions_are_metrics() {
        let mut status = crate::status::check::tests::healthy();
        let text = render_prometheus(&status);
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let fs = [("image", "fs")];
        assert_eq!(value(&samples, "cairn_check_problems", &[]), 0.0);
        assert_eq!(value(&samples, "cairn_job_last_run_success", &fs), 1.0);
        assert_eq!(value(&samples, "cairn_job_period_seconds", &fs), 86_400.0);
        assert_eq!(value(&samples, "cairn_job_snapshot_too_old", &fs), 0.0);
        assert_eq!(
            value(&samples, "cairn_image_below_target_seconds", &fs),
            0.0
        );
        let run = status.jobs[0].last_run.as_mut().unwrap();
        run.result = crate::jobs::RunResult::Failed;
        status.jobs[0].newest_at_r_unix_ms = Some(status.now_unix_ms - 3 * 86_400_000);
        status.images[0].below_target_since_unix_ms = Some(status.now_unix_ms - 7_200_000);
        let text = render_prometheus(&status);
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(value(&samples, "cairn_check_problems", &[]), 3.0);
        assert_eq!(value(&samples, "cairn_job_last_run_success", &fs), 0.0);
        assert_eq!(value(&samples, "cairn_job_snapshot_too_old", &fs), 1.0);
        assert_eq!(
            value(&samples, "cairn_image_below_target_seconds", &fs),
            7_200.0
        );
    }

    #[test]
    fn prometheus_text_is_valid_and_carries_the_numbers() {
        let status = sample();
        let text = render_prometheus(&status);
        let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(samples.iter().all(|s| s.name.starts_with("cairn_")));
        let harbour = "Harbour \"Annex\"";
        let (p2, p3) = (short_node_id(&node(2)), short_node_id(&node(3)));
        assert_eq!(
            value(
                &samples,
                "cairn_node_info",
                &[
                    ("node", &short_node_id(&node(1))),
                    ("node_id", &node(1).to_string()),
                    ("site", "Main Street"),
                    ("site_id", &site(10).to_string()),
                ]
            ),
            1.0
        );
        assert_eq!(value(&samples, "cairn_uptime_seconds", &[]), 273_900.0);
        assert_eq!(
            value(&samples, "cairn_chunks_held", &[("owner", "own")]),
            120_000.0
        );
        let harbour_id = site(20).to_string();
        assert_eq!(
            value(
                &samples,
                "cairn_partner_held_bytes",
                &[("site", harbour), ("site_id", &harbour_id)]
            ),
            (180 * GIB) as f64
        );
        assert_eq!(
            value(
                &samples,
                "cairn_rate_limit_bytes_per_second",
                &[("direction", "upload")]
            ),
            2_097_152.0
        );
        assert_eq!(
            value(
                &samples,
                "cairn_rate_limit_bytes_per_second",
                &[("direction", "download")]
            ),
            f64::INFINITY
        );
        assert_eq!(
            value(
                &samples,
                "cairn_image_latest_snapshot_timestamp_seconds",
                &[("image", "fileserver")]
            ),
            1_794_996_400.0
        );
        assert_eq!(
            value(
                &samples,
                "cairn_image_chunks_at_target",
                &[("image", "fileserver")]
            ),
            99_999.0
        );
        assert_eq!(
            value(
                &samples,
                "cairn_image_under_replicated_bytes",
                &[("image", "fileserver")]
            ),
            4_194_304.0
        );
        assert_eq!(
            value(
                &samples,
                "cairn_image_copy_bytes",
                &[
                    ("image", "fileserver"),
                    ("site", harbour),
                    ("site_id", &harbour_id)
                ]
            ),
            (399 * GIB) as f64
        );
        // An image without a snapshot has no timestamp rather than a zero one.
        assert!(!samples
            .iter()
            .any(|s| s.name == "cairn_image_size_bytes" && s.labels["image"] == "accounting"));
        assert_eq!(
            value(&samples, "cairn_image_chunks", &[("image", "accounting")]),
            0.0
        );
        // Exactly one state is 1 per peer, and odd site names survive escaping.
        let odd = "Back\\office\nB";
        for (state, expected) in [("live", 0.0), ("suspect", 1.0), ("dead", 0.0)] {
            assert_eq!(
                value(
                    &samples,
                    "cairn_peer_state",
                    &[("node", &p3), ("site", odd), ("state", state)]
                ),
                expected
            );
        }
        assert!(text.contains(r#"site="Back\\office\nB""#), "{text}");
        assert!(text.contains(r#"site="Harbour \"Annex\"""#));
        assert_eq!(
            value(
                &samples,
                "cairn_peer_rtt_seconds",
                &[("node", &p2), ("site", harbour)]
            ),
            0.012345
        );
        assert_eq!(
            value(
                &samples,
                "cairn_peer_sent_bytes_total",
                &[("node", &p2), ("site", harbour)]
            ),
            (399 * GIB) as f64
        );
        assert_eq!(
            value(
                &samples,
                "cairn_peer_received_bytes_total",
                &[("node", &p2), ("site", harbour)]
            ),
            1536.0
        );
        assert_eq!(
            value(
                &samples,
                "cairn_peer_last_seen_timestamp_seconds",
                &[("node", &p2), ("site", harbour)]
            ),
            1_794_999_998.0
        );
        // A peer never seen or measured has no such samples.
        let p4 = short_node_id(&node(4));
        assert!(!samples
            .iter()
            .any(|s| s.name == "cairn_peer_rtt_seconds" && s.labels["node"] == p4));
        assert!(text.contains("# TYPE cairn_peer_sent_bytes_total counter\n"));
    }

    #[test]
    fn the_checker_catches_broken_exposition() {
        for bad in [
            "cairn_x 1\n",
            "# HELP cairn_x x\n# TYPE cairn_x gauge\ncairn_x{a=\"1\" 1\n",
            "# HELP cairn_x x\n# TYPE cairn_x gauge\ncairn_x{a=\"\\q\"} 1\n",
            "# HELP cairn_x x\n# TYPE cairn_x counter\ncairn_x 1\n",
            "# HELP cairn_x x\n# TYPE cairn_x gauge\ncairn_x 1\n# HELP cairn_y y\n# TYPE cairn_y gauge\ncairn_x 2\n",
            "# HELP cairn_x x\n# TYPE cairn_x gauge\ncairn_x one\n",
        ] {
            assert!(parse_exposition(bad).is_err(), "{bad:?} passed");
        }
        let good = "# HELP cairn_x x\n# TYPE cairn_x gauge\ncairn_x{a=\"1\",b=\"\\\"\"} 1\n";
        let samples = parse_exposition(good).unwrap();
        assert_eq!(samples[0].labels["b"], "\"");
    }
}

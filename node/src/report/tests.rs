use super::*;
use crate::status::{FetchRate, PartnerSeen};
use cairn_protocol::identity::SiteId;
use cairn_protocol::{ImageName, SnapshotId};

const NOW: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;
const MIB: u64 = 1 << 20;

fn site(n: u8) -> SiteId {
    SiteId([n; 32])
}

/// Office (this site), North and West: accounting's newest snapshot is at the office and
/// North only; West was last heard from 3 days ago; North delivered 8 MiB/s.
fn office() -> NodeStatus {
    let mut status: NodeStatus = serde_json::from_value(serde_json::json!({
        "version": 1,
        "node_id": cairn_protocol::identity::NodeId([1; 32]).to_string(),
        "site_id": site(1).to_string(),
        "site_name": "Office",
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
    let copies = |n: u8, name: &str, chunks: u64| SiteCopies {
        site_id: site(n),
        site_name: name.into(),
        chunks,
        bytes: chunks * MIB,
    };
    status.images.push(status::ImageStatus {
        image: ImageName::new("accounting").unwrap(),
        latest_snapshot: Some(status::SnapshotSummary {
            id: SnapshotId([7; 16]),
            time_unix_ms: NOW - 2 * HOUR,
            size_bytes: 1024 * MIB,
        }),
        replication_target: 3,
        chunks: 512,
        chunks_at_target: 0,
        under_replicated_bytes: 512 * MIB,
        copies: vec![
            copies(1, "Office", 512),
            copies(2, "North", 512),
            copies(3, "West", 100),
        ],
        chunk_list_complete: true,
        chunks_checking: 0,
        copy_bytes_target: 3 * 512 * MIB,
        copy_bytes_done: 1124 * MIB,
        rate_bytes_per_sec: None,
        eta_ms: None,
        waiting_for: None,
        copies_acknowledged_unix_ms: None,
        below_target_since_unix_ms: None,
    });
    status.partners = vec![
        PartnerSeen {
            site_id: site(2),
            site_name: "North".into(),
            last_seen_unix_ms: Some(NOW - 1_000),
        },
        PartnerSeen {
            site_id: site(3),
            site_name: "West".into(),
            last_seen_unix_ms: Some(NOW - 72 * HOUR),
        },
    ];
    status.fetch_rates = vec![FetchRate {
        site_id: site(2),
        site_name: "North".into(),
        bytes: 64 * MIB,
        busy_ms: 8_000,
        samples: 2,
        bytes_per_sec: 8 * MIB,
        last_unix_ms: NOW - HOUR,
    }];
    status
}

fn report_of(status: &NodeStatus, newest_at_r: &[(&str, u64)], drills: &[DrillSummary]) -> Report {
    let newest: BTreeMap<String, u64> = newest_at_r
        .iter()
        .map(|(i, t)| (i.to_string(), *t))
        .collect();
    let mut retention = BTreeMap::new();
    retention.insert(
        "accounting".to_string(),
        Policy {
            last: Some(Count::Of(7)),
            daily: Some(Count::Of(14)),
            ..Policy::default()
        },
    );
    let snapshots: Vec<SnapshotRecord> = (0..3)
        .map(|n| SnapshotRecord {
            id: SnapshotId([n; 16]),
            image: ImageName::new("accounting").unwrap(),
            time_unix_ms: NOW - (26 - n as u64 * 12) * HOUR,
            size_bytes: 1024 * MIB,
            root: cairn_protocol::ChunkId([0; 32]),
        })
        .collect();
    build(&Input {
        status,
        node_running: true,
        snapshots: &snapshots,
        newest_at_r: &newest,
        retention: &retention,
        drills,
        limits: CheckLimits::default(),
    })
}

#[test]
fn gaps_are_named_in_the_issues_words() {
    let report = report_of(&office(), &[("accounting", NOW - 26 * HOUR)], &[]);
    assert_eq!(
        report.gaps,
        [
            "accounting: only 2 sites hold the newest snapshot",
            "accounting: no backup job: snapshots are made by hand only",
            "accounting: no drill recorded",
            "partner West unseen for 3d 0h",
        ]
    );
    let image = &report.images[0];
    assert_eq!(image.rpo_ms, Some(26 * HOUR));
    assert_eq!(image.rpo_compliance, "no schedule");
    assert_eq!(image.retention, "keep last 7, daily 14");
    assert_eq!(image.snapshot_times_unix_ms.len(), 3);
    // A drill 40 days old, then a failed one.
    let drill = |days: u64, passed: bool| DrillSummary {
        image: "accounting".into(),
        snapshot: "abc".into(),
        when_unix_ms: NOW - days * 24 * HOUR,
        took_ms: 40_000,
        passed,
        booted: true,
        failed: if passed {
            vec![]
        } else {
            vec!["ext4 on partition 1: bad superblock".into()]
        },
        screenshot: None,
    };
    let report = report_of(&office(), &[("accounting", NOW - HOUR)], &[drill(40, true)]);
    assert!(
        report
            .gaps
            .contains(&"accounting: no drill for 40 days".to_string()),
        "{:?}",
        report.gaps
    );
    let report = report_of(&office(), &[], &[drill(40, true), drill(1, false)]);
    assert!(
        report
            .gaps
            .iter()
            .any(|g| g.starts_with("accounting: the last drill (")
                && g.ends_with("failed: ext4 on partition 1: bad superblock")),
        "{:?}",
        report.gaps
    );
    assert!(report
        .gaps
        .contains(&"accounting: no snapshot at R sites yet".to_string()));
}

#[test]
fn the_full_restore_is_the_stored_bytes_over_the_holders_measured_rate() {
    let report = report_of(&office(), &[("accounting", NOW - HOUR)], &[]);
    let full = &report.images[0].rto_full;
    // 512 MiB stored, from North (8 MiB/s) and West (not measured): 64 s.
    assert_eq!(full.bytes, 512 * MIB);
    assert_eq!(full.bytes_per_sec, Some(8 * MIB));
    assert_eq!(full.ms, Some(64_000));
    assert_eq!(full.sites, ["North", "West"]);
    assert!(
        full.basis.contains("not every holder measured yet"),
        "{}",
        full.basis
    );
    // The boot: the first 256 MiB of a 1 GiB disk that stores as 512 MiB: 128 MiB, 16 s.
    let boot = &report.images[0].rto_boot;
    assert_eq!(boot.bytes, 128 * MIB);
    assert_eq!(boot.ms, Some(16_000));
    assert!(boot
        .basis
        .starts_with("what a boot reads is not known until a drill boots it"));
    // Nothing measured: no figure, and a gap that says why.
    let mut status = office();
    status.fetch_rates.clear();
    let report = report_of(&status, &[("accounting", NOW - HOUR)], &[]);
    assert_eq!(report.images[0].rto_full.ms, None);
    assert!(report.gaps.iter().any(|g| g.starts_with("accounting: the time of a full restore is unknown: 512.0 MiB to fetch from North, West, whose throughput is not measured yet")), "{:?}", report.gaps);
}

#[test]
fn the_rpo_is_weighed_against_the_jobs_period() {
    let mut status = office();
    let job: crate::jobs::JobStatus = serde_json::from_value(serde_json::json!({
        "image": "accounting", "schedule": "daily 02:00", "period_ms": 24 * HOUR,
        "last_run": null, "running_since_unix_ms": null, "next_run_unix_ms": null,
        "runs": 0, "failures": 0, "failures_in_a_row": 0, "last_success_unix_ms": null,
        "newest_at_r_unix_ms": null,
    }))
    .unwrap();
    status.jobs.push(job);
    for (age_h, words) in [
        (20, "compliant"),
        (30, "exceeded"),
        (60, "severely exceeded"),
        (100, "critically exceeded"),
    ] {
        let report = report_of(&status, &[("accounting", NOW - age_h * HOUR)], &[]);
        assert_eq!(report.images[0].rpo_compliance, words, "{age_h} h");
        let too_old = report
            .gaps
            .iter()
            .any(|g| g.contains("more than twice its schedule's period (daily 02:00, 1d 0h)"));
        assert_eq!(too_old, age_h > 48, "{age_h} h: {:?}", report.gaps);
    }
}

#[test]
fn the_text_and_the_html_name_rpo_rto_and_gaps_and_the_html_fetches_nothing() {
    let report = report_of(&office(), &[("accounting", NOW - 26 * HOUR)], &[]);
    let text = render_text(&report);
    for needle in [
        "image accounting",
        "  RPO        1d 2h (no schedule)",
        "  RTO full   1m 4s: 512.0 MiB to fetch from North, West at the 8.0 MiB/s",
        "  - partner West unseen for 3d 0h",
        "North: last seen 1s ago, delivered 8.0 MiB/s (64.0 MiB over 2 samples)",
    ] {
        assert!(text.contains(needle), "{needle:?} in:\n{text}");
    }
    let page = html::render(&report).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert_eq!(
        page.matches("<svg").count(),
        2,
        "an RPO plot and a throughput plot"
    );
    assert!(page.contains("partner West unseen for 3d 0h"));
    assert!(page.contains("RTO, full restore"));
    for fetch in ["src=\"http", "href=\"http", "<link", "<script", "url("] {
        assert!(!page.contains(fetch), "{fetch} in the page");
    }
    // Names from certificates cannot inject markup.
    let mut status = office();
    status.partners[1].site_name = "<b>West</b>".into();
    let page = html::render(&report_of(&status, &[], &[])).unwrap();
    assert!(!page.contains("<b>West"), "escaped");
    assert!(page.contains("&lt;b&gt;West"));
}

#[test]
fn a_holder_whose_nodes_are_all_dead_is_no_copy_and_no_source() {
    let mut status = office();
    // West holds all of it now; North's only node is declared dead.
    status.images[0].copies[2].chunks = 512;
    status.images[0].copies[2].bytes = 512 * MIB;
    let peer = |n: u8, state| status::PeerStatus {
        node_id: cairn_protocol::identity::NodeId([n; 32]),
        site_id: site(n),
        site_name: String::new(),
        state,
        last_seen_unix_ms: None,
        rtt_us: None,
        sent_bytes: 0,
        received_bytes: 0,
    };
    status.peers = vec![
        peer(2, status::PeerState::Live),
        peer(3, status::PeerState::Live),
    ];
    let report = report_of(&status, &[("accounting", NOW - HOUR)], &[]);
    assert_eq!(report.images[0].sites_with_newest, 3);
    assert!(
        !report.gaps.iter().any(|g| g.contains("sites hold")),
        "{:?}",
        report.gaps
    );
    status.peers[0].state = status::PeerState::Dead;
    let report = report_of(&status, &[("accounting", NOW - HOUR)], &[]);
    let image = &report.images[0];
    assert_eq!(image.sites_with_newest, 2);
    assert_eq!(image.unreachable_holders, ["North"]);
    assert_eq!(
        report.gaps[0],
        "accounting: only 2 sites hold the newest snapshot (North held it too and cannot be reached)"
    );
    // North measured 8 MiB/s but cannot send now: the full restore has no figure.
    assert_eq!(image.rto_full.sites, ["West"]);
    assert_eq!(image.rto_full.ms, None);
}

//! Which snapshots of one image a retention policy keeps: restic's `forget` rules, as a
//! pure function. The caller (the node) converts each snapshot's UTC time into the civil
//! time of the machine's zone; nothing here reads a clock or a zone, so every node of a
//! site that runs the same policy over the same records reaches the same answer.
//!
//! The rules (docs/retention.md, 2.1):
//! - snapshots are walked newest first by `(time, id)`, both descending;
//! - `last N` keeps the first N;
//! - each bucket rule (hourly, daily, weekly, monthly, yearly) with count N keeps the
//!   newest snapshot of each of the last N buckets that have snapshots; empty buckets do
//!   not count;
//! - `within D` keeps every snapshot newer than the newest acknowledged snapshot's time
//!   minus D (restic counts from the newest snapshot; an unacknowledged one is kept
//!   anyway, so it must not move the window);
//! - a snapshot not yet acknowledged at R sites is kept and takes no rule's slot, so
//!   `last 1` never forgets the only restorable snapshot while a new one uploads;
//! - a snapshot is kept when any rule keeps it.

use std::cmp::Reverse;
use std::fmt;

use crate::ids::SnapshotId;

/// How many buckets (or snapshots, for `last`) a rule keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Of(u32),
    Unlimited,
}

impl Count {
    fn allows(self, used: u32) -> bool {
        match self {
            Count::Of(n) => used < n,
            Count::Unlimited => true,
        }
    }
}

/// A retention policy. Every field absent means the policy keeps nothing by rule, which
/// [`decide`] refuses: a policy that forgets everything is a typing mistake.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: Option<Count>,
    pub hourly: Option<Count>,
    pub daily: Option<Count>,
    pub weekly: Option<Count>,
    pub monthly: Option<Count>,
    pub yearly: Option<Count>,
    /// Keep every snapshot at most this many milliseconds older than the newest one.
    pub within_ms: Option<u64>,
}

impl Policy {
    /// True when no rule would keep anything.
    pub fn is_empty(&self) -> bool {
        let counts = [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ];
        counts
            .iter()
            .all(|c| matches!(c, None | Some(Count::Of(0))))
            && matches!(self.within_ms, None | Some(0))
    }
}

/// A civil (wall-clock) time in the zone the policy's buckets are read in, to the hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Civil {
    year: i32,
    month: u8,
    day: u8,
    hour: u8,
}

impl Civil {
    /// None when the fields do not name a real hour of the proleptic Gregorian calendar.
    pub fn new(year: i32, month: u8, day: u8, hour: u8) -> Option<Civil> {
        let valid =
            (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month) && hour < 24;
        valid.then_some(Civil {
            year,
            month,
            day,
            hour,
        })
    }

    /// The ISO 8601 week-numbering year and week (1 to 53) of this date.
    pub fn iso_week(&self) -> (i32, u8) {
        let ordinal = day_of_year(self.year, self.month, self.day) as i64;
        let weekday = weekday(self.year, self.month, self.day) as i64; // 1 = Monday
        let week = (ordinal - weekday + 10) / 7;
        if week < 1 {
            (self.year - 1, iso_weeks_in(self.year - 1))
        } else if week > iso_weeks_in(self.year) as i64 {
            (self.year + 1, 1)
        } else {
            (self.year, week as u8)
        }
    }
}

/// One snapshot of the image, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: SnapshotId,
    pub time_unix_ms: u64,
    pub civil: Civil,
    /// Acknowledged at R sites. An unacknowledged snapshot is always kept.
    pub acknowledged: bool,
}

/// Why a snapshot is kept. The labels name the bucket, so `--dry-run` can say which day
/// or week a snapshot stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    Last,
    Hourly(Civil),
    Daily(Civil),
    Weekly(i32, u8),
    Monthly(i32, u8),
    Yearly(i32),
    Within(u64),
    NotYetAtR,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Last => write!(f, "last"),
            Reason::Hourly(c) => write!(
                f,
                "hourly {:04}-{:02}-{:02} {:02}h",
                c.year, c.month, c.day, c.hour
            ),
            Reason::Daily(c) => write!(f, "daily {:04}-{:02}-{:02}", c.year, c.month, c.day),
            Reason::Weekly(y, w) => write!(f, "weekly {y:04}-W{w:02}"),
            Reason::Monthly(y, m) => write!(f, "monthly {y:04}-{m:02}"),
            Reason::Yearly(y) => write!(f, "yearly {y:04}"),
            Reason::Within(ms) => write!(f, "within {}", duration_label(*ms)),
            Reason::NotYetAtR => write!(f, "not yet at R sites"),
        }
    }
}

/// The policy's answer for one snapshot. `reasons` is empty exactly when it is forgotten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub id: SnapshotId,
    pub time_unix_ms: u64,
    pub reasons: Vec<Reason>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy keeps nothing: give at least one --keep-* rule, or name one snapshot as IMAGE@SNAPSHOT")]
    Empty,
}

/// Applies `policy` to one image's snapshots. The answer lists every candidate, newest
/// first, whatever order they came in.
pub fn decide(policy: &Policy, candidates: &[Candidate]) -> Result<Vec<Decision>, PolicyError> {
    if policy.is_empty() {
        return Err(PolicyError::Empty);
    }
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by_key(|c| Reverse((c.time_unix_ms, c.id)));
    let mut out: Vec<Decision> = order
        .iter()
        .map(|c| Decision {
            id: c.id,
            time_unix_ms: c.time_unix_ms,
            reasons: if c.acknowledged {
                Vec::new()
            } else {
                vec![Reason::NotYetAtR]
            },
        })
        .collect();

    if let Some(count) = policy.last {
        let mut used = 0;
        for (i, c) in order.iter().enumerate() {
            if c.acknowledged && count.allows(used) {
                out[i].reasons.push(Reason::Last);
                used += 1;
            }
        }
    }
    bucket_rule(&order, &mut out, policy.hourly, |c| Reason::Hourly(c.civil));
    bucket_rule(&order, &mut out, policy.daily, |c| {
        Reason::Daily(Civil { hour: 0, ..c.civil })
    });
    bucket_rule(&order, &mut out, policy.weekly, |c| {
        let (y, w) = c.civil.iso_week();
        Reason::Weekly(y, w)
    });
    bucket_rule(&order, &mut out, policy.monthly, |c| {
        Reason::Monthly(c.civil.year, c.civil.month)
    });
    bucket_rule(&order, &mut out, policy.yearly, |c| {
        Reason::Yearly(c.civil.year)
    });

    // Counted from the newest acknowledged snapshot: one still uploading is kept anyway,
    // and must not push the restorable ones out of the window.
    let newest = order.iter().find(|c| c.acknowledged);
    if let (Some(within), Some(newest)) = (policy.within_ms, newest) {
        let since = newest.time_unix_ms.saturating_sub(within);
        for (i, c) in order.iter().enumerate() {
            if c.acknowledged && c.time_unix_ms > since {
                out[i].reasons.push(Reason::Within(within));
            }
        }
    }
    Ok(out)
}

/// Keeps the newest acknowledged snapshot of each bucket, newest buckets first, until
/// `count` buckets are used. `bucket` returns the reason, which doubles as the bucket's
/// label: two snapshots share a bucket when their reasons are equal.
fn bucket_rule(
    order: &[&Candidate],
    out: &mut [Decision],
    count: Option<Count>,
    bucket: impl Fn(&Candidate) -> Reason,
) {
    let Some(count) = count else { return };
    let mut used = 0;
    let mut previous: Option<Reason> = None;
    for (i, c) in order.iter().enumerate() {
        if !c.acknowledged {
            continue;
        }
        if !count.allows(used) {
            break;
        }
        let label = bucket(c);
        if previous.as_ref() != Some(&label) {
            out[i].reasons.push(label.clone());
            previous = Some(label);
            used += 1;
        }
    }
}

fn duration_label(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    for (unit, name) in UNITS {
        if ms >= unit && ms.is_multiple_of(unit) {
            return format!("{}{name}", ms / unit);
        }
    }
    format!("{ms}ms")
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

fn day_of_year(year: i32, month: u8, day: u8) -> u16 {
    (1..month)
        .map(|m| days_in_month(year, m) as u16)
        .sum::<u16>()
        + day as u16
}

/// Days since 1970-01-01 (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i32, month: u8, day: u8) -> i64 {
    let y = year as i64 - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// ISO weekday, 1 = Monday to 7 = Sunday.
fn weekday(year: i32, month: u8, day: u8) -> u8 {
    // 1970-01-01 was a Thursday (4).
    ((days_from_civil(year, month, day) + 3).rem_euclid(7) + 1) as u8
}

fn iso_weeks_in(year: i32) -> u8 {
    let jan1 = weekday(year, 1, 1);
    if jan1 == 4 || (jan1 == 3 && is_leap(year)) {
        53
    } else {
        52
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    /// A UTC civil time for `ms`, so tests can build candidates from times alone.
    fn utc(ms: u64) -> Civil {
        let days = (ms / DAY) as i64;
        let hour = ((ms % DAY) / HOUR) as u8;
        // civil_from_days (Hinnant).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        Civil::new(year, month, day, hour).unwrap()
    }

    fn snap(n: u8, ms: u64) -> Candidate {
        Candidate {
            id: SnapshotId([n; 16]),
            time_unix_ms: ms,
            civil: utc(ms),
            acknowledged: true,
        }
    }

    fn kept(decisions: &[Decision]) -> Vec<u8> {
        decisions
            .iter()
            .filter(|d| d.keep())
            .map(|d| d.id.0[0])
            .collect()
    }

    /// 2024-05-01 00:00 UTC, a Wednesday.
    const MAY_1: u64 = 1_714_521_600_000;

    #[test]
    fn iso_weeks_match_the_calendar() {
        let week = |y, m, d| Civil::new(y, m, d, 0).unwrap().iso_week();
        assert_eq!(week(2024, 5, 1), (2024, 18));
        assert_eq!(week(2021, 1, 3), (2020, 53)); // Sunday after 2020's week 53
        assert_eq!(week(2021, 1, 4), (2021, 1));
        assert_eq!(week(2019, 12, 30), (2020, 1)); // Monday of 2020's week 1
        assert_eq!(week(2026, 12, 31), (2026, 53));
        assert_eq!(week(2027, 1, 1), (2026, 53));
        assert_eq!(week(2000, 2, 29), (2000, 9));
        assert!(Civil::new(2023, 2, 29, 0).is_none());
        assert!(Civil::new(2024, 13, 1, 0).is_none());
        assert!(Civil::new(2024, 1, 1, 24).is_none());
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_with_snapshots() {
        // Two a day on May 1, 2, 4 (none on the 3rd): daily 3 keeps the evening ones.
        let snaps = [
            snap(1, MAY_1 + 2 * HOUR),
            snap(2, MAY_1 + 20 * HOUR),
            snap(3, MAY_1 + DAY + 2 * HOUR),
            snap(4, MAY_1 + DAY + 20 * HOUR),
            snap(5, MAY_1 + 3 * DAY + 2 * HOUR),
            snap(6, MAY_1 + 3 * DAY + 20 * HOUR),
        ];
        let policy = Policy {
            daily: Some(Count::Of(3)),
            ..Policy::default()
        };
        let out = decide(&policy, &snaps).unwrap();
        assert_eq!(kept(&out), vec![6, 4, 2]);
        assert_eq!(out[0].reasons[0].to_string(), "daily 2024-05-04");
        assert!(out
            .iter()
            .filter(|d| !d.keep())
            .all(|d| d.reasons.is_empty()));
    }

    #[test]
    fn rules_combine_and_each_reason_is_listed() {
        let snaps: Vec<_> = (0..10).map(|i| snap(i as u8, MAY_1 + i * DAY)).collect();
        let policy = Policy {
            last: Some(Count::Of(2)),
            weekly: Some(Count::Of(2)),
            within_ms: Some(3 * DAY),
            ..Policy::default()
        };
        let out = decide(&policy, &snaps).unwrap();
        // Newest (May 10, week 19) is last + weekly + within; May 9 last + within;
        // May 8 within; May 5 is the newest of week 18.
        assert_eq!(kept(&out), vec![9, 8, 7, 4]);
        let labels: Vec<String> = out[0].reasons.iter().map(|r| r.to_string()).collect();
        assert_eq!(labels, ["last", "weekly 2024-W19", "within 3d"]);
        assert_eq!(out[5].reasons, vec![Reason::Weekly(2024, 18)]);
    }

    #[test]
    fn an_unacknowledged_snapshot_is_kept_and_takes_no_slot() {
        let mut snaps = vec![snap(1, MAY_1), snap(2, MAY_1 + HOUR)];
        snaps[1].acknowledged = false;
        let policy = Policy {
            last: Some(Count::Of(1)),
            ..Policy::default()
        };
        let out = decide(&policy, &snaps).unwrap();
        assert_eq!(out[0].reasons, vec![Reason::NotYetAtR]);
        assert_eq!(out[1].reasons, vec![Reason::Last]);
    }

    #[test]
    fn within_counts_from_the_newest_snapshot_not_from_now() {
        let snaps = [
            snap(1, MAY_1),
            snap(2, MAY_1 + 5 * DAY),
            snap(3, MAY_1 + 6 * DAY),
        ];
        let policy = Policy {
            within_ms: Some(2 * DAY),
            ..Policy::default()
        };
        assert_eq!(kept(&decide(&policy, &snaps).unwrap()), vec![3, 2]);
    }

    #[test]
    fn an_empty_policy_is_refused() {
        let zero = Policy {
            daily: Some(Count::Of(0)),
            ..Policy::default()
        };
        assert_eq!(decide(&Policy::default(), &[]), Err(PolicyError::Empty));
        assert_eq!(decide(&zero, &[snap(1, MAY_1)]), Err(PolicyError::Empty));
        // Within 0 keeps nothing either (found by the property test below).
        let within_zero = Policy {
            within_ms: Some(0),
            ..Policy::default()
        };
        assert_eq!(
            decide(&within_zero, &[snap(1, MAY_1)]),
            Err(PolicyError::Empty)
        );
    }

    #[test]
    fn ties_in_time_are_broken_by_id_on_every_node() {
        let a = snap(1, MAY_1);
        let b = snap(2, MAY_1);
        let policy = Policy {
            last: Some(Count::Of(1)),
            ..Policy::default()
        };
        assert_eq!(kept(&decide(&policy, &[a, b]).unwrap()), vec![2]);
        assert_eq!(kept(&decide(&policy, &[b, a]).unwrap()), vec![2]);
    }

    fn count() -> impl Strategy<Value = Option<Count>> {
        prop_oneof![
            Just(None),
            (0u32..6).prop_map(|n| Some(Count::Of(n))),
            Just(Some(Count::Unlimited)),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            (count(), count(), count()),
            (count(), count(), count()),
            proptest::option::of(0u64..40 * DAY),
        )
            .prop_map(
                |((last, hourly, daily), (weekly, monthly, yearly), within_ms)| Policy {
                    last,
                    hourly,
                    daily,
                    weekly,
                    monthly,
                    yearly,
                    within_ms,
                },
            )
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        // Ids are the index, so each candidate is told apart by id alone.
        proptest::collection::vec((0u64..800 * DAY, any::<bool>()), 0..40).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (offset, acked))| Candidate {
                    acknowledged: acked,
                    ..snap(i as u8, MAY_1 + offset)
                })
                .collect()
        })
    }

    proptest! {
        /// Any policy that keeps something keeps the newest acknowledged snapshot and every
        /// unacknowledged one, lists every candidate once, and does not depend on the order
        /// the candidates came in.
        #[test]
        fn the_newest_restorable_snapshot_always_survives(
            policy in policy(), snaps in candidates(), seed in any::<u64>()
        ) {
            prop_assume!(!policy.is_empty());
            let out = decide(&policy, &snaps).unwrap();
            prop_assert_eq!(out.len(), snaps.len());
            let acked = |d: &Decision| snaps.iter().any(|c| c.id == d.id && c.acknowledged);
            if let Some(d) = out.iter().find(|d| acked(d)) {
                prop_assert!(d.keep(), "newest acknowledged snapshot forgotten");
            }
            for c in snaps.iter().filter(|c| !c.acknowledged) {
                prop_assert!(out.iter().any(|d| d.id == c.id && d.keep()));
            }
            let mut shuffled = snaps.clone();
            let n = shuffled.len();
            if n > 1 {
                shuffled.rotate_left((seed % n as u64) as usize);
                shuffled.swap(0, (seed as usize / 7) % n);
            }
            prop_assert_eq!(decide(&policy, &shuffled).unwrap(), out);
        }

        /// A bucket rule with count N keeps at most N snapshots for it, each in its own
        /// bucket, and each the newest acknowledged snapshot of that bucket.
        #[test]
        fn a_bucket_rule_keeps_the_newest_of_at_most_n_buckets(n in 1u32..6, snaps in candidates()) {
            let policy = Policy { daily: Some(Count::Of(n)), ..Policy::default() };
            let out = decide(&policy, &snaps).unwrap();
            let days: Vec<&Reason> = out.iter().flat_map(|d| d.reasons.iter())
                .filter(|r| matches!(r, Reason::Daily(_))).collect();
            prop_assert!(days.len() <= n as usize);
            let mut distinct = days.clone();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), days.len());
            for d in out.iter().filter(|d| d.reasons.iter().any(|r| matches!(r, Reason::Daily(_)))) {
                let day = utc(d.time_unix_ms);
                let newer_same_day = snaps.iter().any(|c| c.acknowledged
                    && (c.civil.year, c.civil.month, c.civil.day) == (day.year, day.month, day.day)
                    && (c.time_unix_ms, c.id) > (d.time_unix_ms, d.id));
                prop_assert!(!newer_same_day);
            }
        }
    }
}

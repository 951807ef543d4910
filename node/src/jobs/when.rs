//! When a backup job runs: the `schedule` key of a `[[backup]]` job in node.toml.
//!
//! ```text
//! "daily 02:00"     every day at 02:00 local time
//! "hourly"          every hour on the hour (local time)
//! "every 6h"        every 6 hours, counted from midnight UTC (00:00, 06:00, ...); also
//!                   "every 90s", "every 30m", "every 2d" (units as `parse_duration_ms`)
//! "0 2 * * 1-5"     cron: minute hour day-of-month month day-of-week, local time
//! ```
//!
//! Cron fields take `*`, `N`, `A-B`, `*/S`, `A-B/S` and comma lists of those; day of week
//! counts Sunday as 0 (7 is Sunday too). As in cron, when both day fields are restricted
//! a day matching either runs. Times are local wall-clock time, as `schedule.rs` uses for
//! bandwidth rules: on the night the clocks go forward, a time that does not exist that
//! night is skipped; when they go back, a time that happens twice runs at its first.

use std::fmt;

use thiserror::Error;

/// Minutes a search for the next scheduled time looks at, at most: enough for a cron
/// that runs on 29 February only, with days skipped whole.
const SEARCH_STEPS_MAX: u32 = 400_000;
/// How far `period_ms` looks ahead for the longest gap of a cron schedule.
const PERIOD_LOOKAHEAD_MS: u64 = 35 * 86_400_000;
const PERIOD_OCCURRENCES_MAX: u32 = 2_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WhenError {
    #[error("{text:?} is not a schedule: {why} (write \"daily 02:00\", \"hourly\", \"every 6h\" or a cron line like \"0 2 * * 1-5\")")]
    Bad { text: String, why: String },
}

/// A parsed `schedule`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum When {
    /// Every `period_ms`, at multiples of it since the Unix epoch.
    Every { period_ms: u64 },
    /// A cron line (also what "daily HH:MM" and "hourly" become).
    Cron(Cron),
}

/// The five cron fields as bit sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    /// Bit 1..=31.
    days_of_month: u32,
    /// Bit 1..=12.
    months: u16,
    /// Bit 0..=6, Sunday 0.
    days_of_week: u8,
    dom_restricted: bool,
    dow_restricted: bool,
}

/// One minute of local time, as cron matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Civil {
    pub minute: u32,
    pub hour: u32,
    /// 1..=31.
    pub day_of_month: u32,
    /// 1..=12.
    pub month: u32,
    /// Sunday 0.
    pub day_of_week: u32,
}

/// This machine's local time at `unix_secs`.
pub fn local_civil(unix_secs: i64) -> Option<Civil> {
    let tm = crate::units::local_tm(u64::try_from(unix_secs).ok()?.saturating_mul(1000))?;
    Some(Civil {
        minute: tm.tm_min as u32,
        hour: tm.tm_hour as u32,
        day_of_month: tm.tm_mday as u32,
        month: tm.tm_mon as u32 + 1,
        day_of_week: tm.tm_wday as u32,
    })
}

impl When {
    pub fn parse(text: &str) -> Result<When, WhenError> {
        let bad = |why: &str| WhenError::Bad {
            text: text.to_owned(),
            why: why.to_owned(),
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["hourly"] => Ok(When::Cron(Cron::parse_fields(&["0", "*", "*", "*", "*"])?)),
            ["daily", time] => {
                let (hour, minute) = time
                    .split_once(':')
                    .and_then(|(h, m)| {
                        let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
                        (h < 24 && m < 60 && time.len() == 5).then_some((h, m))
                    })
                    .ok_or_else(|| bad("the time is not HH:MM between 00:00 and 23:59"))?;
                let (hour, minute) = (hour.to_string(), minute.to_string());
                Ok(When::Cron(Cron::parse_fields(&[
                    &minute, &hour, "*", "*", "*",
                ])?))
            }
            ["every", duration] => {
                let period_ms = crate::units::parse_duration_ms(duration).map_err(|e| bad(&e))?;
                if period_ms % 1000 != 0 {
                    return Err(bad("the period is not whole seconds"));
                }
                Ok(When::Every { period_ms })
            }
            [_, _, _, _, _] => {
                let cron = Cron::parse_fields(&words).map_err(|e| match e {
                    WhenError::Bad { why, .. } => bad(&why),
                })?;
                Ok(When::Cron(cron))
            }
            _ => Err(bad("unknown form")),
        }
    }

    /// The first scheduled time strictly after `after_unix_ms`, by this machine's clock.
    pub fn next_after(&self, after_unix_ms: u64) -> Option<u64> {
        self.next_after_in(after_unix_ms, &local_civil)
    }

    /// `next_after` with `civil` as the clock's time zone (tests pass UTC).
    pub fn next_after_in(
        &self,
        after_unix_ms: u64,
        civil: &dyn Fn(i64) -> Option<Civil>,
    ) -> Option<u64> {
        match self {
            When::Every { period_ms } => Some((after_unix_ms / period_ms + 1) * period_ms),
            When::Cron(cron) => cron.next_after(after_unix_ms, civil),
        }
    }

    /// The longest wait between two runs: the period, or for a cron line the longest gap
    /// in the weeks ahead ("0 2 * * 1-5" waits 3 days from Friday to Monday). What a
    /// snapshot's age is measured against.
    pub fn period_ms(&self, now_unix_ms: u64) -> u64 {
        self.period_ms_in(now_unix_ms, &local_civil)
    }

    pub fn period_ms_in(&self, now_unix_ms: u64, civil: &dyn Fn(i64) -> Option<Civil>) -> u64 {
        match self {
            When::Every { period_ms } => *period_ms,
            When::Cron(cron) => {
                let Some(mut previous) = cron.next_after(now_unix_ms, civil) else {
                    return u64::MAX;
                };
                let mut gap_max = 0;
                for _ in 0..PERIOD_OCCURRENCES_MAX {
                    let Some(next) = cron.next_after(previous, civil) else {
                        break;
                    };
                    gap_max = gap_max.max(next - previous);
                    if next - now_unix_ms > PERIOD_LOOKAHEAD_MS {
                        break;
                    }
                    previous = next;
                }
                gap_max.max(60_000)
            }
        }
    }
}

impl Cron {
    fn parse_fields(fields: &[&str]) -> Result<Cron, WhenError> {
        assert_eq!(fields.len(), 5, "callers pass five fields");
        let bad = |why: String| WhenError::Bad {
            text: fields.join(" "),
            why,
        };
        let names = ["minute", "hour", "day of month", "month", "day of week"];
        let ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
        let mut sets = [0u64; 5];
        for (i, field) in fields.iter().enumerate() {
            sets[i] = parse_field(field, ranges[i])
                .map_err(|why| bad(format!("{} field {field:?}: {why}", names[i])))?;
        }
        // 7 is Sunday as well as 0.
        let days_of_week = (sets[4] | (sets[4] >> 7)) as u8 & 0x7f;
        Ok(Cron {
            minutes: sets[0],
            hours: sets[1] as u32,
            days_of_month: sets[2] as u32,
            months: sets[3] as u16,
            days_of_week,
            dom_restricted: fields[2] != "*",
            dow_restricted: fields[4] != "*",
        })
    }

    fn day_matches(&self, c: &Civil) -> bool {
        let dom = self.days_of_month & (1 << c.day_of_month) != 0;
        let dow = self.days_of_week & (1 << c.day_of_week) != 0;
        match (self.dom_restricted, self.dow_restricted) {
            (true, true) => dom || dow,
            _ => dom && dow,
        }
    }

    /// Walks forward from the minute after `after_unix_ms`, skipping whole days and hours
    /// that cannot match; each step re-reads the local time, so a clock change only
    /// costs more steps.
    fn next_after(&self, after_unix_ms: u64, civil: &dyn Fn(i64) -> Option<Civil>) -> Option<u64> {
        let mut t = i64::try_from(after_unix_ms / 60_000 + 1).ok()? * 60;
        for _ in 0..SEARCH_STEPS_MAX {
            let c = civil(t)?;
            let minute_of_day = i64::from(c.hour * 60 + c.minute);
            if self.months & (1 << c.month) == 0 || !self.day_matches(&c) {
                // To 02:00 before the next midnight, then hour by hour: a day that is
                // 23 hours long never makes the jump overshoot midnight.
                let to_midnight = 24 * 60 - minute_of_day;
                t += if to_midnight > 120 {
                    (to_midnight - 120) * 60
                } else {
                    (60 - i64::from(c.minute)) * 60
                };
            } else if self.hours & (1 << c.hour) == 0 {
                t += (60 - i64::from(c.minute)) * 60;
            } else if self.minutes & (1 << c.minute) == 0 {
                t += 60;
            } else {
                return u64::try_from(t).ok().map(|t| t * 1000);
            }
        }
        None
    }
}

/// One cron field as a bit set of the values in `(low, high)` it names.
fn parse_field(field: &str, (low, high): (u32, u32)) -> Result<u64, String> {
    let mut set = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("step {step:?} is not a number above 0"))?;
                (range, step)
            }
            None => (part, 1),
        };
        let number = |text: &str| -> Result<u32, String> {
            text.parse::<u32>()
                .ok()
                .filter(|n| (low..=high).contains(n))
                .ok_or_else(|| format!("{text:?} is not a number from {low} to {high}"))
        };
        let (from, to) = match range {
            "*" => (low, high),
            _ => match range.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if step > 1 => (number(range)?, high),
                None => (number(range)?, number(range)?),
            },
        };
        if from > to {
            return Err(format!("the range {range:?} runs backwards"));
        }
        let mut value = from;
        while value <= to {
            set |= 1 << value;
            value += step;
        }
    }
    Ok(set)
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            When::Every { period_ms } => write!(f, "every {}s", period_ms / 1000),
            When::Cron(_) => write!(f, "cron"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// UTC as the "local" zone, so the tests hold on any machine.
    pub(crate) fn utc(unix_secs: i64) -> Option<Civil> {
        let days = unix_secs.div_euclid(86_400);
        let secs = unix_secs.rem_euclid(86_400);
        let (_, month, day) = crate::units::civil_from_days(days);
        Some(Civil {
            minute: (secs / 60 % 60) as u32,
            hour: (secs / 3600) as u32,
            day_of_month: day,
            month,
            // 1970-01-01 was a Thursday.
            day_of_week: (days + 4).rem_euclid(7) as u32,
        })
    }

    /// 2026-12-07 (a Monday) 00:00 UTC.
    const MONDAY_MS: u64 = 1_796_601_600_000;
    const HOUR_MS: u64 = 3_600_000;
    const DAY_MS: u64 = 24 * HOUR_MS;

    fn next(text: &str, after: u64) -> u64 {
        When::parse(text)
            .unwrap()
            .next_after_in(after, &utc)
            .unwrap()
    }

    #[test]
    fn the_reference_day_is_a_monday() {
        let c = utc((MONDAY_MS / 1000) as i64).unwrap();
        assert_eq!((c.day_of_week, c.day_of_month, c.month), (1, 7, 12));
    }

    #[test]
    fn daily_runs_at_its_time_today_or_tomorrow() {
        assert_eq!(next("daily 02:00", MONDAY_MS), MONDAY_MS + 2 * HOUR_MS);
        assert_eq!(
            next("daily 02:00", MONDAY_MS + 2 * HOUR_MS),
            MONDAY_MS + DAY_MS + 2 * HOUR_MS,
            "strictly after"
        );
        assert_eq!(
            next("daily 23:59", MONDAY_MS + 5 * HOUR_MS),
            MONDAY_MS + 23 * HOUR_MS + 59 * 60_000
        );
    }

    #[test]
    fn hourly_and_every_are_on_their_boundaries() {
        assert_eq!(next("hourly", MONDAY_MS + 61_000), MONDAY_MS + HOUR_MS);
        assert_eq!(
            next("every 6h", MONDAY_MS + HOUR_MS),
            MONDAY_MS + 6 * HOUR_MS
        );
        assert_eq!(next("every 10s", 1_000_001), 1_010_000);
        assert_eq!(next("every 10s", 1_010_000), 1_020_000);
    }

    #[test]
    fn cron_weekdays_skip_the_weekend() {
        // Friday 03:00 -> Monday 02:00.
        let friday = MONDAY_MS + 4 * DAY_MS;
        assert_eq!(
            next("0 2 * * 1-5", friday + 3 * HOUR_MS),
            MONDAY_MS + 7 * DAY_MS + 2 * HOUR_MS
        );
        assert_eq!(next("0 2 * * 1-5", MONDAY_MS), MONDAY_MS + 2 * HOUR_MS);
        // Sunday as 7 and as 0.
        let sunday = MONDAY_MS + 6 * DAY_MS;
        assert_eq!(
            next("30 4 * * 7", MONDAY_MS),
            sunday + 4 * HOUR_MS + 30 * 60_000
        );
        assert_eq!(
            next("30 4 * * 0", MONDAY_MS),
            sunday + 4 * HOUR_MS + 30 * 60_000
        );
    }

    #[test]
    fn cron_steps_lists_and_either_day_field() {
        assert_eq!(
            next("*/15 * * * *", MONDAY_MS + 60_000),
            MONDAY_MS + 15 * 60_000
        );
        assert_eq!(
            next("5,40 9-10 * * *", MONDAY_MS + 9 * HOUR_MS + 6 * 60_000),
            MONDAY_MS + 9 * HOUR_MS + 40 * 60_000
        );
        // The 1st of the month or a Sunday, whichever comes first: Sunday 13 December.
        assert_eq!(next("0 0 1 * 0", MONDAY_MS), MONDAY_MS + 6 * DAY_MS);
        // 29 February: 2028.
        let leap = next("0 0 29 2 *", MONDAY_MS);
        let c = utc((leap / 1000) as i64).unwrap();
        assert_eq!((c.day_of_month, c.month), (29, 2));
        assert!(leap - MONDAY_MS > 365 * DAY_MS);
    }

    #[test]
    fn a_cron_that_never_matches_has_no_next_time() {
        let never = When::parse("0 0 31 2 *").unwrap();
        assert_eq!(never.next_after_in(MONDAY_MS, &utc), None);
    }

    #[test]
    fn period_is_the_longest_gap() {
        let period = |text: &str| When::parse(text).unwrap().period_ms_in(MONDAY_MS, &utc);
        assert_eq!(period("daily 02:00"), DAY_MS);
        assert_eq!(period("hourly"), HOUR_MS);
        assert_eq!(period("every 10s"), 10_000);
        assert_eq!(period("0 2 * * 1-5"), 3 * DAY_MS);
    }

    #[test]
    fn bad_schedules_are_refused_with_the_reason() {
        for (text, why) in [
            ("daily 2:00", "HH:MM"),
            ("daily 24:00", "HH:MM"),
            ("every 0s", "no time at all"),
            ("every 1500ms", "not a duration"),
            ("weekly", "unknown form"),
            ("60 2 * * *", "minute field"),
            ("0 2 * * 1-8", "day of week field"),
            ("0 5-2 * * *", "backwards"),
            ("*/0 * * * *", "step"),
        ] {
            let e = When::parse(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
            assert!(e.contains(&format!("{text:?}")), "{e}");
        }
    }
}

//! Upload and download limits, with a weekly schedule, so a node backing up over an office
//! link leaves room for the office during working hours.
//!
//! Syntax, the same in the config file and on the command line:
//!
//! ```text
//! --upload-limit 20MiB/s --download-limit 50MiB/s
//! --schedule "Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s"
//! --schedule "Fri 22:00-06:00 upload=unlimited"
//! ```
//!
//! * A limit is a size per second as `units::parse_size` reads it (`2MiB/s`, `500kB/s`;
//!   the `/s` may be left out), or `unlimited`. `0` is refused: it reads as "paused" to
//!   some and "no limit" to others, and a paused direction would silently stop a site's
//!   copies from leaving. Write `unlimited` for no limit; the smallest limit is 1 B/s.
//! * A rule is `[DAYS] [HH:MM-HH:MM] SETTING...`. DAYS is a comma list of days (`Mon`,
//!   `tuesday`) and ranges (`Mon-Fri`, `Fri-Mon` wraps the week), or `daily`, `weekdays`,
//!   `weekends`; without it the rule holds every day. Without a time it holds all day.
//!   Times are local wall-clock time; the start is included, the end is not, and `24:00`
//!   ends at midnight. A range whose end comes before its start crosses midnight: the hours
//!   after midnight belong to the day after each listed day (`Fri 22:00-06:00` is Friday
//!   night into Saturday morning). SETTING is `upload=LIMIT` or `download=LIMIT`.
//! * The plain limits hold outside every rule. Rules are applied in order and a later rule
//!   wins, per direction: a rule that sets only `upload` leaves `download` to the rules
//!   before it.
//!
//! The daemon asks `Limits::at(local_now())` every minute or so and passes the answer to
//! its two `RateLimiter`s with `set_rate`; each transfer first asks its limiter how long to
//! wait with `take`.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use crate::units::parse_size;

pub const MINUTES_PER_DAY: u16 = 24 * 60;
/// A config file or command line with more rules than this is surely a mistake.
pub const RULES_MAX: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("{text:?} is not a rate like 20MiB/s or unlimited: {why}")]
    BadLimit { text: String, why: String },
    #[error("a limit of {text:?} is 0, which cairn refuses: write unlimited for no limit (there is no pause; the smallest limit is 1B/s)")]
    ZeroLimit { text: String },
    #[error("schedule rule {rule:?}: {why} (rules look like \"Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s\")")]
    BadRule { rule: String, why: String },
    #[error("{n_rules} schedule rules is more than the {RULES_MAX} allowed")]
    TooManyRules { n_rules: usize },
}

/// How fast one direction may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Limit {
    #[default]
    Unlimited,
    /// Never zero: the syntax refuses 0.
    BytesPerSec(u64),
}

impl Limit {
    /// `None` for unlimited.
    pub fn bytes_per_sec(self) -> Option<u64> {
        match self {
            Limit::Unlimited => None,
            Limit::BytesPerSec(rate) => {
                assert!(rate > 0, "a zero limit is refused when parsed");
                Some(rate)
            }
        }
    }
}

impl FromStr for Limit {
    type Err = ScheduleError;
    fn from_str(text: &str) -> Result<Limit, ScheduleError> {
        let bad = |why: &str| ScheduleError::BadLimit {
            text: text.to_owned(),
            why: why.to_owned(),
        };
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("unlimited") {
            return Ok(Limit::Unlimited);
        }
        let size = match trimmed.len().checked_sub(2) {
            Some(cut)
                if trimmed.is_char_boundary(cut) && trimmed[cut..].eq_ignore_ascii_case("/s") =>
            {
                &trimmed[..cut]
            }
            _ => trimmed,
        };
        if size.contains('/') {
            return Err(bad("give bytes per second, ending in /s"));
        }
        let rate = parse_size(size).map_err(|why| bad(&why))?;
        if rate == 0 && size.contains(|c: char| ('1'..='9').contains(&c)) {
            return Err(bad("below 1 B/s; write unlimited for no limit"));
        }
        if rate == 0 {
            return Err(ScheduleError::ZeroLimit {
                text: text.to_owned(),
            });
        }
        Ok(Limit::BytesPerSec(rate))
    }
}

impl fmt::Display for Limit {
    /// The shortest exact form, so that it parses back to the same limit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 10] = [
            (1 << 50, "PiB"),
            (1_000_000_000_000_000, "PB"),
            (1 << 40, "TiB"),
            (1_000_000_000_000, "TB"),
            (1 << 30, "GiB"),
            (1_000_000_000, "GB"),
            (1 << 20, "MiB"),
            (1_000_000, "MB"),
            (1 << 10, "KiB"),
            (1_000, "kB"),
        ];
        let Some(rate) = self.bytes_per_sec() else {
            return f.write_str("unlimited");
        };
        match UNITS.iter().find(|(unit, _)| rate % unit == 0) {
            Some((unit, name)) => write!(f, "{}{name}/s", rate / unit),
            None => write!(f, "{rate}B/s"),
        }
    }
}

/// Both directions' limits at one moment, as `Limits::at` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RateLimits {
    pub upload: Limit,
    pub download: Limit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub const ALL: [Weekday; 7] = [
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
        Weekday::Sun,
    ];

    /// Monday is 0.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_index(index: usize) -> Weekday {
        Weekday::ALL[index % 7]
    }

    pub fn previous(self) -> Weekday {
        Weekday::from_index(self.index() + 6)
    }

    fn name(self) -> &'static str {
        ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][self.index()]
    }

    fn parse(word: &str) -> Option<Weekday> {
        const FULL: [&str; 7] = [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ];
        let word = word.to_ascii_lowercase();
        FULL.iter()
            .position(|full| word == *full || word == full[..3])
            .map(Weekday::from_index)
    }
}

/// One `--schedule` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Bit `Weekday::index()` set for each day the rule starts on.
    days_mask: u8,
    start_minute: u16,
    /// Exclusive; 1440 for midnight. Below `start_minute` when the range crosses midnight.
    end_minute: u16,
    upload: Option<Limit>,
    download: Option<Limit>,
}

impl Rule {
    /// True when the rule holds at `minute_of_day` (local time) on `weekday`.
    pub fn covers(&self, weekday: Weekday, minute_of_day: u16) -> bool {
        assert!(minute_of_day < MINUTES_PER_DAY);
        let on = |day: Weekday| self.days_mask & (1 << day.index()) != 0;
        if self.start_minute < self.end_minute {
            on(weekday) && (self.start_minute..self.end_minute).contains(&minute_of_day)
        } else {
            (on(weekday) && minute_of_day >= self.start_minute)
                || (on(weekday.previous()) && minute_of_day < self.end_minute)
        }
    }

    fn parse(text: &str) -> Result<Rule, String> {
        let mut words = text.split_whitespace().peekable();
        let mut rule = Rule {
            days_mask: 0x7f,
            start_minute: 0,
            end_minute: MINUTES_PER_DAY,
            upload: None,
            download: None,
        };
        let is_setting = |word: &str| word.contains('=');
        let is_time = |word: &str| word.starts_with(|c: char| c.is_ascii_digit());
        if let Some(word) = words.next_if(|w| !is_setting(w) && !is_time(w)) {
            rule.days_mask = parse_days(word)?;
        }
        if let Some(word) = words.next_if(|w| !is_setting(w)) {
            (rule.start_minute, rule.end_minute) = parse_time_range(word)?;
        }
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(format!(
                    "unexpected {word:?}: give days, then a time range, then settings"
                ));
            };
            let slot = match key.to_ascii_lowercase().as_str() {
                "upload" => &mut rule.upload,
                "download" => &mut rule.download,
                _ => return Err(format!("unknown setting {key:?}: use upload= or download=")),
            };
            if slot.is_some() {
                return Err(format!("{key} is set twice"));
            }
            *slot = Some(value.parse().map_err(|e: ScheduleError| e.to_string())?);
        }
        if rule.upload.is_none() && rule.download.is_none() {
            return Err("sets nothing: add upload=LIMIT or download=LIMIT".into());
        }
        Ok(rule)
    }
}

fn parse_days(word: &str) -> Result<u8, String> {
    match word.to_ascii_lowercase().as_str() {
        "daily" => return Ok(0x7f),
        "weekdays" => return Ok(0x1f),
        "weekends" => return Ok(0x60),
        _ => {}
    }
    let day = |name: &str| {
        Weekday::parse(name).ok_or_else(|| {
            format!("unknown day {name:?}: use Mon .. Sun, ranges like Mon-Fri, or daily")
        })
    };
    let mut mask = 0u8;
    for item in word.split(',') {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (day(first)?, day(last)?),
            None => (day(item)?, day(item)?),
        };
        let n_days = (last.index() + 7 - first.index()) % 7 + 1;
        for offset in 0..n_days {
            mask |= 1 << Weekday::from_index(first.index() + offset).index();
        }
    }
    Ok(mask)
}

fn parse_time_range(word: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{word:?} is not a time range like 08:00-18:00");
    let (start, end) = word.split_once('-').ok_or_else(bad)?;
    let minute = |time: &str| -> Result<u16, String> {
        let (hours, minutes) = time.split_once(':').ok_or_else(bad)?;
        let two_digits = |part: &str| part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit());
        if !two_digits(hours) || !two_digits(minutes) {
            return Err(bad());
        }
        let (hours, minutes): (u16, u16) = (
            hours.parse().map_err(|_| bad())?,
            minutes.parse().map_err(|_| bad())?,
        );
        if minutes > 59 || hours * 60 + minutes > MINUTES_PER_DAY {
            return Err(format!("{time:?} is not a time of day (00:00 to 24:00)"));
        }
        Ok(hours * 60 + minutes)
    };
    let (start, end) = (minute(start)?, minute(end)?);
    if start == MINUTES_PER_DAY {
        return Err(format!("{word:?} starts at 24:00: start at 00:00 instead"));
    }
    if start == end {
        return Err(format!(
            "{word:?} is empty: use 00:00-24:00, or no time, for the whole day"
        ));
    }
    Ok((start, end))
}

impl FromStr for Rule {
    type Err = ScheduleError;
    fn from_str(text: &str) -> Result<Rule, ScheduleError> {
        Rule::parse(text).map_err(|why| ScheduleError::BadRule {
            rule: text.to_owned(),
            why,
        })
    }
}

impl fmt::Display for Rule {
    /// A canonical form that parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.days_mask != 0x7f {
            parts.push(days_text(self.days_mask));
        }
        if (self.start_minute, self.end_minute) != (0, MINUTES_PER_DAY) {
            let hhmm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
            parts.push(format!(
                "{}-{}",
                hhmm(self.start_minute),
                hhmm(self.end_minute)
            ));
        }
        if let Some(limit) = self.upload {
            parts.push(format!("upload={limit}"));
        }
        if let Some(limit) = self.download {
            parts.push(format!("download={limit}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// Runs of consecutive days as ranges, Monday first: "Mon-Wed,Fri".
fn days_text(mask: u8) -> String {
    let on = |index: usize| mask & (1 << index) != 0;
    let mut items = Vec::new();
    let mut index = 0;
    while index < 7 {
        if !on(index) {
            index += 1;
            continue;
        }
        let first = index;
        while index + 1 < 7 && on(index + 1) {
            index += 1;
        }
        let (first, last) = (Weekday::from_index(first), Weekday::from_index(index));
        items.push(if first == last {
            first.name().to_owned()
        } else {
            format!("{}-{}", first.name(), last.name())
        });
        index += 1;
    }
    items.join(",")
}

/// A node's limits: the plain ones and the schedule over them. In a config file (JSON) it
/// reads `{"upload_limit": "20MiB/s", "download_limit": "unlimited", "schedule": [RULE..]}`,
/// every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default)]
    pub upload_limit: Limit,
    #[serde(default)]
    pub download_limit: Limit,
    #[serde(default)]
    pub schedule: Vec<Rule>,
}

impl Limits {
    /// Builds limits from the command line's or config file's strings.
    pub fn parse(
        upload_limit: Option<&str>,
        download_limit: Option<&str>,
        schedule: &[&str],
    ) -> Result<Limits, ScheduleError> {
        if schedule.len() > RULES_MAX {
            return Err(ScheduleError::TooManyRules {
                n_rules: schedule.len(),
            });
        }
        Ok(Limits {
            upload_limit: upload_limit
                .map(str::parse)
                .transpose()?
                .unwrap_or_default(),
            download_limit: download_limit
                .map(str::parse)
                .transpose()?
                .unwrap_or_default(),
            schedule: schedule
                .iter()
                .map(|rule| rule.parse())
                .collect::<Result<_, _>>()?,
        })
    }

    /// The limits in force at `minute_of_day` (local time, 0..1440) on `weekday`.
    pub fn at(&self, weekday: Weekday, minute_of_day: u16) -> RateLimits {
        let mut limits = RateLimits {
            upload: self.upload_limit,
            download: self.download_limit,
        };
        for rule in self
            .schedule
            .iter()
            .filter(|r| r.covers(weekday, minute_of_day))
        {
            limits.upload = rule.upload.unwrap_or(limits.upload);
            limits.download = rule.download.unwrap_or(limits.download);
        }
        limits
    }

    /// The limits in force now, by this machine's local time.
    pub fn now(&self) -> RateLimits {
        let (weekday, minute_of_day) = local_now();
        self.at(weekday, minute_of_day)
    }
}

/// Local weekday and minute of the day, by the machine's time zone (`localtime_r`). Falls
/// back to UTC if the C library cannot convert the time.
pub fn local_now() -> (Weekday, u16) {
    let now_ms = crate::units::now_unix_ms();
    let now_secs = now_ms / 1000;
    let Some(tm) = crate::units::local_tm(now_ms) else {
        let days = now_secs / 86_400;
        // 1970-01-01 was a Thursday.
        let weekday = Weekday::from_index((days + 3) as usize % 7);
        return (weekday, (now_secs % 86_400 / 60) as u16);
    };
    // tm_wday counts from Sunday = 0.
    let weekday = Weekday::from_index((tm.tm_wday as usize + 6) % 7);
    // A leap second can make tm_sec 60, never the minute past 23:59.
    let minute_of_day = (tm.tm_hour as u16 * 60 + tm.tm_min as u16).min(MINUTES_PER_DAY - 1);
    (weekday, minute_of_day)
}

macro_rules! serde_as_text {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(Limit);
serde_as_text!(Rule);

/// A token bucket: `bytes_per_sec` on average, up to `burst_bytes` at once after a pause.
/// A take larger than what the bucket holds still goes through, leaving a debt that later
/// takes wait for, so one big transfer is neither refused nor allowed to jump the queue.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    limit: Limit,
    burst_bytes: u64,
    /// In nanobytes (bytes x 1e9) so refills are exact integers; negative is debt.
    tokens_nano: i128,
    refilled_at: Instant,
}

const NANOS_PER_SEC: i128 = 1_000_000_000;

impl RateLimiter {
    /// Starts full. `burst_bytes` must be positive; a few hundred milliseconds of the rate,
    /// and at least one transfer unit, works well.
    pub fn new(limit: Limit, burst_bytes: u64, now: Instant) -> RateLimiter {
        assert!(
            burst_bytes > 0,
            "a token bucket needs room for at least a byte"
        );
        RateLimiter {
            limit,
            burst_bytes,
            tokens_nano: i128::from(burst_bytes) * NANOS_PER_SEC,
            refilled_at: now,
        }
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Takes `bytes` and answers how long to wait before sending them (zero: send now).
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        let Some(rate) = self.limit.bytes_per_sec() else {
            return Duration::ZERO;
        };
        self.tokens_nano = self
            .tokens_nano
            .saturating_sub(i128::from(bytes) * NANOS_PER_SEC);
        if self.tokens_nano >= 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(rate);
        let wait_ns = self.tokens_nano.saturating_neg().saturating_add(rate - 1) / rate;
        match u64::try_from(wait_ns / NANOS_PER_SEC) {
            Ok(wait_secs) => Duration::new(wait_secs, (wait_ns % NANOS_PER_SEC) as u32),
            Err(_) => Duration::MAX,
        }
    }

    /// Changes the rate from `now` on; what accrued before `now` accrued at the old rate.
    /// Going unlimited forgives any debt and fills the bucket.
    pub fn set_rate(&mut self, limit: Limit, now: Instant) {
        self.refill(now);
        self.limit = limit;
        if limit == Limit::Unlimited {
            self.tokens_nano = self.capacity_nano();
        }
    }

    fn capacity_nano(&self) -> i128 {
        i128::from(self.burst_bytes) * NANOS_PER_SEC
    }

    fn refill(&mut self, now: Instant) {
        let elapsed_ns = now.saturating_duration_since(self.refilled_at).as_nanos();
        self.refilled_at = self.refilled_at.max(now);
        let capacity = self.capacity_nano();
        let Some(rate) = self.limit.bytes_per_sec() else {
            self.tokens_nano = capacity;
            return;
        };
        let rate = i128::from(rate);
        let missing = capacity.saturating_sub(self.tokens_nano);
        // Compare before multiplying: a long pause times a high rate would overflow.
        let fill_ns = missing.saturating_add(rate - 1) / rate;
        let elapsed_ns = i128::try_from(elapsed_ns).unwrap_or(i128::MAX);
        if elapsed_ns >= fill_ns {
            self.tokens_nano = capacity;
        } else {
            self.tokens_nano += rate * elapsed_ns;
        }
        debug_assert!(self.tokens_nano <= capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Weekday::*;

    const MIB: u64 = 1 << 20;

    fn limit(rate: u64) -> Limit {
        Limit::BytesPerSec(rate)
    }

    fn minute(hhmm: &str) -> u16 {
        let (h, m) = hhmm.split_once(':').unwrap();
        h.parse::<u16>().unwrap() * 60 + m.parse::<u16>().unwrap()
    }

    fn office() -> Limits {
        Limits::parse(
            Some("20MiB/s"),
            Some("50MiB/s"),
            &["Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s"],
        )
        .unwrap()
    }

    #[test]
    fn limits_parse_as_people_write_them() {
        assert_eq!("20MiB/s".parse(), Ok(limit(20 * MIB)));
        assert_eq!("20MiB".parse(), Ok(limit(20 * MIB)));
        assert_eq!("500kB/s".parse(), Ok(limit(500_000)));
        assert_eq!("1.5 MB/S".parse(), Ok(limit(1_500_000)));
        assert_eq!(" unlimited ".parse(), Ok(Limit::Unlimited));
        assert_eq!("Unlimited".parse(), Ok(Limit::Unlimited));
        assert_eq!("1B/s".parse(), Ok(limit(1)));
    }

    #[test]
    fn a_zero_limit_is_refused_saying_how_to_write_no_limit() {
        for text in ["0", "0MiB/s", " 0B/s", "0.0kB"] {
            assert_eq!(
                text.parse::<Limit>(),
                Err(ScheduleError::ZeroLimit { text: text.into() })
            );
        }
        let error = "0".parse::<Limit>().unwrap_err().to_string();
        assert_eq!(
            error,
            "a limit of \"0\" is 0, which cairn refuses: write unlimited for no limit (there is no pause; the smallest limit is 1B/s)"
        );
        let rule = "Mon-Fri upload=0".parse::<Rule>().unwrap_err().to_string();
        assert!(rule.contains("write unlimited for no limit"), "{rule}");
        assert!(Limits::parse(Some("0"), None, &[]).is_err());
        assert!(Limits::parse(None, Some("0B/s"), &[]).is_err());
        let config = serde_json::from_str::<Limits>(r#"{"upload_limit": "0"}"#);
        assert!(config.unwrap_err().to_string().contains("write unlimited"));
    }

    #[test]
    fn every_bad_limit_says_what_is_wrong() {
        for (text, why) in [
            ("", "is not a size"),
            ("fast", "is not a size"),
            ("20MiB/h", "ending in /s"),
            ("20/MiB", "ending in /s"),
            ("20XB/s", "unknown unit"),
            ("-1MB/s", "is not a size"),
            ("0.1B/s", "below 1 B/s"),
            ("99999999PiB/s", "too large"),
            ("/s", "is not a size"),
        ] {
            let error = text.parse::<Limit>().unwrap_err().to_string();
            assert!(error.contains(why), "{text:?}: {error}");
            assert!(error.contains("20MiB/s"), "{text:?}: {error}");
        }
    }

    #[test]
    fn office_hours_are_throttled_and_the_rest_is_not() {
        let limits = office();
        let day = RateLimits {
            upload: limit(2 * MIB),
            download: limit(5 * MIB),
        };
        let night = RateLimits {
            upload: limit(20 * MIB),
            download: limit(50 * MIB),
        };
        assert_eq!(limits.at(Mon, minute("08:00")), day);
        assert_eq!(limits.at(Fri, minute("17:59")), day);
        assert_eq!(limits.at(Wed, minute("12:30")), day);
        assert_eq!(limits.at(Mon, minute("07:59")), night);
        assert_eq!(limits.at(Mon, minute("18:00")), night);
        assert_eq!(limits.at(Sat, minute("12:00")), night);
        assert_eq!(limits.at(Sun, minute("09:00")), night);
        assert_eq!(Limits::default().at(Tue, 0), RateLimits::default());
    }

    #[test]
    fn later_rules_win_per_direction() {
        let limits = Limits::parse(
            None,
            Some("10MB/s"),
            &[
                "daily 08:00-18:00 upload=1MB/s download=2MB/s",
                "Fri 12:00-18:00 upload=unlimited",
                "Fri 16:00-17:00 upload=3MB/s",
            ],
        )
        .unwrap();
        let at = |day, hhmm| {
            let l = limits.at(day, minute(hhmm));
            (l.upload, l.download)
        };
        assert_eq!(at(Thu, "13:00"), (limit(1_000_000), limit(2_000_000)));
        // The Friday afternoon rule lifts upload only; download stays with the first rule.
        assert_eq!(at(Fri, "13:00"), (Limit::Unlimited, limit(2_000_000)));
        assert_eq!(at(Fri, "16:30"), (limit(3_000_000), limit(2_000_000)));
        assert_eq!(at(Fri, "19:00"), (Limit::Unlimited, limit(10_000_000)));
        // Order matters: the same rules reversed let the daily one win everywhere.
        let reversed = Limits {
            schedule: limits.schedule.iter().rev().cloned().collect(),
            ..limits.clone()
        };
        let l = reversed.at(Fri, minute("16:30"));
        assert_eq!(l.upload, limit(1_000_000));
    }

    #[test]
    fn ranges_cross_midnight_into_the_next_day() {
        let limits = Limits::parse(None, None, &["Fri 22:00-06:00 upload=1MB/s"]).unwrap();
        let up = |day, hhmm| limits.at(day, minute(hhmm)).upload;
        assert_eq!(up(Fri, "22:00"), limit(1_000_000));
        assert_eq!(up(Fri, "23:59"), limit(1_000_000));
        assert_eq!(up(Sat, "00:00"), limit(1_000_000));
        assert_eq!(up(Sat, "05:59"), limit(1_000_000));
        assert_eq!(up(Sat, "06:00"), Limit::Unlimited);
        assert_eq!(
            up(Fri, "05:00"),
            Limit::Unlimited,
            "Thursday night is not listed"
        );
        assert_eq!(up(Fri, "21:59"), Limit::Unlimited);
        assert_eq!(up(Sat, "22:30"), Limit::Unlimited);

        // Sunday night wraps the week into Monday morning.
        let limits = Limits::parse(None, None, &["Sun 23:00-01:00 download=1MB/s"]).unwrap();
        assert_eq!(limits.at(Mon, minute("00:30")).download, limit(1_000_000));
        assert_eq!(limits.at(Sun, minute("00:30")).download, Limit::Unlimited);

        // Ending at 00:00 is ending at midnight.
        let rule: Rule = "Mon 18:00-00:00 upload=1MB/s".parse().unwrap();
        assert!(rule.covers(Mon, minute("23:59")));
        assert!(!rule.covers(Tue, 0));
    }

    #[test]
    fn days_and_times_have_short_forms() {
        let rule = |text: &str| text.parse::<Rule>().unwrap();
        assert_eq!(rule("upload=1MB/s").days_mask, 0x7f);
        assert_eq!(rule("weekdays upload=1MB/s").days_mask, 0x1f);
        assert_eq!(rule("weekends upload=1MB/s").days_mask, 0x60);
        assert_eq!(rule("Sat,Sun upload=1MB/s").days_mask, 0x60);
        assert_eq!(rule("saturday,SUNDAY upload=1MB/s").days_mask, 0x60);
        assert_eq!(rule("Fri-Mon upload=1MB/s").days_mask, 0b111_0001);
        assert_eq!(rule("Mon,Wed-Thu upload=1MB/s").days_mask, 0b1101);
        let all_day = rule("Tue download=5MiB/s");
        assert!(all_day.covers(Tue, 0) && all_day.covers(Tue, MINUTES_PER_DAY - 1));
        assert!(!all_day.covers(Wed, 0));
        let evening = rule("18:00-24:00 upload=1MB/s");
        assert!(evening.covers(Sun, minute("23:59")) && !evening.covers(Sun, minute("17:59")));
    }

    #[test]
    fn every_bad_rule_says_what_is_wrong() {
        for (text, why) in [
            ("", "sets nothing"),
            ("Mon-Fri 08:00-18:00", "sets nothing"),
            ("Mox 08:00-18:00 upload=1MB/s", "unknown day \"Mox\""),
            ("Mon-Fry upload=1MB/s", "unknown day \"Fry\""),
            ("Mon,,Tue upload=1MB/s", "unknown day \"\""),
            ("8-18 upload=1MB/s", "not a time range"),
            ("08:00 upload=1MB/s", "not a time range"),
            ("8:00-18:00 upload=1MB/s", "not a time range"),
            ("08:00-18:0 upload=1MB/s", "not a time range"),
            ("08:60-18:00 upload=1MB/s", "not a time of day"),
            ("25:00-26:00 upload=1MB/s", "not a time of day"),
            ("08:00-24:01 upload=1MB/s", "not a time of day"),
            ("24:00-06:00 upload=1MB/s", "starts at 24:00"),
            ("08:00-08:00 upload=1MB/s", "is empty"),
            ("Mon upload=1MB/s 08:00-18:00", "unexpected \"08:00-18:00\""),
            ("Mon 08:00-18:00 Tue upload=1MB/s", "unexpected \"Tue\""),
            ("Mon up=1MB/s", "unknown setting \"up\""),
            ("Mon upload=1MB/s upload=2MB/s", "upload is set twice"),
            ("Mon upload=fast", "\"fast\" is not a rate"),
            ("Mon upload=", "\"\" is not a rate"),
        ] {
            let error = text.parse::<Rule>().unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(&error, ScheduleError::BadRule { rule, .. } if rule == text),
                "{text:?}: {error:?}"
            );
            assert!(message.contains(why), "{text:?}: {message}");
            assert!(message.contains("rules look like"), "{text:?}: {message}");
        }
        let too_many = vec!["upload=1MB/s"; RULES_MAX + 1];
        assert_eq!(
            Limits::parse(None, None, &too_many),
            Err(ScheduleError::TooManyRules {
                n_rules: RULES_MAX + 1
            })
        );
        assert!(Limits::parse(Some("fast"), None, &[]).is_err());
        assert!(Limits::parse(None, Some("fast"), &[]).is_err());
    }

    #[test]
    fn rules_print_in_a_form_that_parses_back() {
        for (text, canonical) in [
            (
                "mon-fri 08:00-18:00 upload=2MiB/s download=5MiB/s",
                "Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s",
            ),
            ("daily 00:00-24:00 upload=unlimited", "upload=unlimited"),
            (
                "Fri-Mon 22:30-06:15 download=20MB/s",
                "Mon,Fri-Sun 22:30-06:15 download=20MB/s",
            ),
            ("Wed upload=1000B/s", "Wed upload=1kB/s"),
            ("Wed upload=1001", "Wed upload=1001B/s"),
        ] {
            let rule: Rule = text.parse().unwrap();
            assert_eq!(rule.to_string(), canonical);
            assert_eq!(canonical.parse::<Rule>().unwrap(), rule);
        }
    }

    #[test]
    fn limits_read_from_a_config_file() {
        let json = r#"{"upload_limit": "20MiB/s",
            "schedule": ["Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s"]}"#;
        let limits: Limits = serde_json::from_str(json).unwrap();
        assert_eq!(
            limits,
            Limits {
                download_limit: Limit::Unlimited,
                ..office()
            }
        );
        let back: Limits = serde_json::from_str(&serde_json::to_string(&limits).unwrap()).unwrap();
        assert_eq!(back, limits);
        let error = serde_json::from_str::<Limits>(r#"{"schedule": ["Mon upload=fast"]}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"fast\" is not a rate"), "{error}");
        assert!(serde_json::from_str::<Limits>(r#"{"upload": "1MB/s"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Limits>("{}").unwrap(),
            Limits::default()
        );
    }

    #[test]
    fn limits_work_as_command_line_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[arg(long, default_value = "unlimited")]
            upload_limit: Limit,
            #[arg(long, default_value = "unlimited")]
            download_limit: Limit,
            #[arg(long)]
            schedule: Vec<Rule>,
        }
        let flags = Flags::try_parse_from([
            "cairn",
            "--upload-limit",
            "20MiB/s",
            "--download-limit",
            "50MiB/s",
            "--schedule",
            "Mon-Fri 08:00-18:00 upload=2MiB/s download=5MiB/s",
        ])
        .unwrap();
        let limits = Limits {
            upload_limit: flags.upload_limit,
            download_limit: flags.download_limit,
            schedule: flags.schedule,
        };
        assert_eq!(limits, office());
        let error = Flags::try_parse_from(["cairn", "--schedule", "Mon 8-18 upload=1MB/s"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("\"8-18\" is not a time range"), "{error}");
    }

    #[test]
    fn local_time_is_a_real_time() {
        let (_, minute_of_day) = local_now();
        assert!(minute_of_day < MINUTES_PER_DAY);
        let _ = office().now();
    }

    #[test]
    fn bucket_lets_a_burst_through_then_paces() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut bucket = RateLimiter::new(limit(1000), 1000, t0);
        assert_eq!(bucket.take(1000, t0), Duration::ZERO, "starts full");
        assert_eq!(bucket.take(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid, and the next 500 bytes wait again.
        assert_eq!(bucket.take(500, ms(500)), Duration::from_millis(500));
        // After a long pause the bucket is full, not fuller.
        assert_eq!(bucket.take(1000, ms(60_000)), Duration::ZERO);
        assert_eq!(bucket.take(1, ms(60_000)), Duration::from_millis(1));
        // A take larger than the burst goes through with a wait for the excess.
        let mut bucket = RateLimiter::new(limit(1000), 100, t0);
        assert_eq!(bucket.take(3100, t0), Duration::from_secs(3));
        assert_eq!(bucket.take(0, ms(1000)), Duration::from_secs(2));
        // Time going backwards adds nothing, and does not rewind the clock of the bucket.
        assert_eq!(bucket.take(0, t0), Duration::from_secs(2));
        assert_eq!(bucket.take(0, ms(1500)), Duration::from_millis(1500));
    }

    #[test]
    fn bucket_rate_changes_take_effect_from_now() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut bucket = RateLimiter::new(limit(1000), 1000, t0);
        assert_eq!(bucket.take(2000, t0), Duration::from_secs(1));
        // 500 ms at 1000 B/s pays 500 bytes; the remaining 500 are paid at 100 B/s.
        bucket.set_rate(limit(100), ms(500));
        assert_eq!(bucket.take(0, ms(500)), Duration::from_secs(5));
        bucket.set_rate(Limit::Unlimited, ms(600));
        assert_eq!(bucket.take(u64::MAX, ms(600)), Duration::ZERO);
        bucket.set_rate(limit(1000), ms(600));
        assert_eq!(bucket.limit(), limit(1000));
        assert_eq!(
            bucket.take(1000, ms(600)),
            Duration::ZERO,
            "unlimited left it full"
        );
        assert_eq!(bucket.take(1000, ms(600)), Duration::from_secs(1));
    }

    #[test]
    fn bucket_survives_extreme_numbers() {
        let t0 = Instant::now();
        let mut bucket = RateLimiter::new(limit(u64::MAX), u64::MAX, t0);
        assert_eq!(bucket.take(u64::MAX, t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(1 << 30);
        assert_eq!(bucket.take(u64::MAX, later), Duration::ZERO);
        let mut bucket = RateLimiter::new(limit(1), 1, t0);
        for _ in 0..4 {
            bucket.take(u64::MAX, t0);
        }
        assert_eq!(bucket.take(1, t0), Duration::MAX);
    }

    fn any_limit() -> impl Strategy<Value = Limit> {
        prop_oneof![
            Just(Limit::Unlimited),
            (1u64..1 << 40).prop_map(Limit::BytesPerSec),
            (1u64..1000, 0usize..4).prop_map(|(n, unit)| {
                Limit::BytesPerSec(n * [1 << 10, 1 << 20, 1_000, 1_000_000][unit])
            }),
        ]
    }

    fn any_rule() -> impl Strategy<Value = Rule> {
        (
            1u8..0x80,
            0u16..MINUTES_PER_DAY,
            1u16..=MINUTES_PER_DAY,
            proptest::option::of(any_limit()),
            any_limit(),
            any::<bool>(),
        )
            .prop_filter("empty range", |(_, start, end, ..)| start != end)
            .prop_map(
                |(days_mask, start_minute, end_minute, upload, other, swap)| {
                    let (upload, download) = if swap {
                        (Some(other), upload)
                    } else {
                        (upload, Some(other))
                    };
                    Rule {
                        days_mask,
                        start_minute,
                        end_minute,
                        upload,
                        download,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn limits_and_rules_round_trip_through_text(limit in any_limit(), rule in any_rule()) {
            prop_assert_eq!(limit.to_string().parse::<Limit>(), Ok(limit));
            prop_assert_eq!(rule.to_string().parse::<Rule>(), Ok(rule));
        }

        #[test]
        fn a_rule_covers_exactly_its_minutes_of_the_week(rule in any_rule()) {
            // Count covered minutes over a week: each listed day contributes the range's
            // length, whether or not it crosses midnight.
            let length = if rule.start_minute < rule.end_minute {
                rule.end_minute - rule.start_minute
            } else {
                MINUTES_PER_DAY - rule.start_minute + rule.end_minute
            };
            let n_days = rule.days_mask.count_ones();
            let mut n_covered = 0u32;
            for day in Weekday::ALL {
                for minute in 0..MINUTES_PER_DAY {
                    n_covered += u32::from(rule.covers(day, minute));
                }
            }
            prop_assert_eq!(n_covered, n_days * u32::from(length));
        }

        #[test]
        fn the_last_covering_rule_decides(
            rules in proptest::collection::vec(any_rule(), 0..6),
            day in 0usize..7,
            minute in 0u16..MINUTES_PER_DAY,
        ) {
            let day = Weekday::from_index(day);
            let limits = Limits { upload_limit: limit(7), download_limit: limit(9), schedule: rules.clone() };
            let got = limits.at(day, minute);
            let last = |pick: fn(&Rule) -> Option<Limit>| rules
                .iter()
                .rev()
                .filter(|r| r.covers(day, minute))
                .find_map(pick);
            prop_assert_eq!(got.upload, last(|r| r.upload).unwrap_or(limit(7)));
            prop_assert_eq!(got.download, last(|r| r.download).unwrap_or(limit(9)));
        }

        #[test]
        fn the_bucket_never_lets_more_than_rate_times_time_plus_burst(
            rate in 1u64..1_000_000,
            burst in 1u64..1_000_000,
            takes in proptest::collection::vec((0u64..2_000_000, 0u64..3_000), 1..40),
        ) {
            // A sender that always waits as told: by the time it sends byte n, n must not
            // exceed burst + rate x elapsed.
            let t0 = Instant::now();
            let mut bucket = RateLimiter::new(limit(rate), burst, t0);
            let mut now = t0;
            let mut n_sent: u128 = 0;
            for (bytes, gap_ms) in takes {
                now += Duration::from_millis(gap_ms);
                let wait = bucket.take(bytes, now);
                now += wait;
                n_sent += u128::from(bytes);
                let allowed = u128::from(burst) + u128::from(rate) * (now - t0).as_nanos() / 1_000_000_000;
                prop_assert!(n_sent <= allowed + 1, "sent {} by {:?}, allowed {}", n_sent, now - t0, allowed);
            }
        }
    }
}

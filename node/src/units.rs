//! Sizes, durations, times and errors as people read and type them.

/// 1.5 GiB, 312 MiB, 17 B: binary units, one decimal.
pub fn bytes(n_bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n_bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n_bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A rate in bytes per second, as "812.4 MiB/s".
pub fn rate(n_bytes: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-".into();
    }
    format!("{}/s", bytes((n_bytes as f64 / seconds) as u64))
}

/// UTC time as "2026-11-22 09:14:03".
pub fn utc(time_unix_ms: u64) -> String {
    let secs = time_unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's algorithm.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Parses sizes as people write them: 500GB, 2TiB, 1.5 TB, 4096 (bytes). Decimal units
/// (kB, MB, GB, TB, PB) are powers of 1000, binary ones (KiB .. PiB) powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 500GB or 2TiB"))?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "p" | "pb" => 1e15,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        "pib" => 1024f64.powi(5),
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit (use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let bytes = number * multiplier;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// A quota as `parse_size` reads it, but never 0: a partner given no room is a partner
/// revoked, and `trust revoke` says so in a record the whole mesh honours.
pub fn parse_quota(text: &str) -> Result<u64, String> {
    match parse_size(text)? {
        0 => Err(format!(
            "a quota of {:?} is 0: to stop storing for a partner use `cairn trust revoke`",
            text.trim()
        )),
        quota => Ok(quota),
    }
}

/// The longest duration `parse_duration_ms` takes: anything longer is a typo, and a token
/// that never expires in practice defeats its expiry.
pub const DURATION_MS_MAX: u64 = 100 * 365 * 86_400_000;

/// Parses durations: 7d, 12h, 30m, 90s, 2w; more than zero and at most 100 years.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration like 7d, 12h, 30m or 90s");
    let unit = text.chars().last().ok_or_else(bad)?;
    let number: u64 = text[..text.len() - unit.len_utf8()]
        .trim()
        .parse()
        .map_err(|_| bad())?;
    let unit_ms: u64 = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        'w' => 7 * 86_400_000,
        _ => return Err(bad()),
    };
    match number.checked_mul(unit_ms) {
        Some(0) => Err(format!(
            "{text:?} is no time at all: give a duration like 7d, 12h, 30m or 90s"
        )),
        Some(ms) if ms <= DURATION_MS_MAX => Ok(ms),
        _ => Err(format!(
            "{text:?} is longer than 100 years: give a duration like 7d, 12h, 30m or 90s"
        )),
    }
}

/// An error and its causes on one line, "outer: inner: innermost", as `{:#}` prints an
/// anyhow error. Error messages in cairn never repeat their source, so each cause shows
/// once; use this wherever a typed error becomes text outside the CLI's printer.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    chain_of(std::iter::successors(Some(error), |e| e.source()))
}

/// Joins a chain of errors with ": ", leaving out a cause the line already shows: some
/// libraries' errors (libp2p's transport errors, io wrappers) print their source in their
/// own message and also return it from `source()`, and some print nothing at all.
pub fn chain_of<'a>(errors: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut text = String::new();
    let mut shown = String::new();
    for error in errors {
        let message = error.to_string();
        if message.is_empty() || shown.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
        shown = message;
    }
    text
}

/// `time_unix_ms` broken down in this machine's time zone (`localtime_r`); None when the
/// C library cannot convert it.
pub fn local_tm(time_unix_ms: u64) -> Option<libc::tm> {
    let time = (time_unix_ms / 1000) as libc::time_t;
    // SAFETY: `tm` is plain old data that localtime_r fills in; both pointers are valid
    // for the call, and localtime_r keeps neither.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let converted = unsafe { !libc::localtime_r(&time, &mut tm).is_null() };
    converted.then_some(tm)
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(17), "17 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot listen on 127.0.0.1:9")]
        Listen(#[source] Empty),
    }
    /// Like libp2p's `TransportError::Other`: no text of its own, and a source whose
    /// text repeats its own source's.
    #[derive(Debug, thiserror::Error)]
    #[error("")]
    struct Empty(#[source] Repeats);
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn error_chains_show_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let error = Outer::Listen(Empty(Repeats(io)));
        assert_eq!(
            chain(&error),
            "cannot listen on 127.0.0.1:9: address in use"
        );
    }

    #[test]
    fn sizes_and_durations_parse_as_people_write_them() {
        assert_eq!(parse_size("500GB"), Ok(500_000_000_000));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("1.5 tb"), Ok(1_500_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GB", "12XB", "1..5GB", "-3GB", "99999999999PB"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_duration_ms("7d"), Ok(7 * 86_400_000));
        assert_eq!(parse_duration_ms("12h"), Ok(12 * 3_600_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        for bad in ["", "d", "7", "7y", "-1d", "1.5h"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_duration_ms("36500d"), Ok(DURATION_MS_MAX));
    }

    #[test]
    fn zero_and_absurd_durations_and_zero_quotas_are_refused() {
        for zero in ["0s", "0d", "00w"] {
            assert_eq!(
                parse_duration_ms(zero),
                Err(format!(
                    "{zero:?} is no time at all: give a duration like 7d, 12h, 30m or 90s"
                ))
            );
        }
        for long in ["36501d", "99999999999d", "18446744073709551615w"] {
            assert_eq!(
                parse_duration_ms(long),
                Err(format!(
                    "{long:?} is longer than 100 years: give a duration like 7d, 12h, 30m or 90s"
                ))
            );
        }
        assert_eq!(
            parse_quota("0"),
            Err(
                "a quota of \"0\" is 0: to stop storing for a partner use `cairn trust revoke`"
                    .into()
            )
        );
        assert!(parse_quota("0GB").is_err());
        assert_eq!(parse_quota("1B"), Ok(1));
        assert_eq!(parse_quota("500GB"), Ok(500_000_000_000));
    }
}

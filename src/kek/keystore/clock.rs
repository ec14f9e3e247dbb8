//! Time helpers: the current time in Unix seconds, and the RFC 3339 timestamps and short durations
//! used in messages and listings.

/// Format Unix seconds as RFC 3339 in UTC (`2027-01-01T00:00:00Z`), without a time crate.
pub fn format_time(t: u64) -> String {
    // Days since the epoch to a civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Format a number of seconds briefly: `7d`, `36h`, `90m`, `45s`.
pub fn format_duration(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_formatting() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(253_402_300_799), "9999-12-31T23:59:59Z");
        assert!(!format_time(u64::MAX).is_empty());
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(7 * 86_400), "7d");
        assert_eq!(format_duration(36 * 3600), "36h");
        assert_eq!(format_duration(90 * 60), "90m");
        assert_eq!(format_duration(61), "61s");
    }
}

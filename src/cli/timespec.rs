//! Times and durations on the command line (`kekfs key set --not-before T --expires T`,
//! `--retention D`), parsed without a time crate.
//!
//! A time is one of:
//! - an RFC 3339 timestamp: `2027-01-01T00:00:00Z`, `2027-01-01t00:00:00.5+02:00`,
//!   `2027-01-01 00:00:00Z` (fractions of a second are dropped), or a bare date
//!   `2027-01-01` (midnight UTC);
//! - `now`;
//! - a time relative to now: `+1h`, `+30d`, `-15m` (units `s`, `m`, `h`, `d`, `w`);
//! - `none` to clear the date.
//!
//! A duration is a number with one of those units (`7d`, `36h`), or `0`.

use crate::time::days_from_civil;

/// The latest time accepted: 9999-12-31T23:59:59Z (RFC 3339 has four-digit years).
pub const MAX_TIME: u64 = 253_402_300_799;

/// Parse a time argument against `now` (Unix seconds). `Ok(None)` means `none` (clear).
pub fn parse_time(s: &str, now: u64) -> Result<Option<u64>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    if t.eq_ignore_ascii_case("now") {
        return Ok(Some(now));
    }
    let hint = "expected an RFC 3339 time like 2027-01-01T00:00:00Z, `now`, a relative time \
                like +1h or +30d (or -2d), or `none`";
    let result = if let Some(rel) = t.strip_prefix('+') {
        let d = parse_duration(rel).map_err(|e| format!("bad time {s:?}: {e}"))?;
        now.checked_add(d)
            .ok_or_else(|| format!("bad time {s:?}: too far in the future"))?
    } else if let Some(rel) = t.strip_prefix('-') {
        let d = parse_duration(rel).map_err(|e| format!("bad time {s:?}: {e}"))?;
        now.checked_sub(d)
            .ok_or_else(|| format!("bad time {s:?}: before 1970-01-01T00:00:00Z"))?
    } else if t.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        parse_rfc3339(t).map_err(|e| format!("bad time {s:?}: {e}; {hint}"))?
    } else {
        return Err(format!("bad time {s:?}: {hint}"));
    };
    if result > MAX_TIME {
        return Err(format!(
            "bad time {s:?}: later than 9999-12-31T23:59:59Z, the last time kekfs can record"
        ));
    }
    Ok(Some(result))
}

/// Parse a duration: digits and a unit (`s`, `m`, `h`, `d`, `w`), or `0`. Returns seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let hint = "expected a number and a unit: s, m, h, d or w (e.g. 90m, 12h, 7d)";
    if t == "0" {
        return Ok(0);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("bad duration {s:?}: {hint}"));
    }
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "" => return Err(format!("bad duration {s:?}: the unit is missing; {hint}")),
        _ => return Err(format!("bad duration {s:?}: unknown unit {unit:?}; {hint}")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad duration {s:?}: too large"))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Parse RFC 3339 (`YYYY-MM-DD[Tt ]HH:MM:SS[.frac](Z|z|±HH:MM)`) or a bare `YYYY-MM-DD`.
fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>, what: &str| -> Result<i64, String> {
        let part = b
            .get(range)
            .filter(|p| p.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| format!("the {what} is not where it should be"))?;
        Ok(part.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
    };
    let sep = |i: usize, c: u8, what: &str| -> Result<(), String> {
        if b.get(i) == Some(&c) {
            Ok(())
        } else {
            Err(format!("expected {what}"))
        }
    };
    let y = num(0..4, "year (4 digits)")?;
    sep(4, b'-', "'-' after the year")?;
    let mo = num(5..7, "month (2 digits)")?;
    sep(7, b'-', "'-' after the month")?;
    let d = num(8..10, "day (2 digits)")?;
    if !(1..=12).contains(&mo) {
        return Err(format!("month {mo} is not 01-12"));
    }
    if !(1..=days_in_month(y, mo)).contains(&d) {
        return Err(format!("day {d} does not exist in {y:04}-{mo:02}"));
    }
    let days = days_from_civil(y, mo, d);
    let (secs_of_day, offset) = if b.len() == 10 {
        (0, 0)
    } else {
        if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
            return Err("expected 'T' between the date and the time".into());
        }
        let h = num(11..13, "hour (2 digits)")?;
        sep(13, b':', "':' after the hour")?;
        let mi = num(14..16, "minute (2 digits)")?;
        sep(16, b':', "':' after the minutes")?;
        let se = num(17..19, "second (2 digits)")?;
        if h > 23 || mi > 59 || se > 60 {
            return Err(format!("time {h:02}:{mi:02}:{se:02} is out of range"));
        }
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return Err("expected digits after '.'".into());
            }
        }
        let offset = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(&c @ (b'+' | b'-')) if i + 6 == b.len() => {
                let oh = num(i + 1..i + 3, "offset hours")?;
                sep(i + 3, b':', "':' in the UTC offset")?;
                let om = num(i + 4..i + 6, "offset minutes")?;
                if oh > 23 || om > 59 {
                    return Err(format!("UTC offset {oh:02}:{om:02} is out of range"));
                }
                let o = oh * 3600 + om * 60;
                if c == b'-' { -o } else { o }
            }
            _ => return Err("expected 'Z' or a UTC offset like +02:00 at the end".into()),
        };
        (h * 3600 + mi * 60 + se, offset)
    };
    let t = days * 86_400 + secs_of_day - offset;
    u64::try_from(t).map_err(|_| "the time is before 1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kek::keystore::format_time;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn keywords_and_relative() {
        assert_eq!(parse_time("none", NOW), Ok(None));
        assert_eq!(parse_time("NONE", NOW), Ok(None));
        assert_eq!(parse_time("now", NOW), Ok(Some(NOW)));
        assert_eq!(parse_time(" now ", NOW), Ok(Some(NOW)));
        assert_eq!(parse_time("+1h", NOW), Ok(Some(NOW + 3600)));
        assert_eq!(parse_time("+30d", NOW), Ok(Some(NOW + 30 * 86_400)));
        assert_eq!(parse_time("+2w", NOW), Ok(Some(NOW + 14 * 86_400)));
        assert_eq!(parse_time("+90s", NOW), Ok(Some(NOW + 90)));
        assert_eq!(parse_time("+0s", NOW), Ok(Some(NOW)));
        assert_eq!(parse_time("-15m", NOW), Ok(Some(NOW - 900)));
        assert!(parse_time("-1d", 10).unwrap_err().contains("before 1970"));
        assert!(parse_time("+1y", NOW).unwrap_err().contains("unknown unit"));
        assert!(
            parse_time("+1", NOW)
                .unwrap_err()
                .contains("unit is missing")
        );
        assert!(parse_time("+h", NOW).is_err());
        assert!(parse_time("+-1h", NOW).is_err());
        assert!(parse_time("+99999999999999999999d", NOW).is_err());
        assert!(parse_time("+18446744073709551615s", NOW).is_err());
        assert!(parse_time("+9000000w", NOW).unwrap_err().contains("9999"));
    }

    #[test]
    fn rfc3339() {
        let p = |s| parse_time(s, NOW);
        assert_eq!(p("1970-01-01T00:00:00Z"), Ok(Some(0)));
        assert_eq!(p("2027-01-01T00:00:00Z"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2027-01-01"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2027-01-01t00:00:00z"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2027-01-01 00:00:00Z"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2027-01-01T00:00:00.999Z"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2027-01-01T02:00:00+02:00"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2026-12-31T19:30:00-04:30"), Ok(Some(1_798_761_600)));
        assert_eq!(p("2000-02-29T00:00:00Z"), Ok(Some(951_782_400)));
        assert_eq!(p("2023-11-14T22:13:20Z"), Ok(Some(1_700_000_000)));
        assert_eq!(p("9999-12-31T23:59:59Z"), Ok(Some(MAX_TIME)));
        assert_eq!(p("2016-12-31T23:59:60Z"), Ok(Some(1_483_228_800)));
        for bad in [
            "",
            "tomorrow",
            "2027",
            "2027-1-01",
            "2027-13-01",
            "2027-00-10",
            "2027-02-29",
            "1900-02-29",
            "2027-04-31",
            "2027-01-00",
            "2027-01-01T",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:60:00Z",
            "2027-01-01T00:00:61Z",
            "2027-01-01T00:00:00",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00+2:00",
            "2027-01-01T00:00:00+24:00",
            "2027-01-01T00:00:00+02:60",
            "2027-01-01T00:00:00Zjunk",
            "2027-01-01X00:00:00Z",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:00:00+00:01",
            "٢٠٢٧-01-01",
            "2027-01-01T00:00:00Z\u{0}",
        ] {
            assert!(p(bad).is_err(), "{bad:?} was accepted: {:?}", p(bad));
        }
    }

    #[test]
    fn round_trips_with_format() {
        for t in [
            0,
            59,
            951_782_400,
            1_700_000_000,
            1_798_761_600,
            4_102_444_800,
            MAX_TIME,
        ] {
            assert_eq!(parse_time(&format_time(t), NOW), Ok(Some(t)), "{t}");
        }
        // Every day boundary over a few leap cycles.
        for day in (0..4 * 366 * 3).map(|d| 946_684_800 + d * 86_400) {
            assert_eq!(parse_time(&format_time(day), NOW), Ok(Some(day)));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(0));
        assert_eq!(parse_duration("0d"), Ok(0));
        assert_eq!(parse_duration("7d"), Ok(7 * 86_400));
        assert_eq!(parse_duration("36h"), Ok(36 * 3600));
        assert_eq!(parse_duration("1w"), Ok(604_800));
        for bad in ["", "d", "7", "7 d", "7D", "-1d", "1.5d", "7days"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

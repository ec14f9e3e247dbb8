//! UTC calendar days: parsing a CK_DATE and reading today's date, for the CKA_START_DATE
//! and CKA_END_DATE checks.

use cryptoki::types::Date;
use std::fmt;

/// A UTC calendar day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Ymd(u32, u32, u32);

impl fmt::Display for Ymd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.0, self.1, self.2)
    }
}

/// Parse a CK_DATE; `Ok(None)` for an empty (or all-zero / all-blank) date.
pub(super) fn parse_date(d: &Date) -> Result<Option<Ymd>, String> {
    if d.is_empty() {
        return Ok(None);
    }
    let mut all = Vec::with_capacity(8);
    all.extend_from_slice(&d.year);
    all.extend_from_slice(&d.month);
    all.extend_from_slice(&d.day);
    if all.iter().all(|&b| b == b'0' || b == b' ' || b == 0) {
        return Ok(None);
    }
    let num = |s: &[u8]| -> Option<u32> {
        s.iter().try_fold(0u32, |acc, &b| {
            b.is_ascii_digit().then(|| acc * 10 + u32::from(b - b'0'))
        })
    };
    let bad = || format!("invalid CK_DATE {:?}", String::from_utf8_lossy(&all));
    let (Some(y), Some(m), Some(day)) = (num(&d.year), num(&d.month), num(&d.day)) else {
        return Err(bad());
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return Err(bad());
    }
    Ok(Some(Ymd(y, m, day)))
}

/// Today (UTC) from the system clock.
pub(super) fn today() -> Ymd {
    civil_from_days((crate::time::unix_now() / 86_400) as i64)
}

/// Days since 1970-01-01 → civil date (years before 0 clamp to 0).
fn civil_from_days(days: i64) -> Ymd {
    let (y, m, d) = crate::time::civil_from_days(days);
    Ymd(y.max(0) as u32, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let d = |s: &str| {
            let b = s.as_bytes();
            Date::new([b[0], b[1], b[2], b[3]], [b[4], b[5]], [b[6], b[7]])
        };
        assert_eq!(parse_date(&Date::new_empty()), Ok(None));
        assert_eq!(parse_date(&d("00000000")), Ok(None));
        assert_eq!(parse_date(&d("        ")), Ok(None));
        assert_eq!(parse_date(&d("20250131")), Ok(Some(Ymd(2025, 1, 31))));
        assert!(parse_date(&d("2025013x")).is_err());
        assert!(parse_date(&d("20251301")).is_err());
        assert!(parse_date(&d("20250100")).is_err());
        assert_eq!(civil_from_days(0), Ymd(1970, 1, 1));
        assert_eq!(civil_from_days(19_675), Ymd(2023, 11, 14));
        assert_eq!(civil_from_days(11_016), Ymd(2000, 2, 29));
        assert!(today() > Ymd(2024, 1, 1));
        assert_eq!(Ymd(2025, 3, 4).to_string(), "2025-03-04");
    }
}

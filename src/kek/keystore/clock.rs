//! Time helpers for the keystore: the current time and RFC 3339 timestamps (from
//! `crate::time`), and the short durations used in messages and listings.

pub use crate::time::{format_time, unix_now};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_formatting() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(7 * 86_400), "7d");
        assert_eq!(format_duration(36 * 3600), "36h");
        assert_eq!(format_duration(90 * 60), "90m");
        assert_eq!(format_duration(61), "61s");
    }
}

//! The one readiness line, `berth-agent: ready uptime=1.234s boot=1 data=formatted`, that
//! tests and the boot benchmark wait for.

use crate::datadisk::DataState;

const UPTIME: &str = "/proc/uptime";

/// Formats the readiness line (without the `berth-agent: ` prefix the console adds).
pub fn line(uptime_secs: f64, boot_count: u64, data: DataState) -> String {
    format!(
        "ready uptime={uptime_secs:.3}s boot={boot_count} data={}",
        data.as_str()
    )
}

/// Seconds since boot from `/proc/uptime` text (`"12.34 56.78\n"`).
pub fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace()
        .next()?
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
}

/// Seconds since boot, or 0 if /proc/uptime cannot be read (the line must still be printed).
pub fn uptime() -> f64 {
    std::fs::read_to_string(UPTIME)
        .ok()
        .as_deref()
        .and_then(parse_uptime)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_line_format() {
        assert_eq!(
            line(1.234, 1, DataState::Formatted),
            "ready uptime=1.234s boot=1 data=formatted"
        );
        assert_eq!(
            line(0.5, 0, DataState::None),
            "ready uptime=0.500s boot=0 data=none"
        );
        assert_eq!(
            line(62.0, 17, DataState::Mounted),
            "ready uptime=62.000s boot=17 data=mounted"
        );
        assert_eq!(
            line(9.8765, 0, DataState::Error),
            "ready uptime=9.877s boot=0 data=error"
        );
        let full = format!(
            "{} {}",
            crate::console::PREFIX,
            line(1.0, 2, DataState::Mounted)
        );
        assert!(full.starts_with("berth-agent: ready "));
    }

    #[test]
    fn uptime_parsing() {
        assert_eq!(parse_uptime("1.23 4.56\n"), Some(1.23));
        assert_eq!(parse_uptime("350735.47 234388.90"), Some(350735.47));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("abc 1.0"), None);
        assert_eq!(parse_uptime("-1 0"), None);
    }
}

//! The one readiness line, `berth-agent: ready uptime=1.234s boot=1 data=formatted`, that
//! tests and the boot benchmark wait for.

use crate::datadisk::DataState;

/// Formats the readiness line (without the `berth-agent: ` prefix the console adds).
pub fn line(uptime_secs: f64, boot_count: u64, data: DataState) -> String {
    format!(
        "ready uptime={uptime_secs:.3}s boot={boot_count} data={}",
        data.as_str()
    )
}

/// Seconds since boot (`CLOCK_BOOTTIME`, what `/proc/uptime` shows; readable before /proc is
/// mounted, which the agent's first line is), or 0 if the clock cannot be read.
pub fn uptime() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
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
    fn uptime_is_the_boot_clock() {
        let a = uptime();
        let proc_uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let b = uptime();
        assert!(
            a > 0.0 && a <= proc_uptime + 0.01 && proc_uptime <= b + 0.01,
            "{a} {proc_uptime} {b}"
        );
    }
}

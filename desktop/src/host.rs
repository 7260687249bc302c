//! What Berth's own processes cost the host: the resident memory of the host proxy and its
//! children (the VMM, passt), and the VMM's CPU time. Read from /proc on Linux; the macOS and
//! Windows versions (proc_pidinfo, GetProcessMemoryInfo) are files to add with those backends.

use std::time::Duration;

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    pub name: String,
    pub pid: u32,
    pub mib: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rss {
    pub total_mib: u64,
    pub processes: Vec<Process>,
}

/// The host proxy `pid` and its children, with their resident memory.
pub fn rss(pid: u32) -> Option<Rss> {
    let mut pids = vec![pid];
    pids.extend(children(pid));
    let processes: Vec<Process> = pids
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let (name, kib) = parse_status(&status)?;
            Some(Process {
                name,
                pid,
                mib: kib.div_ceil(1024),
            })
        })
        .collect();
    if processes.is_empty() {
        return None;
    }
    Some(Rss {
        total_mib: processes.iter().map(|p| p.mib).sum(),
        processes,
    })
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        let path = task.path().join("children");
        if let Ok(text) = std::fs::read_to_string(path) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children.sort_unstable();
    children.dedup();
    children
}

/// `Name:` and `VmRSS:` (KiB) of /proc/PID/status.
fn parse_status(text: &str) -> Option<(String, u64)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    let name = field("Name:")?.to_string();
    // A zombie has no VmRSS: it holds nothing.
    let kib = field("VmRSS:")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some((name, kib))
}

/// The process's user and system CPU time so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = u64::try_from(per_sec).ok().filter(|&t| t > 0)?;
    Some(Duration::from_secs_f64(ticks as f64 / per_sec as f64))
}

/// utime + stime (fields 14 and 15) of /proc/PID/stat, whose second field, the command name,
/// may hold spaces and parentheses: the fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, so index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_stat_fields_are_read_even_with_odd_names() {
        let status = "Name:\tberth-vmm\nState:\tS (sleeping)\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_status(status), Some(("berth-vmm".into(), 40960)));
        assert_eq!(
            parse_status("Name:\tgone\nState:\tZ (zombie)\n"),
            Some(("gone".into(), 0))
        );
        let stat = "4242 (a (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn this_process_is_measured() {
        let me = std::process::id();
        let rss = rss(me).unwrap();
        assert_eq!(rss.processes[0].pid, me);
        assert!(rss.total_mib > 0);
        assert!(cpu_time(me).is_some());
    }
}

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

/// The host proxy `pid`, its children (the VMM, passt) and `vmm` (named by the status, in case
/// it is not a child), with their resident memory.
pub fn rss(pid: u32, vmm: Option<u32>) -> Option<Rss> {
    let mut pids = vec![pid];
    pids.extend(children(pid));
    pids.extend(vmm.filter(|v| !pids.contains(v)));
    let processes: Vec<Process> = pids
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let (name, kib) = parse_status(&status)?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            Some(Process {
                name: program_name(&cmdline).unwrap_or(name),
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

/// The processes whose parent is `pid`, found by their /proc/PID/stat (the kernel's own list,
/// /proc/PID/task/TID/children, needs CONFIG_PROC_CHILDREN, which not every kernel has).
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| parse_ppid(&stat))
                == Some(pid)
        })
        .collect();
    children.sort_unstable();
    children
}

/// The program's file name from its command line (`Name:` in status stops at 15 bytes:
/// "berth-host-prox").
fn program_name(cmdline: &[u8]) -> Option<String> {
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    let name = std::path::Path::new(std::str::from_utf8(argv0).ok()?).file_name()?;
    Some(name.to_str()?.to_string()).filter(|n| !n.is_empty())
}

/// The parent pid (field 4) of /proc/PID/stat, counted after the command name's last `)`.
fn parse_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
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
    fn parent_and_program_name_are_read_past_odd_names() {
        let stat = "4242 (a (weird) name) S 77 4242 4242 0 -1 4194560";
        assert_eq!(parse_ppid(stat), Some(77));
        assert_eq!(
            program_name(b"/usr/libexec/berth/berth-host-proxy\0--home\0/h\0").as_deref(),
            Some("berth-host-proxy")
        );
        assert_eq!(program_name(b""), None);
    }

    #[test]
    fn this_process_its_children_and_a_named_vmm_are_measured() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // PID 1 stands for a VMM that is not a child; the child named as the VMM counts once.
        let with_other = rss(me, Some(1));
        let with_child = rss(me, Some(child.id()));
        child.kill().unwrap();
        let _ = child.wait();
        let pids = |r: &Rss| r.processes.iter().map(|p| p.pid).collect::<Vec<u32>>();
        let with_other = with_other.unwrap();
        assert_eq!(with_other.processes[0].pid, me);
        assert!(pids(&with_other).contains(&child.id()), "{with_other:?}");
        assert!(pids(&with_other).contains(&1), "{with_other:?}");
        let with_child = with_child.unwrap();
        assert_eq!(
            pids(&with_child)
                .iter()
                .filter(|&&p| p == child.id())
                .count(),
            1,
            "{with_child:?}"
        );
        let sleep = with_child
            .processes
            .iter()
            .find(|p| p.pid == child.id())
            .unwrap();
        assert_eq!(sleep.name, "sleep");
        assert!(with_other.total_mib > 0);
        assert!(cpu_time(me).is_some());
    }
}

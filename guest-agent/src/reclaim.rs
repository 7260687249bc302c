//! Gives the page cache back when the guest is idle.
//!
//! Once booted, most of what the guest holds is clean page cache (image layers, dockerd's own
//! binaries): free memory goes back to the host at once through the balloon's free page
//! reporting, cache never does. So when the CPUs have been idle for `berth.idle_reclaim`
//! seconds (default 300), the agent asks the kernel to reclaim the inactive file cache (pages
//! read once and not since: image layers, logs), once per idle period: cgroup v2's
//! `memory.reclaim` on the root group (cold pages first), or `drop_caches` where that file is
//! missing. The active list (the binaries and libraries dockerd, containerd and runc run from)
//! stays: reclaiming everything down to a 16 MiB floor made the next `docker run` 2.3 times
//! slower in the rig, each binary read back from the disk. The guest has no swap, so only clean
//! file pages go.
//!
//! Free page reporting only hands back free blocks of 2 MiB (the guest's pageblock order), and
//! the reclaimed pages lie scattered among used ones; so the reclaim is followed by a
//! compaction (`/proc/sys/vm/compact_memory`), which gathers the free pages into such blocks.
//! So is a large free at any time (a container that held memory exits: its pages come free
//! among others still used), at most every half minute (`FreeWatch`).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::console;
use crate::control::meminfo_kib;

/// Seconds of idle CPUs before the cache is reclaimed, unless `berth.idle_reclaim` says. The
/// first `docker run` after a reclaim reads back what it needs (1.4–2.4 times slower in the rig,
/// even with runc and the shim read back first or the daemons' cgroup under `memory.low`): five
/// minutes keeps that off the short pauses of someone at work and still gives the memory back
/// to a machine left alone.
pub const DEFAULT_IDLE_SECS: u64 = 300;
/// How often the CPUs' times are sampled.
const SAMPLE: Duration = Duration::from_secs(5);
/// Busier than this share of all CPUs' time is not idle. An idle dockerd and containerd cost
/// well under 1% on hardware but 5–7% under the nested rig's emulation; a build, a pull or a
/// server under load is far above 10%.
const IDLE_BUSY_FRACTION: f64 = 0.10;
/// File cache kept: the hottest pages of what runs.
const KEEP_KIB: u64 = 16 << 10;
/// Less than this above the floor is not worth a reclaim.
const MIN_RECLAIM_KIB: u64 = 16 << 10;
/// A rise in free memory this large between two samples is worth a compaction.
const FREED_COMPACT_KIB: u64 = 64 << 10;
/// Where the kernel is asked for a compaction.
const COMPACT_MEMORY: &str = "/proc/sys/vm/compact_memory";
/// Compactions for freed memory come at most this often.
const COMPACT_EVERY: Duration = Duration::from_secs(30);

/// Aggregate CPU times from the `cpu` line of /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// The first line of /proc/stat: user nice system idle iowait irq softirq steal ...; idle and
/// iowait are not busy.
pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // guest and guest_nice (fields 9 and 10) are already counted in user and nice.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

/// The guest's file cache from /proc/meminfo, in KiB: what reclaim can take (Cached also
/// counts shmem and tmpfs, which it cannot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileCache {
    pub active_kib: u64,
    pub inactive_kib: u64,
}

impl FileCache {
    pub fn total_kib(self) -> u64 {
        self.active_kib + self.inactive_kib
    }
}

/// Active(file) and Inactive(file) from /proc/meminfo.
pub fn file_cache(meminfo: &str) -> Option<FileCache> {
    Some(FileCache {
        active_kib: meminfo_kib(meminfo, "Active(file)")?,
        inactive_kib: meminfo_kib(meminfo, "Inactive(file)")?,
    })
}

/// When to reclaim: after `idle_after` of idle samples, once, until a busy sample re-arms it.
#[derive(Debug)]
pub struct IdleTracker {
    idle_after: Duration,
    idle_for: Duration,
    done: bool,
}

impl IdleTracker {
    pub fn new(idle_after: Duration) -> Self {
        IdleTracker {
            idle_after,
            idle_for: Duration::ZERO,
            done: false,
        }
    }

    /// One sample of `elapsed` between `before` and `after`; true when the reclaim is due now.
    pub fn observe(&mut self, before: CpuTimes, after: CpuTimes, elapsed: Duration) -> bool {
        let total = after.total.saturating_sub(before.total);
        let busy = after.busy.saturating_sub(before.busy);
        let idle = total == 0 || (busy as f64) < IDLE_BUSY_FRACTION * total as f64;
        if !idle {
            self.idle_for = Duration::ZERO;
            self.done = false;
            return false;
        }
        self.idle_for += elapsed;
        if self.done || self.idle_for < self.idle_after {
            return false;
        }
        self.done = true;
        true
    }
}

/// When a large free is worth a compaction: free memory rose by `FREED_COMPACT_KIB` since the
/// last sample, and the last compaction is `COMPACT_EVERY` old.
#[derive(Debug, Default)]
pub struct FreeWatch {
    last_free_kib: Option<u64>,
    since_compact: Option<Duration>,
}

impl FreeWatch {
    /// One sample, `elapsed` after the previous one; true when a compaction is due now.
    pub fn observe(&mut self, free_kib: u64, elapsed: Duration) -> bool {
        let rose = self
            .last_free_kib
            .is_some_and(|last| free_kib >= last + FREED_COMPACT_KIB);
        self.last_free_kib = Some(free_kib);
        if let Some(since) = self.since_compact.as_mut() {
            *since += elapsed;
        }
        let rested = self
            .since_compact
            .is_none_or(|since| since >= COMPACT_EVERY);
        if rose && rested {
            self.since_compact = Some(Duration::ZERO);
            return true;
        }
        false
    }
}

/// MemFree from /proc/meminfo, in KiB.
pub fn free_kib(meminfo: &str) -> Option<u64> {
    meminfo_kib(meminfo, "MemFree")
}

/// How much of `cache` to reclaim: the inactive part, never below the floor, or nothing when
/// that is little.
pub fn to_reclaim_kib(cache: FileCache) -> Option<u64> {
    let above_floor = cache.total_kib().saturating_sub(KEEP_KIB);
    let kib = cache.inactive_kib.min(above_floor);
    (kib >= MIN_RECLAIM_KIB).then_some(kib)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {0}")]
    Read(&'static str, #[source] std::io::Error),
    #[error("{0} has no figure this agent reads")]
    Parse(&'static str),
    #[error("write {0}")]
    Write(String, #[source] std::io::Error),
}

/// Asks the kernel to reclaim `kib` of the root cgroup's memory; where `memory.reclaim` is
/// missing, drops the clean page cache. A reclaim that got less than asked (EAGAIN) is fine.
pub fn reclaim(cgroup_root: &Path, kib: u64) -> Result<(), Error> {
    let file = cgroup_root.join("memory.reclaim");
    match write(&file, &format!("{}", kib << 10)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let drop = "/proc/sys/vm/drop_caches";
            write(Path::new(drop), "1").map_err(|e| Error::Write(drop.into(), e))
        }
        Err(e) => Err(Error::Write(file.display().to_string(), e)),
    }
}

/// Gathers free pages into blocks free page reporting takes; a kernel without compaction (no
/// such file) has nothing to do.
pub fn compact(compact_memory: &Path) -> Result<(), Error> {
    match write(compact_memory, "1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Write(compact_memory.display().to_string(), e)),
    }
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

fn read_cpu() -> Result<CpuTimes, Error> {
    let text = std::fs::read_to_string("/proc/stat").map_err(|e| Error::Read("/proc/stat", e))?;
    parse_stat(&text).ok_or(Error::Parse("/proc/stat"))
}

fn read_cache() -> Result<FileCache, Error> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::Read("/proc/meminfo", e))?;
    file_cache(&text).ok_or(Error::Parse("/proc/meminfo"))
}

/// One idle pass: the reclaim when the inactive cache is worth it, then the compaction either
/// way (it is what lets the free pages go back); said on the console with the cache's figures.
fn reclaim_now(idle_after: Duration) -> Result<(), Error> {
    let before = read_cache()?;
    let reclaimed = match to_reclaim_kib(before) {
        Some(kib) => {
            reclaim(Path::new(crate::cgroups::ROOT), kib)?;
            true
        }
        None => false,
    };
    compact(Path::new(COMPACT_MEMORY))?;
    let after = read_cache()?;
    let cache = if reclaimed {
        format!(
            "page cache reclaimed, {} MiB -> {} MiB (active {} MiB kept)",
            before.total_kib() >> 10,
            after.total_kib() >> 10,
            before.active_kib >> 10
        )
    } else {
        format!(
            "page cache {} MiB, {} MiB of it inactive: nothing worth reclaiming",
            before.total_kib() >> 10,
            before.inactive_kib >> 10
        )
    };
    console::say(&format!(
        "idle for {} s: {cache}; memory compacted",
        idle_after.as_secs()
    ));
    Ok(())
}

/// Starts the idle watch in a thread of its own; `idle_secs` 0 starts nothing.
pub fn spawn(idle_secs: u64) -> std::io::Result<()> {
    if idle_secs == 0 {
        return Ok(());
    }
    let idle_after = Duration::from_secs(idle_secs);
    std::thread::Builder::new()
        .name("idle-reclaim".into())
        .spawn(move || {
            let mut tracker = IdleTracker::new(idle_after);
            let mut before = match read_cpu() {
                Ok(times) => times,
                Err(e) => return console::warn(&format!("idle reclaim: {}", console::chain(&e))),
            };
            let mut freed = FreeWatch::default();
            loop {
                std::thread::sleep(SAMPLE);
                let Ok(after) = read_cpu() else { continue };
                if tracker.observe(before, after, SAMPLE) {
                    if let Err(e) = reclaim_now(idle_after) {
                        console::warn(&format!("idle reclaim: {}", console::chain(&e)));
                    }
                }
                before = after;
                let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
                if let Some(free) = free_kib(&meminfo) {
                    if freed.observe(free, SAMPLE) {
                        match compact(Path::new(COMPACT_MEMORY)) {
                            Ok(()) => console::say(&format!(
                                "{} MiB free: memory compacted for free page reporting",
                                free >> 10
                            )),
                            Err(e) => console::warn(&format!("compaction: {}", console::chain(&e))),
                        }
                    }
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 5 50 1000 20 3 2 0 7 0\ncpu0 100 5 50 1000 20 3 2 0 7 0\nintr 1\n";

    #[test]
    fn cpu_times_count_idle_and_iowait_as_not_busy_and_guest_time_once() {
        assert_eq!(
            parse_stat(STAT),
            Some(CpuTimes {
                busy: 160,
                total: 1180
            })
        );
        assert_eq!(parse_stat("cpu  1 2\n"), None);
        assert_eq!(parse_stat("cpu  1 x 3 4\n"), None);
        assert_eq!(parse_stat("intr 1\n"), None);
    }

    #[test]
    fn the_file_cache_is_active_plus_inactive_file() {
        let meminfo =
            "MemTotal: 1000 kB\nCached: 900 kB\nActive(file):  300 kB\nInactive(file): 200 kB\n";
        let cache = file_cache(meminfo).unwrap();
        assert_eq!(
            cache,
            FileCache {
                active_kib: 300,
                inactive_kib: 200
            }
        );
        assert_eq!(cache.total_kib(), 500);
        assert_eq!(file_cache("Active(file): 1 kB\n"), None);
    }

    fn times(busy: u64, total: u64) -> CpuTimes {
        CpuTimes { busy, total }
    }

    #[test]
    fn reclaims_once_per_idle_period_and_a_busy_sample_rearms_it() {
        let step = Duration::from_secs(5);
        let mut t = IdleTracker::new(Duration::from_secs(15));
        let mut at = times(0, 0);
        let mut sample = |t: &mut IdleTracker, busy: u64| {
            let next = times(at.busy + busy, at.total + 500);
            let due = t.observe(at, next, step);
            at = next;
            due
        };
        // 4% and 8% busy are idle: due at the third sample, then not again.
        assert!(!sample(&mut t, 20));
        assert!(!sample(&mut t, 40));
        assert!(sample(&mut t, 20));
        assert!(!sample(&mut t, 0));
        assert!(!sample(&mut t, 0));
        // 10% busy re-arms; the idle time counts again from zero.
        assert!(!sample(&mut t, 50));
        assert!(!sample(&mut t, 0));
        assert!(!sample(&mut t, 0));
        assert!(sample(&mut t, 0));
        // So does 30%.
        assert!(!sample(&mut t, 150));
        assert!(!sample(&mut t, 0));
        assert!(!sample(&mut t, 0));
        assert!(sample(&mut t, 0));
    }

    #[test]
    fn only_the_inactive_cache_above_the_floor_is_reclaimed_and_only_when_worth_it() {
        let cache = |active_kib, inactive_kib| FileCache {
            active_kib,
            inactive_kib,
        };
        assert_eq!(to_reclaim_kib(cache(0, 0)), None);
        // The active list stays: 100 MiB active, 150 inactive -> 150 reclaimed.
        assert_eq!(to_reclaim_kib(cache(100 << 10, 150 << 10)), Some(150 << 10));
        // Little inactive cache is not worth a reclaim.
        assert_eq!(to_reclaim_kib(cache(200 << 10, MIN_RECLAIM_KIB - 1)), None);
        // All of it inactive: down to the floor, not below.
        assert_eq!(
            to_reclaim_kib(cache(0, KEEP_KIB + MIN_RECLAIM_KIB)),
            Some(MIN_RECLAIM_KIB)
        );
        assert_eq!(
            to_reclaim_kib(cache(0, KEEP_KIB + MIN_RECLAIM_KIB - 1)),
            None
        );
    }

    #[test]
    fn a_large_free_asks_for_a_compaction_at_most_every_half_minute() {
        let step = Duration::from_secs(5);
        let mib = |m: u64| m << 10;
        let mut w = FreeWatch::default();
        // The first sample has nothing to compare with; small rises are not worth it.
        assert!(!w.observe(mib(100), step));
        assert!(!w.observe(mib(163), step));
        assert!(!w.observe(mib(100), step));
        // 64 MiB more free: due.
        assert!(w.observe(mib(164), step));
        // Another large free within 30 s waits; after 30 s the next one is due.
        assert!(!w.observe(mib(100), step));
        assert!(!w.observe(mib(300), step));
        for _ in 0..3 {
            assert!(!w.observe(mib(300), step));
        }
        assert!(w.observe(mib(400), step));
        assert_eq!(free_kib("MemTotal: 9 kB\nMemFree:  1234 kB\n"), Some(1234));
        assert_eq!(free_kib("MemTotal: 9 kB\n"), None);
    }

    #[test]
    fn compaction_is_asked_with_a_1_and_a_kernel_without_it_is_fine() {
        let dir = std::env::temp_dir().join(format!("berth-agent-compact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("compact_memory");
        std::fs::write(&file, "").unwrap();
        compact(&file).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "1");
        compact(&dir.join("missing")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_amount_goes_to_memory_reclaim_in_bytes() {
        let dir = std::env::temp_dir().join(format!("berth-agent-reclaim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("memory.reclaim");
        std::fs::write(&file, "").unwrap();
        reclaim(&dir, 3).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "3072");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! virtio-balloon (virtio 1.2 section 5.5): the host sets a target of pages the guest should
//! give back; the guest inflates (hands pages over, which the host frees at once) and deflates,
//! reports the pages it does not use (free page reporting, freed at once too) and its memory
//! statistics.

mod device;
mod discard;
#[cfg(test)]
mod tests;

use berth_machine::BalloonStats;

pub use device::{Balloon, BalloonHandle, BalloonStatus};

/// Every queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page frame numbers count pages of this size, whatever the guest's page size
/// (VIRTIO_BALLOON_PFN_SHIFT).
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Pages of [`PAGE_SIZE`] in a MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

/// Feature bits (virtio 1.2 section 5.5.3), as bit numbers.
pub mod features {
    /// The stats queue exists (it is queue 2).
    pub const STATS_VQ: u32 = 1;
    /// The guest may deflate when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// The free page reporting queue exists, after the stats queue if there is one.
    pub const REPORTING: u32 = 5;
}

/// The most bytes of one inflate, deflate or stats chain read; Linux sends at most 256 page
/// numbers per buffer and a few dozen statistics.
const MAX_CHAIN_BYTES: u32 = 64 * 1024;

/// Which queue serves what, under the features the driver acked: Linux sets up only the queues
/// its features need, numbered in order, so the reporting queue is queue 2 without STATS_VQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct QueueLayout {
    pub(crate) stats: Option<usize>,
    pub(crate) reporting: Option<usize>,
}

pub(crate) const INFLATE: usize = 0;
pub(crate) const DEFLATE: usize = 1;

impl QueueLayout {
    pub(crate) fn new(acked: u64) -> Self {
        let has = |bit: u32| acked & crate::devices::virtio::feature(bit) != 0;
        let mut next = DEFLATE + 1;
        let mut take = |present: bool| {
            present.then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(has(features::STATS_VQ));
        let reporting = take(has(features::REPORTING));
        QueueLayout { stats, reporting }
    }

    /// How many queues the driver sets up.
    pub(crate) fn count(&self) -> usize {
        2 + usize::from(self.stats.is_some()) + usize::from(self.reporting.is_some())
    }
}

/// Statistics tags (virtio 1.2 section 5.5.6.3, and Linux's later additions).
pub mod tags {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJFLT: u16 = 2;
    pub const MINFLT: u16 = 3;
    pub const MEMFREE: u16 = 4;
    pub const MEMTOT: u16 = 5;
    pub const AVAIL: u16 = 6;
    pub const CACHES: u16 = 7;
    pub const HTLB_PGALLOC: u16 = 8;
    pub const HTLB_PGFAIL: u16 = 9;
    pub const OOM_KILL: u16 = 10;
    pub const ALLOC_STALL: u16 = 11;
}

/// One statistic on the wire: a little-endian u16 tag and u64 value, packed.
pub const STAT_LEN: usize = 10;

/// Records every whole `(tag, value)` entry of `bytes` in `stats`; unknown tags are skipped.
/// Returns how many entries were known.
pub(crate) fn parse_stats(bytes: &[u8], stats: &mut BalloonStats) -> usize {
    let mut known = 0;
    for entry in bytes.chunks_exact(STAT_LEN) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..]);
        let value = Some(u64::from_le_bytes(value));
        let field = match tag {
            tags::SWAP_IN => &mut stats.swap_in_bytes,
            tags::SWAP_OUT => &mut stats.swap_out_bytes,
            tags::MAJFLT => &mut stats.major_faults,
            tags::MINFLT => &mut stats.minor_faults,
            tags::MEMFREE => &mut stats.free_memory_bytes,
            tags::MEMTOT => &mut stats.total_memory_bytes,
            tags::AVAIL => &mut stats.available_memory_bytes,
            tags::CACHES => &mut stats.disk_caches_bytes,
            tags::HTLB_PGALLOC => &mut stats.hugetlb_allocations,
            tags::HTLB_PGFAIL => &mut stats.hugetlb_failures,
            tags::OOM_KILL => &mut stats.oom_kills,
            tags::ALLOC_STALL => &mut stats.alloc_stalls,
            _ => continue,
        };
        *field = value;
        known += 1;
    }
    known
}

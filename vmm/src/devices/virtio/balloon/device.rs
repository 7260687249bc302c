//! The virtio-balloon device model: its configuration space shared with the VMM API through a
//! [`BalloonHandle`], and the handler that serves its queues on the event loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use berth_machine::BalloonStats;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};
use vmm_sys_util::eventfd::EventFd;

use super::discard::{self, discard};
use super::{
    features as balloon_features, parse_stats, QueueLayout, DEFLATE, INFLATE, MAX_CHAIN_BYTES,
    PAGE_SHIFT, QUEUE_SIZE,
};
use crate::devices::virtio::event_loop::{Context, DeviceHandler, EventLoop, Served};
use crate::devices::virtio::{
    feature, features, read_config_space, ActivateError, Interrupt, VirtioDevice, TYPE_BALLOON,
};
use crate::memory::GuestMemory;

/// Numbers the event loop threads: "virtio-balloon-0"...
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// The token of the timer that asks the guest for fresh statistics.
const STATS_TIMER: u32 = 1;

/// Offsets in the configuration space: `num_pages` (the host's target), `actual` (the guest's
/// count); the two fields after them need features the device does not offer and read zero.
const CONFIG_NUM_PAGES: u64 = 0;
const CONFIG_ACTUAL: u64 = 4;
const CONFIG_LEN: usize = 8;

/// What the device and the VMM API share.
#[derive(Default)]
struct Shared {
    /// The pages the host wants the guest to give back.
    num_pages: u32,
    /// The pages the guest says it has given back.
    actual: u32,
    /// The pages inflated and not deflated since the driver started, as the device counted.
    inflated_pages: u64,
    /// Bytes released from free page reports since the VMM started.
    reported_bytes: u64,
    stats: BalloonStats,
    interrupt: Option<Arc<Interrupt>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the balloon looks like now, for the VMM API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub inflated_pages: u64,
    pub reported_bytes: u64,
    pub stats: BalloonStats,
}

/// The VMM API's hold on the balloon: sets its target, reads its state.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Mutex<Shared>>);

impl BalloonHandle {
    /// Asks the guest to give back `pages` 4 KiB pages in all (fewer than now: deflate) and
    /// raises the configuration-change interrupt. The caller checks `pages` against the
    /// guest's memory.
    pub fn set_target_pages(&self, pages: u32) {
        let mut shared = lock(&self.0);
        shared.num_pages = pages;
        tracing::info!(pages, "balloon target set");
        // Under the lock `read_config` takes, as `signal_config_changed` asks.
        if let Some(interrupt) = &shared.interrupt {
            if let Err(e) = interrupt.signal_config_changed() {
                tracing::warn!("virtio-balloon: raising the config-change interrupt failed: {e}");
            }
        }
    }

    pub fn status(&self) -> BalloonStatus {
        let shared = lock(&self.0);
        BalloonStatus {
            target_pages: shared.num_pages,
            actual_pages: shared.actual,
            inflated_pages: shared.inflated_pages,
            reported_bytes: shared.reported_bytes,
            stats: shared.stats.clone(),
        }
    }
}

/// A virtio memory balloon.
pub struct Balloon {
    acked_features: u64,
    /// How often the guest is asked for statistics; `None` offers no stats queue.
    stats_period: Option<Duration>,
    shared: Arc<Mutex<Shared>>,
    event_loop: EventLoop<BalloonHandler>,
}

impl Balloon {
    pub fn new(stats_period: Option<Duration>) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self {
            acked_features: 0,
            stats_period: stats_period.filter(|p| !p.is_zero()),
            shared: Arc::default(),
            event_loop: EventLoop::new(format!("virtio-balloon-{id}"), 4),
        }
    }

    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    #[cfg(test)]
    pub(crate) fn acked_features_for_tests(&self) -> u64 {
        self.acked_features
    }

    fn layout(&self) -> QueueLayout {
        QueueLayout::new(self.acked_features)
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn active_queue_count(&self) -> usize {
        self.layout().count()
    }

    fn avail_features(&self) -> u64 {
        let stats = if self.stats_period.is_some() {
            feature(balloon_features::STATS_VQ)
        } else {
            0
        };
        feature(features::VERSION_1)
            | stats
            | feature(balloon_features::DEFLATE_ON_OOM)
            | feature(balloon_features::REPORTING)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let shared = lock(&self.shared);
        let mut config = [0u8; CONFIG_LEN];
        let at = |offset: u64| offset as usize..offset as usize + 4;
        config[at(CONFIG_NUM_PAGES)].copy_from_slice(&shared.num_pages.to_le_bytes());
        config[at(CONFIG_ACTUAL)].copy_from_slice(&shared.actual.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let end = offset.checked_add(data.len() as u64);
        if offset < CONFIG_ACTUAL || end.is_none_or(|end| end > CONFIG_LEN as u64) {
            warn_rate_limited!(
                "virtio-balloon: ignoring a {}-byte config write at {offset:#x} (only `actual` is writable)",
                data.len()
            );
            return;
        }
        let mut shared = lock(&self.shared);
        let mut actual = shared.actual.to_le_bytes();
        let at = (offset - CONFIG_ACTUAL) as usize;
        actual[at..at + data.len()].copy_from_slice(data);
        shared.actual = u32::from_le_bytes(actual);
    }

    fn attach_interrupt(&mut self, interrupt: &Arc<Interrupt>) {
        lock(&self.shared).interrupt = Some(interrupt.clone());
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let layout = self.layout();
        self.event_loop.set_queue_count(layout.count());
        let shared = self.shared.clone();
        let stats_period = self.stats_period;
        self.event_loop.activate(mem, interrupt, queues, || {
            Ok(BalloonHandler {
                layout,
                shared,
                stats_period,
                held_stats: None,
            })
        })
    }

    fn reset(&mut self) {
        self.event_loop.stop();
        self.acked_features = 0;
        // The driver starts again from an empty balloon; the pages it held are the guest's.
        let mut shared = lock(&self.shared);
        shared.actual = 0;
        shared.inflated_pages = 0;
    }
}

/// Serves the balloon's queues on its event loop.
struct BalloonHandler {
    layout: QueueLayout,
    shared: Arc<Mutex<Shared>>,
    stats_period: Option<Duration>,
    /// The head of the stats buffer the guest gave, held until statistics are wanted again.
    held_stats: Option<u16>,
}

impl DeviceHandler for BalloonHandler {
    fn start(
        &mut self,
        ctx: &mut Context<'_>,
    ) -> Result<(), crate::devices::virtio::event_loop::Error> {
        if let (Some(_), Some(period)) = (self.layout.stats, self.stats_period) {
            ctx.registry()
                .start_timer(STATS_TIMER, period, Some(period))?;
        }
        Ok(())
    }

    fn queue_ready(&mut self, ctx: &mut Context<'_>, index: usize) {
        match index {
            INFLATE | DEFLATE => ctx.drain_queue(index, |mem, chain, _| {
                self.serve_pages(mem, chain, index == INFLATE);
                Served::Used(0)
            }),
            _ if Some(index) == self.layout.stats => self.take_stats(ctx, index),
            _ if Some(index) == self.layout.reporting => ctx.drain_queue(index, |mem, chain, _| {
                self.serve_report(mem, chain);
                Served::Used(0)
            }),
            _ => {
                warn_rate_limited!("virtio-balloon: notify of queue {index}, which it does not use")
            }
        }
    }

    fn timer(&mut self, ctx: &mut Context<'_>, token: u32) {
        if token == STATS_TIMER {
            self.return_stats(ctx);
        }
    }
}

impl BalloonHandler {
    /// An inflate (`inflate`) or deflate chain: page frame numbers of 4 KiB pages.
    fn serve_pages(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        inflate: bool,
    ) {
        let bytes = match readable_bytes(mem, chain) {
            Ok(bytes) => bytes,
            Err(why) => {
                warn_rate_limited!("virtio-balloon: dropping a page list: {why}");
                return;
            }
        };
        let mut pfns: Vec<u64> = bytes
            .chunks_exact(4)
            .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect();
        pfns.sort_unstable();
        pfns.dedup();
        let mut counted = 0u64;
        for (first, count) in runs(&pfns) {
            counted += if inflate {
                release_run(mem, first, count)
            } else {
                (first..first + count)
                    .filter(|&pfn| mem.check_range(page_address(pfn), 1 << PAGE_SHIFT))
                    .count() as u64
            };
        }
        let mut shared = lock(&self.shared);
        shared.inflated_pages = if inflate {
            shared.inflated_pages.saturating_add(counted)
        } else {
            shared.inflated_pages.saturating_sub(counted)
        };
    }

    /// A free page report: each buffer is a guest range the guest does not use.
    fn serve_report(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) {
        let mut released = 0u64;
        let mut ended = false;
        for desc in chain {
            ended = !desc.has_next();
            match discard(mem, desc.addr(), u64::from(desc.len())) {
                Ok(bytes) => released += bytes,
                Err(e) => warn_rate_limited!("virtio-balloon: ignoring a reported range: {e}"),
            }
        }
        if !ended {
            warn_rate_limited!("virtio-balloon: a free page report loops or has a bad `next`");
        }
        lock(&self.shared).reported_bytes += released;
    }

    /// The guest's stats buffer: record what it says and keep it until the next period.
    fn take_stats(&mut self, ctx: &mut Context<'_>, index: usize) {
        let held = &mut self.held_stats;
        let shared = &self.shared;
        ctx.with_queue(index, |mem, queue| {
            let mut used = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match readable_bytes(mem, chain) {
                    Ok(bytes) => {
                        parse_stats(&bytes, &mut lock(shared).stats);
                    }
                    Err(why) => warn_rate_limited!("virtio-balloon: bad stats buffer: {why}"),
                }
                // The driver has one buffer; if it sends another, the older goes back.
                if let Some(older) = held.replace(head) {
                    used |= add_used(mem, queue, older);
                }
            }
            ((), used && queue.needs_notification(mem).unwrap_or(true))
        });
    }

    /// Hands the held stats buffer back: the guest refills it and sends it again.
    fn return_stats(&mut self, ctx: &mut Context<'_>) {
        let (Some(index), Some(head)) = (self.layout.stats, self.held_stats.take()) else {
            return;
        };
        ctx.with_queue(index, |mem, queue| {
            let used = add_used(mem, queue, head);
            ((), used && queue.needs_notification(mem).unwrap_or(true))
        });
    }
}

fn add_used(mem: &GuestMemory, queue: &mut Queue, head: u16) -> bool {
    match queue.add_used(mem, head, 0) {
        Ok(()) => true,
        Err(e) => {
            warn_rate_limited!("virtio-balloon: add_used failed: {e}");
            false
        }
    }
}

fn page_address(pfn: u64) -> GuestAddress {
    GuestAddress(pfn << PAGE_SHIFT)
}

/// Sorted, distinct page numbers as runs of consecutive ones: `(first, count)`.
fn runs(pfns: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &pfn in pfns {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == pfn => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// Releases `count` pages from `first` to the host; returns how many were in guest memory.
/// A run that crosses a region boundary is released page by page.
fn release_run(mem: &GuestMemory, first: u64, count: u64) -> u64 {
    match discard(mem, page_address(first), count << PAGE_SHIFT) {
        Ok(_) => count,
        Err(discard::Error::OutsideMemory { .. }) if count > 1 => (first..first + count)
            .map(|pfn| release_run(mem, pfn, 1))
            .sum(),
        Err(e) => {
            warn_rate_limited!("virtio-balloon: inflating pages failed: {e}");
            0
        }
    }
}

/// The chain's bytes, from driver-readable buffers inside guest memory, at most
/// `MAX_CHAIN_BYTES` of them.
fn readable_bytes(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<Vec<u8>, &'static str> {
    let mut bytes = Vec::new();
    let mut ended = false;
    for desc in chain {
        if desc.is_write_only() {
            return Err("a buffer is device-writable");
        }
        let room = MAX_CHAIN_BYTES as usize - bytes.len();
        let len = (desc.len() as usize).min(room);
        let start = bytes.len();
        bytes.resize(start + len, 0);
        if mem.read_slice(&mut bytes[start..], desc.addr()).is_err() {
            return Err("a buffer is outside guest memory");
        }
        ended = !desc.has_next();
    }
    // The iterator stops early, with `next` still set, on loops and out-of-table indices.
    if !ended {
        return Err("the chain loops or has a bad `next`");
    }
    Ok(bytes)
}

//! virtio devices over the virtio-mmio transport: the device trait, the interrupt shared by a
//! transport and its device's event loop, and the constants of the virtio 1.2 specification.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// Logs a `tracing::warn!` at most a few times per second per call site, so that a guest cannot
/// flood the host's log by repeating a bad access.
macro_rules! warn_rate_limited {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::devices::virtio::LogLimiter =
            $crate::devices::virtio::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)*);
            } else {
                tracing::warn!($($arg)*);
            }
        }
    }};
}

pub mod balloon;
pub mod block;
pub mod event_loop;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod epoll_backends;
#[cfg(test)]
pub(crate) mod test_utils;

pub use balloon::Balloon;
pub use block::Block;
pub use mmio::MmioTransport;
pub use rng::Rng;

/// Device types (virtio 1.2 section 5).
pub use virtio_bindings::virtio_ids::{
    VIRTIO_ID_BALLOON as TYPE_BALLOON, VIRTIO_ID_BLOCK as TYPE_BLOCK, VIRTIO_ID_RNG as TYPE_RNG,
};

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;

    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bits every device may offer (virtio 1.2 section 6), as bit numbers.
pub mod features {
    pub const VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    pub const RING_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// The mask of a feature bit number.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues, the device needs {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("the device is already active")]
    AlreadyActive,
    #[error("the device's backend is gone: an earlier activation failed after taking it")]
    BackendLost,
    #[error("creating the event loop's kill eventfd failed")]
    CreateKillEvent(#[source] io::Error),
    #[error("creating the event loop's epoll failed")]
    CreateEpoll(#[source] io::Error),
    #[error("watching the kill eventfd in the event loop failed")]
    WatchKillEvent(#[source] io::Error),
    #[error("watching queue {index}'s notification eventfd in the event loop failed")]
    WatchQueue {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("starting the device's backend in its event loop failed")]
    StartBackend(#[source] event_loop::Error),
    #[error("starting the event loop thread failed")]
    SpawnThread(#[source] io::Error),
}

/// A virtio device model, driven by a transport.
///
/// The transport owns the register file; the device owns its configuration space and, once
/// activated, an event loop that serves its queues.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_BLOCK`, `TYPE_RNG`...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of those queues, from the first, the driver sets up under the features it
    /// acked; the device is activated with those. All of them unless a device's queues depend
    /// on its features (the balloon's stats and reporting queues).
    fn active_queue_count(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// The feature bits the device offers, including `VERSION_1`.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; writes to read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Hands the device its interrupt once, when the transport is built (before any
    /// activation). A device whose configuration space changes on its own (the balloon's
    /// target, set through the VMM API) keeps it and calls
    /// [`Interrupt::signal_config_changed`] after each change.
    fn attach_interrupt(&mut self, _interrupt: &Arc<Interrupt>) {}
    /// Starts serving `queues`, each with the eventfd the driver's notifications arrive on.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError>;
    /// Stops the event loop and returns to the state before activation, so the driver can
    /// initialise the device again.
    fn reset(&mut self);
    /// The VM is stopping (its vCPUs already have): finish what is in flight, stop the event
    /// loop and make what the guest wrote durable (a disk syncs its image). Errors are the
    /// device's to log. By default the same as a reset.
    fn shutdown(&mut self) {
        self.reset();
    }
}

/// The interrupt of one virtio-mmio device: the InterruptStatus register, shared by the transport
/// (which reads and acknowledges it) and the device's event loop (which raises it), the eventfd
/// the VMM registers as the device's KVM irqfd, and the configuration generation the transport's
/// ConfigGeneration register shows.
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl Interrupt {
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver that a queue's used ring has new entries.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INT_USED_RING)
    }

    /// Tells the driver that the configuration space changed: a new configuration generation,
    /// then the config bit and the interrupt. Call it once `read_config` returns the new bytes,
    /// still holding whatever lock `read_config` takes: a driver reading the space between two
    /// ConfigGeneration reads then either sees one version of it, or sees the generation move
    /// and reads again (virtio 1.2 section 2.5, Device Configuration Space).
    pub fn signal_config_changed(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(INT_CONFIG)
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        // The status bit must be visible before the guest takes the interrupt and reads it.
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The InterruptACK register: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd that injects the interrupt into the guest.
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

/// A driver's read of `data.len()` bytes at `offset` of a configuration space whose bytes are
/// `config`: bytes beyond it read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
        let len = src.len().min(data.len());
        data[..len].copy_from_slice(&src[..len]);
    }
}

/// Messages a call site may log per second before it is silenced until the next second.
const LOG_BURST: u64 = 5;

/// The state behind `warn_rate_limited!`: one per call site.
pub struct LogLimiter {
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(messages suppressed since the last one logged)` when this message may be
    /// logged, `None` when it must be dropped.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < LOG_BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_sets_status_before_writing_the_irq_and_ack_clears_only_acked_bits() {
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        assert_eq!(interrupt.status(), 0);
        assert!(interrupt.irq().read().is_err(), "no interrupt yet");

        interrupt.signal_used_queue().unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING);
        assert_eq!(interrupt.irq().read().unwrap(), 1);

        assert_eq!(interrupt.config_generation(), 0);
        interrupt.signal_config_changed().unwrap();
        assert_eq!(interrupt.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(
            interrupt.config_generation(),
            1,
            "a new configuration generation"
        );
        assert_eq!(interrupt.irq().read().unwrap(), 1);
        interrupt.ack(INT_USED_RING);
        assert_eq!(interrupt.status(), INT_CONFIG);
        interrupt.clear();
        assert_eq!(interrupt.status(), 0);
    }

    #[test]
    fn config_reads_past_the_end_read_zeros() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_space(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_space(&config, 9, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_space(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
        let mut byte = [0u8; 1];
        read_config_space(&config, 0, &mut byte);
        assert_eq!(byte, [1]);
    }

    #[test]
    fn log_limiter_allows_a_burst_then_counts_what_it_drops() {
        // A second boundary may pass during the test; retry once if it did.
        for _ in 0..2 {
            let limiter = LogLimiter::new();
            let start = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let allowed = (0..100).filter(|_| limiter.allow().is_some()).count();
            let end = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            if start.as_secs() == end.as_secs() && allowed as u64 == LOG_BURST {
                return;
            }
        }
        panic!("the limiter let through more than a burst per second");
    }
}

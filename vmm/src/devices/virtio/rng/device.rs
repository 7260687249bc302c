//! The virtio-rng device model and its request handling.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};
use vmm_sys_util::eventfd::EventFd;

use super::{Error, MAX_BYTES_PER_REQUEST, QUEUE_SIZE};
use crate::devices::virtio::event_loop::{DeviceHandler, EventLoop};
use crate::devices::virtio::{feature, features, ActivateError, Interrupt, VirtioDevice, TYPE_RNG};
use crate::memory::GuestMemory;

/// Numbers the event loop threads: "virtio-rng-0"...
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A virtio entropy device.
pub struct Rng {
    acked_features: u64,
    event_loop: EventLoop<RngHandler>,
}

impl Rng {
    /// Creates the device after checking that getrandom(2) works on this host.
    pub fn new() -> Result<Self, Error> {
        let mut probe = [0u8; 1];
        fill_random(&mut probe).map_err(Error::GetRandom)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            acked_features: 0,
            event_loop: EventLoop::new(format!("virtio-rng-{id}"), 1),
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        feature(features::VERSION_1) | feature(features::RING_EVENT_IDX)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn_rate_limited!("virtio-rng: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        self.event_loop.activate(mem, interrupt, queues, || {
            Ok(RngHandler {
                buffer: vec![0; MAX_BYTES_PER_REQUEST as usize],
            })
        })
    }

    fn reset(&mut self) {
        self.event_loop.stop();
        self.acked_features = 0;
    }
}

/// Serves the entropy queue on the device's event loop.
struct RngHandler {
    buffer: Vec<u8>,
}

impl DeviceHandler for RngHandler {
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let buffers = match writable_buffers(mem, chain) {
            Ok(buffers) => buffers,
            Err(why) => {
                warn_rate_limited!("virtio-rng: dropping request: {why}");
                return 0;
            }
        };
        let mut written = 0u32;
        for (addr, len) in buffers {
            let len = len.min(MAX_BYTES_PER_REQUEST - written) as usize;
            if len == 0 {
                break;
            }
            let bytes = &mut self.buffer[..len];
            if let Err(e) = fill_random(bytes) {
                warn_rate_limited!("virtio-rng: getrandom failed: {e}");
                break;
            }
            // The buffer was checked to lie in guest memory.
            if mem.write_slice(bytes, addr).is_err() {
                break;
            }
            written += len as u32;
        }
        written
    }
}

/// The chain's buffers, all device-writable and inside guest memory.
fn writable_buffers(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<Vec<(GuestAddress, u32)>, &'static str> {
    let mut buffers = Vec::new();
    let mut ended = false;
    for desc in chain {
        if !desc.is_write_only() {
            return Err("a buffer is not device-writable");
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err("a buffer is outside guest memory");
        }
        buffers.push((desc.addr(), desc.len()));
        ended = !desc.has_next();
    }
    // The iterator stops early, with `next` still set, on loops and out-of-table indices.
    if !ended {
        return Err("the chain loops or has a bad `next`");
    }
    Ok(buffers)
}

/// Fills `bytes` from getrandom(2), retrying short reads and signals.
fn fill_random(bytes: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        let rest = &mut bytes[done..];
        // SAFETY: `rest` is a valid, exclusively borrowed buffer of `rest.len()` bytes.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += got as usize;
        }
    }
    Ok(())
}

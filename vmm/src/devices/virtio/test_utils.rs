//! Test harness: real guest memory, a driver-side split queue on it, a device activated on that
//! queue with a live event loop, and backends watched on a plain epoll.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(crate) use super::epoll_backends::EpollBackends;
use super::{Interrupt, VirtioDevice, INT_USED_RING};
use crate::memory::GuestMemory;

pub(crate) const MEM_SIZE: usize = 16 << 20;
/// Where tests put their buffers, well after the queue's rings.
pub(crate) const DATA: u64 = 0x10_0000;
/// An address beyond guest memory.
pub(crate) const OUTSIDE: u64 = 0x4000_0000;
pub(crate) const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub(crate) const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub(crate) const QUEUE_LEN: u16 = 256;

pub(crate) fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The driver's side of one queue.
pub(crate) struct TestQueue {
    pub(crate) mem: &'static GuestMemory,
    pub(crate) mock: MockSplitQueue<'static, GuestMemory>,
    pub(crate) interrupt: Arc<Interrupt>,
    notify: EventFd,
    next_desc: u16,
    used_seen: u16,
    /// Whether [`wait_used`](Self::wait_used) also waits for (and acknowledges) the interrupt;
    /// not with a shared interrupt, where another queue's wait may have acknowledged it.
    own_interrupt: bool,
}

impl TestQueue {
    pub(crate) fn new() -> Self {
        // Leaked so that the mock queue can borrow it for the whole test.
        let mem: &'static GuestMemory = Box::leak(Box::new(guest_memory()));
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        Self {
            own_interrupt: true,
            ..Self::at(mem, interrupt, GuestAddress(0))
        }
    }

    /// One of several queues of a device: its rings at `start` in `mem` (keep them below
    /// [`DATA`], 64 KiB apart), sharing the device's `interrupt`.
    pub(crate) fn at(
        mem: &'static GuestMemory,
        interrupt: Arc<Interrupt>,
        start: GuestAddress,
    ) -> Self {
        Self {
            mem,
            mock: MockSplitQueue::create(mem, start, QUEUE_LEN),
            interrupt,
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            next_desc: 0,
            used_seen: 0,
            own_interrupt: false,
        }
    }

    /// The queue and its notification event, as `VirtioDevice::activate` takes them.
    pub(crate) fn queue_and_event(&self, event_idx: bool) -> (Queue, EventFd) {
        let mut queue: Queue = self.mock.create_queue().unwrap();
        queue.set_event_idx(event_idx);
        (queue, self.notify.try_clone().unwrap())
    }

    /// Activates `device` on this queue.
    pub(crate) fn activate(&self, device: &mut dyn VirtioDevice, event_idx: bool) {
        let queues = vec![self.queue_and_event(event_idx)];
        device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .unwrap();
    }

    /// Publishes a chain of `(addr, len, flags)` descriptors linked in order; returns its head.
    pub(crate) fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { flags } else { flags | NEXT };
                (addr, len, flags, i as u16 + 1)
            })
            .collect();
        self.add_raw(&raw)
    }

    /// Stores `(addr, len, flags, next)` descriptors exactly as given (`next` relative to the
    /// head) and publishes the first as a chain head.
    pub(crate) fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let desc = SplitDescriptor::new(addr, len, flags, head.wrapping_add(next));
            self.mock
                .desc_table()
                .store(head + i as u16, RawDescriptor::from(desc))
                .unwrap();
        }
        self.next_desc += descs.len() as u16;
        let avail = self.mock.avail();
        let idx = avail.idx().load();
        avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_LEN))
            .unwrap()
            .store(head);
        avail.idx().store(idx.wrapping_add(1));
        head
    }

    /// Notifies the device, waits until it has used `count` more chains and returns their
    /// used elements as `(head, len)`.
    pub(crate) fn kick(&mut self, count: u16) -> Vec<(u32, u32)> {
        // Like Linux's virtqueue_enable_cb: interrupt me once the next chain is used.
        self.set_used_event(self.used_seen);
        self.notify();
        self.wait_used(count)
    }

    /// Notifies the device without waiting.
    pub(crate) fn notify(&self) {
        self.notify.write(1).unwrap();
    }

    /// Waits until the device has used `count` more chains (on its own, or after a
    /// [`notify`](Self::notify)) and returns their used elements as `(head, len)`.
    pub(crate) fn wait_used(&mut self, count: u16) -> Vec<(u32, u32)> {
        let target = self.used_seen + count;
        wait_for(
            || self.mock.used().idx().load() >= target,
            "the device to use the chains",
        );
        assert_eq!(
            self.mock.used().idx().load(),
            target,
            "more chains used than published"
        );
        let used = (self.used_seen..target)
            .map(|i| {
                let elem = self
                    .mock
                    .used()
                    .ring()
                    .ref_at(usize::from(i))
                    .unwrap()
                    .load();
                (elem.id(), elem.len())
            })
            .collect();
        self.used_seen = target;
        if !self.own_interrupt {
            return used;
        }
        wait_for(
            || self.interrupt.status() & INT_USED_RING != 0,
            "the used-ring interrupt",
        );
        self.interrupt.ack(INT_USED_RING);
        used
    }

    /// The avail ring's `used_event` (EVENT_IDX): interrupt when the used index passes it.
    pub(crate) fn set_used_event(&self, value: u16) {
        let addr = self.mock.avail_addr().0 + 4 + 2 * u64::from(QUEUE_LEN);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    pub(crate) fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }
}

pub(crate) fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

//! The virtio-vsock device (type 19): its configuration (the guest CID) and the worker thread
//! that moves packets between the guest's queues and the host-side `Muxer`.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::Header;
use crate::devices::virtio::{feature, features, ActivateError, Interrupt, VirtioDevice};
use crate::memory::GuestMemory;

pub const TYPE_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// Largest payload one packet may carry (Linux sends at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;
const KILL_TOKEN: u64 = u64::MAX;
const MUXER_TOKEN: u64 = u64::MAX - 1;

pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    /// The muxer lives here while the device is inactive and in the worker while it runs.
    muxer: Arc<Mutex<Option<Muxer>>>,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl Vsock {
    pub fn new(guest_cid: u64, muxer: Muxer) -> Self {
        Self {
            guest_cid,
            acked_features: 0,
            muxer: Arc::new(Mutex::new(Some(muxer))),
            worker: None,
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        feature(features::VERSION_1)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        data.fill(0);
        if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        warn_rate_limited!("virtio-vsock: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        let muxer = lock(&self.muxer)
            .take()
            .ok_or(ActivateError::AlreadyActive)?;
        let kill = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::CreateKillEvent)?;
        let epoll = Epoll::new().map_err(ActivateError::CreateEpoll)?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ActivateError::RegisterEvent)
        };
        add(kill.as_raw_fd(), KILL_TOKEN)?;
        add(muxer.as_raw_fd(), MUXER_TOKEN)?;
        for (i, (_, event)) in queues.iter().enumerate() {
            add(event.as_raw_fd(), i as u64)?;
        }
        let worker_kill = kill.try_clone().map_err(ActivateError::CreateKillEvent)?;
        let slot = self.muxer.clone();
        let mut worker = VsockWorker {
            mem,
            interrupt,
            queues,
            muxer,
            epoll,
            kill: worker_kill,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-vsock".into())
            .spawn(move || {
                worker.run();
                // Hand the muxer (and its listening socket) back for the next activation.
                let mut muxer = worker.muxer;
                muxer.reset();
                *lock(&slot) = Some(muxer);
            })
            .map_err(ActivateError::SpawnWorker)?;
        self.worker = Some((kill, thread));
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((kill, thread)) = self.worker.take() {
            if kill.write(1).is_ok() && thread.join().is_err() {
                tracing::error!("the virtio-vsock worker panicked");
            }
        }
        self.acked_features = 0;
    }
}

fn lock(m: &Mutex<Option<Muxer>>) -> std::sync::MutexGuard<'_, Option<Muxer>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct VsockWorker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<(Queue, EventFd)>,
    muxer: Muxer,
    epoll: Epoll,
    kill: EventFd,
}

impl VsockWorker {
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-vsock: waiting for events failed, stopping: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                match event.data() {
                    KILL_TOKEN => {
                        let _ = self.kill.read();
                        return;
                    }
                    MUXER_TOKEN => self.muxer.process_host_events(),
                    queue => {
                        if let Some((_, evt)) = self.queues.get(queue as usize) {
                            let _ = evt.read();
                        }
                        if queue as usize == TX_QUEUE {
                            self.process_tx();
                        }
                        // The event queue only carries transport resets, which we never send.
                        let _ = EVENT_QUEUE;
                    }
                }
            }
            // Whatever happened may have produced packets for the guest.
            self.process_rx();
        }
    }

    /// Packets from the guest: each goes to the muxer, its buffer straight back.
    fn process_tx(&mut self) {
        let mem = &self.mem;
        let queue = &mut self.queues[TX_QUEUE].0;
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::read_from(&pkt);
                    let data = if hdr.len > 0 { pkt.data_slice() } else { None };
                    self.muxer.send_pkt(&hdr, data);
                }
                Err(e) => warn_rate_limited!("virtio-vsock: dropping a malformed TX packet: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                warn_rate_limited!("virtio-vsock: add_used on TX failed: {e}");
            }
            used = true;
        }
        if used {
            self.signal();
        }
    }

    /// Packets for the guest, as long as there are both packets and RX buffers.
    fn process_rx(&mut self) {
        let mem = &self.mem;
        let queue = &mut self.queues[RX_QUEUE].0;
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    let mut hdr = Header::default();
                    if !self.muxer.recv_pkt(&mut hdr, pkt.data_slice()) {
                        queue.go_to_previous_position();
                        break;
                    }
                    hdr.write_to(&mut pkt);
                    PKT_HEADER_SIZE as u32 + hdr.len
                }
                Err(e) => {
                    warn_rate_limited!("virtio-vsock: unusable RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                warn_rate_limited!("virtio-vsock: add_used on RX failed: {e}");
            }
            used = true;
        }
        if used {
            self.signal();
        }
    }

    fn signal(&self) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            warn_rate_limited!("virtio-vsock: raising the interrupt failed: {e}");
        }
    }
}

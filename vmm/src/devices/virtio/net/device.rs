//! The virtio-net device (type 1): its features and configuration space, and the handler that
//! moves frames between the guest's queues and the backend socket on the device's event loop.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net as vn;
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, ReadResult};
use super::frame::{tx_frame, Next};
use super::queue::{deliver, read_tx_chain, Outcome, RxMode};
use super::{Counters, Error, MAX_FRAME, NET_HDR_LEN, QUEUE_SIZE, RECONNECT_PERIOD};
use crate::devices::virtio::event_loop::{
    self, Backends, Context, DeviceHandler, EventLoop, Served,
};
use crate::devices::virtio::{
    feature, features, read_config_space, ActivateError, Interrupt, VirtioDevice,
};
use crate::memory::GuestMemory;

pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_COUNT: usize = 2;
/// The backend socket's token in the event loop.
const SOCKET: u32 = 1;
/// The reconnection timer's token.
const RECONNECT: u32 = 1;
/// Reads from the socket per wakeup at most, so the TX queue is served in between.
const READS_PER_EVENT: usize = 16;

/// Numbers the event loop threads: "virtio-net-0"...
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// The features the device offers (see the module documentation for why these).
const AVAIL_FEATURES: u64 = feature(features::VERSION_1)
    | feature(features::RING_EVENT_IDX)
    | feature(vn::VIRTIO_NET_F_CSUM)
    | feature(vn::VIRTIO_NET_F_GUEST_CSUM)
    | feature(vn::VIRTIO_NET_F_MTU)
    | feature(vn::VIRTIO_NET_F_MAC)
    | feature(vn::VIRTIO_NET_F_STATUS)
    | feature(vn::VIRTIO_NET_F_MRG_RXBUF);

/// A virtio network device whose backend is a unix stream socket.
pub struct Net {
    backend: Option<Backend>,
    /// mac (6), status (2), max_virtqueue_pairs (2), mtu (2), as virtio_net_config lays them.
    config: [u8; 12],
    acked_features: u64,
    counters: Arc<Counters>,
    event_loop: EventLoop<NetHandler>,
}

impl Net {
    /// A device that will connect to `socket` when the driver starts it, offering the guest
    /// `mac` and `mtu`.
    pub fn new(socket: &Path, mac: &str, mtu: u16) -> Result<Self, Error> {
        let mac = berth_machine::parse_mac(mac).map_err(Error::Mac)?;
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            backend: Some(Backend::new(socket)),
            config,
            acked_features: 0,
            counters: Arc::default(),
            event_loop: EventLoop::new(format!("virtio-net-{id}"), QUEUE_COUNT),
        })
    }

    /// What the device dropped or refused so far.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUE_COUNT]
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only without VIRTIO_NET_F_MAC and VERSION_1 (legacy drivers).
        warn_rate_limited!("virtio-net: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let acked = self.acked_features;
        let mode = RxMode {
            mergeable: acked & feature(vn::VIRTIO_NET_F_MRG_RXBUF) != 0,
            data_valid: acked & feature(vn::VIRTIO_NET_F_GUEST_CSUM) != 0,
        };
        let counters = self.counters.clone();
        self.event_loop.activate(mem, interrupt, queues, || {
            let backend = self.backend.take().ok_or(ActivateError::BackendLost)?;
            Ok(NetHandler::new(backend, mode, counters))
        })
    }

    fn reset(&mut self) {
        if let Some(handler) = self.event_loop.stop() {
            // Back for the next activation, which connects again.
            let mut backend = handler.backend;
            backend.disconnect();
            self.backend = Some(backend);
        }
        self.acked_features = 0;
    }
}

/// Serves the queues on the device's event loop; the socket is its one backend fd.
pub(super) struct NetHandler {
    backend: Backend,
    mode: RxMode,
    counters: Arc<Counters>,
    /// What the socket is watched for, while it is watched.
    watched: Option<EventSet>,
    /// A whole frame waits for RX buffers: the socket is not read meanwhile.
    rx_blocked: bool,
    /// TX chains were left in the queue because the socket is behind.
    tx_stalled: bool,
    /// The backend was lost and the loss is not logged as mended yet.
    outage: bool,
    /// One TX packet (header and frame) as read from its chain.
    packet: Vec<u8>,
}

impl NetHandler {
    pub(super) fn new(backend: Backend, mode: RxMode, counters: Arc<Counters>) -> Self {
        Self {
            backend,
            mode,
            counters,
            watched: None,
            rx_blocked: false,
            tx_stalled: false,
            outage: false,
            packet: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
        }
    }

    /// Connects to the backend, or starts retrying every `RECONNECT_PERIOD`.
    fn connect(&mut self, ctx: &mut Context<'_>) {
        match self.backend.connect() {
            Ok(()) => {
                ctx.registry().stop_timer(RECONNECT);
                self.watched = None;
                self.rx_blocked = false;
                self.tx_stalled = false;
                if std::mem::take(&mut self.outage) {
                    tracing::info!(
                        "virtio-net: reconnected to {}",
                        self.backend.path().display()
                    );
                } else {
                    tracing::info!("virtio-net: connected to {}", self.backend.path().display());
                }
                self.update_interest(ctx);
            }
            Err(e) => {
                if !std::mem::replace(&mut self.outage, true) {
                    tracing::warn!(
                        "virtio-net: cannot connect to {} ({e}); frames are dropped until it answers",
                        self.backend.path().display()
                    );
                }
                self.start_reconnecting(ctx);
            }
        }
    }

    fn start_reconnecting(&mut self, ctx: &mut Context<'_>) {
        if let Err(e) =
            ctx.registry()
                .start_timer(RECONNECT, RECONNECT_PERIOD, Some(RECONNECT_PERIOD))
        {
            tracing::error!(
                "virtio-net: the backend cannot be reconnected: {}",
                berth_errors::Chain(&e)
            );
        }
    }

    /// The connection is over: stop watching it, drop what was in flight, reconnect later.
    fn lost(&mut self, ctx: &mut Context<'_>) {
        if let Some(fd) = self.backend.fd() {
            ctx.registry().remove(fd, SOCKET);
        }
        self.backend.disconnect();
        self.watched = None;
        self.rx_blocked = false;
        self.tx_stalled = false;
        self.outage = true;
        tracing::warn!(
            "virtio-net: the backend {} went away; frames are dropped until it is back",
            self.backend.path().display()
        );
        self.start_reconnecting(ctx);
        // Chains held back for the socket are completed (their frames dropped).
        self.process_tx(ctx);
    }

    /// Watches the socket for reading while the frame buffer has room, for writing while bytes
    /// wait.
    fn update_interest(&mut self, ctx: &mut Context<'_>) {
        let mut interest = EventSet::empty();
        if self.backend.rx_room() {
            interest |= EventSet::IN;
        }
        if self.backend.tx_pending() {
            interest |= EventSet::OUT;
        }
        let Some(fd) = self.backend.fd() else {
            return;
        };
        let result = match self.watched {
            Some(watched) if watched == interest => return,
            Some(_) => ctx.registry().modify(fd, SOCKET, interest),
            None => ctx.registry().add(fd, SOCKET, interest),
        };
        match result {
            Ok(()) => self.watched = Some(interest),
            Err(e) => {
                tracing::error!("virtio-net: {}", berth_errors::Chain(&e));
                self.lost(ctx);
            }
        }
    }

    /// Frames from the guest: queued for the socket (or dropped without one), chains used.
    fn process_tx(&mut self, ctx: &mut Context<'_>) {
        loop {
            self.tx_stalled = false;
            let Self {
                backend,
                counters,
                packet,
                tx_stalled,
                ..
            } = self;
            ctx.drain_queue(TX_QUEUE, |mem, chain, _| {
                if backend.is_connected() && !backend.can_queue() {
                    *tx_stalled = true;
                    return Served::Later;
                }
                take_tx_chain(mem, chain, packet, backend, counters);
                Served::Used(0)
            });
            if let Err(e) = self.backend.flush() {
                tracing::debug!("virtio-net: writing to the backend failed: {e}");
                self.lost(ctx);
                return;
            }
            // Stalled, but the socket took it all at once: take more.
            if !(self.tx_stalled && self.backend.can_queue()) {
                break;
            }
        }
        self.update_interest(ctx);
    }

    /// Reads from the socket and delivers the frames, until the socket is empty, the frame
    /// buffer is full (while RX buffers are out, frames wait there), or it has had its turn.
    fn process_rx(&mut self, ctx: &mut Context<'_>) {
        for _ in 0..READS_PER_EVENT {
            if !self.rx_blocked {
                self.deliver_frames(ctx);
            }
            if !self.backend.is_connected() || !self.backend.rx_room() {
                break;
            }
            match self.backend.read() {
                ReadResult::Data => {}
                ReadResult::WouldBlock => break,
                ReadResult::Closed => {
                    self.deliver_frames(ctx);
                    self.lost(ctx);
                    return;
                }
            }
        }
        if !self.rx_blocked {
            self.deliver_frames(ctx);
        }
        self.update_interest(ctx);
    }

    /// Moves the whole frames already read into the RX queue.
    fn deliver_frames(&mut self, ctx: &mut Context<'_>) {
        let mode = self.mode;
        loop {
            let frames = self.backend.frames();
            let frame = match frames.next() {
                Next::Frame(frame) => frame,
                Next::Dropped(len) => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    warn_rate_limited!("virtio-net: dropping a {len}-byte frame from the backend");
                    continue;
                }
                Next::Partial => return,
            };
            let len = frame.len();
            let Some(delivery) =
                ctx.with_queue(RX_QUEUE, |mem, queue| deliver(mem, queue, frame, mode))
            else {
                return;
            };
            for e in &delivery.bad_chains {
                self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                warn_rate_limited!("virtio-net: unusable RX buffer: {e}");
            }
            match delivery.outcome {
                Outcome::Delivered(_) => frames.consume(),
                Outcome::TooLarge => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    warn_rate_limited!(
                        "virtio-net: dropping a {len}-byte frame: the guest's RX buffers cannot hold it"
                    );
                    frames.consume();
                }
                Outcome::NoBuffers => {
                    self.rx_blocked = true;
                    return;
                }
            }
        }
    }
}

/// Reads one TX chain and queues its frame, or counts why it cannot be sent.
fn take_tx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    packet: &mut Vec<u8>,
    backend: &mut Backend,
    counters: &Counters,
) {
    if let Err(e) = read_tx_chain(mem, chain, packet) {
        counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        warn_rate_limited!("virtio-net: dropping a malformed TX chain: {e}");
        return;
    }
    match tx_frame(packet) {
        Ok(frame) if backend.is_connected() => backend.queue_frame(frame),
        Ok(_) => {
            counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            warn_rate_limited!("virtio-net: dropping a TX frame: {e}");
        }
    }
}

impl DeviceHandler for NetHandler {
    fn start(&mut self, ctx: &mut Context<'_>) -> Result<(), event_loop::Error> {
        self.connect(ctx);
        Ok(())
    }

    fn queue_ready(&mut self, ctx: &mut Context<'_>, index: usize) {
        match index {
            TX_QUEUE => self.process_tx(ctx),
            // New RX buffers: deliver what waited for them, then read the socket again.
            RX_QUEUE if self.rx_blocked => {
                self.rx_blocked = false;
                self.process_rx(ctx);
            }
            _ => {}
        }
    }

    fn backend_event(&mut self, ctx: &mut Context<'_>, token: u32, readiness: EventSet) {
        if token != SOCKET || !self.backend.is_connected() {
            return;
        }
        if readiness.contains(EventSet::OUT) {
            self.process_tx(ctx);
            if !self.backend.is_connected() {
                return;
            }
        }
        if readiness.contains(EventSet::IN) {
            self.process_rx(ctx);
        } else if readiness.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Not reading (the frame buffer is full) and the peer is gone.
            self.lost(ctx);
        }
    }

    fn timer(&mut self, ctx: &mut Context<'_>, token: u32) {
        if token == RECONNECT && !self.backend.is_connected() {
            self.connect(ctx);
        }
    }

    fn batch_done(&mut self, ctx: &mut Context<'_>) {
        if !self.rx_blocked && self.backend.is_connected() {
            self.deliver_frames(ctx);
            self.update_interest(ctx);
        }
    }
}

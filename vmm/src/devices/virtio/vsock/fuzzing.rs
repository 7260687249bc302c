//! Entry point for the `vsock_queue` fuzz target in `vmm/fuzz/` (feature `fuzzing`): the
//! virtio-vsock device's TX and RX paths on split queues that start as the fuzzer's bytes lay
//! them out (descriptor tables, avail rings, buffers) and to which the guest then adds packets
//! and RX buffers of its own making, served by a real muxer whose host side (a listener, host
//! `CONNECT` clients, their writes, shutdowns and closes) the same bytes drive.
//!
//! The device's handler only runs inside its event loop, whose `Context` cannot be made
//! outside it, so the few lines of `process_tx` and `process_rx` that hand chains to the
//! muxer are repeated here; everything they call (descriptor parsing, `rx_packet`, the muxer,
//! the connections) is the device's own.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, VolatileSlice};
use vmm_sys_util::epoll::EpollEvent;

use super::device::{rx_packet, MAX_PKT_DATA};
use super::muxer::{Muxer, FIRST_LOCAL_PORT};
use super::packet::{Header, Op, HOST_CID, SHUTDOWN_SEND, VSOCK_TYPE_STREAM};
use crate::devices::virtio::epoll_backends::EpollBackends;
use crate::devices::virtio::net::fuzzing::{queue_from, Input};
use crate::memory::GuestMemory;

const GUEST_CID: u64 = 3;
/// The host port with a listener behind it (`v.sock_1024`).
const LISTENED_PORT: u32 = 1024;
/// A host port nobody listens on: a request to it is answered with a reset.
const UNLISTENED_PORT: u32 = 1025;
/// Host `CONNECT`s per input: enough to have several connections the host started.
const MAX_HOST_CONNECTS: u32 = 4;
/// Steps per input, so that a long input stays a fast one.
const MAX_STEPS: usize = 256;
const HDR_LEN: u32 = PKT_HEADER_SIZE as u32;
/// Where the guest's own packets and RX buffers go: slots above the raw layout's buffers
/// (which end by 32 KiB) in the 1 MiB of each queue's memory. A large payload runs on into
/// the next slots, and the last slot's still ends within guest memory.
const SLOTS: u64 = 0x8_0000;
const SLOT_SIZE: u64 = 0x2000;
const SLOT_COUNT: u64 = 32;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// (host port, guest port), as the muxer keys its connections.
type Key = (u32, u32);

/// The scratch directory the muxer listens in, and the host listener behind
/// `LISTENED_PORT`; made once, as each input's muxer is made afresh.
struct Scratch {
    dir: PathBuf,
    listener: UnixListener,
}

static SCRATCH: OnceLock<Scratch> = OnceLock::new();

fn scratch() -> &'static Scratch {
    SCRATCH.get_or_init(|| {
        // The VMM binary's Rust runtime ignores SIGPIPE; libFuzzer's `main` does not, and a
        // muxer writing to a host socket the input closed must see EPIPE, not end the process.
        // SAFETY: sets the disposition of one signal to "ignore"; no handler code runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = std::env::temp_dir().join(format!("berth-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the scratch directory");
        let listener = UnixListener::bind(dir.join(format!("v.sock_{LISTENED_PORT}")))
            .expect("the host listener binds in a fresh directory");
        listener
            .set_nonblocking(true)
            .expect("a fresh listener can be made nonblocking");
        Scratch { dir, listener }
    })
}

/// The host's end of one muxer connection, and what the oracles know about it.
struct HostEnd {
    /// `None` once the input closed it.
    stream: Option<UnixStream>,
    /// The host shut its sending side or closed the socket.
    host_shut: bool,
    /// Bytes the host wrote; the guest must receive exactly these, in order.
    written: Vec<u8>,
    /// Bytes the host read; always a prefix of `expected`.
    read: Vec<u8>,
    /// The `OK` line (for a host `CONNECT`) and the payloads of every RW packet the guest
    /// sent on the connection's key since it was made.
    expected: Vec<u8>,
    /// Bytes of RW packets the guest received on the connection.
    rx_cnt: Wrapping<u32>,
    /// The guest's receive buffer as its last packet on the key described it.
    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
}

impl HostEnd {
    fn new(stream: UnixStream, expected: Vec<u8>, buf_alloc: u32, fwd_cnt: u32) -> Self {
        Self {
            stream: Some(stream),
            host_shut: false,
            written: Vec::new(),
            read: Vec::new(),
            expected,
            rx_cnt: Wrapping(0),
            buf_alloc,
            fwd_cnt: Wrapping(fwd_cnt),
        }
    }

    /// Reads what the muxer forwarded so far; it must be the guest's bytes, in order.
    fn drain(&mut self, key: Key) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.read.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        assert!(
            self.expected.starts_with(&self.read),
            "connection {key:?}: the host read {} bytes that are not the guest's {} bytes in order",
            self.read.len(),
            self.expected.len()
        );
    }
}

fn encode(hdr: &Header) -> [u8; PKT_HEADER_SIZE] {
    let mut b = [0u8; PKT_HEADER_SIZE];
    b[0..8].copy_from_slice(&hdr.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&hdr.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&hdr.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&hdr.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&hdr.len.to_le_bytes());
    b[28..30].copy_from_slice(&hdr.type_.to_le_bytes());
    b[30..32].copy_from_slice(&hdr.op.to_le_bytes());
    b[32..36].copy_from_slice(&hdr.flags.to_le_bytes());
    b[36..40].copy_from_slice(&hdr.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&hdr.fwd_cnt.to_le_bytes());
    b
}

/// Byte `i` of a stream, which repeats only every 251 × 256 bytes: bytes delivered out of
/// place do not pass for the right ones.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8 ^ (i / 251) as u8
}

fn u32_from(input: &mut Input<'_>) -> u32 {
    let b = input.take(4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Whether the muxer takes a packet with this header as one for a connection (its key).
fn addressed(hdr: &Header) -> bool {
    hdr.type_ == VSOCK_TYPE_STREAM && hdr.src_cid == GUEST_CID && hdr.dst_cid == HOST_CID
}

/// The guest driver's side of a queue, for the chains it adds after the raw layout:
/// descriptors taken in turn from the table, buffers in turn from the slots.
#[derive(Default)]
struct Driver {
    next_desc: u16,
    next_slot: u64,
}

impl Driver {
    fn slot(&mut self) -> u64 {
        let at = SLOTS + (self.next_slot % SLOT_COUNT) * SLOT_SIZE;
        self.next_slot += 1;
        at
    }

    /// Publishes `descs` (address, length, flags) as one chain, unless a queue's worth is
    /// outstanding already (which a driver never lets happen).
    fn publish(&mut self, mem: &GuestMemory, queue: &Queue, descs: &[(u64, u32, u16)]) {
        let size = queue.size();
        let idx_at = GuestAddress(queue.avail_ring() + 2);
        let Ok(idx) = mem.load::<u16>(idx_at, Ordering::Acquire) else {
            return;
        };
        if idx.wrapping_sub(queue.next_avail()) >= size {
            return;
        }
        let head = self.next_desc % size;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | NEXT };
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&((index + 1) % size).to_le_bytes());
            let at = GuestAddress(queue.desc_table() + 16 * u64::from(index));
            let _ = mem.write_slice(&raw, at);
        }
        self.next_desc = (head + descs.len() as u16) % size;
        let ring_at = GuestAddress(queue.avail_ring() + 4 + 2 * u64::from(idx % size));
        let _ = mem.write_obj(head, ring_at);
        let _ = mem.store(idx.wrapping_add(1), idx_at, Ordering::Release);
    }
}

/// One input's device: the muxer, its queues and the host's ends of its connections.
struct Harness {
    scratch: &'static Scratch,
    muxer: Muxer,
    backends: EpollBackends,
    tx_mem: GuestMemory,
    tx: Queue,
    rx_mem: GuestMemory,
    rx: Queue,
    tx_driver: Driver,
    rx_driver: Driver,
    /// Bytes of payload the guest made so far, for payloads that differ from packet to packet.
    made: usize,
    /// Ordered, so that "the n-th connection" means the same one on every run of an input.
    ends: BTreeMap<Key, HostEnd>,
    host_connects: u32,
}

impl Harness {
    fn new(scratch: &'static Scratch, input: &mut Input<'_>) -> Option<Harness> {
        // Connections another input's muxer made and nobody accepted would be taken for
        // this input's.
        while scratch.listener.accept().is_ok() {}
        let event_idx = input.byte() & 1 != 0;
        let (tx_mem, tx) = queue_from(input, event_idx)?;
        let (rx_mem, rx) = queue_from(input, event_idx)?;
        let mut backends = EpollBackends::new();
        let mut muxer = Muxer::new(GUEST_CID, &scratch.dir.join("v.sock"))
            .expect("the muxer listens in the scratch directory");
        muxer
            .start(&mut backends)
            .expect("the muxer's listener is watched");
        Some(Harness {
            scratch,
            muxer,
            backends,
            tx_mem,
            tx,
            rx_mem,
            rx,
            tx_driver: Driver::default(),
            rx_driver: Driver::default(),
            made: 0,
            ends: BTreeMap::new(),
            host_connects: 0,
        })
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.byte() % 9 {
            0 => self.publish_tx(input),
            1 => {
                self.serve_tx();
            }
            2 => self.publish_rx(input),
            3 => self.serve_rx(),
            4 => self.poll(),
            5 => self.host_connect(input),
            6 => self.host_write(input),
            7 => self.host_close(input),
            _ => self.drain_hosts(),
        }
    }

    /// Serves what is left, as the device would with no more guest or host activity.
    fn finish(&mut self) {
        while self.serve_tx() {}
        for _ in 0..2 {
            self.poll();
            self.serve_rx();
            self.drain_hosts();
        }
    }

    /// The muxer hears what its sockets signalled, without blocking.
    fn poll(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let Ok(n) = self.backends.epoll.wait(0, &mut events) else {
                return;
            };
            for event in &events[..n] {
                self.muxer.handle_host_event(
                    &mut self.backends,
                    event.data() as u32,
                    event.event_set(),
                );
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// The n-th host end, n from the input.
    fn pick_end(&mut self, input: &mut Input<'_>) -> Option<(Key, &mut HostEnd)> {
        if self.ends.is_empty() {
            return None;
        }
        let n = usize::from(input.byte()) % self.ends.len();
        self.ends.iter_mut().nth(n).map(|(key, end)| (*key, end))
    }

    /// A host client asks for a guest port with a whole `CONNECT` line.
    fn host_connect(&mut self, input: &mut Input<'_>) {
        let peer_port = u32::from(input.byte() % 3) + 1;
        if self.host_connects >= MAX_HOST_CONNECTS {
            return;
        }
        let Ok(mut client) = UnixStream::connect(self.muxer.path()) else {
            return;
        };
        if client
            .write_all(format!("CONNECT {peer_port}\n").as_bytes())
            .is_err()
            || client.set_nonblocking(true).is_err()
        {
            return;
        }
        let before = self.muxer.connection_count();
        self.poll();
        assert_eq!(
            self.muxer.connection_count(),
            before + 1,
            "a host CONNECT line did not make a connection"
        );
        // A fresh muxer hands out local ports in order from the first.
        let local_port = FIRST_LOCAL_PORT + self.host_connects;
        self.host_connects += 1;
        let ok_line = format!("OK {local_port}\n").into_bytes();
        let end = HostEnd::new(client, ok_line, 0, 0);
        self.ends.insert((local_port, peer_port), end);
    }

    /// The host writes to one connection, as much as its socket takes.
    fn host_write(&mut self, input: &mut Input<'_>) {
        let len = usize::from(input.byte()) * 64 + 1;
        let Some((_, end)) = self.pick_end(input) else {
            return;
        };
        let Some(stream) = end.stream.as_mut() else {
            return;
        };
        if end.host_shut {
            return;
        }
        let start = end.written.len();
        let bytes: Vec<u8> = (start..start + len).map(pattern).collect();
        if let Ok(n) = stream.write(&bytes) {
            end.written.extend_from_slice(&bytes[..n]);
        }
    }

    /// The host shuts its sending side of one connection, or closes its socket.
    fn host_close(&mut self, input: &mut Input<'_>) {
        let close = input.byte() & 1 != 0;
        let Some((_, end)) = self.pick_end(input) else {
            return;
        };
        if close {
            end.stream = None;
        } else if let Some(stream) = end.stream.as_ref() {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        end.host_shut = true;
    }

    fn drain_hosts(&mut self) {
        for (key, end) in &mut self.ends {
            end.drain(*key);
        }
    }
}

impl Harness {
    /// The guest puts a packet on the TX queue, in a layout a driver may use or one it must
    /// not: header and data apart or in one buffer, a header cut short, data the device may
    /// only write, data past the end of guest memory.
    fn publish_tx(&mut self, input: &mut Input<'_>) {
        let layout = input.byte() % 6;
        // Up to the largest payload the device takes, so that a few packets fill a host
        // socket's buffer.
        let data_len = match input.byte() {
            n @ 0..=127 => u32::from(n) * 32,
            n => (u32::from(n) - 127) * 512,
        };
        let hdr = self.header_from(input, data_len);
        let at = self.tx_driver.slot();
        let data_at = at + u64::from(HDR_LEN);
        let payload: Vec<u8> = (self.made..self.made + data_len as usize)
            .map(pattern)
            .collect();
        self.made += payload.len();
        let _ = self.tx_mem.write_slice(&encode(&hdr), GuestAddress(at));
        let _ = self.tx_mem.write_slice(&payload, GuestAddress(data_at));
        let past_end = self.tx_mem.last_addr().0 - 8;
        let descs = match layout {
            0 => vec![(at, HDR_LEN, 0), (data_at, data_len, 0)],
            1 => vec![(at, HDR_LEN + data_len, 0)],
            2 => vec![(at, HDR_LEN, 0)],
            3 => vec![(at, u32::from(input.byte()) % HDR_LEN, 0)],
            4 => vec![(at, HDR_LEN, 0), (data_at, data_len, WRITE)],
            _ => vec![(at, HDR_LEN, 0), (past_end, data_len.max(64), 0)],
        };
        self.tx_driver.publish(&self.tx_mem, &self.tx, &descs);
    }

    /// The guest offers an RX buffer, in a layout a driver may use or one it must not: header
    /// and data apart or in one buffer, no room for data, an empty or oversized data buffer, a
    /// header the device may only read.
    fn publish_rx(&mut self, input: &mut Input<'_>) {
        let layout = input.byte() % 5;
        let data_len = match input.byte() {
            n @ 0..=63 => u32::from(n),
            n @ 64..=191 => u32::from(n) * 32,
            255 => u32_from(input),
            n => (u32::from(n) - 191) * 1024,
        };
        let at = self.rx_driver.slot();
        let data_at = at + u64::from(HDR_LEN);
        let descs = match layout {
            0 | 1 => vec![(at, HDR_LEN, WRITE), (data_at, data_len, WRITE)],
            2 => vec![(at, HDR_LEN.saturating_add(data_len), WRITE)],
            3 => vec![(at, HDR_LEN, WRITE)],
            _ => vec![(at, HDR_LEN, 0), (data_at, data_len, WRITE)],
        };
        self.rx_driver.publish(&self.rx_mem, &self.rx, &descs);
    }

    /// One TX chain, as the device's `process_tx` serves it; false when the queue is empty.
    fn serve_tx(&mut self) -> bool {
        let Some(mut chain) = self.tx.pop_descriptor_chain(&self.tx_mem) else {
            return false;
        };
        let head = chain.head_index();
        let sent = match VsockPacket::from_tx_virtq_chain(&self.tx_mem, &mut chain, MAX_PKT_DATA) {
            Ok(pkt) => {
                let hdr = Header::read_from(&pkt);
                let data = if hdr.len > 0 { pkt.data_slice() } else { None };
                let payload = data.map(|d| {
                    let mut bytes = vec![0u8; d.len()];
                    d.copy_to(&mut bytes);
                    bytes
                });
                self.muxer.send_pkt(&mut self.backends, &hdr, data);
                Some((hdr, payload))
            }
            Err(_) => None,
        };
        if let Some((hdr, payload)) = sent {
            self.note_tx(&hdr, payload);
        }
        // The device uses every TX chain, with length 0.
        let _ = self.tx.add_used(&self.tx_mem, head, 0);
        true
    }

    /// A header from the input's choices, most of them ones that reach a connection;
    /// `fits` is the payload the packet was laid out with.
    fn header_from(&self, input: &mut Input<'_>, fits: u32) -> Header {
        let sel = u16::from_le_bytes([input.byte(), input.byte()]);
        let op = match input.byte() % 9 {
            n @ 0..=6 => u16::from(n) + 1,
            7 => 0,
            _ => u16::from_le_bytes([input.byte(), input.byte()]),
        };
        let (src_cid, dst_cid) = match sel & 1 {
            0 => (GUEST_CID, HOST_CID),
            _ => (u64::from(input.byte()), u64::from(input.byte())),
        };
        let type_ = match sel >> 1 & 1 {
            0 => VSOCK_TYPE_STREAM,
            _ => u16::from(input.byte()),
        };
        // Guest ports 1 to 3 are also the ones host clients ask for.
        let src_port = match sel >> 2 & 3 {
            3 => u32_from(input),
            n => u32::from(n) + 1,
        };
        let dst_port = match sel >> 4 & 7 {
            1 => UNLISTENED_PORT,
            n @ 2..=5 => FIRST_LOCAL_PORT + u32::from(n) - 2,
            6 => u32_from(input),
            _ => LISTENED_PORT,
        };
        let len = match sel >> 7 & 3 {
            0 => fits,
            1 => 0,
            2 => u32::from(u16::from_le_bytes([input.byte(), input.byte()])),
            _ => u32_from(input),
        };
        let (buf_alloc, fwd_cnt) = self.credit_from(input, sel >> 9, (dst_port, src_port));
        let flags = match sel >> 13 & 1 {
            0 => 0,
            _ => u32::from(input.byte()),
        };
        Header {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len,
            type_,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// The receive buffer a guest packet on `key` describes, from the low four bits of `sel`.
    fn credit_from(&self, input: &mut Input<'_>, sel: u16, key: Key) -> (u32, u32) {
        let buf_alloc = match sel & 3 {
            0 => 1 << 18,
            1 => 0,
            2 => u32::from(input.byte()),
            _ => u32_from(input),
        };
        let received = self.ends.get(&key).map_or(0, |end| end.rx_cnt.0);
        let fwd_cnt = match sel >> 2 & 3 {
            // What a well-behaved guest says: it has taken all it received.
            0 => received,
            1 => 0,
            2 => received.wrapping_sub(u32::from(input.byte())),
            _ => u32_from(input),
        };
        (buf_alloc, fwd_cnt)
    }

    /// What a guest packet the muxer took changes in the oracles' view of its connection.
    fn note_tx(&mut self, hdr: &Header, payload: Option<Vec<u8>>) {
        let key = (hdr.dst_port, hdr.src_port);
        let request = addressed(hdr) && hdr.op == Op::Request as u16;
        if let Ok((stream, _)) = self.scratch.listener.accept() {
            assert!(
                request && hdr.dst_port == LISTENED_PORT,
                "the muxer connected to a host listener for {hdr:?}"
            );
            let _ = stream.set_nonblocking(true);
            let end = HostEnd::new(stream, Vec::new(), hdr.buf_alloc, hdr.fwd_cnt);
            self.ends.insert(key, end);
        }
        if !addressed(hdr) {
            return;
        }
        if let Some(end) = self.ends.get_mut(&key) {
            end.buf_alloc = hdr.buf_alloc;
            end.fwd_cnt = Wrapping(hdr.fwd_cnt);
            if let (true, Some(payload)) = (hdr.op == Op::Rw as u16, payload) {
                end.expected.extend_from_slice(&payload);
            }
        }
    }
}

impl Harness {
    /// RX chains, as the device's `process_rx` fills them, while the muxer has packets.
    fn serve_rx(&mut self) {
        while self.muxer.has_rx() {
            let Some(mut chain) = self.rx.pop_descriptor_chain(&self.rx_mem) else {
                return;
            };
            let head = chain.head_index();
            let writable: u64 = chain
                .clone()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            let mut delivered = None;
            let used = match rx_packet(&self.rx_mem, &mut chain) {
                Ok(mut pkt) => {
                    let mut hdr = Header::default();
                    let data = pkt.data_slice();
                    if !self.muxer.recv_pkt(&mut self.backends, &mut hdr, data) {
                        self.rx.go_to_previous_position();
                        return;
                    }
                    let payload = payload_of(&hdr, data);
                    hdr.write_to(&mut pkt);
                    delivered = Some((hdr, payload));
                    PKT_HEADER_SIZE as u32 + hdr.len
                }
                Err(_) => 0,
            };
            assert!(
                u64::from(used) <= writable,
                "used length {used} beyond the chain's {writable} writable bytes"
            );
            if let Some((hdr, payload)) = delivered {
                self.check_rx(&hdr, &payload);
            }
            let _ = self.rx.add_used(&self.rx_mem, head, used);
        }
    }

    /// A packet for the guest must come from a connection the host has, and carry the host's
    /// bytes in order within the credit the guest gave.
    fn check_rx(&mut self, hdr: &Header, payload: &[u8]) {
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.type_),
            (HOST_CID, GUEST_CID, VSOCK_TYPE_STREAM),
            "a packet for the guest with the wrong addresses: {hdr:?}"
        );
        let op = Op::from_u16(hdr.op);
        assert!(op.is_some(), "a packet for the guest with no op: {hdr:?}");
        if op == Some(Op::Rst) {
            // Also the answer to guest packets for no connection at all.
            return;
        }
        let key = (hdr.src_port, hdr.dst_port);
        let Some(end) = self.ends.get_mut(&key) else {
            panic!("a packet for the guest on a connection the host never had: {hdr:?}");
        };
        match op {
            Some(Op::Rw) => {
                assert!(hdr.len > 0, "an RW packet with no data: {hdr:?}");
                let in_flight = (end.rx_cnt - end.fwd_cnt).0;
                let credit = end.buf_alloc.saturating_sub(in_flight);
                assert!(
                    hdr.len <= credit,
                    "{} bytes sent with the guest's credit at {credit}: {hdr:?}",
                    hdr.len
                );
                let at = end.rx_cnt.0 as usize;
                assert!(
                    end.written.get(at..at + payload.len()) == Some(payload),
                    "connection {key:?}: {} bytes at {at} that the host did not write there",
                    payload.len()
                );
                end.rx_cnt += Wrapping(hdr.len);
            }
            Some(Op::Shutdown) if hdr.flags & SHUTDOWN_SEND != 0 => {
                assert!(
                    end.host_shut && end.rx_cnt.0 as usize == end.written.len(),
                    "connection {key:?}: the guest was told the host sends no more, but the \
                     host did not close ({} of its {} bytes delivered)",
                    end.rx_cnt.0,
                    end.written.len()
                );
            }
            _ => {}
        }
    }
}

/// The payload the muxer put in an RX buffer, read before the header is written over a
/// buffer that may overlap it.
fn payload_of(hdr: &Header, data: Option<&VolatileSlice<'_>>) -> Vec<u8> {
    let len = hdr.len as usize;
    let Some(data) = data else {
        assert_eq!(len, 0, "a packet with data and no RX data buffer: {hdr:?}");
        return Vec::new();
    };
    assert!(
        len <= data.len(),
        "a packet of {len} bytes in an RX buffer of {}",
        data.len()
    );
    let mut bytes = vec![0u8; len];
    if let Ok(slice) = data.subslice(0, len) {
        slice.copy_to(&mut bytes);
    }
    bytes
}

/// Serves one input: a TX and an RX queue laid out from its bytes, then steps it picks
/// (serve a TX chain, fill RX buffers, let the muxer hear its sockets, a host `CONNECT`, host
/// writes, shutdowns and closes, host reads). Oracles: no panic; a used length never beyond
/// the chain's device-writable bytes; every packet for the guest from a connection the host
/// has, with a defined op; data to the guest only within its credit and exactly the host's
/// bytes in order; "no more data" only after the host closed and all its bytes arrived; the
/// host reads only the guest's bytes, in order; a host listener connected to only for a
/// request to it.
pub fn vsock_queue(data: &[u8]) {
    let mut input = Input(data);
    let Some(mut harness) = Harness::new(scratch(), &mut input) else {
        return;
    };
    let mut steps = 0;
    while !input.0.is_empty() && steps < MAX_STEPS {
        harness.step(&mut input);
        steps += 1;
    }
    harness.finish();
}

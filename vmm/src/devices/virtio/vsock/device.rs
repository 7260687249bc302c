//! The virtio-vsock device (type 19): its configuration (the guest CID) and the handler that
//! moves packets between the guest's queues and the host-side `Muxer` on the device's event
//! loop, where the muxer's sockets are backends.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use virtio_vsock::packet::{Error as PacketError, VsockPacket, PKT_HEADER_SIZE};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::Muxer;
use super::packet::Header;
use crate::devices::virtio::event_loop::{self, Context, DeviceHandler, EventLoop, Served};
use crate::devices::virtio::{
    feature, features, read_config_space, ActivateError, Interrupt, VirtioDevice,
};
use crate::memory::GuestMemory;

pub const TYPE_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// The event queue only carries transport resets, which the device never sends.
const QUEUE_COUNT: usize = 3;
/// Largest payload one packet may carry (Linux sends at most 64 KiB).
pub(crate) const MAX_PKT_DATA: u32 = 64 * 1024;

pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    /// The muxer lives here while the device is inactive and in the event loop while it runs.
    muxer: Option<Muxer>,
    event_loop: EventLoop<VsockHandler>,
}

impl Vsock {
    pub fn new(guest_cid: u64, muxer: Muxer) -> Self {
        Self {
            guest_cid,
            acked_features: 0,
            muxer: Some(muxer),
            event_loop: EventLoop::new("virtio-vsock".into(), QUEUE_COUNT),
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUE_COUNT]
    }

    fn avail_features(&self) -> u64 {
        feature(features::VERSION_1)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
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
        self.event_loop.activate(mem, interrupt, queues, || {
            let muxer = self.muxer.take().ok_or(ActivateError::BackendLost)?;
            Ok(VsockHandler { muxer })
        })
    }

    fn reset(&mut self) {
        if let Some(handler) = self.event_loop.stop() {
            // Back for the next activation, with its listening socket.
            let mut muxer = handler.muxer;
            muxer.reset();
            self.muxer = Some(muxer);
        }
        self.acked_features = 0;
    }
}

/// Serves the queues on the device's event loop; the muxer's sockets are its backends.
struct VsockHandler {
    muxer: Muxer,
}

impl DeviceHandler for VsockHandler {
    fn start(&mut self, ctx: &mut Context<'_>) -> Result<(), event_loop::Error> {
        self.muxer.start(ctx.registry())
    }

    fn queue_ready(&mut self, ctx: &mut Context<'_>, index: usize) {
        // New RX buffers are filled in `batch_done`.
        if index == TX_QUEUE {
            self.process_tx(ctx);
        }
    }

    fn backend_event(&mut self, ctx: &mut Context<'_>, token: u32, readiness: EventSet) {
        self.muxer
            .handle_host_event(ctx.registry(), token, readiness);
    }

    fn batch_done(&mut self, ctx: &mut Context<'_>) {
        // Whatever happened may have produced packets for the guest.
        self.process_rx(ctx);
    }
}

impl VsockHandler {
    /// Packets from the guest: each goes to the muxer, its buffer straight back.
    fn process_tx(&mut self, ctx: &mut Context<'_>) {
        let muxer = &mut self.muxer;
        ctx.drain_queue(TX_QUEUE, |mem, mut chain, backends| {
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let hdr = Header::read_from(&pkt);
                    let data = if hdr.len > 0 { pkt.data_slice() } else { None };
                    muxer.send_pkt(backends, &hdr, data);
                }
                Err(e) => warn_rate_limited!("virtio-vsock: dropping a malformed TX packet: {e}"),
            }
            Served::Used(0)
        });
    }

    /// Packets for the guest, as long as there are both packets and RX buffers.
    fn process_rx(&mut self, ctx: &mut Context<'_>) {
        if !self.muxer.has_rx() {
            return;
        }
        let muxer = &mut self.muxer;
        ctx.drain_queue(RX_QUEUE, |mem, mut chain, backends| {
            if !muxer.has_rx() {
                return Served::Later;
            }
            match rx_packet(mem, &mut chain) {
                Ok(mut pkt) => {
                    let mut hdr = Header::default();
                    if !muxer.recv_pkt(backends, &mut hdr, pkt.data_slice()) {
                        return Served::Later;
                    }
                    hdr.write_to(&mut pkt);
                    Served::Used(PKT_HEADER_SIZE as u32 + hdr.len)
                }
                Err(e) => {
                    warn_rate_limited!("virtio-vsock: unusable RX buffer: {e}");
                    Served::Used(0)
                }
            }
        });
    }
}

/// The packet an RX chain can hold. The chain's data buffer must not be empty: the muxer reads
/// host bytes straight into it, and a read of zero bytes means the host closed its side.
pub(crate) fn rx_packet<'a>(
    mem: &'a GuestMemory,
    chain: &mut DescriptorChain<&GuestMemory>,
) -> Result<VsockPacket<'a, ()>, PacketError> {
    let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA)?;
    match pkt.data_slice() {
        Some(data) if !data.is_empty() => Ok(pkt),
        _ => Err(PacketError::DescriptorLengthTooSmall),
    }
}

#[cfg(test)]
mod tests {
    //! The device as the guest driver sees it: real guest memory, three split queues, the
    //! event loop, and the muxer's unix sockets on the host side.

    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use vm_memory::GuestAddress;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::devices::virtio::test_utils::{wait_for, TestQueue, DATA, WRITE};
    use crate::devices::virtio::vsock::packet::{Op, HOST_CID, VSOCK_TYPE_STREAM};

    const GUEST_CID: u64 = 3;
    const HDR: u32 = PKT_HEADER_SIZE as u32;
    const TX_BUFS: u64 = DATA;
    const RX_BUFS: u64 = DATA + 0x10_0000;
    const RX_BUF_LEN: u32 = 4096;

    struct Driver {
        dir: TempDir,
        device: Vsock,
        rx: TestQueue,
        tx: TestQueue,
        rx_used_seen: u16,
        tx_next: u64,
        rx_next: u64,
    }

    fn encode(hdr: &Header) -> Vec<u8> {
        let mut b = Vec::with_capacity(PKT_HEADER_SIZE);
        b.extend_from_slice(&hdr.src_cid.to_le_bytes());
        b.extend_from_slice(&hdr.dst_cid.to_le_bytes());
        b.extend_from_slice(&hdr.src_port.to_le_bytes());
        b.extend_from_slice(&hdr.dst_port.to_le_bytes());
        b.extend_from_slice(&hdr.len.to_le_bytes());
        b.extend_from_slice(&hdr.type_.to_le_bytes());
        b.extend_from_slice(&hdr.op.to_le_bytes());
        b.extend_from_slice(&hdr.flags.to_le_bytes());
        b.extend_from_slice(&hdr.buf_alloc.to_le_bytes());
        b.extend_from_slice(&hdr.fwd_cnt.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn header(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    impl Driver {
        /// A device on a fresh muxer, activated, with `rx_buffers` RX buffers published.
        fn new(rx_buffers: u16) -> Driver {
            let dir = TempDir::new_with_prefix("/tmp/vsock-dev-test").unwrap();
            let muxer = Muxer::new(GUEST_CID, &dir.as_path().join("v.sock")).unwrap();
            let mut driver = Driver {
                device: Vsock::new(GUEST_CID, muxer),
                dir,
                rx: TestQueue::new(),
                tx: TestQueue::new(),
                rx_used_seen: 0,
                tx_next: TX_BUFS,
                rx_next: RX_BUFS,
            };
            driver.activate(rx_buffers);
            driver
        }

        /// (Re)activates the device on fresh queues, as a driver does after a reset.
        fn activate(&mut self, rx_buffers: u16) {
            let mem = self.rx.mem;
            let interrupt = self.rx.interrupt.clone();
            self.rx = TestQueue::at(mem, interrupt.clone(), GuestAddress(0));
            self.tx = TestQueue::at(mem, interrupt.clone(), GuestAddress(0x1_0000));
            let event = TestQueue::at(mem, interrupt.clone(), GuestAddress(0x2_0000));
            self.rx_used_seen = 0;
            self.tx_next = TX_BUFS;
            self.rx_next = RX_BUFS;
            let queues = vec![
                self.rx.queue_and_event(false),
                self.tx.queue_and_event(false),
                event.queue_and_event(false),
            ];
            self.device
                .activate(mem.clone(), interrupt, queues)
                .unwrap();
            self.add_rx_buffers(rx_buffers);
        }

        fn add_rx_buffers(&mut self, count: u16) {
            for _ in 0..count {
                let hdr = self.rx_next;
                let data = hdr + u64::from(HDR);
                self.rx_next += u64::from(HDR + RX_BUF_LEN);
                self.rx
                    .add_chain(&[(hdr, HDR, WRITE), (data, RX_BUF_LEN, WRITE)]);
            }
            self.rx.notify();
        }

        fn host_path(&self, port: u32) -> std::path::PathBuf {
            self.dir.as_path().join(format!("v.sock_{port}"))
        }

        /// Puts one packet (header and data in two descriptors) on the TX queue and waits
        /// until the device has consumed it.
        fn send(&mut self, hdr: Header, data: &[u8]) {
            let at = self.tx_next;
            self.tx_next += 0x1000 + data.len() as u64;
            self.tx.write(at, &encode(&hdr));
            if data.is_empty() {
                self.tx.add_chain(&[(at, HDR, 0)]);
            } else {
                let data_at = at + u64::from(HDR);
                self.tx.write(data_at, data);
                self.tx
                    .add_chain(&[(at, HDR, 0), (data_at, data.len() as u32, 0)]);
            }
            let used = self.tx.kick(1);
            assert_eq!(used[0].1, 0, "TX buffers are used with length 0");
        }

        /// The next packet the device put on the RX queue.
        fn recv(&mut self) -> (Header, Vec<u8>) {
            let target = self.rx_used_seen + 1;
            wait_for(
                || self.rx.mock.used().idx().load() >= target,
                "a packet on the RX queue",
            );
            let elem = self
                .rx
                .mock
                .used()
                .ring()
                .ref_at(usize::from(self.rx_used_seen))
                .unwrap()
                .load();
            self.rx_used_seen = target;
            let head = elem.id() as u64;
            // Chains were published two descriptors each, in order.
            let hdr_at = RX_BUFS + (head / 2) * u64::from(HDR + RX_BUF_LEN);
            let hdr = decode(&self.rx.read(hdr_at, PKT_HEADER_SIZE));
            assert_eq!(elem.len(), HDR + hdr.len, "used length = header + data");
            let data = self.rx.read(hdr_at + u64::from(HDR), hdr.len as usize);
            (hdr, data)
        }

        /// The next RX packet that is not a credit update.
        fn recv_op(&mut self, op: Op) -> (Header, Vec<u8>) {
            loop {
                let (hdr, data) = self.recv();
                if hdr.op == Op::CreditUpdate as u16 && op != Op::CreditUpdate {
                    continue;
                }
                assert_eq!(hdr.op, op as u16, "unexpected packet {hdr:?}");
                return (hdr, data);
            }
        }
    }

    impl Drop for Driver {
        fn drop(&mut self) {
            self.device.reset();
        }
    }

    fn read_exact_timeout(stream: &mut UnixStream, n: usize) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0; n];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn a_guest_connection_moves_data_through_the_queues_both_ways() {
        let mut d = Driver::new(16);
        let listener = UnixListener::bind(d.host_path(5000)).unwrap();
        d.send(header(Op::Request, 1234, 5000, 0), &[]);
        let (hdr, _) = d.recv_op(Op::Response);
        assert_eq!(
            (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port),
            (HOST_CID, GUEST_CID, 5000, 1234)
        );
        let (mut host, _) = listener.accept().unwrap();

        d.send(header(Op::Rw, 1234, 5000, 5), b"hello");
        assert_eq!(read_exact_timeout(&mut host, 5), b"hello");

        host.write_all(b"world").unwrap();
        let (hdr, data) = d.recv_op(Op::Rw);
        assert_eq!((hdr.src_port, hdr.dst_port, hdr.len), (5000, 1234, 5));
        assert_eq!(data, b"world");
        assert_ne!(d.rx.interrupt.status(), 0, "the guest was interrupted");
    }

    #[test]
    fn a_host_connect_reaches_the_guest_as_a_request() {
        let mut d = Driver::new(16);
        let mut host = UnixStream::connect(d.dir.as_path().join("v.sock")).unwrap();
        host.write_all(b"CONNECT 2375\n").unwrap();
        let (req, _) = d.recv_op(Op::Request);
        assert_eq!((req.dst_cid, req.dst_port), (GUEST_CID, 2375));
        let mut resp = header(Op::Response, 2375, req.src_port, 0);
        resp.dst_cid = HOST_CID;
        d.send(resp, &[]);
        let ok = read_exact_timeout(&mut host, 3);
        assert_eq!(ok, b"OK ");
    }

    #[test]
    fn malformed_chains_are_consumed_and_the_device_keeps_working() {
        let mut d = Driver::new(16);
        let listener = UnixListener::bind(d.host_path(5001)).unwrap();
        // A header descriptor shorter than a header, a device-writable TX buffer and a data
        // descriptor outside guest memory: each is used (length 0) and dropped.
        let at = d.tx_next;
        d.tx.write(at, &encode(&header(Op::Request, 1, 5001, 0)));
        d.tx.add_chain(&[(at, 10, 0)]);
        d.tx.add_chain(&[(at, HDR, WRITE)]);
        d.tx.write(at + 0x100, &encode(&header(Op::Rw, 1, 5001, 64)));
        d.tx.add_chain(&[(at + 0x100, HDR, 0), (0x4000_0000, 64, 0)]);
        d.tx_next += 0x1000;
        let used = d.tx.kick(3);
        assert!(used.iter().all(|&(_, len)| len == 0));

        // The same device still connects and carries data.
        d.send(header(Op::Request, 2, 5001, 0), &[]);
        d.recv_op(Op::Response);
        let (mut host, _) = listener.accept().unwrap();
        d.send(header(Op::Rw, 2, 5001, 2), b"ok");
        assert_eq!(read_exact_timeout(&mut host, 2), b"ok");
    }

    /// A zero-length data buffer used to be read into: the read of zero bytes looked like the
    /// host closing its side, so the guest was told "no more data" and the host's bytes never
    /// came (found while writing the `vsock_queue` fuzz target).
    #[test]
    fn an_empty_rx_data_buffer_is_refused_and_not_taken_for_the_host_closing() {
        let mut d = Driver::new(1);
        let listener = UnixListener::bind(d.host_path(5003)).unwrap();
        d.send(header(Op::Request, 9, 5003, 0), &[]);
        d.recv_op(Op::Response);
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(b"still here").unwrap();

        // Laid out where `recv` expects the next chain, with no room for data.
        let hdr_at = d.rx_next;
        d.rx_next += u64::from(HDR + RX_BUF_LEN);
        d.rx.add_chain(&[(hdr_at, HDR, WRITE), (hdr_at + u64::from(HDR), 0, WRITE)]);
        d.rx.notify();
        let target = d.rx_used_seen + 1;
        wait_for(
            || d.rx.mock.used().idx().load() >= target,
            "the empty buffer to be used",
        );
        let elem =
            d.rx.mock
                .used()
                .ring()
                .ref_at(usize::from(d.rx_used_seen))
                .unwrap()
                .load();
        d.rx_used_seen = target;
        assert_eq!(
            elem.len(),
            0,
            "a packet was put in a buffer with no room for data"
        );

        d.add_rx_buffers(1);
        let (hdr, data) = d.recv_op(Op::Rw);
        assert_eq!((hdr.src_port, hdr.dst_port), (5003, 9));
        assert_eq!(data, b"still here");
    }

    #[test]
    fn a_device_reset_closes_host_sockets_and_a_new_activation_works() {
        let mut d = Driver::new(16);
        let listener = UnixListener::bind(d.host_path(5002)).unwrap();
        d.send(header(Op::Request, 7, 5002, 0), &[]);
        d.recv_op(Op::Response);
        let (mut host, _) = listener.accept().unwrap();

        // The driver resets the device mid-connection: the host sees end of stream, not a hang.
        d.device.reset();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        let n = host.read(&mut buf).expect("EOF, not a timeout");
        assert_eq!(n, 0, "the host socket is closed by the reset");

        // After re-activation the same muxer (and its listening socket) serves again.
        d.activate(16);
        d.send(header(Op::Request, 8, 5002, 0), &[]);
        d.recv_op(Op::Response);
        let (mut host, _) = listener.accept().unwrap();
        d.send(header(Op::Rw, 8, 5002, 5), b"again");
        assert_eq!(read_exact_timeout(&mut host, 5), b"again");
        let mut client = UnixStream::connect(d.dir.as_path().join("v.sock")).unwrap();
        client.write_all(b"CONNECT 99\n").unwrap();
        let (req, _) = d.recv_op(Op::Request);
        assert_eq!(req.dst_port, 99);
    }
}

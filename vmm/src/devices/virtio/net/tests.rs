//! The device as the guest driver sees it: real guest memory, two split queues, the event loop,
//! and a real unix socket as the backend, served by the test as passt would.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio_bindings::virtio_net as vn;
use vm_memory::GuestAddress;
use vmm_sys_util::tempdir::TempDir;

use super::frame::{HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM};
use super::*;
use crate::devices::virtio::test_utils::{wait_for, TestQueue, DATA, OUTSIDE, WRITE};
use crate::devices::virtio::{feature, VirtioDevice};

const MAC: &str = "52:54:00:12:34:56";
const RX_BUFS: u64 = DATA;
const RX_BUF_LEN: u32 = 4096;
const TX_BUFS: u64 = DATA + 0x40_0000;
const HDR: u32 = NET_HDR_LEN as u32;
/// Long enough for the device to have acted if it was going to.
const QUIET: Duration = Duration::from_millis(100);

struct Rig {
    dir: TempDir,
    listener: UnixListener,
    device: Net,
    rx: TestQueue,
    tx: TestQueue,
    peer: Option<UnixStream>,
    rx_next: u64,
    rx_seen: u16,
}

fn socket_path(dir: &TempDir) -> PathBuf {
    dir.as_path().join("passt.sock")
}

impl Rig {
    /// A device connected to the test's listener, with every feature acked but `refused`.
    fn new(refused: u64) -> Rig {
        let dir = TempDir::new_with_prefix("/tmp/net-dev-test").unwrap();
        let listener = UnixListener::bind(socket_path(&dir)).unwrap();
        let mut rig = Rig::unconnected(dir, listener, refused);
        rig.accept();
        rig
    }

    fn unconnected(dir: TempDir, listener: UnixListener, refused: u64) -> Rig {
        let mut device = Net::new(&socket_path(&dir), MAC, 65506).unwrap();
        device.set_acked_features(device.avail_features() & !refused);
        let rx = TestQueue::new();
        let tx = TestQueue::at(rx.mem, rx.interrupt.clone(), GuestAddress(0x1_0000));
        let queues = vec![rx.queue_and_event(false), tx.queue_and_event(false)];
        device
            .activate(rx.mem.clone(), rx.interrupt.clone(), queues)
            .unwrap();
        Rig {
            dir,
            listener,
            device,
            rx,
            tx,
            peer: None,
            rx_next: RX_BUFS,
            rx_seen: 0,
        }
    }

    /// Takes the device's next connection (it retries every second).
    fn accept(&mut self) {
        let (peer, _) = self.listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        self.peer = Some(peer);
    }

    fn peer(&mut self) -> &mut UnixStream {
        self.peer.as_mut().expect("connected")
    }

    fn add_rx_buffers(&mut self, count: u16, len: u32) {
        for _ in 0..count {
            self.rx.add_chain(&[(self.rx_next, len, WRITE)]);
            self.rx_next += u64::from(len);
        }
        self.rx.notify();
    }

    /// Sends `frame` from the guest: its header and frame in separate descriptors.
    fn send(&mut self, frame: &[u8]) -> (u32, u32) {
        self.tx.write(TX_BUFS, &[0; NET_HDR_LEN]);
        self.tx.write(TX_BUFS + 0x100, frame);
        self.tx
            .add_chain(&[(TX_BUFS, HDR, 0), (TX_BUFS + 0x100, frame.len() as u32, 0)]);
        self.tx.kick(1)[0]
    }

    /// The next frame the peer got.
    fn recv_on_peer(&mut self) -> Vec<u8> {
        let peer = self.peer();
        let mut len = [0u8; 4];
        peer.read_exact(&mut len).unwrap();
        let mut frame = vec![0; u32::from_be_bytes(len) as usize];
        peer.read_exact(&mut frame).unwrap();
        frame
    }

    fn send_from_peer(&mut self, frame: &[u8]) {
        let mut bytes = (frame.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.peer().write_all(&bytes).unwrap();
    }

    fn rx_used(&self) -> u16 {
        self.rx.mock.used().idx().load()
    }

    /// Waits for `count` more used RX chains; returns their (head, len).
    fn rx_wait(&mut self, count: u16) -> Vec<(u16, u32)> {
        let target = self.rx_seen + count;
        wait_for(|| self.rx_used() >= target, "RX chains to be used");
        assert_eq!(self.rx_used(), target, "more RX chains used than expected");
        let used = (self.rx_seen..target)
            .map(|i| {
                let elem = self
                    .rx
                    .mock
                    .used()
                    .ring()
                    .ref_at(usize::from(i))
                    .unwrap()
                    .load();
                (elem.id() as u16, elem.len())
            })
            .collect();
        self.rx_seen = target;
        used
    }

    /// The bytes a used RX chain of one buffer got, given its head (buffers are laid out in
    /// the order of their heads, each `buf_len` long).
    fn rx_bytes(&self, head: u16, buf_len: u32, len: u32) -> Vec<u8> {
        self.rx
            .read(RX_BUFS + u64::from(head) * u64::from(buf_len), len as usize)
    }

    fn counters(&self) -> [u64; 3] {
        let c = self.device.counters();
        [
            c.tx_dropped.load(Ordering::Relaxed),
            c.rx_dropped.load(Ordering::Relaxed),
            c.bad_chains.load(Ordering::Relaxed),
        ]
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn config_space_shows_the_mac_link_up_and_mtu_and_no_gso_is_offered() {
    let rig = Rig::new(0);
    let mut config = [0u8; 12];
    rig.device.read_config(0, &mut config);
    assert_eq!(&config[..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 65506);
    let offered = rig.device.avail_features();
    for bit in [
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_MTU,
    ] {
        assert_ne!(offered & feature(bit), 0, "feature {bit}");
    }
    for bit in [
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_HOST_TSO6,
        vn::VIRTIO_NET_F_HOST_UFO,
        vn::VIRTIO_NET_F_GUEST_TSO4,
    ] {
        assert_eq!(offered & feature(bit), 0, "feature {bit}");
    }
    assert!(Net::new(&socket_path(&rig.dir), "nope", 1500).is_err());
}

#[test]
fn a_tx_chain_reaches_the_socket_as_one_length_prefixed_frame() {
    let mut rig = Rig::new(0);
    let sent = frame(1514, 1);
    assert_eq!(rig.send(&sent).1, 0, "TX chains are used with length 0");
    assert_eq!(rig.recv_on_peer(), sent);
    let second = frame(60, 2);
    rig.send(&second);
    assert_eq!(rig.recv_on_peer(), second);
}

#[test]
fn a_checksum_left_to_the_device_is_on_the_wire() {
    let mut rig = Rig::new(0);
    let mut packet = vec![0u8; NET_HDR_LEN];
    packet[0] = HDR_F_NEEDS_CSUM;
    packet[6..8].copy_from_slice(&34u16.to_le_bytes());
    packet[8..10].copy_from_slice(&6u16.to_le_bytes());
    let sent = frame(100, 3);
    rig.tx.write(TX_BUFS, &packet);
    rig.tx.write(TX_BUFS + 0x100, &sent);
    rig.tx
        .add_chain(&[(TX_BUFS, HDR, 0), (TX_BUFS + 0x100, 100, 0)]);
    rig.tx.kick(1);
    let got = rig.recv_on_peer();
    // The driver's pseudo-header sum was what the field held: sent[40..42].
    let pseudo = u16::from_be_bytes([sent[40], sent[41]]);
    let sum = super::frame::ones_complement_sum(&got[34..]);
    assert_eq!(super::frame::tests::fold(sum, pseudo), 0xffff);
    assert_eq!(&got[..40], &sent[..40], "only the checksum field changed");
    assert_eq!(&got[42..], &sent[42..]);
}

#[test]
fn malformed_tx_chains_are_used_empty_counted_and_send_nothing() {
    let mut rig = Rig::new(0);
    rig.tx.write(TX_BUFS, &[0; 256]);
    // A buffer outside guest memory; a header shorter than 12 bytes; a device-writable buffer.
    rig.tx.add_chain(&[(TX_BUFS, HDR, 0), (OUTSIDE, 100, 0)]);
    rig.tx.add_chain(&[(TX_BUFS, 8, 0)]);
    rig.tx
        .add_chain(&[(TX_BUFS, HDR, 0), (TX_BUFS + 0x100, 60, WRITE)]);
    let used = rig.tx.kick(3);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    assert_eq!(rig.counters()[2], 3, "three bad chains counted");
    // The next good frame is the first thing on the socket.
    let good = frame(64, 4);
    rig.send(&good);
    assert_eq!(rig.recv_on_peer(), good);
}

#[test]
fn a_frame_split_at_every_byte_reaches_one_rx_chain_whole() {
    let mut rig = Rig::new(0);
    let sent = frame(60, 5);
    let mut bytes = (sent.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&sent);
    for split in 1..bytes.len() {
        rig.add_rx_buffers(1, RX_BUF_LEN);
        rig.peer().write_all(&bytes[..split]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        rig.peer().write_all(&bytes[split..]).unwrap();
        let used = rig.rx_wait(1);
        let (head, len) = used[0];
        assert_eq!(len, HDR + 60, "split {split}");
        let got = rig.rx_bytes(head, RX_BUF_LEN, len);
        assert_eq!(got[0], HDR_F_DATA_VALID);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(&got[NET_HDR_LEN..], &sent[..], "split {split}");
    }
}

#[test]
fn a_64k_frame_spans_mergeable_buffers_published_together() {
    let mut rig = Rig::new(0);
    rig.add_rx_buffers(20, RX_BUF_LEN);
    let sent = frame(65520, 6);
    rig.send_from_peer(&sent);
    let needed = (NET_HDR_LEN + sent.len()).div_ceil(RX_BUF_LEN as usize);
    let used = rig.rx_wait(needed as u16);
    let first = rig.rx_bytes(used[0].0, RX_BUF_LEN, HDR);
    assert_eq!(
        usize::from(u16::from_le_bytes([first[10], first[11]])),
        needed,
        "num_buffers"
    );
    let mut got = Vec::new();
    for &(head, len) in &used {
        got.extend(rig.rx_bytes(head, RX_BUF_LEN, len));
    }
    assert_eq!(got.len(), NET_HDR_LEN + sent.len());
    assert_eq!(&got[NET_HDR_LEN..], &sent[..]);
    // The rest of the buffers serve the next frame.
    let next = frame(100, 7);
    rig.send_from_peer(&next);
    let (head, len) = rig.rx_wait(1)[0];
    assert_eq!(
        &rig.rx_bytes(head, RX_BUF_LEN, len)[NET_HDR_LEN..],
        &next[..]
    );
}

#[test]
fn a_frame_larger_than_the_buffers_offered_is_dropped_and_the_next_one_arrives() {
    // Without mergeable buffers a frame must fit one chain.
    let mut rig = Rig::new(feature(vn::VIRTIO_NET_F_MRG_RXBUF));
    rig.add_rx_buffers(1, 1526);
    rig.send_from_peer(&frame(3000, 8));
    let small = frame(1514, 9);
    rig.send_from_peer(&small);
    let (head, len) = rig.rx_wait(1)[0];
    assert_eq!(len, HDR + 1514);
    assert_eq!(&rig.rx_bytes(head, 1526, len)[NET_HDR_LEN..], &small[..]);
    assert_eq!(rig.counters()[1], 1, "the large frame counted as dropped");
}

#[test]
fn frames_wait_for_rx_buffers_and_arrive_when_they_are_offered() {
    let mut rig = Rig::new(0);
    let frames: Vec<_> = (0..3).map(|i| frame(200, i)).collect();
    for f in &frames {
        rig.send_from_peer(f);
    }
    std::thread::sleep(QUIET);
    assert_eq!(rig.rx_used(), 0, "no buffers, nothing used");
    // TX still works while RX waits.
    let out = frame(80, 10);
    rig.send(&out);
    assert_eq!(rig.recv_on_peer(), out);
    for f in &frames {
        rig.add_rx_buffers(1, RX_BUF_LEN);
        let (head, len) = rig.rx_wait(1)[0];
        assert_eq!(&rig.rx_bytes(head, RX_BUF_LEN, len)[NET_HDR_LEN..], &f[..]);
    }
    assert_eq!(rig.counters(), [0, 0, 0], "nothing dropped");
}

#[test]
fn the_socket_is_drained_while_the_guest_has_no_rx_buffers_and_nothing_is_lost() {
    // passt drops a frame whose write would block, and a unix socket holds ~200 KiB: 1.2 MB of
    // 60 KB frames must go in while the guest offers nothing, then all arrive in order.
    let mut rig = Rig::new(0);
    const BUF: u32 = 64 << 10;
    let frames: Vec<_> = (0..20).map(|i| frame(60_000, i as u8)).collect();
    let mut bytes = Vec::new();
    for f in &frames {
        bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
        bytes.extend_from_slice(f);
    }
    rig.peer()
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    rig.peer()
        .write_all(&bytes)
        .expect("the device reads the socket while RX buffers are out");
    std::thread::sleep(QUIET);
    assert_eq!(rig.rx_used(), 0, "no buffers, nothing used");
    rig.add_rx_buffers(20, BUF);
    let used = rig.rx_wait(20);
    for (f, &(head, len)) in frames.iter().zip(&used) {
        assert_eq!(&rig.rx_bytes(head, BUF, len)[NET_HDR_LEN..], &f[..]);
    }
    assert_eq!(rig.counters(), [0, 0, 0], "nothing dropped");
}

#[test]
fn tx_stops_taking_chains_when_the_socket_is_full_and_resumes_when_it_drains() {
    let mut rig = Rig::new(0);
    let big = frame(60_000, 11);
    rig.tx.write(TX_BUFS, &[0; NET_HDR_LEN]);
    rig.tx.write(TX_BUFS + 0x100, &big);
    let count = 64u16;
    for _ in 0..count {
        rig.tx
            .add_chain(&[(TX_BUFS, HDR, 0), (TX_BUFS + 0x100, big.len() as u32, 0)]);
    }
    rig.tx.notify();
    std::thread::sleep(QUIET * 3);
    let used_before = rig.tx.mock.used().idx().load();
    assert!(
        used_before > 0 && used_before < count,
        "{used_before} of {count} chains taken while the peer does not read"
    );
    for i in 0..count {
        assert_eq!(rig.recv_on_peer(), big, "frame {i}");
    }
    wait_for(
        || rig.tx.mock.used().idx().load() == count,
        "every TX chain used",
    );
}

#[test]
fn the_device_reconnects_after_the_backend_goes_away_and_drops_frames_meanwhile() {
    let mut rig = Rig::new(0);
    rig.add_rx_buffers(4, RX_BUF_LEN);
    rig.peer = None;
    std::thread::sleep(QUIET);
    // No backend: the chain is used, the frame dropped.
    assert_eq!(rig.send(&frame(60, 12)).1, 0);
    wait_for(|| rig.counters()[0] == 1, "the frame counted as dropped");
    // passt restarted on the same path: the device is back within its retry period.
    rig.accept();
    let out = frame(70, 13);
    rig.send(&out);
    assert_eq!(rig.recv_on_peer(), out);
    let back = frame(90, 14);
    rig.send_from_peer(&back);
    let (head, len) = rig.rx_wait(1)[0];
    assert_eq!(
        &rig.rx_bytes(head, RX_BUF_LEN, len)[NET_HDR_LEN..],
        &back[..]
    );
}

#[test]
fn a_backend_not_there_at_activation_is_connected_once_it_appears() {
    let dir = TempDir::new_with_prefix("/tmp/net-dev-test").unwrap();
    let elsewhere = dir.as_path().join("later.sock");
    let listener = UnixListener::bind(&elsewhere).unwrap();
    let mut rig = Rig::unconnected(dir, listener, 0);
    assert_eq!(
        rig.send(&frame(60, 15)).1,
        0,
        "TX completes without a backend"
    );
    std::fs::rename(&elsewhere, socket_path(&rig.dir)).unwrap();
    rig.accept();
    let out = frame(60, 16);
    rig.send(&out);
    assert_eq!(rig.recv_on_peer(), out);
}

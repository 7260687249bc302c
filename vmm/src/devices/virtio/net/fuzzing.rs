//! Entry points for the fuzz targets in `vmm/fuzz/` (feature `fuzzing`): the net device's TX
//! and RX paths on a real split queue whose descriptor table, avail ring and buffers come from
//! the fuzzer's bytes, and the backend stream cut into frames from the same bytes.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::frame::{tx_frame, FrameBuffer, Next};
use super::queue::{deliver, read_tx_chain, RxMode};
use crate::memory::GuestMemory;

const MEM_SIZE: usize = 1 << 20;
const QUEUE_LEN: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const BUFFERS: u64 = 0x4000;
/// Bytes per descriptor in the input: addr/16 (2), len (2), flags (1), next (1).
const DESC_INPUT: usize = 6;

/// A cursor over the fuzzer's bytes that yields zeros once they run out (block's and vsock's
/// fuzzing entry points lay out their queues with it too).
pub(crate) struct Input<'a>(pub(crate) &'a [u8]);

impl Input<'_> {
    pub(crate) fn take(&mut self, n: usize) -> Vec<u8> {
        let n_here = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n_here);
        self.0 = rest;
        let mut bytes = head.to_vec();
        bytes.resize(n, 0);
        bytes
    }

    pub(crate) fn byte(&mut self) -> u8 {
        self.take(1)[0]
    }
}

/// Lays out a queue in fresh guest memory from `input`: the descriptor table, the avail ring
/// (how many heads and which), and buffer contents.
pub(crate) fn queue_from(input: &mut Input<'_>, event_idx: bool) -> Option<(GuestMemory, Queue)> {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    for i in 0..u64::from(QUEUE_LEN) {
        let d = input.take(DESC_INPUT);
        let addr = u64::from(u16::from_le_bytes([d[0], d[1]])) * 16;
        let len = u32::from(u16::from_le_bytes([d[2], d[3]]));
        let flags = u16::from(d[4] & 0x7);
        let next = u16::from(d[5]);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC_TABLE + i * 16))
            .ok()?;
    }
    let heads = u16::from(input.byte()) % (QUEUE_LEN + 1);
    for i in 0..u64::from(heads) {
        let head = u16::from(input.byte()) % (QUEUE_LEN + 2);
        mem.write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * i))
            .ok()?;
    }
    mem.store(
        heads.to_le(),
        GuestAddress(AVAIL_RING + 2),
        Ordering::Release,
    )
    .ok()?;
    let fill = usize::from(input.byte()) * 64;
    let contents = input.take(fill);
    mem.write_slice(&contents, GuestAddress(BUFFERS)).ok()?;

    let mut queue = Queue::new(QUEUE_LEN).ok()?;
    queue.set_size(QUEUE_LEN);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .ok()?;
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .ok()?;
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .ok()?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Some((mem, queue))
}

/// The net TX and RX paths on guest-made queues and a backend-made stream.
pub fn net_queue(data: &[u8]) {
    let mut input = Input(data);
    let mode_bits = input.byte();
    let mode = RxMode {
        mergeable: mode_bits & 1 != 0,
        data_valid: mode_bits & 2 != 0,
    };
    let event_idx = mode_bits & 4 != 0;

    // TX: every chain read and checked as the device does.
    let Some((mem, mut queue)) = queue_from(&mut input, event_idx) else {
        return;
    };
    let mut packet = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        if read_tx_chain(&mem, chain, &mut packet).is_ok() {
            let _ = tx_frame(&mut packet);
        }
    }

    // RX: the rest of the input is the backend's stream, read in pieces of varying size.
    let Some((mem, mut queue)) = queue_from(&mut input, event_idx) else {
        return;
    };
    let chunk = usize::from(input.byte()) + 1;
    let stream = input.0;
    let mut frames = FrameBuffer::new(0);
    for piece in stream.chunks(chunk) {
        let spare = frames.spare();
        let n = piece.len().min(spare.len());
        spare[..n].copy_from_slice(&piece[..n]);
        frames.filled(n);
        loop {
            match frames.next() {
                Next::Frame(frame) => {
                    let (delivery, _) = deliver(&mem, &mut queue, frame, mode);
                    if delivery.outcome == super::queue::Outcome::NoBuffers {
                        return;
                    }
                    frames.consume();
                }
                Next::Dropped(_) => {}
                Next::Partial => break,
            }
        }
    }
}

//! The net device's side of its two queues, with every descriptor the guest wrote checked: a TX
//! chain read into one packet, and a frame written into one RX chain or, with mergeable RX
//! buffers, spread over several chains that reach the used ring together.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};

use super::frame::rx_header;
use super::{MAX_FRAME, NET_HDR_LEN};
use crate::memory::GuestMemory;

/// Why a chain the guest offered is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a TX buffer is device-writable")]
    WritableInTx,
    #[error("an RX buffer is not device-writable")]
    ReadOnlyInRx,
    #[error("a buffer lies outside guest memory")]
    OutsideMemory,
    #[error("the chain loops or has a bad `next`")]
    Broken,
    #[error("the chain holds more than a header and a {MAX_FRAME}-byte frame")]
    TooLong,
    #[error("the RX chain cannot hold the {NET_HDR_LEN}-byte header")]
    NoRoomForHeader,
}

/// Reads TX chain `chain` (header and frame) into `packet`, replacing what it held.
pub fn read_tx_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    packet: &mut Vec<u8>,
) -> Result<(), ChainError> {
    packet.clear();
    let mut ended = false;
    for desc in chain {
        if desc.is_write_only() {
            return Err(ChainError::WritableInTx);
        }
        let len = desc.len() as usize;
        if packet.len() + len > NET_HDR_LEN + MAX_FRAME {
            return Err(ChainError::TooLong);
        }
        let at = packet.len();
        packet.resize(at + len, 0);
        mem.read_slice(&mut packet[at..], desc.addr())
            .map_err(|_| ChainError::OutsideMemory)?;
        ended = !desc.has_next();
    }
    // The iterator stops early, with `next` still set, on loops and out-of-table indices.
    if !ended {
        return Err(ChainError::Broken);
    }
    Ok(())
}

/// One RX chain taken from the avail ring: its head and writable buffers.
struct RxChain {
    head: u16,
    buffers: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

fn rx_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<RxChain, ChainError> {
    let head = chain.head_index();
    let mut buffers = Vec::new();
    let mut capacity = 0usize;
    let mut ended = false;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(ChainError::ReadOnlyInRx);
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(ChainError::OutsideMemory);
        }
        // A chain has at most queue-size descriptors of at most 4 GiB each: no overflow.
        capacity += desc.len() as usize;
        buffers.push((desc.addr(), desc.len()));
        ended = !desc.has_next();
    }
    if !ended {
        return Err(ChainError::Broken);
    }
    if capacity < NET_HDR_LEN {
        return Err(ChainError::NoRoomForHeader);
    }
    Ok(RxChain {
        head,
        buffers,
        capacity,
    })
}

/// How RX frames are written.
#[derive(Clone, Copy, Debug)]
pub struct RxMode {
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may take several chains.
    pub mergeable: bool,
    /// VIRTIO_NET_F_GUEST_CSUM: frames are marked DATA_VALID.
    pub data_valid: bool,
}

/// What became of one frame offered to the RX queue.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub outcome: Outcome,
    /// Unusable chains met on the way, used with length 0.
    pub bad_chains: Vec<ChainError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// In the used ring, over this many chains.
    Delivered(u16),
    /// The buffers the guest has offered so far cannot hold it: try again when it offers more.
    NoBuffers,
    /// The guest's buffers can never hold it (a single chain too small without mergeable
    /// buffers, or the whole ring too small with them): dropped, the chains left for the next.
    TooLarge,
}

/// Writes `frame` (without its header) into the RX queue. Returns what became of it and whether
/// the driver is owed an interrupt.
pub fn deliver(
    mem: &GuestMemory,
    queue: &mut Queue,
    frame: &[u8],
    mode: RxMode,
) -> (Delivery, bool) {
    let mut bad_chains = Vec::new();
    let mut owes_interrupt = false;
    loop {
        let (delivery, owes) = try_deliver(mem, queue, frame, mode);
        bad_chains.extend(delivery.bad_chains);
        owes_interrupt |= owes;
        // The driver may have added buffers while these were counted: count again.
        if delivery.outcome == Outcome::NoBuffers && more_offered(mem, queue) {
            continue;
        }
        let delivery = Delivery {
            outcome: delivery.outcome,
            bad_chains,
        };
        return (delivery, owes_interrupt);
    }
}

/// Asks the driver to notify the RX queue when it offers more buffers than it has now
/// (EVENT_IDX's avail_event; without EVENT_IDX it always notifies), then checks whether it
/// already has.
fn more_offered(mem: &GuestMemory, queue: &mut Queue) -> bool {
    let Ok(seen) = queue.avail_idx(mem, Ordering::Acquire) else {
        return false;
    };
    if queue.event_idx_enabled() {
        let avail_event_at =
            GuestAddress(queue.used_ring()).unchecked_add(4 + 8 * u64::from(queue.size()));
        if mem
            .store(seen.0.to_le(), avail_event_at, Ordering::Release)
            .is_err()
        {
            return false;
        }
    }
    // The request out before the second look (as virtio-queue's enable_notification does).
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|now| now != seen)
}

fn try_deliver(
    mem: &GuestMemory,
    queue: &mut Queue,
    frame: &[u8],
    mode: RxMode,
) -> (Delivery, bool) {
    let needed = NET_HDR_LEN + frame.len();
    let mut taken: Vec<RxChain> = Vec::new();
    // Unusable chains before the first good one are used (with length 0) whatever becomes of
    // the frame; those after it only if the frame is delivered, else they are met again.
    let mut leading_bad: Vec<(u16, ChainError)> = Vec::new();
    let mut trailing_bad: Vec<(u16, ChainError)> = Vec::new();
    let mut resume = queue.next_avail();
    let mut room = 0usize;
    let mut popped = 0u16;
    while room < needed {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        popped += 1;
        let head = chain.head_index();
        match rx_chain(mem, chain) {
            Ok(chain) => {
                room += chain.capacity;
                taken.push(chain);
                if !mode.mergeable {
                    break;
                }
            }
            Err(e) if taken.is_empty() => {
                leading_bad.push((head, e));
                resume = queue.next_avail();
            }
            Err(e) => trailing_bad.push((head, e)),
        }
    }
    let outcome = if room >= needed {
        Outcome::Delivered(taken.len() as u16)
    } else if (!mode.mergeable && !taken.is_empty()) || popped >= queue.size() {
        Outcome::TooLarge
    } else {
        Outcome::NoBuffers
    };
    let mut bad = leading_bad;
    let mut used: Vec<(u16, u32)> = bad.iter().map(|&(head, _)| (head, 0)).collect();
    if let Outcome::Delivered(count) = outcome {
        used.extend(trailing_bad.iter().map(|&(head, _)| (head, 0)));
        bad.extend(trailing_bad);
        write_frame(
            mem,
            &taken,
            frame,
            rx_header(count, mode.data_valid),
            &mut used,
        );
    } else {
        queue.set_next_avail(resume);
    }
    let owes_interrupt = publish_used(mem, queue, &used);
    let delivery = Delivery {
        outcome,
        bad_chains: bad.into_iter().map(|(_, e)| e).collect(),
    };
    (delivery, owes_interrupt)
}

/// Copies the header and the frame into `chains` in order; records each chain's used length.
fn write_frame(
    mem: &GuestMemory,
    chains: &[RxChain],
    frame: &[u8],
    header: [u8; NET_HDR_LEN],
    used: &mut Vec<(u16, u32)>,
) {
    let mut rest: [&[u8]; 2] = [&header, frame];
    for chain in chains {
        let mut written = 0u32;
        for &(addr, len) in &chain.buffers {
            let mut at = addr;
            let mut space = len as usize;
            for part in rest.iter_mut() {
                let n = part.len().min(space);
                if n == 0 {
                    continue;
                }
                // Each buffer was checked to lie in guest memory.
                if mem.write_slice(&part[..n], at).is_err() {
                    warn_rate_limited!("virtio-net: writing an RX buffer failed");
                }
                *part = &part[n..];
                space -= n;
                at = at.unchecked_add(n as u64);
                written += n as u32;
            }
        }
        used.push((chain.head, written));
    }
}

/// Puts `used` (head, length) in the used ring and moves its index once, so the driver sees
/// all of them together. Returns whether the driver asked for an interrupt (EVENT_IDX).
fn publish_used(mem: &GuestMemory, queue: &mut Queue, used: &[(u16, u32)]) -> bool {
    if used.is_empty() {
        return false;
    }
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let old = queue.next_used();
    let mut next = old;
    for &(head, len) in used {
        let slot = u64::from(next % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        // The transport checked that the used ring lies in guest memory.
        if mem
            .write_slice(&elem, ring.unchecked_add(4 + slot * 8))
            .is_err()
        {
            warn_rate_limited!("virtio-net: writing the used ring failed");
            return false;
        }
        next = next.wrapping_add(1);
    }
    queue.set_next_used(next);
    // The elements before the index that shows them.
    fence(Ordering::Release);
    if mem
        .store(next.to_le(), ring.unchecked_add(2), Ordering::Release)
        .is_err()
    {
        warn_rate_limited!("virtio-net: writing the used index failed");
        return false;
    }
    if !queue.event_idx_enabled() {
        return true;
    }
    // Read the driver's used_event only after the index is out (as Linux's virtqueue does).
    fence(Ordering::SeqCst);
    let used_event_at = GuestAddress(queue.avail_ring()).unchecked_add(4 + 2 * u64::from(size));
    match mem.load::<u16>(used_event_at, Ordering::Acquire) {
        // Interrupt when the index passed used_event in this publication (vring_need_event).
        Ok(event) => {
            let event = u16::from_le(event);
            next.wrapping_sub(event).wrapping_sub(1) < next.wrapping_sub(old)
        }
        Err(_) => true,
    }
}

//! virtio-net: Ethernet frames between the guest and a user-mode network stack (passt on Linux,
//! gvproxy elsewhere) over a unix stream socket in QEMU's `-netdev stream` framing: each frame
//! preceded by its length, 4 bytes big-endian.
//!
//! Decisions, and why:
//!
//! - **Connection.** The device connects when the driver activates it (not at creation: the host
//!   proxy may start passt alongside the VMM, and a VM whose network is not up yet still boots).
//!   A socket that is not there, refuses, or goes away (EOF, error) is retried every
//!   [`RECONNECT_PERIOD`] on a timer of the device's event loop; the host proxy restarts a dead
//!   passt on the same path and the device connects again by itself. Meanwhile TX chains are
//!   completed and their frames dropped, and nothing is delivered: no vCPU and no other device
//!   ever waits for the backend. Bytes in flight on a lost connection (a partial frame either
//!   way) are dropped with it, so a new connection starts in step. A reset closes the socket;
//!   the next activation connects again.
//! - **Backpressure.** The socket is nonblocking. TX frames are queued (with their prefix) up
//!   to [`backend::TX_HIGH_WATER`] bytes; past that TX chains stay in the queue and the socket
//!   is watched for EPOLLOUT, and TX resumes when it drains. RX reads are cut into frames; when
//!   the guest has no RX buffers for the next whole frame the socket is no longer watched for
//!   reading (the bytes stay in the kernel's socket buffer, pushing back on the peer) until the
//!   driver offers buffers.
//! - **Features.** VERSION_1 (a 12-byte `virtio_net_hdr_v1`), EVENT_IDX, MAC, MTU, STATUS (the
//!   link is always reported up), MRG_RXBUF (a frame may span several RX chains, published in
//!   the used ring together with `num_buffers` in the first). Checksums: the device offers
//!   VIRTIO_NET_F_CSUM and **completes** a checksum the driver leaves to it (NEEDS_CSUM) before
//!   the frame leaves, so every frame on the socket carries valid checksums whatever the peer
//!   checks (passt terminates L4 and takes the payload; gvproxy's netstack may verify; either is
//!   fine). It offers VIRTIO_NET_F_GUEST_CSUM and marks received frames DATA_VALID: the peer is
//!   a local L4-terminating stack that builds every frame it sends with its own checksums, over
//!   a socket that cannot corrupt them, so the guest's second pass over 64 KiB frames is waste.
//!   No TSO/UFO/GSO either way: a GSO frame from the guest would exceed the MTU passt takes and
//!   the device would have to segment it; a TX header with a GSO type is refused.
//! - **Guest input.** Every descriptor is checked; a malformed chain (outside memory, a
//!   writable TX buffer, a read-only RX buffer, a header shorter than 12 bytes, a loop, a frame
//!   over [`MAX_FRAME`]) is used with length 0 and counted, logged rate-limited. A frame from
//!   the backend longer than [`MAX_FRAME`] or longer than all the buffers the guest could ever
//!   offer is dropped and counted, and the stream stays in step.

mod backend;
mod device;
mod frame;
mod queue;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use device::{Net, RX_QUEUE, TX_QUEUE, TYPE_NET};

/// Each queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr_v1`, which VERSION_1 puts before every frame in either queue.
pub const NET_HDR_LEN: usize = 12;
/// The longest frame either way: what a 4-byte prefix of a 16-bit IP length carries. passt
/// itself takes frames up to 65520 bytes (the MTU 65506 plus an Ethernet header).
pub const MAX_FRAME: usize = 65535;
/// How often a backend that is not there is tried again.
pub const RECONNECT_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Mac(String),
}

/// What the device dropped or refused, for tests and diagnostics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Guest frames dropped because the backend was not connected.
    pub tx_dropped: AtomicU64,
    /// Backend frames dropped: too long for the stream or for the guest's buffers, or empty.
    pub rx_dropped: AtomicU64,
    /// Malformed chains the guest offered, in either queue.
    pub bad_chains: AtomicU64,
}

#[cfg(test)]
mod tests;

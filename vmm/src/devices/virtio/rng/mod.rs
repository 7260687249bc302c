//! virtio-rng: an entropy device that fills the guest's buffers from the host's getrandom(2).

mod device;

use std::io;

pub use device::Rng;

/// The one queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes given for one request; the driver asks again for more.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the host's getrandom(2) does not work: {0}")]
    GetRandom(io::Error),
}

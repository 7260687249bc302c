//! virtio-vsock: stream sockets between guest and host, exposed on the host as unix sockets.

pub mod connection;
pub mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod muxer;
pub mod packet;

pub use device::Vsock;
pub use muxer::Muxer;

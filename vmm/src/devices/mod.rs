//! Emulated devices and the buses they sit on.

pub mod bus;
pub mod power;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice};

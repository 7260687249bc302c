//! Berth's host side: the daemon that owns the VM's lifecycle, serves the Docker API socket and
//! the control API, and the pieces the `berth` CLI shares with it (file layout, instance lock,
//! config file, the control API's JSON, the hybrid vsock handshake).
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod control;
pub mod control_api;
pub mod daemon;
pub mod disk;
pub mod hybrid;
pub mod layout;
pub mod lock;
pub mod passt;
pub mod ports;
pub mod settings;
pub mod vmm;
pub mod watch;

pub use layout::Layout;
pub use settings::VmSettings;

pub use berth_errors::chain;

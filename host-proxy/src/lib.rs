//! Berth's host side: the daemon that runs the VMM and serves the Docker API socket, and the
//! pieces the `berth` CLI shares with it (file layout, instance lock, state file, the hybrid
//! vsock handshake and the control-channel client).
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
pub mod settings;
pub mod state;
pub mod vmm;

pub use layout::Layout;
pub use settings::VmSettings;

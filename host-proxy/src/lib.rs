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
pub mod settings;
pub mod vmm;

pub use layout::Layout;
pub use settings::VmSettings;

/// An error and its causes on one line, each cause once: "cannot start the VMM: cannot read
/// the settings: /x/config.toml: cpus must be ...". Messages never repeat their source, so
/// nothing is left out or printed twice.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

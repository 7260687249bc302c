//! The JSON of the control API (`host-proxy/API.md`): the lifecycle's states, the status
//! document, the event stream's lines, request bodies and the error body. Server and clients
//! both use these types, so the wire format lives here once.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The control API's version: the `/v1` in every path, and `api_version` in the status.
pub const API_VERSION: u32 = 1;
/// The path prefix of this version.
pub const PREFIX: &str = "/v1";
/// The `Upgrade` protocol of `POST /v1/shell` (with `Connection: Upgrade`).
pub const SHELL_UPGRADE: &str = "berth-shell";

/// Where the VM is in its life. Transitions: stopped -> starting -> running -> stopping ->
/// stopped; starting or running -> crashed (the VMM exited unasked); crashed -> starting (a
/// start, or the restart after a crash, `daemon/recovery.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state and why the VM is in it: what the event stream carries and the status embeds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub state: VmState,
    /// Why: "the guest kernel panicked (see console.log)", "stopped by request", "dockerd
    /// answers". `None` only where nothing more is known.
    pub reason: Option<String>,
    /// When the state was entered, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub api_version: u32,
    /// The host proxy's version.
    pub version: String,
    /// The host proxy's pid.
    pub pid: u32,
    /// The VMM's pid while one runs.
    pub vmm_pid: Option<u32>,
    /// The host memory the VMM holds (its RSS: guest memory the guest touched and has not
    /// given back through the balloon, and the VMM's own), in KiB; `None` when no VMM runs or
    /// the host cannot tell.
    #[serde(default)]
    pub vmm_rss_kib: Option<u64>,
    /// The memory balloon as the VMM last reported it; `None` when no VM runs or the VMM has
    /// not answered.
    #[serde(default)]
    pub balloon: Option<BalloonStatus>,
    #[serde(flatten)]
    pub state: StateChange,
    /// Seconds since the VMM of this run started; `None` when no VM runs.
    pub uptime_secs: Option<u64>,
    pub home: PathBuf,
    pub sockets: Sockets,
    /// The settings the running VM was started with, or the ones the next start uses.
    pub settings: Settings,
    /// What the guest agent said; `None` until it answered `Hello` in this run.
    pub guest: Option<GuestStatus>,
    /// The published ports forwarded from the host now, oldest first.
    #[serde(default)]
    pub ports: Vec<crate::ports::ForwardedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sockets {
    pub docker: PathBuf,
    pub control: PathBuf,
    pub vsock: PathBuf,
    pub vmm_api: PathBuf,
}

/// The VM's settings as the status shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub cpus: u8,
    pub memory_mib: u64,
    pub disk_size_gib: u64,
    pub kernel: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    pub cmdline_extra: String,
    /// The host folders the guest mounts (for the next start: the config file's, resolved as a
    /// start resolves them).
    #[serde(default)]
    pub shares: Vec<Share>,
    #[serde(default)]
    pub ports: PortSettings,
}

/// One host folder shared with the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The host directory, symlinks resolved; the guest mounts it at this same path.
    pub path: PathBuf,
    /// The path as configured, when a symlink made it differ: the guest mounts it there too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<PathBuf>,
    pub read_only: bool,
}

/// How published ports are served.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSettings {
    /// The host address published ports listen on; `None`: the default.
    pub bind_address: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The agent's protocol version and ours, as exchanged in `Hello`.
    pub protocol_version: u32,
    pub host_protocol_version: u32,
    pub agent_version: String,
    /// The agent's last health answer.
    pub dockerd: bool,
    pub containerd: bool,
    pub detail: String,
    /// The agent's last stats, when it gave them.
    pub stats: Option<GuestStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub disk_total_kib: u64,
    pub disk_used_kib: u64,
    pub load_avg_1m: String,
}

/// The balloon (virtio-balloon): the memory the host asked the guest to give back and what it
/// gave, in MiB, and the guest's latest memory statistics from the balloon's stats queue (bytes
/// and counts; a figure the guest has not reported is absent). Free page reporting hands back
/// what the guest frees without the balloon: that shows in `vmm_rss_kib`, not here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatus {
    pub target_mib: u64,
    pub actual_mib: u64,
    pub stats: berth_machine::BalloonStats,
}

/// One line of `GET /v1/events` (newline-delimited JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ApiEvent {
    /// The lifecycle moved; the stream's first line is always the current state.
    State(StateChange),
    /// Something the guest agent pushed (a daemon exited or became ready).
    Guest { event: berth_protocol::Event },
    /// A published port began or stopped being forwarded from the host.
    Port { event: crate::ports::PortEvent },
}

/// The optional body of `POST /v1/stop`, `/v1/restart` and `/v1/quit`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest has to power off before the VM is stopped by force (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// The answer to `POST /v1/start`, `/v1/stop`, `/v1/restart`, `/v1/quit`: the state the request
/// left the VM in (`starting`, `stopping`, or the state it already was in). Clients follow
/// `GET /v1/events` (or poll the status) to see it through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    #[serde(flatten)]
    pub state: StateChange,
}

/// The body of every 4xx and 5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable and machine-readable: `bad_request`, `not_found`, `method_not_allowed`,
    /// `conflict`, `not_running`, `unavailable`, `internal`.
    pub code: String,
    /// One line for the user.
    pub message: String,
}

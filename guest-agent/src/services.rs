//! The agent's vsock services: one accept thread per port (Docker API splice, control, shell,
//! published-port dials), one thread per connection, and the real `control::Guest` behind the
//! control channel.

use std::ffi::CString;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::ports::DIAL_PORT;
use berth_protocol::{CONTROL_PORT, DOCKER_API_PORT, SHELL_PORT};

use crate::control::{self, DiskUsage, Guest, Health};
use crate::events::Bus;
use crate::supervisor::Supervisor;
use crate::vsock::{VsockListener, VsockStream};
use crate::{console, daemons, datadisk, dial, power, readiness, shell, splice};

/// Stack of a control or shell connection thread.
const CONNECTION_STACK: usize = 256 * 1024;
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Listen(#[from] crate::vsock::Error),
    #[error("start the accept thread of vsock port {0}")]
    Thread(u32, #[source] std::io::Error),
}

/// The guest behind the control channel.
#[derive(Debug)]
pub struct AgentGuest {
    /// `None` with `berth.docker=off`.
    pub supervisor: Option<Arc<Supervisor>>,
    /// What `Subscribe` connections hear.
    pub events: Arc<Bus>,
}

impl Guest for AgentGuest {
    fn uptime_ms(&self) -> u64 {
        (readiness::uptime() * 1000.0) as u64
    }

    fn health(&self) -> Health {
        let Some(sup) = &self.supervisor else {
            return Health {
                dockerd: false,
                containerd: false,
                detail: "docker is off (berth.docker=off)".into(),
            };
        };
        let answering = daemons::ping(Path::new(daemons::DOCKER_SOCKET), PING_TIMEOUT);
        let dockerd = matches!(answering, Ok(true));
        let dockerd_text = match (sup.dockerd.pid(), &answering) {
            (None, _) => "dockerd: not running".to_string(),
            (Some(pid), Ok(true)) => format!("dockerd: answering (pid {pid})"),
            (Some(pid), Ok(false)) => format!("dockerd: pid {pid}, /_ping not OK"),
            (Some(pid), Err(e)) => format!("dockerd: pid {pid}, {}", console::chain(e)),
        };
        let containerd = sup.containerd.pid();
        let containerd_text = containerd.map_or("containerd: not running".to_string(), |pid| {
            format!("containerd: running (pid {pid})")
        });
        Health {
            dockerd,
            containerd: containerd.is_some(),
            detail: format!("{dockerd_text}; {containerd_text}"),
        }
    }

    fn meminfo(&self) -> Result<String, control::Error> {
        std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| control::Error::Read("/proc/meminfo", e))
    }

    fn loadavg(&self) -> Result<String, control::Error> {
        std::fs::read_to_string("/proc/loadavg")
            .map_err(|e| control::Error::Read("/proc/loadavg", e))
    }

    fn disk_usage(&self) -> Result<DiskUsage, control::Error> {
        statvfs(datadisk::MOUNT_POINT)
    }

    fn set_clock(&self, secs: u64, nanos: u32) -> Result<(), control::Error> {
        let ts = libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nanos as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(control::Error::SetClock(std::io::Error::last_os_error()));
        }
        console::say(&format!("clock set to {secs} s since the epoch"));
        Ok(())
    }

    fn shutdown(&self, timeout_secs: u32) {
        console::say(&format!(
            "shutdown requested by the host (timeout {timeout_secs} s)"
        ));
        power::request_power_off(timeout_secs);
    }

    fn events(&self) -> &Arc<Bus> {
        &self.events
    }
}

fn statvfs(path: &'static str) -> Result<DiskUsage, control::Error> {
    let c_path = CString::new(path).map_err(|e| control::Error::Statvfs(path, e.into()))?;
    // SAFETY: statvfs is plain data; all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and `st` a writable statvfs for the call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(control::Error::Statvfs(
            path,
            std::io::Error::last_os_error(),
        ));
    }
    let kib = |blocks: u64| blocks.saturating_mul(st.f_frsize) / 1024;
    Ok(DiskUsage {
        total_kib: kib(st.f_blocks),
        used_kib: kib(st.f_blocks.saturating_sub(st.f_bfree)),
    })
}

/// Binds the four ports and starts their accept threads.
pub fn start(guest: Arc<AgentGuest>) -> Result<(), Error> {
    listen(DOCKER_API_PORT, "docker-api", serve_docker_api)?;
    let g = Arc::clone(&guest);
    listen(CONTROL_PORT, "control", move |s| {
        control::serve(s, g.as_ref())
    })?;
    listen(SHELL_PORT, "shell", |s| {
        if let Err(e) = shell::serve(s) {
            console::warn(&format!("shell session: {}", console::chain(&e)));
        }
    })?;
    let slots = Arc::new(dial::Slots::default());
    listen(DIAL_PORT, "dial", move |s| {
        // A failed dial was answered `Failed`; these are hosts that hung up or broke the
        // protocol, which the host proxy logs on its side: nothing to say per connection.
        let _ = dial::serve(s, &slots);
    })?;
    console::say(&format!(
        "listening on vsock ports {DOCKER_API_PORT} (docker), {CONTROL_PORT} (control), \
         {SHELL_PORT} (shell), {DIAL_PORT} (published ports)"
    ));
    Ok(())
}

/// Accepts connections on `port` forever, handling each on its own thread.
fn listen<F>(port: u32, name: &'static str, handle: F) -> Result<(), Error>
where
    F: Fn(VsockStream) + Send + Sync + 'static,
{
    let listener = VsockListener::bind(port)?;
    let handle = Arc::new(handle);
    std::thread::Builder::new()
        .name(format!("accept-{name}"))
        .spawn(move || accept_loop(&listener, name, &handle))
        .map_err(|e| Error::Thread(port, e))?;
    Ok(())
}

fn accept_loop<F>(listener: &VsockListener, name: &'static str, handle: &Arc<F>)
where
    F: Fn(VsockStream) + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                console::warn(&format!("accept on vsock port {}: {e}", listener.port()));
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let h = Arc::clone(handle);
        let spawned = std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(CONNECTION_STACK)
            .spawn(move || h(stream));
        if let Err(e) = spawned {
            console::warn(&format!("{name} connection dropped: no thread ({e})"));
        }
    }
}

/// Splices one host connection to dockerd's socket; closes it if dockerd is not there yet.
fn serve_docker_api(stream: VsockStream) {
    let Ok(docker) = UnixStream::connect(daemons::DOCKER_SOCKET) else {
        return;
    };
    let _ = splice::splice(stream, docker);
}

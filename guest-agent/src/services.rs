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
fn serve_docker_api(mut stream: VsockStream) {
    match UnixStream::connect(daemons::DOCKER_SOCKET) {
        Ok(docker) => {
            let _ = splice::splice(stream, docker);
        }
        // dockerd is not up yet (the VM is starting or restarting after a crash) or is being
        // restarted by the supervisor: the client gets a 503 it can show, not a closed
        // connection ("EOF").
        Err(e) => {
            let _ = crate::vsock::set_read_timeout(&stream, Some(REQUEST_HEAD_TIMEOUT));
            let _ = answer_not_ready(&mut stream, &e);
        }
    }
}

/// How long a client refused with a 503 has to send its request head.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a refused client's request head read before answering.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Reads the client's request head (answering before it arrived and closing with it unread
/// would reset the connection, and the client might never see the answer), then answers 503
/// with dockerd's JSON error shape, `{"message": ...}`, which the docker CLI prints.
fn answer_not_ready(
    client: &mut (impl std::io::Read + std::io::Write),
    why: &std::io::Error,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while head.len() < MAX_REQUEST_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let message = format!(
        "dockerd in the Berth VM is not ready yet (connect to {}: {why}); try again in a few \
         seconds, or see `berth logs --source dockerd`",
        daemons::DOCKER_SOCKET
    );
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head.starts_with(b"HEAD ") {
        response.push_str(&body);
    }
    client.write_all(response.as_bytes())?;
    client.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// What a client sees when dockerd's socket is missing: its request read, then a 503 with
    /// a JSON message (no body for HEAD).
    fn refused(request: &[u8]) -> String {
        let (mut client, mut agent) = UnixStream::pair().unwrap();
        client.write_all(request).unwrap();
        let why = std::io::Error::from(std::io::ErrorKind::NotFound);
        answer_not_ready(&mut agent, &why).unwrap();
        drop(agent);
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn a_client_gets_a_503_with_a_message_while_dockerd_is_not_up() {
        let answer = refused(b"GET /v1.45/containers/json HTTP/1.1\r\nHost: docker\r\n\r\n");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        let message = json["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "dockerd in the Berth VM is not ready yet (connect to /var/run/docker.sock:"
            ),
            "{message}"
        );
        let answer = refused(b"HEAD /_ping HTTP/1.1\r\nHost: docker\r\n\r\n");
        assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    }
}

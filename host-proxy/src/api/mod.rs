//! The Docker API socket (`run/docker.sock`): every client connection goes to dockerd's socket
//! in the guest (vsock port 2375) byte for byte, so HTTP upgrades (attach, exec, build) and
//! streams (logs, events) work unchanged; only requests that create a container or service are
//! held and checked first, so a bind mount of a host folder that is not shared is refused with
//! a clear message ([`mounts`], [`http`]). When the guest cannot be reached the client gets a
//! well-formed `503` with a JSON `message`, never a hang.

pub mod http;
pub mod mounts;

pub use mounts::{Denied, MountPolicy, GUEST_PATHS};

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::DOCKER_API_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::control_api::model::{StateChange, VmState};
use crate::hybrid::{self, ConnectError};

/// How long a client that gets a 503 has to send its request head.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST_HEAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} exists and is not a socket: refusing to replace it", .0.display())]
    NotSocket(PathBuf),
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the VM's lifecycle is at this moment, for the 503's message.
pub type StateProbe = Arc<dyn Fn() -> StateChange + Send + Sync>;

/// Where client connections go.
#[derive(Clone)]
pub struct Forwarder {
    /// The VMM's hybrid vsock socket.
    pub vsock: PathBuf,
    /// How long the guest may take to accept a connection before the client gets a 503.
    pub connect_timeout: Duration,
    /// Which host paths containers may bind-mount.
    pub mounts: MountPolicy,
    /// The lifecycle's state, so that a client refused while the VM restarts after a crash is
    /// told so; `None` where no lifecycle runs (the message then goes by the error alone).
    pub state: Option<StateProbe>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("vsock", &self.vsock)
            .field("connect_timeout", &self.connect_timeout)
            .field("mounts", &self.mounts)
            .field("state", &self.state.as_ref().map(|probe| probe()))
            .finish()
    }
}

/// The listening Docker socket; removed on drop unless another process has replaced it.
#[derive(Debug)]
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl ApiSocket {
    /// Listens on `path`, owner-only (0600). The socket is bound under a temporary name and
    /// renamed over `path`, so clients never see a socket with looser permissions and a stale
    /// one is replaced in one step.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let listen = |source| Error::Listen {
            path: path.into(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(Error::NotSocket(path.into())),
            _ => {}
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(listen)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path))
            .and_then(|()| std::fs::symlink_metadata(path));
        let meta = match placed {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(listen(e));
            }
        };
        std_listener.set_nonblocking(true).map_err(listen)?;
        let listener = UnixListener::from_std(std_listener).map_err(listen)?;
        Ok(ApiSocket {
            listener,
            path: path.into(),
            ino: meta.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next client.
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(client, _)| client)
    }

    /// Accepts clients forever, each served on its own task.
    pub async fn serve(&self, forwarder: Arc<Forwarder>) {
        loop {
            match self.listener.accept().await {
                Ok((client, _)) => {
                    let forwarder = forwarder.clone();
                    tokio::spawn(async move { forward(client, &forwarder).await });
                }
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    tracing::warn!("accept on {}: {e}", self.path.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Serves one client: forwards it to dockerd (checking mounts), or answers 503.
pub async fn forward(client: UnixStream, forwarder: &Forwarder) {
    match hybrid::connect(&forwarder.vsock, DOCKER_API_PORT, forwarder.connect_timeout).await {
        Ok(guest) => match http::splice(client, guest, &forwarder.mounts).await {
            Ok(()) => tracing::debug!("docker connection done"),
            Err(e) => tracing::debug!("docker connection ended: {}", crate::chain(&e)),
        },
        Err(e) => {
            tracing::info!("docker client answered 503: {e}");
            let state = forwarder.state.as_ref().map(|probe| probe());
            let message = unavailable_message(&e, state.as_ref());
            answer_unavailable(client, &message).await;
        }
    }
}

/// The message a Docker client shows ("Error response from daemon: ..."): what the lifecycle
/// is doing when it is known, else what the failed connection says.
pub fn unavailable_message(err: &ConnectError, state: Option<&StateChange>) -> String {
    let reason = |state: &StateChange| {
        state
            .reason
            .as_deref()
            .filter(|r| !r.is_empty())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    };
    match state {
        Some(s) if s.state == VmState::Starting => {
            let what = match s.reason.as_deref() {
                Some(r) if r.starts_with("restarting after a crash") => {
                    format!("the Berth VM is {r}")
                }
                _ => format!("the Berth VM is starting{}", reason(s)),
            };
            format!("{what}; try again in a few seconds, or see `berth logs`")
        }
        Some(s) if s.state == VmState::Stopping => {
            format!("the Berth VM is stopping{}", reason(s))
        }
        // The reason after five crashes already says that a start tries again.
        Some(s) if s.state == VmState::Crashed => match s.reason.as_deref() {
            Some(r) if r.contains("berth start") => format!("the Berth VM crashed{}", reason(s)),
            _ => format!(
                "the Berth VM crashed{}: `berth start` starts it again",
                reason(s)
            ),
        },
        _ if err.vmm_down() || state.is_some_and(|s| s.state == VmState::Stopped) => {
            "the Berth VM is not running: start it with `berth start`".into()
        }
        _ => format!(
            "the Berth VM is starting or dockerd in it is not ready yet ({}); \
             try again in a few seconds, or see `berth logs`",
            crate::chain(err)
        ),
    }
}

/// A complete HTTP/1.1 503 response carrying `{"message": ...}` (no body for `HEAD`).
pub fn unavailable_response(message: &str, head_request: bool) -> Vec<u8> {
    http::json_response("503 Service Unavailable", message, true, head_request)
}

async fn answer_unavailable(mut client: UnixStream, message: &str) {
    // Read the request first: answering before it arrives, then closing with it unread, makes
    // the kernel reset the client's side and it may never see the answer.
    let head = read_request_head(&mut client).await;
    let response = unavailable_response(message, head.starts_with(b"HEAD "));
    if client.write_all(&response).await.is_err() {
        return;
    }
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, drain).await;
}

async fn read_request_head(client: &mut UnixStream) -> Vec<u8> {
    let mut head = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while head.len() < MAX_REQUEST_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, read).await;
    head
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_503_says_what_the_vm_is_doing() {
        let down = ConnectError::Socket {
            path: "/h/run/vsock.sock".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let refused = ConnectError::Refused { port: 2375 };
        let at = |state, reason: &str| StateChange {
            state,
            reason: Some(reason.into()),
            since_ms: 0,
        };
        let restarting = at(
            VmState::Starting,
            "restarting after a crash (the guest kernel panicked), attempt 2 in 1 s",
        );
        assert_eq!(
            unavailable_message(&down, Some(&restarting)),
            "the Berth VM is restarting after a crash (the guest kernel panicked), attempt 2 in \
             1 s; try again in a few seconds, or see `berth logs`"
        );
        assert_eq!(
            unavailable_message(
                &refused,
                Some(&at(VmState::Starting, "waiting for dockerd"))
            ),
            "the Berth VM is starting (waiting for dockerd); try again in a few seconds, or see \
             `berth logs`"
        );
        assert_eq!(
            unavailable_message(&down, Some(&at(VmState::Crashed, "the VMM was killed"))),
            "the Berth VM crashed (the VMM was killed): `berth start` starts it again"
        );
        assert_eq!(
            unavailable_message(&down, Some(&at(VmState::Stopped, "stopped by the user"))),
            "the Berth VM is not running: start it with `berth start`"
        );
        // No lifecycle to ask: the error decides.
        assert_eq!(
            unavailable_message(&down, None),
            "the Berth VM is not running: start it with `berth start`"
        );
        assert!(unavailable_message(&refused, None).contains("nothing listens there yet"));
        // Running, yet the guest refused: dockerd is being restarted in the guest.
        let running = at(VmState::Running, "dockerd answers");
        assert!(unavailable_message(&refused, Some(&running)).contains("not ready yet"));
    }

    #[test]
    fn the_503_is_well_formed_http_with_a_json_message() {
        let response = unavailable_response("the Berth VM is not running", false);
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["message"], "the Berth VM is not running");
        let head_only = unavailable_response("x", true);
        assert!(head_only.ends_with(b"\r\n\r\n"));
    }

    #[test]
    fn the_socket_is_owner_only_replaces_a_stale_one_and_spares_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let socket = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(socket);
        assert!(!path.exists(), "the socket is removed on drop");

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        assert!(matches!(ApiSocket::bind(&file), Err(Error::NotSocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }
}

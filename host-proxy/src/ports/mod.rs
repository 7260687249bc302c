//! Published ports, host side: the guest's port proxy asks (over vsock, at
//! `<vsock socket>_<PUBLISH_PORT>`) for a host port to be bound; each publish's listener lives
//! exactly as long as the asking connection, and every host connection or UDP flow it accepts
//! is carried to the container through the agent's dial service.

mod dial;
mod listen;
mod tcp;
mod udp;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_protocol::ports::{Proto, Publish, PublishReply, PUBLISH_PORT};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::control;
pub use dial::DialError;
pub use listen::effective_address;

/// How long the port proxy has to send its `Publish` after connecting.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to answer a dial (connect, `Dial`, `DialReply`): longer than the
/// agent's own bound on the TCP connect to the container (45 s, SYN retries into a full accept
/// queue), so the agent's answer, not this timer, decides.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(60);
/// A UDP flow with no datagram either way for this long closes.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// UDP flows per published port; a new peer over it evicts the least recently used flow.
pub const MAX_UDP_FLOWS: usize = 1024;
/// Publishes at once; more are refused (each holds host descriptors at the guest's asking).
pub const MAX_PUBLISHES: usize = 4096;
/// At most one warning per published port this often (dial failures, accept errors).
const WARN_INTERVAL: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} exists and is not a socket: refusing to replace it", .0.display())]
    NotSocket(PathBuf),
    #[error("cannot listen for published ports on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One port forwarded from the host to a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedPort {
    pub proto: Proto,
    /// What is bound on the host (after the `ports.bind_address` setting).
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_ip: IpAddr,
    pub container_port: u16,
}

impl std::fmt::Display for ForwardedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.proto,
            SocketAddr::new(self.host_ip, self.host_port),
            SocketAddr::new(self.container_ip, self.container_port)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PortEvent {
    PortPublished(ForwardedPort),
    PortUnpublished(ForwardedPort),
}

/// Timeouts and bounds; `Options::default()` is what `Forwarder::start` uses.
#[derive(Clone, Debug)]
pub struct Options {
    pub publish_timeout: Duration,
    pub dial_timeout: Duration,
    pub udp_idle: Duration,
    pub max_udp_flows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            publish_timeout: PUBLISH_TIMEOUT,
            dial_timeout: DIAL_TIMEOUT,
            udp_idle: UDP_IDLE,
            max_udp_flows: MAX_UDP_FLOWS,
        }
    }
}

/// The socket the VMM delivers the guest's connections to host port `PUBLISH_PORT` at.
pub fn publish_socket_path(vsock: &Path) -> PathBuf {
    let mut path = vsock.as_os_str().to_owned();
    path.push(format!("_{PUBLISH_PORT}"));
    PathBuf::from(path)
}

/// The published-port service: the publish socket and every port it forwards.
#[derive(Debug)]
pub struct Forwarder {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Listens for publish requests at `<vsock>_<PUBLISH_PORT>` (replacing a stale socket file),
    /// dials containers through `vsock` (CONNECT DIAL_PORT). `bind_address`: the user's
    /// `ports.bind_address` setting (None: bind what was asked; see `effective_address`).
    /// Must run inside a tokio runtime.
    pub fn start(
        vsock: &Path,
        bind_address: Option<IpAddr>,
        events: mpsc::UnboundedSender<PortEvent>,
    ) -> Result<Forwarder, Error> {
        Self::start_with(vsock, bind_address, events, Options::default())
    }

    /// `start` with other timeouts and bounds (tests shorten them).
    pub fn start_with(
        vsock: &Path,
        bind_address: Option<IpAddr>,
        events: mpsc::UnboundedSender<PortEvent>,
        options: Options,
    ) -> Result<Forwarder, Error> {
        let path = publish_socket_path(vsock);
        let socket = PublishSocket::bind(&path)?;
        let shared = Arc::new(Shared {
            vsock: vsock.into(),
            bind_address,
            options,
            events,
            ports: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_publishes(socket, shared.clone(), stopped));
        Ok(Forwarder { shared, stop, task })
    }

    /// The ports forwarded now, oldest first.
    pub fn ports(&self) -> Vec<ForwardedPort> {
        self.shared.lock_ports().values().cloned().collect()
    }

    /// Closes the publish socket and every listener and connection; returns when they are
    /// closed and every `PortUnpublished` is sent.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!("the published-port service ended abnormally: {e}");
        }
    }
}

/// What every publish of one forwarder shares.
#[derive(Debug)]
struct Shared {
    vsock: PathBuf,
    bind_address: Option<IpAddr>,
    options: Options,
    events: mpsc::UnboundedSender<PortEvent>,
    ports: Mutex<BTreeMap<u64, ForwardedPort>>,
    next_id: AtomicU64,
}

impl Shared {
    fn lock_ports(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ForwardedPort>> {
        // A panic while holding the lock cannot leave the map half-updated: keep using it.
        self.ports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, port: ForwardedPort) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!("published {port}");
        self.lock_ports().insert(id, port.clone());
        let _ = self.events.send(PortEvent::PortPublished(port));
        id
    }

    fn remove(&self, id: u64) {
        let removed = self.lock_ports().remove(&id);
        if let Some(port) = removed {
            tracing::info!("unpublished {port}");
            let _ = self.events.send(PortEvent::PortUnpublished(port));
        }
    }
}

/// The listening publish socket; its file is removed on drop unless something replaced it.
struct PublishSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl PublishSocket {
    fn bind(path: &Path) -> Result<Self, Error> {
        let listen = |source| Error::Listen {
            path: path.into(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => return Err(Error::NotSocket(path.into())),
            Ok(_) => std::fs::remove_file(path).map_err(listen)?,
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(listen)?;
        let meta = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::symlink_metadata(path))
            .map_err(listen)?;
        Ok(PublishSocket {
            listener,
            path: path.into(),
            ino: meta.ino(),
        })
    }
}

impl Drop for PublishSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// True once `stop()` ran or the `Forwarder` was dropped.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn accept_publishes(
    socket: PublishSocket,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut publishes = JoinSet::new();
    let warns = Throttle::default();
    loop {
        tokio::select! {
            () = stopping(&mut stop) => break,
            accepted = socket.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    publishes.spawn(publish(stream, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    if let Some(suppressed) = warns.check() {
                        tracing::warn!(
                            "accept on {}: {e} ({suppressed} more suppressed)",
                            socket.path.display()
                        );
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = publishes.join_next(), if !publishes.is_empty() => {}
        }
    }
    drop(socket);
    while publishes.join_next().await.is_some() {}
}

/// Serves one publish connection: read the request, bind, answer, forward until the
/// connection closes or the forwarder stops.
async fn publish(mut stream: UnixStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let timeout = shared.options.publish_timeout;
    let request = tokio::select! {
        () = stopping(&mut stop) => return,
        read = tokio::time::timeout(timeout, control::read_frame::<_, Publish>(&mut stream)) => read,
    };
    let request = match request {
        Ok(Ok(Some(request))) => request,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tracing::debug!("publish request: {}", crate::chain(&e)),
        Err(_) => return tracing::debug!("no publish request within {timeout:?}"),
    };
    let Some((bound, port)) = bind(&shared, &request) else {
        return refuse(&mut stream, &request, timeout, "too many published ports").await;
    };
    let bound = match bound {
        Ok(bound) => bound,
        Err(message) => return refuse(&mut stream, &request, timeout, &message).await,
    };
    let reply = PublishReply::Bound {
        host_ip: port.host_ip,
        host_port: port.host_port,
    };
    match tokio::time::timeout(timeout, control::write_frame(&mut stream, &reply)).await {
        Ok(Ok(())) => {}
        _ => return tracing::debug!("the port proxy left before the answer for {port}"),
    }
    let id = shared.add(port.clone());
    let target = Arc::new(Target {
        vsock: shared.vsock.clone(),
        port,
        dial_timeout: shared.options.dial_timeout,
        warns: Throttle::default(),
    });
    let mut tasks = JoinSet::new();
    match bound {
        listen::Bound::Tcp(listener) => {
            tokio::select! {
                () = tcp::serve(&listener, &target, &mut tasks) => {}
                () = guest_closed(&mut stream) => {}
                () = stopping(&mut stop) => {}
            }
        }
        listen::Bound::Udp(socket) => {
            let limits = udp::Limits {
                idle: shared.options.udp_idle,
                max_flows: shared.options.max_udp_flows,
            };
            tokio::select! {
                () = udp::serve(socket, &target, limits, &mut tasks) => {}
                () = guest_closed(&mut stream) => {}
                () = stopping(&mut stop) => {}
            }
        }
    }
    // The listener is closed (dropped with the select's futures); cut its connections.
    tasks.shutdown().await;
    shared.remove(id);
}

/// Binds what `request` asks (narrowed by the setting); `None` over `MAX_PUBLISHES`.
fn bind(
    shared: &Shared,
    request: &Publish,
) -> Option<(Result<listen::Bound, String>, ForwardedPort)> {
    if shared.lock_ports().len() >= MAX_PUBLISHES {
        return None;
    }
    let host_ip = effective_address(request.host_ip, shared.bind_address);
    let addr = SocketAddr::new(host_ip, request.host_port);
    let bound = listen::bind(request.proto, addr);
    let local = bound
        .as_ref()
        .ok()
        .and_then(|b| b.local_addr().ok())
        .unwrap_or(addr);
    let port = ForwardedPort {
        proto: request.proto,
        host_ip: local.ip(),
        host_port: local.port(),
        container_ip: request.container_ip,
        container_port: request.container_port,
    };
    Some((bound, port))
}

async fn refuse(stream: &mut UnixStream, request: &Publish, timeout: Duration, message: &str) {
    tracing::info!(
        "refused to publish {} {} for {}: {message}",
        request.proto,
        SocketAddr::new(request.host_ip, request.host_port),
        SocketAddr::new(request.container_ip, request.container_port),
    );
    let reply = PublishReply::Refused {
        message: message.into(),
    };
    let _ = tokio::time::timeout(timeout, control::write_frame(stream, &reply)).await;
}

/// Returns when the port proxy closes its connection (or breaks the protocol: nothing may
/// follow the request).
async fn guest_closed(stream: &mut UnixStream) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => tracing::debug!("the port proxy sent bytes after its request: closing"),
    }
}

/// Where one published port's connections go.
#[derive(Debug)]
struct Target {
    vsock: PathBuf,
    port: ForwardedPort,
    dial_timeout: Duration,
    warns: Throttle,
}

impl Target {
    async fn dial(&self, proto: Proto) -> Result<UnixStream, DialError> {
        dial::dial(
            &self.vsock,
            proto,
            self.port.container_ip,
            self.port.container_port,
            self.dial_timeout,
        )
        .await
    }

    fn dial_failed(&self, e: &DialError) {
        if let Some(suppressed) = self.warns.check() {
            tracing::warn!(
                "published port {}: {} ({suppressed} more suppressed)",
                self.port,
                crate::chain(e)
            );
        }
    }
}

/// Lets one warning through per `WARN_INTERVAL` and counts the ones it holds back.
#[derive(Debug, Default)]
struct Throttle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(held back since the last one)` when a warning may go out now.
    fn check(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < WARN_INTERVAL) {
            *suppressed += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_held_back_and_counted() {
        let throttle = Throttle::default();
        assert_eq!(throttle.check(), Some(0));
        assert_eq!(throttle.check(), None);
        assert_eq!(throttle.check(), None);
        throttle.state.lock().unwrap().0 = Some(Instant::now() - WARN_INTERVAL);
        assert_eq!(throttle.check(), Some(2));
    }

    #[test]
    fn port_events_are_tagged_json_with_the_ports_fields() {
        let port = ForwardedPort {
            proto: Proto::Udp,
            host_ip: "::".parse().unwrap(),
            host_port: 5353,
            container_ip: "172.17.0.2".parse().unwrap(),
            container_port: 53,
        };
        let json = serde_json::to_value(PortEvent::PortUnpublished(port.clone())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "event": "port_unpublished", "proto": "udp", "host_ip": "::",
                "host_port": 5353, "container_ip": "172.17.0.2", "container_port": 53,
            })
        );
        assert_eq!(port.to_string(), "udp [::]:5353 -> 172.17.0.2:53");
    }

    #[test]
    fn the_publish_socket_is_the_vsock_path_with_the_port() {
        assert_eq!(
            publish_socket_path(Path::new("/run/berth/vsock.sock")),
            Path::new("/run/berth/vsock.sock_1030")
        );
    }
}

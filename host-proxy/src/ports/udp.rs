//! A published UDP port: datagrams from each host peer travel on their own flow (one dial to
//! the container), replies go back to that peer; a flow idle for the idle timeout closes, and
//! the number of flows and the bytes queued towards the guest are bounded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_protocol::ports::{Proto, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use super::dial::{read_datagram, write_datagram};
use super::Target;

/// Datagrams a flow holds while its dial is under way or the guest is slow.
const FLOW_QUEUE: usize = 64;
/// Bytes all of a port's flows may hold towards the guest; datagrams over it are dropped.
const QUEUED_BYTES: usize = 16 << 20;

/// Pause after a failed receive.
const RECV_BACKOFF: Duration = Duration::from_millis(10);

/// How a port's flows are bounded.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub idle: Duration,
    pub max_flows: usize,
}

struct Flow {
    tx: mpsc::Sender<Vec<u8>>,
    /// Milliseconds since the port's epoch at the flow's last datagram, either way.
    last: Arc<AtomicU64>,
    abort: AbortHandle,
}

/// State shared by a port's flows.
struct Port {
    socket: Arc<UdpSocket>,
    target: Arc<Target>,
    epoch: Instant,
    queued: Arc<AtomicUsize>,
    idle: Duration,
}

impl Port {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Receives datagrams forever, each peer's on its own flow task in `tasks` (which the caller
/// shuts down when the publish ends).
pub(super) async fn serve(
    socket: UdpSocket,
    target: &Arc<Target>,
    limits: Limits,
    tasks: &mut JoinSet<()>,
) {
    let port = Arc::new(Port {
        socket: Arc::new(socket),
        target: target.clone(),
        epoch: Instant::now(),
        queued: Arc::new(AtomicUsize::new(0)),
        idle: limits.idle,
    });
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        tokio::select! {
            received = port.socket.recv_from(&mut buf) => match received {
                Ok((len, peer)) => {
                    deliver(&port, &mut flows, tasks, limits.max_flows, peer, &buf[..len]);
                }
                // An ICMP error for an earlier send, reported on this socket: not fatal; the
                // pause keeps an error that repeats from spinning.
                Err(e) => {
                    tracing::debug!("receive on published port {}: {e}", port.target.port);
                    tokio::time::sleep(RECV_BACKOFF).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

fn deliver(
    port: &Arc<Port>,
    flows: &mut HashMap<SocketAddr, Flow>,
    tasks: &mut JoinSet<()>,
    max_flows: usize,
    peer: SocketAddr,
    payload: &[u8],
) {
    if payload.len() > MAX_DATAGRAM {
        return;
    }
    let live = flows.get(&peer).is_some_and(|f| !f.tx.is_closed());
    if !live {
        flows.remove(&peer);
        make_room(flows, max_flows);
        let flow = open(port, tasks, peer);
        flows.insert(peer, flow);
    }
    let Some(flow) = flows.get(&peer) else {
        return;
    };
    if port.queued.load(Ordering::Relaxed) + payload.len() > QUEUED_BYTES {
        tracing::debug!(
            "{}: datagram from {peer} dropped (queue full)",
            port.target.port
        );
        return;
    }
    if flow.tx.try_send(payload.to_vec()).is_ok() {
        port.queued.fetch_add(payload.len(), Ordering::Relaxed);
        flow.last.store(port.now_ms(), Ordering::Relaxed);
    }
}

/// Drops finished flows, then the least recently used one while there are `max_flows`.
fn make_room(flows: &mut HashMap<SocketAddr, Flow>, max_flows: usize) {
    flows.retain(|_, f| !f.tx.is_closed());
    while flows.len() >= max_flows.max(1) {
        let oldest = flows
            .iter()
            .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
            .map(|(peer, _)| *peer);
        match oldest.and_then(|peer| flows.remove(&peer)) {
            Some(evicted) => evicted.abort.abort(),
            None => break,
        }
    }
}

fn open(port: &Arc<Port>, tasks: &mut JoinSet<()>, peer: SocketAddr) -> Flow {
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let inbox = Inbox {
        rx,
        queued: port.queued.clone(),
    };
    let last = Arc::new(AtomicU64::new(port.now_ms()));
    let abort = tasks.spawn(run_flow(port.clone(), peer, inbox, last.clone()));
    Flow { tx, last, abort }
}

/// A flow's queue of datagrams towards the guest; what it still holds when the flow ends
/// (closed, idle, evicted) is given back to the port's byte budget.
struct Inbox {
    rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl Inbox {
    async fn recv(&mut self) -> Option<Vec<u8>> {
        let datagram = self.rx.recv().await?;
        self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
        Some(datagram)
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(datagram) = self.rx.try_recv() {
            self.queued.fetch_sub(datagram.len(), Ordering::Relaxed);
        }
    }
}

/// One peer's flow: dial the container, then datagrams both ways until it is idle, the guest
/// closes it, or it is evicted.
async fn run_flow(port: Arc<Port>, peer: SocketAddr, mut inbox: Inbox, last: Arc<AtomicU64>) {
    let stream = match port.target.dial(Proto::Udp).await {
        Ok(stream) => stream,
        Err(e) => return port.target.dial_failed(&e),
    };
    let (mut rd, mut wr) = stream.into_split();
    let touch = || last.store(port.now_ms(), Ordering::Relaxed);
    let up = async {
        while let Some(datagram) = inbox.recv().await {
            touch();
            if write_datagram(&mut wr, &datagram).await.is_err() {
                break;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok(Some(len)) = read_datagram(&mut rd, &mut buf).await {
            touch();
            if let Err(e) = port.socket.send_to(&buf[..len], peer).await {
                tracing::debug!("{}: reply to {peer}: {e}", port.target.port);
            }
        }
    };
    let idle = async {
        loop {
            let since = port.now_ms().saturating_sub(last.load(Ordering::Relaxed));
            let since = Duration::from_millis(since);
            if since >= port.idle {
                break;
            }
            tokio::time::sleep(port.idle - since).await;
        }
    };
    tokio::select! {
        () = up => {}
        () = down => {}
        () = idle => tracing::debug!("{}: flow from {peer} idle, closed", port.target.port),
    }
}

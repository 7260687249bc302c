//! The host side of the vsock device, in Firecracker's "hybrid vsock" convention: the host
//! connects to one unix socket and writes `CONNECT <port>\n` to reach guest port `port` (the
//! answer is `OK <host port>\n`); a guest connection to host port P is delivered to the unix
//! socket `<path>_P`. The muxer owns every connection, watches their sockets (and the listener)
//! as backends of the device's event loop, and turns guest packets into socket I/O and back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;

use super::connection::{read_connect_line, Connection, Pending, State};
use super::packet::{Header, Op, HOST_CID, VSOCK_TYPE_STREAM};
use crate::devices::virtio::event_loop::{self, Backends};
use berth_errors::Chain;

/// At most this many connections at once; more are refused with a reset.
pub const MAX_CONNECTIONS: usize = 4096;
pub(crate) const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} exists and is not a socket: refusing to replace it")]
    PathNotSocket(PathBuf),
    #[error("listening on {path} failed")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// (host port, guest port)
type Key = (u32, u32);

enum FdOwner {
    Listener,
    /// A host client that has not finished its `CONNECT` line.
    Connecting,
    Conn(Key),
}

/// The event loop token of a socket: its descriptor, which is never negative.
fn token(fd: RawFd) -> u32 {
    fd as u32
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    fds: HashMap<RawFd, FdOwner>,
    connecting: HashMap<RawFd, (UnixStream, Vec<u8>)>,
    conns: HashMap<Key, Connection>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// Connections with something for the guest, served round robin.
    rx_order: VecDeque<Key>,
    rx_queued: HashSet<Key>,
    /// Resets for guest packets that match no connection.
    resets: VecDeque<Header>,
    /// The listener is not watched because accept ran out of file descriptors; it is watched
    /// again when a connection goes away (else the level-triggered listener would spin).
    listener_paused: bool,
}

fn bind_listener(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket left by an earlier run: ours to replace.
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(Error::PathNotSocket(path.into())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Listen {
        path: path.into(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::Listen {
            path: path.into(),
            source,
        })?;
    Ok(listener)
}

impl Muxer {
    /// Listens on `path`; host connections are accepted once the muxer is
    /// [`start`](Self::start)ed in the device's event loop.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, Error> {
        let listener = bind_listener(path)?;
        let mut fds = HashMap::new();
        fds.insert(listener.as_raw_fd(), FdOwner::Listener);
        Ok(Muxer {
            guest_cid,
            path: path.into(),
            listener,
            fds,
            connecting: HashMap::new(),
            conns: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_order: VecDeque::new(),
            rx_queued: HashSet::new(),
            resets: VecDeque::new(),
            listener_paused: false,
        })
    }

    /// Starts accepting host connections: watches the listener in `backends`.
    pub(crate) fn start(&mut self, backends: &mut dyn Backends) -> Result<(), event_loop::Error> {
        self.watch_listener(backends)
    }

    /// Forgets every connection, closing their host sockets (the guest driver was reset), and
    /// keeps the listening socket. Called once the event loop that watched them is gone.
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            self.fds.remove(&conn.stream.as_raw_fd());
        }
        for (fd, _) in self.connecting.drain() {
            self.fds.remove(&fd);
        }
        self.local_ports.clear();
        self.rx_order.clear();
        self.rx_queued.clear();
        self.resets.clear();
        // The next start watches it again.
        self.listener_paused = false;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn watch_listener(&self, backends: &mut dyn Backends) -> Result<(), event_loop::Error> {
        let fd = self.listener.as_fd();
        backends.add(fd, token(fd.as_raw_fd()), EventSet::IN)
    }

    fn watch_stream(
        backends: &mut dyn Backends,
        stream: &UnixStream,
    ) -> Result<(), event_loop::Error> {
        let fd = stream.as_fd();
        backends.add(
            fd,
            token(fd.as_raw_fd()),
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
        )
    }

    fn queue_rx(&mut self, key: Key) {
        if self.rx_queued.insert(key) {
            self.rx_order.push_back(key);
        }
    }

    /// True while something waits to be sent to the guest.
    pub fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_order.is_empty()
    }

    /// The socket watched with `token` is ready: accepts, reads a `CONNECT` line, or notes
    /// that a connection can be read or written, without blocking.
    pub(crate) fn handle_host_event(
        &mut self,
        backends: &mut dyn Backends,
        token: u32,
        set: EventSet,
    ) {
        let Ok(fd) = RawFd::try_from(token) else {
            return;
        };
        match self.fds.get(&fd) {
            Some(FdOwner::Listener) => self.accept_host_connections(backends),
            Some(FdOwner::Connecting) => self.read_connect(backends, fd),
            Some(FdOwner::Conn(key)) => {
                let key = *key;
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                if set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    conn.host_readable = true;
                }
                if set.contains(EventSet::OUT) && conn.wants_writable {
                    if let Err(e) = conn.flush_to_host() {
                        tracing::debug!("vsock {key:?}: {}", Chain(&e));
                        conn.close_with_reset();
                    }
                }
                if conn.has_rx() {
                    self.queue_rx(key);
                }
            }
            None => {}
        }
    }

    fn accept_host_connections(&mut self, backends: &mut dyn Backends) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Err(e) = Self::watch_stream(backends, &stream) {
                        warn_rate_limited!("vsock: dropping a host connection: {}", Chain(&e));
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.fds.insert(fd, FdOwner::Connecting);
                    self.connecting.insert(fd, (stream, Vec::new()));
                    // The CONNECT line may already be there: edge-triggered needs a first read.
                    self.read_connect(backends, fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // The client stays in the backlog until a descriptor is free again.
                    warn_rate_limited!(
                        "vsock: out of file descriptors with {} connections; new host connections on {} wait",
                        self.conns.len(),
                        self.path.display()
                    );
                    self.pause_listener(backends);
                    return;
                }
                Err(e) => {
                    warn_rate_limited!("vsock accept on {} failed: {e}", self.path.display());
                    return;
                }
            }
        }
    }

    fn pause_listener(&mut self, backends: &mut dyn Backends) {
        let fd = self.listener.as_fd();
        backends.remove(fd, token(fd.as_raw_fd()));
        self.listener_paused = true;
    }

    /// A descriptor was freed: a paused listener may accept again.
    fn resume_listener(&mut self, backends: &mut dyn Backends) {
        if !self.listener_paused {
            return;
        }
        match self.watch_listener(backends) {
            Ok(()) => self.listener_paused = false,
            Err(e) => warn_rate_limited!(
                "vsock: host connections on {} still wait: {}",
                self.path.display(),
                Chain(&e)
            ),
        }
    }

    /// True while new host connections wait for a free file descriptor.
    pub fn listener_paused(&self) -> bool {
        self.listener_paused
    }

    fn read_connect(&mut self, backends: &mut dyn Backends, fd: RawFd) {
        let Some((stream, buf)) = self.connecting.get_mut(&fd) else {
            return;
        };
        let port = match read_connect_line(stream, buf) {
            Ok(None) => return,
            Ok(Some(port)) => Some(port),
            Err(e) => {
                tracing::debug!("vsock host connection dropped: {e}");
                None
            }
        };
        let Some((stream, _)) = self.connecting.remove(&fd) else {
            return;
        };
        self.fds.remove(&fd);
        let Some(peer_port) = port.filter(|_| self.conns.len() < MAX_CONNECTIONS) else {
            backends.remove(stream.as_fd(), token(fd));
            drop(stream); // closes it
            return self.resume_listener(backends);
        };
        // The socket stays watched, with the same token, as the connection's.
        let local_port = self.allocate_local_port();
        let mut conn = Connection::new_local(stream, local_port, peer_port);
        conn.host_readable = true;
        let key = (local_port, peer_port);
        self.fds.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.queue_rx(key);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if self.local_ports.insert(port) {
                return port;
            }
        }
    }

    fn reset_reply(&mut self, hdr: &Header) {
        if hdr.op == Op::Rst as u16 {
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: VSOCK_TYPE_STREAM,
            op: Op::Rst as u16,
            ..Default::default()
        });
    }

    fn remove(&mut self, backends: &mut dyn Backends, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_fd();
            backends.remove(fd, token(fd.as_raw_fd()));
            self.fds.remove(&fd.as_raw_fd());
            self.local_ports.remove(&key.0);
            drop(conn);
            self.resume_listener(backends);
        }
    }

    /// A packet the guest sent (TX queue); `data` is its payload in guest memory.
    pub(crate) fn send_pkt(
        &mut self,
        backends: &mut dyn Backends,
        hdr: &Header,
        data: Option<&VolatileSlice<'_>>,
    ) {
        if hdr.type_ != VSOCK_TYPE_STREAM
            || hdr.src_cid != self.guest_cid
            || hdr.dst_cid != HOST_CID
        {
            tracing::debug!("vsock: refusing packet {hdr:?}");
            return self.reset_reply(hdr);
        }
        let key = (hdr.dst_port, hdr.src_port);
        let op = Op::from_u16(hdr.op);
        if !self.conns.contains_key(&key) {
            return match op {
                Some(Op::Request) => self.connect_to_host(backends, hdr),
                _ => self.reset_reply(hdr),
            };
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.update_peer_credit(hdr);
        match op {
            Some(Op::Response) if conn.state == State::LocalInit => {
                if conn.on_response(true).is_err() {
                    conn.close_with_reset();
                }
            }
            Some(Op::Rw) if conn.state == State::Established => {
                let result = match data {
                    Some(data) => conn.send_to_host(data),
                    None => Ok(()),
                };
                if let Err(e) = result {
                    tracing::debug!("vsock {key:?}: {}", Chain(&e));
                    conn.close_with_reset();
                }
            }
            Some(Op::CreditUpdate) => {}
            Some(Op::CreditRequest) => conn.push_pending(Pending::CreditUpdate),
            Some(Op::Shutdown) => conn.on_peer_shutdown(hdr.flags),
            Some(Op::Rst) => return self.remove(backends, key),
            // A request for a live connection, data before the handshake, or an unknown op.
            _ => conn.close_with_reset(),
        }
        if conn.has_rx() {
            self.queue_rx(key);
        }
    }

    fn connect_to_host(&mut self, backends: &mut dyn Backends, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            return self.reset_reply(hdr);
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), hdr.dst_port));
        let stream =
            match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(
                        "vsock: guest port {} to {}: {e}",
                        hdr.src_port,
                        target.display()
                    );
                    return self.reset_reply(hdr);
                }
            };
        if let Err(e) = Self::watch_stream(backends, &stream) {
            warn_rate_limited!("vsock: refusing a guest connection: {}", Chain(&e));
            return self.reset_reply(hdr);
        }
        let key = (hdr.dst_port, hdr.src_port);
        let fd = stream.as_raw_fd();
        let conn = Connection::new_peer(
            stream,
            hdr.dst_port,
            hdr.src_port,
            hdr.buf_alloc,
            hdr.fwd_cnt,
        );
        self.fds.insert(fd, FdOwner::Conn(key));
        self.conns.insert(key, conn);
        self.queue_rx(key);
    }

    /// Fills the next packet for the guest into `hdr` and `data` (an RX buffer); false when
    /// nothing is waiting.
    pub(crate) fn recv_pkt(
        &mut self,
        backends: &mut dyn Backends,
        hdr: &mut Header,
        data: Option<&VolatileSlice<'_>>,
    ) -> bool {
        if let Some(reset) = self.resets.pop_front() {
            *hdr = reset;
            return true;
        }
        while let Some(key) = self.rx_order.pop_front() {
            self.rx_queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            *hdr = Header {
                src_cid: HOST_CID,
                dst_cid: self.guest_cid,
                type_: VSOCK_TYPE_STREAM,
                ..Default::default()
            };
            let sent = conn.recv_pkt(hdr, data);
            let (again, done) = (conn.has_rx(), conn.is_done());
            if done {
                self.remove(backends, key);
            } else if again {
                self.queue_rx(key);
            }
            if sent {
                return true;
            }
        }
        false
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use vmm_sys_util::epoll::EpollEvent;

    use super::*;
    use crate::devices::virtio::test_utils::EpollBackends;
    use crate::devices::virtio::vsock::connection::CONN_BUF_SIZE;
    use crate::devices::virtio::vsock::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

    const GUEST_CID: u64 = 3;

    /// A stand-in for the guest driver: sends packets and collects what the muxer answers.
    struct Guest {
        muxer: Muxer,
        /// The muxer's sockets, watched as the device's event loop watches them.
        backends: EpollBackends,
        dir: vmm_sys_util::tempdir::TempDir,
        buf_alloc: u32,
        fwd_cnt: u32,
    }

    impl Guest {
        fn new() -> Guest {
            let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
            let mut muxer = Muxer::new(GUEST_CID, &dir.as_path().join("v.sock")).unwrap();
            let mut backends = EpollBackends::new();
            muxer.start(&mut backends).unwrap();
            Guest {
                muxer,
                backends,
                dir,
                buf_alloc: 1 << 20,
                fwd_cnt: 0,
            }
        }

        /// Hands the muxer whatever its sockets have signalled, without blocking.
        fn poll(&mut self) {
            let mut events = vec![EpollEvent::default(); 64];
            loop {
                let n = self.backends.epoll.wait(0, &mut events).unwrap();
                for event in &events[..n] {
                    let token = event.data() as u32;
                    self.muxer
                        .handle_host_event(&mut self.backends, token, event.event_set());
                }
                if n < events.len() {
                    return;
                }
            }
        }

        fn host_path(&self, port: u32) -> PathBuf {
            self.dir.as_path().join(format!("v.sock_{port}"))
        }

        fn send(&mut self, op: Op, src_port: u32, dst_port: u32, flags: u32, data: &[u8]) {
            let hdr = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: VSOCK_TYPE_STREAM,
                op: op as u16,
                flags,
                buf_alloc: self.buf_alloc,
                fwd_cnt: self.fwd_cnt,
            };
            let mut copy = data.to_vec();
            let slice = VolatileSlice::from(copy.as_mut_slice());
            let data = if data.is_empty() { None } else { Some(&slice) };
            self.muxer.send_pkt(&mut self.backends, &hdr, data);
        }

        /// The next packet for the guest, waiting up to 5 s for host sockets to deliver.
        fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                self.poll();
                let mut buf = vec![0u8; 64 * 1024];
                let mut hdr = Header::default();
                let slice = VolatileSlice::from(buf.as_mut_slice());
                if self
                    .muxer
                    .recv_pkt(&mut self.backends, &mut hdr, Some(&slice))
                {
                    buf.truncate(hdr.len as usize);
                    return Some((hdr, buf));
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }

        fn recv_op(&mut self, op: Op) -> (Header, Vec<u8>) {
            let (hdr, data) = self
                .recv()
                .unwrap_or_else(|| panic!("no packet while waiting for {op:?}"));
            assert_eq!(Op::from_u16(hdr.op), Some(op), "{hdr:?}");
            (hdr, data)
        }
    }

    fn host_connect(guest: &mut Guest, port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(guest.muxer.path()).unwrap();
        host.write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let (req, _) = guest.recv_op(Op::Request);
        assert_eq!(
            (req.dst_port, req.dst_cid, req.src_cid),
            (port, GUEST_CID, HOST_CID)
        );
        guest.send(Op::Response, port, req.src_port, 0, b"");
        let mut line = [0u8; 64];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = host.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        (host, req.src_port)
    }

    #[test]
    fn host_connect_handshake_and_data_both_ways() {
        let mut guest = Guest::new();
        let (mut host, local) = host_connect(&mut guest, 1024);
        host.write_all(b"ping from host").unwrap();
        let (hdr, data) = guest.recv_op(Op::Rw);
        assert_eq!((hdr.src_port, hdr.dst_port), (local, 1024));
        assert_eq!(data, b"ping from host");
        guest.send(Op::Rw, 1024, local, 0, b"pong from guest");
        let mut buf = [0u8; 15];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong from guest");
    }

    #[test]
    fn guest_connects_to_a_host_listener() {
        let mut guest = Guest::new();
        let listener = UnixListener::bind(guest.host_path(2375)).unwrap();
        guest.send(Op::Request, 5555, 2375, 0, b"");
        let (resp, _) = guest.recv_op(Op::Response);
        assert_eq!((resp.src_port, resp.dst_port), (2375, 5555));
        let (mut host, _) = listener.accept().unwrap();
        guest.send(Op::Rw, 5555, 2375, 0, b"GET /_ping");
        let mut buf = [0u8; 10];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"GET /_ping");
        host.write_all(b"OK").unwrap();
        assert_eq!(guest.recv_op(Op::Rw).1, b"OK");
    }

    #[test]
    fn nobody_listening_and_malformed_packets_get_resets() {
        let mut guest = Guest::new();
        guest.send(Op::Request, 1, 4242, 0, b"");
        let (rst, _) = guest.recv_op(Op::Rst);
        assert_eq!((rst.src_port, rst.dst_port), (4242, 1));
        guest.send(Op::Rw, 1, 4242, 0, b"data for nobody");
        guest.recv_op(Op::Rst);
        let mut hdr = Header {
            src_cid: 99,
            dst_cid: HOST_CID,
            type_: VSOCK_TYPE_STREAM,
            op: Op::Request as u16,
            ..Default::default()
        };
        guest.muxer.send_pkt(&mut guest.backends, &hdr, None);
        guest.recv_op(Op::Rst);
        hdr.src_cid = GUEST_CID;
        hdr.type_ = 2; // SEQPACKET: not offered
        guest.muxer.send_pkt(&mut guest.backends, &hdr, None);
        guest.recv_op(Op::Rst);
        hdr.type_ = VSOCK_TYPE_STREAM;
        hdr.op = 99;
        guest.muxer.send_pkt(&mut guest.backends, &hdr, None);
        guest.recv_op(Op::Rst);
        // An RST for nothing is not answered.
        guest.send(Op::Rst, 1, 4242, 0, b"");
        assert!(guest.recv().is_none());
        assert_eq!(guest.muxer.connection_count(), 0);
    }

    #[test]
    fn host_to_guest_data_respects_the_guests_credit() {
        let mut guest = Guest::new();
        guest.buf_alloc = 100;
        let (mut host, local) = host_connect(&mut guest, 7);
        host.write_all(&[7u8; 1000]).unwrap();
        let (_, first) = guest.recv_op(Op::Rw);
        assert_eq!(first.len(), 100, "exactly the credit");
        assert!(
            guest.recv().is_none(),
            "no credit left: nothing more may be sent"
        );
        guest.fwd_cnt = 100;
        guest.send(Op::CreditUpdate, 7, local, 0, b"");
        let (_, second) = guest.recv_op(Op::Rw);
        assert_eq!(second.len(), 100);
    }

    #[test]
    fn a_slow_host_reader_buffers_and_credit_limits_the_guest() {
        let mut guest = Guest::new();
        let (mut host, local) = host_connect(&mut guest, 9);
        // More than the socket buffer: the rest waits in the connection.
        let chunk: Vec<u8> = (0..CONN_BUF_SIZE).map(|i| (i % 251) as u8).collect();
        for piece in chunk.chunks(32 * 1024) {
            guest.send(Op::Rw, 9, local, 0, piece);
        }
        // The guest may not exceed the credit it was given: that resets the connection.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 8192];
            while got.len() < CONN_BUF_SIZE as usize {
                let n = host.read(&mut buf).unwrap();
                assert!(n > 0, "early EOF after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
            got
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut credit_updates = 0;
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "host reader starved");
            if let Some((hdr, _)) = guest.recv() {
                if hdr.op == Op::CreditUpdate as u16 {
                    credit_updates += 1;
                }
            }
        }
        assert_eq!(
            reader.join().unwrap(),
            chunk,
            "bytes arrive complete and in order"
        );
        assert!(
            credit_updates > 0,
            "the guest must hear that its data was consumed"
        );
    }

    #[test]
    fn sending_beyond_the_credit_resets_the_connection() {
        let mut guest = Guest::new();
        let (host, local) = host_connect(&mut guest, 10);
        let big = vec![1u8; 64 * 1024];
        for _ in 0..(CONN_BUF_SIZE as usize / big.len() + 8) {
            guest.send(Op::Rw, 10, local, 0, &big);
        }
        // Nobody reads `host`: the overrun must end in an RST, not unbounded memory.
        let mut saw_reset = false;
        while let Some((hdr, _)) = guest.recv() {
            if hdr.op == Op::Rst as u16 {
                saw_reset = true;
                break;
            }
        }
        assert!(saw_reset);
        drop(host);
    }

    #[test]
    fn shutdowns_propagate_in_each_direction() {
        let mut guest = Guest::new();
        let (mut host, local) = host_connect(&mut guest, 11);
        guest.send(Op::Rw, 11, local, 0, b"last words");
        guest.send(Op::Shutdown, 11, local, SHUTDOWN_SEND, b"");
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"last words", "the host reads the data, then EOF");
        // The host can still answer, then closes: the guest is told, then reset.
        host.write_all(b"reply").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(guest.recv_op(Op::Rw).1, b"reply");
        let (shut, _) = guest.recv_op(Op::Shutdown);
        assert_eq!(shut.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
        guest.recv_op(Op::Rst);
        assert_eq!(guest.muxer.connection_count(), 0);
    }

    #[test]
    fn guest_full_shutdown_closes_the_host_socket() {
        let mut guest = Guest::new();
        let (mut host, local) = host_connect(&mut guest, 12);
        guest.send(Op::Shutdown, 12, local, SHUTDOWN_SEND | SHUTDOWN_RCV, b"");
        guest.recv_op(Op::Rst);
        let mut buf = [0u8; 4];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        assert_eq!(guest.muxer.connection_count(), 0);
    }

    #[test]
    fn hundreds_of_connections_keep_their_bytes_apart() {
        let mut guest = Guest::new();
        let mut hosts = Vec::new();
        for i in 0..300u32 {
            let (host, local) = host_connect(&mut guest, 20_000 + i);
            hosts.push((host, local, 20_000 + i));
        }
        for (host, _, port) in hosts.iter_mut() {
            host.write_all(format!("hello guest port {port}").as_bytes())
                .unwrap();
        }
        let mut seen = HashSet::new();
        while seen.len() < hosts.len() {
            let (hdr, data) = guest.recv_op(Op::Rw);
            assert_eq!(
                data,
                format!("hello guest port {}", hdr.dst_port).as_bytes()
            );
            assert!(seen.insert(hdr.dst_port));
        }
        for (_, local, port) in &hosts {
            guest.send(
                Op::Rw,
                *port,
                *local,
                0,
                format!("back to {local}").as_bytes(),
            );
        }
        for (host, local, _) in hosts.iter_mut() {
            let want = format!("back to {local}");
            let mut buf = vec![0u8; want.len()];
            host.read_exact(&mut buf).unwrap();
            assert_eq!(buf, want.as_bytes());
        }
    }

    #[test]
    fn a_bad_connect_line_closes_only_that_client() {
        let mut guest = Guest::new();
        let mut bad = UnixStream::connect(guest.muxer.path()).unwrap();
        bad.write_all(b"HELLO there\n").unwrap();
        guest.poll();
        let mut buf = [0u8; 4];
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(bad.read(&mut buf).unwrap(), 0);
        let (mut good, _) = host_connect(&mut guest, 13);
        good.write_all(b"x").unwrap();
        assert_eq!(guest.recv_op(Op::Rw).1, b"x");
    }

    #[test]
    fn a_reset_closes_connections_and_clients_still_sending_their_connect_line() {
        let mut guest = Guest::new();
        let (mut connected, _) = host_connect(&mut guest, 14);
        let mut half_open = UnixStream::connect(guest.muxer.path()).unwrap();
        half_open.write_all(b"CONNECT 1").unwrap();
        guest.poll();
        // The device's loop is gone after a reset: nothing would ever read the rest of the
        // line, so the client is told at once instead of hanging.
        guest.muxer.reset();
        let mut buf = [0u8; 4];
        for client in [&mut connected, &mut half_open] {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            assert_eq!(client.read(&mut buf).unwrap(), 0, "EOF, not a timeout");
        }
        assert_eq!(guest.muxer.connection_count(), 0);
    }

    fn open_fds() -> Vec<i32> {
        let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        fds
    }

    fn set_nofile(soft: u64) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit on a valid rlimit.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            lim.rlim_cur = soft;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }

    const FD_CHILD_ENV: &str = "BERTH_VSOCK_FD_LIMIT_CHILD";
    const FD_TEST: &str = "running_out_of_descriptors_pauses_the_listener_instead_of_spinning";

    /// At the open-file limit the level-triggered listener used to wake the event loop forever
    /// (a busy loop with a warning each time). Runs in a child process: the limit is per process.
    #[test]
    fn running_out_of_descriptors_pauses_the_listener_instead_of_spinning() {
        if std::env::var_os(FD_CHILD_ENV).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([FD_TEST, "--test-threads=1", "--nocapture"])
                .env(FD_CHILD_ENV, "1")
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{text}");
            assert!(
                text.contains("1 passed"),
                "the child did not run it:\n{text}"
            );
            return;
        }
        let mut guest = Guest::new();
        let (_first, first_local) = host_connect(&mut guest, 100);
        // Fill every descriptor below the new limit, then free exactly one.
        set_nofile(*open_fds().iter().max().unwrap() as u64 + 8);
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
        }
        filler.pop();
        // The client takes the last descriptor: the muxer cannot accept it.
        let mut waiting = UnixStream::connect(guest.muxer.path()).unwrap();
        waiting.write_all(b"CONNECT 101\n").unwrap();
        for _ in 0..3 {
            guest.poll();
        }
        assert!(guest.muxer.listener_paused());
        let mut pfd = libc::pollfd {
            fd: guest.backends.epoll.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        assert_eq!(
            ready, 0,
            "the event loop's epoll must not stay readable (the loop would spin)"
        );
        assert!(guest.recv().is_none());
        // The guest resets the first connection: its descriptor is freed and the waiting
        // client is served.
        guest.send(Op::Rst, 100, first_local, 0, b"");
        let (req, _) = guest.recv_op(Op::Request);
        assert_eq!(req.dst_port, 101);
        // Still at the limit (accept needs a free descriptor even with nobody waiting): paused
        // again, and quiet.
        guest.poll();
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    }

    #[test]
    fn an_existing_non_socket_path_is_not_replaced() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
        let path = dir.as_path().join("precious");
        std::fs::write(&path, b"user data").unwrap();
        assert!(matches!(
            Muxer::new(GUEST_CID, &path),
            Err(Error::PathNotSocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"user data");
    }
}

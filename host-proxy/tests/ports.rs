//! The published-port forwarder end to end without a VM: a fake VMM (a unix listener at the
//! vsock path speaking the hybrid `CONNECT`/`OK` handshake) plays the agent's dial service and
//! reaches real TCP and UDP echo servers on 127.0.0.1; a fake port proxy connects to
//! `<vsock>_1030` and sends `Publish` as the guest's would.
#![allow(clippy::unwrap_used)] // test helpers panic on purpose

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_host_proxy::control::{read_frame, write_frame};
use berth_host_proxy::ports::{publish_socket_path, ForwardedPort, Forwarder, Options, PortEvent};
use berth_protocol::ports::{Dial, DialReply, Proto, Publish, PublishReply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener, UnixStream};
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A fake VMM with the agent's dial service behind guest port 1026; counts its live UDP flows.
struct Guest {
    udp_flows: Arc<AtomicUsize>,
}

impl Guest {
    fn start(vsock: &Path) -> Guest {
        let listener = UnixListener::bind(vsock).unwrap();
        let udp_flows = Arc::new(AtomicUsize::new(0));
        let flows = udp_flows.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_dial(stream, flows.clone()));
            }
        });
        Guest { udp_flows }
    }
}

async fn serve_dial(mut stream: UnixStream, udp_flows: Arc<AtomicUsize>) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).await.unwrap();
        line.push(byte[0]);
    }
    assert_eq!(line, b"CONNECT 1026\n");
    stream.write_all(b"OK 1\n").await.unwrap();
    let dial: Dial = read_frame(&mut stream).await.unwrap().unwrap();
    let target = SocketAddr::new(dial.ip, dial.port);
    match dial.proto {
        Proto::Tcp => match TcpStream::connect(target).await {
            Ok(mut container) => {
                write_frame(&mut stream, &DialReply::Connected)
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut container).await;
            }
            Err(e) => {
                let message = format!("dial tcp {target}: {e}");
                write_frame(&mut stream, &DialReply::Failed { message })
                    .await
                    .unwrap();
            }
        },
        Proto::Udp => {
            let container = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            container.connect(target).await.unwrap();
            write_frame(&mut stream, &DialReply::Connected)
                .await
                .unwrap();
            udp_flows.fetch_add(1, Ordering::SeqCst);
            let (mut rd, mut wr) = stream.into_split();
            let up = async {
                while let Some(datagram) = read_datagram(&mut rd).await {
                    container.send(&datagram).await.unwrap();
                }
            };
            let down = async {
                let mut buf = vec![0u8; 65536];
                loop {
                    let len = container.recv(&mut buf).await.unwrap();
                    write_datagram(&mut wr, &buf[..len]).await;
                }
            };
            tokio::select! { () = up => {}, () = down => {} }
            udp_flows.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

async fn read_datagram<R: AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut header = [0u8; 2];
    r.read_exact(&mut header).await.ok()?;
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes(header))];
    r.read_exact(&mut payload).await.ok()?;
    Some(payload)
}

async fn write_datagram<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) {
    let mut frame = Vec::new();
    berth_protocol::ports::write_datagram(&mut frame, payload).unwrap();
    let _ = w.write_all(&frame).await;
}

/// A TCP echo server ("the container"): echoes each connection, half-close included.
async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (len, peer) = socket.recv_from(&mut buf).await.unwrap();
            socket.send_to(&buf[..len], peer).await.unwrap();
        }
    });
    addr
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

struct Rig {
    _dir: tempfile::TempDir,
    vsock: PathBuf,
    guest: Guest,
    forwarder: Option<Forwarder>,
    events: mpsc::UnboundedReceiver<PortEvent>,
}

impl Rig {
    fn new(bind_address: Option<IpAddr>) -> Rig {
        Rig::with(bind_address, Options::default())
    }

    fn with(bind_address: Option<IpAddr>, options: Options) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let guest = Guest::start(&vsock);
        let (tx, events) = mpsc::unbounded_channel();
        let forwarder = Forwarder::start_with(&vsock, bind_address, tx, options).unwrap();
        Rig {
            _dir: dir,
            vsock,
            guest,
            forwarder: Some(forwarder),
            events,
        }
    }

    fn forwarder(&self) -> &Forwarder {
        self.forwarder.as_ref().unwrap()
    }

    /// Publishes as the guest's port proxy does; the stream is the publish's life.
    async fn publish(
        &self,
        proto: Proto,
        host: &str,
        container: SocketAddr,
    ) -> (UnixStream, PublishReply) {
        let host: SocketAddr = host.parse().unwrap();
        let mut stream = UnixStream::connect(publish_socket_path(&self.vsock))
            .await
            .unwrap();
        let request = Publish {
            proto,
            host_ip: host.ip(),
            host_port: host.port(),
            container_ip: container.ip(),
            container_port: container.port(),
        };
        write_frame(&mut stream, &request).await.unwrap();
        let reply = tokio::time::timeout(PATIENCE, read_frame(&mut stream))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        (stream, reply)
    }

    /// Publishes and expects it bound; returns the host address and the stream.
    async fn bound(
        &mut self,
        proto: Proto,
        host: &str,
        container: SocketAddr,
    ) -> (UnixStream, SocketAddr) {
        let (stream, reply) = self.publish(proto, host, container).await;
        let PublishReply::Bound { host_ip, host_port } = reply else {
            panic!("{host}: {reply:?}");
        };
        let published = self.event().await;
        let expected = ForwardedPort {
            proto,
            host_ip,
            host_port,
            container_ip: container.ip(),
            container_port: container.port(),
        };
        assert_eq!(published, PortEvent::PortPublished(expected));
        (stream, SocketAddr::new(host_ip, host_port))
    }

    async fn event(&mut self) -> PortEvent {
        tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("a port event")
            .unwrap()
    }
}

/// Deterministic bytes for connection `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sends `len` bytes through `addr` while reading the echo, then half-closes; checks the echo
/// is the same bytes (length and checksum) and ends with the server's FIN.
async fn echo_through(addr: SocketAddr, seed: u64, len: usize) {
    let conn = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = conn.into_split();
    let sent = pattern(seed, len);
    let expected = fnv1a(&sent);
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(16 * 1024) {
            wr.write_all(chunk).await.unwrap();
        }
        wr.shutdown().await.unwrap();
        wr
    });
    let mut received = Vec::with_capacity(len);
    rd.read_to_end(&mut received).await.unwrap();
    let _wr = writer.await.unwrap();
    assert_eq!(received.len(), len, "connection {seed}");
    assert_eq!(fnv1a(&received), expected, "connection {seed}");
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Waits until `addr` refuses connections (the listener closed).
async fn until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    while !refused(addr).await {
        assert!(Instant::now() < deadline, "{addr} still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_published_tcp_port_carries_a_mebibyte_both_ways() {
    let mut rig = Rig::new(None);
    let container = tcp_echo().await;
    // dockerd always picks the port; port 0 still gets an ephemeral one, reported back.
    let (_publish, addr) = rig.bound(Proto::Tcp, "127.0.0.1:0", container).await;
    assert_ne!(addr.port(), 0);
    assert_eq!(addr.ip(), ip("127.0.0.1"));
    assert_eq!(rig.forwarder().ports().len(), 1);
    assert_eq!(rig.forwarder().ports()[0].host_port, addr.port());
    echo_through(addr, 1, 1 << 20).await;
}

#[tokio::test]
async fn a_taken_host_port_is_refused_in_dockerds_words() {
    let mut rig = Rig::new(None);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (mut stream, reply) = rig
        .publish(Proto::Tcp, &format!("127.0.0.1:{port}"), tcp_echo().await)
        .await;
    assert_eq!(
        reply,
        PublishReply::Refused {
            message: format!("listen tcp4 127.0.0.1:{port}: bind: address already in use")
        }
    );
    // Nothing stays half-open: the host closes the publish connection and lists nothing.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rig.forwarder().ports().is_empty());
    assert!(rig.events.try_recv().is_err());
}

#[tokio::test]
async fn ipv4_and_ipv6_wildcards_bind_the_same_port_independently() {
    let mut rig = Rig::new(None);
    let container = tcp_echo().await;
    // A port free on both families: a dual-stack bind finds one.
    let port = std::net::TcpListener::bind("[::]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_v4, addr4) = rig
        .bound(Proto::Tcp, &format!("0.0.0.0:{port}"), container)
        .await;
    let (_v6, addr6) = rig
        .bound(Proto::Tcp, &format!("[::]:{port}"), container)
        .await;
    assert_eq!((addr4.port(), addr6.port()), (port, port));
    echo_through(SocketAddr::new(ip("127.0.0.1"), port), 2, 4096).await;
    echo_through(SocketAddr::new(ip("::1"), port), 3, 4096).await;
    assert_eq!(rig.forwarder().ports().len(), 2);
}

#[tokio::test]
async fn a_loopback_publish_is_not_reachable_on_other_local_addresses() {
    let mut rig = Rig::new(None);
    let container = tcp_echo().await;
    let (_lo, lo) = rig.bound(Proto::Tcp, "127.0.0.1:0", container).await;
    // 127.0.0.2 is another local address (all of 127/8 is on lo).
    assert!(refused(SocketAddr::new(ip("127.0.0.2"), lo.port())).await);
    echo_through(lo, 4, 100).await;
    // The same check passes for a wildcard publish, so the refusal above means something.
    let (_any, any) = rig.bound(Proto::Tcp, "0.0.0.0:0", container).await;
    echo_through(SocketAddr::new(ip("127.0.0.2"), any.port()), 5, 100).await;
}

#[tokio::test]
async fn a_loopback_bind_address_setting_narrows_wildcards() {
    let mut rig = Rig::new(Some(ip("127.0.0.1")));
    let container = tcp_echo().await;
    let (_v4, v4) = rig.bound(Proto::Tcp, "0.0.0.0:0", container).await;
    assert_eq!(v4.ip(), ip("127.0.0.1"));
    assert!(refused(SocketAddr::new(ip("127.0.0.2"), v4.port())).await);
    let (_v6, v6) = rig.bound(Proto::Udp, "[::]:0", udp_echo().await).await;
    assert_eq!(v6.ip(), ip("::1"));
    echo_through(v4, 6, 100).await;
}

#[tokio::test]
async fn closing_the_publish_connection_closes_the_port_and_its_connections() {
    let mut rig = Rig::new(None);
    let (publish, addr) = rig.bound(Proto::Tcp, "127.0.0.1:0", tcp_echo().await).await;
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    live.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");

    drop(publish);
    let PortEvent::PortUnpublished(port) = rig.event().await else {
        panic!("expected PortUnpublished");
    };
    assert_eq!(port.host_port, addr.port());
    until_refused(addr).await;
    assert!(rig.forwarder().ports().is_empty());
    // The connection that was open is cut, not left half-open.
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(PATIENCE, live.read_to_end(&mut rest))
        .await
        .expect("the open connection is closed");
    assert!(cut.is_err() || rest.is_empty(), "{cut:?}");
}

#[tokio::test]
async fn stop_closes_every_port_connection_and_the_publish_socket() {
    let mut rig = Rig::new(None);
    let (mut tcp_publish, tcp) = rig.bound(Proto::Tcp, "127.0.0.1:0", tcp_echo().await).await;
    let (mut udp_publish, udp) = rig.bound(Proto::Udp, "127.0.0.1:0", udp_echo().await).await;
    let mut live = TcpStream::connect(tcp).await.unwrap();
    live.write_all(b"x").await.unwrap();
    live.read_exact(&mut [0u8; 1]).await.unwrap();

    tokio::time::timeout(PATIENCE, rig.forwarder.take().unwrap().stop())
        .await
        .expect("stop returns");
    let mut unpublished = vec![rig.event().await, rig.event().await];
    unpublished.sort_by_key(|e| format!("{e:?}"));
    assert!(
        unpublished
            .iter()
            .all(|e| matches!(e, PortEvent::PortUnpublished(_))),
        "{unpublished:?}"
    );
    assert!(refused(tcp).await);
    // The UDP port is free again: binding it works.
    std::net::UdpSocket::bind(udp).unwrap();
    let mut rest = Vec::new();
    assert!(matches!(tcp_publish.read_to_end(&mut rest).await, Ok(0)));
    assert!(matches!(udp_publish.read_to_end(&mut rest).await, Ok(0)));
    let cut = live.read_to_end(&mut rest).await;
    assert!(cut.is_err() || rest.is_empty(), "{cut:?}");
    assert!(!publish_socket_path(&rig.vsock).exists());
}

#[tokio::test]
async fn udp_datagrams_stay_whole_and_peers_stay_apart() {
    let mut rig = Rig::new(None);
    let (_publish, addr) = rig.bound(Proto::Udp, "127.0.0.1:0", udp_echo().await).await;
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 65536];
    for len in [1usize, 1400, 65507] {
        for (peer, fill) in [(&a, b'a'), (&b, b'b')] {
            peer.send_to(&vec![fill; len], addr).await.unwrap();
        }
        for (peer, fill) in [(&a, b'a'), (&b, b'b')] {
            let (got, from) = tokio::time::timeout(PATIENCE, peer.recv_from(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert_eq!(from, addr);
            assert_eq!(got, len);
            assert!(
                buf[..got].iter().all(|&x| x == fill),
                "{len} bytes to {}",
                fill as char
            );
        }
    }
    assert_eq!(rig.guest.udp_flows.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_idle_udp_flow_closes_and_the_next_datagram_opens_another() {
    let options = Options {
        udp_idle: Duration::from_millis(300),
        ..Options::default()
    };
    let mut rig = Rig::with(None, options);
    let (_publish, addr) = rig.bound(Proto::Udp, "127.0.0.1:0", udp_echo().await).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 16];
    for round in 0..2 {
        peer.send_to(b"hello", addr).await.unwrap();
        let (len, _) = tokio::time::timeout(PATIENCE, peer.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(&buf[..len], b"hello", "round {round}");
        assert_eq!(rig.guest.udp_flows.load(Ordering::SeqCst), 1);
        let deadline = Instant::now() + PATIENCE;
        while rig.guest.udp_flows.load(Ordering::SeqCst) != 0 {
            assert!(Instant::now() < deadline, "the idle flow stays open");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn udp_flows_are_bounded_and_the_oldest_is_evicted() {
    let options = Options {
        max_udp_flows: 2,
        ..Options::default()
    };
    let mut rig = Rig::with(None, options);
    let (_publish, addr) = rig.bound(Proto::Udp, "127.0.0.1:0", udp_echo().await).await;
    let mut buf = [0u8; 16];
    let mut peers = Vec::new();
    for _ in 0..3 {
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        peer.send_to(b"hi", addr).await.unwrap();
        tokio::time::timeout(PATIENCE, peer.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        peers.push(peer);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + PATIENCE;
    while rig.guest.udp_flows.load(Ordering::SeqCst) != 2 {
        assert!(Instant::now() < deadline, "flows are not bounded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_parallel_connections_carry_a_mebibyte_each_way() {
    let mut rig = Rig::new(None);
    let (_publish, addr) = rig.bound(Proto::Tcp, "127.0.0.1:0", tcp_echo().await).await;
    let transfers: Vec<_> = (0..200)
        .map(|seed| tokio::spawn(echo_through(addr, seed, 1 << 20)))
        .collect();
    for transfer in transfers {
        tokio::time::timeout(Duration::from_secs(240), transfer)
            .await
            .expect("every transfer finishes")
            .unwrap();
    }
}

#[tokio::test]
async fn a_failed_dial_resets_the_client_promptly() {
    let mut rig = Rig::new(None);
    let (_publish, addr) = rig
        .bound(Proto::Tcp, "127.0.0.1:0", dead_port().await)
        .await;
    let started = Instant::now();
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(PATIENCE, client.read(&mut buf))
        .await
        .expect("the client is closed promptly");
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_stall_the_others() {
    let mut rig = Rig::new(None);
    let (_publish, addr) = rig.bound(Proto::Tcp, "127.0.0.1:0", tcp_echo().await).await;
    let stalled = TcpStream::connect(addr).await.unwrap();
    let (_stalled_rd, mut stalled_wr) = stalled.into_split();
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let _writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while stalled_wr.write_all(&chunk).await.is_ok() {
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    });
    // Until every buffer on its path is full and the writer blocks.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    tokio::time::timeout(Duration::from_secs(30), echo_through(addr, 9, 1 << 20))
        .await
        .expect("the other connection is not stalled");
    assert_eq!(
        written.load(Ordering::SeqCst),
        last,
        "the stalled client stays stalled"
    );
}

#[tokio::test]
async fn a_port_proxy_that_sends_nothing_is_dropped() {
    let options = Options {
        publish_timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let rig = Rig::with(None, options);
    let mut silent = UnixStream::connect(publish_socket_path(&rig.vsock))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, silent.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
}

#[tokio::test]
async fn a_stale_publish_socket_is_replaced_and_a_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let vsock = dir.path().join("vsock.sock");
    drop(std::os::unix::net::UnixListener::bind(publish_socket_path(&vsock)).unwrap());
    let (tx, _rx) = mpsc::unbounded_channel();
    let forwarder = Forwarder::start(&vsock, None, tx.clone()).unwrap();
    UnixStream::connect(publish_socket_path(&vsock))
        .await
        .unwrap();
    forwarder.stop().await;

    std::fs::write(publish_socket_path(&vsock), b"not a socket").unwrap();
    let err = Forwarder::start(&vsock, None, tx).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
}

//! The dial service (`DIAL_PORT`): the host proxy's way to a container. Each connection carries
//! one `Dial` frame, the agent connects to that address in the guest and answers `DialReply`;
//! after `Connected` the stream is the TCP connection's bytes (spliced with half-close) or the
//! UDP flow's datagram frames, until either side closes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_protocol::ports::{read_datagram, write_datagram, Dial, DialReply, Proto, MAX_DATAGRAM};
use berth_protocol::{read_frame, write_frame};

use crate::inet::NetError;
use crate::splice;
use crate::vsock::{self, Duplex};

/// Connections served at once; more are answered `Failed` and closed.
pub const MAX_DIALS: usize = 1024;
/// How long the host has to send its `Dial` frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP connect to a container may take. A busy server's full accept queue drops
/// SYNs, which the kernel retries after 1, 3, 7, 15 s: a burst of connections (200 at once
/// against a backlog of 128) needs the retries, as it would with docker-proxy. A closed port
/// still fails at once (a reset).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("set the dial request's timeout")]
    Timeout(#[source] std::io::Error),
    #[error("read the dial request")]
    Request(#[source] berth_protocol::Error),
    #[error("the host closed the dial connection before its request")]
    NoRequest,
    #[error("answer the dial request")]
    Reply(#[source] berth_protocol::Error),
    #[error("relay a TCP connection")]
    Splice(#[source] splice::Error),
    #[error("share the UDP socket between two threads")]
    Clone(#[source] std::io::Error),
    #[error("start the UDP reply thread")]
    Thread(#[source] std::io::Error),
}

/// Counts what is being served at once (dial connections, forwarded connections), to hold it
/// under a limit.
#[derive(Debug, Default)]
pub struct Slots {
    active: AtomicUsize,
}

/// One place of `Slots`, given back when dropped.
pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn take(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let taken = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.ok().map(|_| Slot(Arc::clone(self)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one dial connection to its end.
pub fn serve<D: Duplex>(stream: D, slots: &Arc<Slots>) -> Result<(), Error> {
    serve_limited(stream, slots, MAX_DIALS)
}

fn serve_limited<D: Duplex>(mut stream: D, slots: &Arc<Slots>, max: usize) -> Result<(), Error> {
    vsock::set_read_timeout(&stream, Some(REQUEST_TIMEOUT)).map_err(Error::Timeout)?;
    let dial: Dial = read_frame(&mut stream)
        .map_err(Error::Request)?
        .ok_or(Error::NoRequest)?;
    vsock::set_read_timeout(&stream, None).map_err(Error::Timeout)?;
    let Some(_slot) = slots.take(max) else {
        let message = format!("the guest is already serving {max} published-port connections");
        return reply(&mut stream, DialReply::Failed { message });
    };
    let addr = SocketAddr::new(dial.ip, dial.port);
    match dial.proto {
        Proto::Tcp => match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(tcp) => {
                reply(&mut stream, DialReply::Connected)?;
                let _ = tcp.set_nodelay(true);
                splice::splice(stream, tcp).map_err(Error::Splice)?;
                Ok(())
            }
            Err(e) => reply(&mut stream, failed("tcp", addr, e)),
        },
        Proto::Udp => match connect_udp(addr) {
            Ok(udp) => {
                reply(&mut stream, DialReply::Connected)?;
                relay_udp(stream, udp)
            }
            Err(e) => reply(&mut stream, failed("udp", addr, e)),
        },
    }
}

fn reply<D: Duplex>(stream: &mut D, answer: DialReply) -> Result<(), Error> {
    write_frame(stream, &answer).map_err(Error::Reply)
}

/// `Failed`, in Go's words: "dial tcp 172.17.0.2:80: connect: connection refused".
fn failed(net: &str, addr: SocketAddr, cause: std::io::Error) -> DialReply {
    let message = NetError {
        op: "dial",
        net: net.to_string(),
        addr,
        syscall: "connect",
        cause,
    }
    .to_string();
    DialReply::Failed { message }
}

fn connect_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0))?;
    socket.connect(addr)?;
    Ok(socket)
}

/// Datagram frames from `stream` go out on `udp`, datagrams `udp` receives come back as frames,
/// until the host closes the stream (its idle timeout) or the stream breaks.
fn relay_udp<D: Duplex>(mut stream: D, udp: UdpSocket) -> Result<(), Error> {
    let to_host = stream.try_clone().map_err(Error::Clone)?;
    let from_container = udp.try_clone().map_err(Error::Clone)?;
    let stopping = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&stopping);
    let replies = std::thread::Builder::new()
        .name("dial-udp".into())
        .stack_size(splice::THREAD_STACK)
        .spawn(move || udp_replies(from_container, to_host, &stop))
        .map_err(Error::Thread)?;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Ok(Some(len)) = read_datagram(&mut stream, &mut buf) {
        // A container that is not listening makes sends fail (ICMP unreachable); the flow
        // goes on, as it would on a real network.
        let _ = udp.send(&buf[..len]);
    }
    stopping.store(true, Ordering::Release);
    // Wakes the reply thread's recv (it returns 0).
    // SAFETY: shutdown(2) on a socket `udp` owns.
    unsafe { libc::shutdown(udp.as_raw_fd(), libc::SHUT_RDWR) };
    let _ = replies.join();
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn udp_replies<D: Duplex>(udp: UdpSocket, mut stream: D, stopping: &AtomicBool) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let len = match udp.recv(&mut buf) {
            Ok(0) if stopping.load(Ordering::Acquire) => return,
            Ok(len) => len,
            Err(_) if stopping.load(Ordering::Acquire) => return,
            // From an earlier ICMP unreachable: the container may listen later.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        };
        if write_datagram(&mut stream, &buf[..len]).is_err() {
            // The host is gone: end the other direction too.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;

    /// The host's end of a dial connection served on a thread.
    fn dial(d: Dial) -> (UnixStream, DialReply, std::thread::JoinHandle<()>) {
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let t = std::thread::spawn(move || {
            let slots = Arc::new(Slots::default());
            serve(guest, &slots).unwrap();
        });
        write_frame(&mut host, &d).unwrap();
        let reply = read_frame::<DialReply>(&mut host).unwrap().unwrap();
        (host, reply, t)
    }

    fn tcp(port: u16) -> Dial {
        Dial {
            proto: Proto::Tcp,
            ip: Ipv4Addr::LOCALHOST.into(),
            port,
        }
    }

    fn checksum(data: &[u8]) -> u64 {
        data.iter().enumerate().fold(0u64, |acc, (i, &b)| {
            acc.wrapping_mul(31).wrapping_add(u64::from(b) ^ i as u64)
        })
    }

    #[test]
    fn a_mebibyte_goes_through_tcp_and_the_half_close_reaches_the_container() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        // The container: reads to end of stream, then answers the checksum and closes.
        let container = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            conn.write_all(format!("{} {}", got.len(), checksum(&got)).as_bytes())
                .unwrap();
        });
        let (mut host, reply, t) = dial(tcp(port));
        assert_eq!(reply, DialReply::Connected);
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
        host.write_all(&data).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        host.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("{} {}", data.len(), checksum(&data)));
        container.join().unwrap();
        t.join().unwrap();
    }

    #[test]
    fn two_hundred_dials_at_once_each_get_their_own_answer() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in server.incoming() {
                let mut conn = conn.unwrap();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    conn.read_to_end(&mut got).unwrap();
                    conn.write_all(&got).unwrap();
                });
            }
        });
        let slots = Arc::new(Slots::default());
        let mut hosts = Vec::new();
        for i in 0..200u32 {
            let (mut host, guest) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let s = Arc::clone(&slots);
            std::thread::spawn(move || serve(guest, &s).unwrap());
            write_frame(&mut host, &tcp(port)).unwrap();
            hosts.push((i, host));
        }
        for (i, host) in &mut hosts {
            assert_eq!(
                read_frame::<DialReply>(host).unwrap().unwrap(),
                DialReply::Connected
            );
            host.write_all(format!("connection {i}").as_bytes())
                .unwrap();
            host.shutdown(Shutdown::Write).unwrap();
        }
        for (i, mut host) in hosts {
            let mut back = String::new();
            host.read_to_string(&mut back).unwrap();
            assert_eq!(back, format!("connection {i}"));
        }
    }

    #[test]
    fn a_closed_port_fails_with_the_reason() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (mut host, reply, t) = dial(tcp(port));
        assert_eq!(
            reply,
            DialReply::Failed {
                message: format!("dial tcp 127.0.0.1:{port}: connect: connection refused")
            }
        );
        t.join().unwrap();
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing follows a Failed");
    }

    #[test]
    fn udp_datagrams_of_1_and_1400_bytes_come_back_whole() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = echo.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], peer);
            }
        });
        let d = Dial {
            proto: Proto::Udp,
            ip: Ipv4Addr::LOCALHOST.into(),
            port,
        };
        let (mut host, reply, t) = dial(d);
        assert_eq!(reply, DialReply::Connected);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        for len in [1usize, 1400] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 7) as u8 + 1).collect();
            write_datagram(&mut host, &payload).unwrap();
            let got = read_datagram(&mut host, &mut buf).unwrap().unwrap();
            assert_eq!(&buf[..got], &payload[..]);
        }
        // The host's idle timeout: it closes, the flow ends.
        host.shutdown(Shutdown::Write).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn over_the_limit_the_dial_is_refused_and_a_freed_place_is_reused() {
        let slots = Arc::new(Slots::default());
        let held = slots.take(1).unwrap();
        let (mut host, guest) = UnixStream::pair().unwrap();
        write_frame(&mut host, &tcp(9)).unwrap();
        serve_limited(guest, &slots, 1).unwrap();
        let reply = read_frame::<DialReply>(&mut host).unwrap().unwrap();
        assert!(
            matches!(&reply, DialReply::Failed { message } if message.contains("1 published-port")),
            "{reply:?}"
        );
        drop(held);
        assert!(slots.take(1).is_some());
    }

    #[test]
    fn a_torn_request_is_dropped_without_a_dial() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.write_all(&[0, 0]).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let err = serve(guest, &Arc::default()).unwrap_err();
        assert!(matches!(err, Error::Request(_)), "{err:?}");
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "no reply to a torn request");
    }
}

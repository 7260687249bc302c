//! The port proxy's guest side, what docker-proxy itself does: listen on the published address
//! in the guest and forward each TCP connection or UDP peer to the container, so that clients
//! inside the guest (other containers through the gateway, the shell) reach the port too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_protocol::ports::{Proto, Publish, MAX_DATAGRAM};

use crate::dial::Slots;
use crate::inet::{self, NetError};
use crate::splice;

/// Connections (TCP) or peers (UDP) forwarded at once; more are dropped.
pub const MAX_FLOWS: usize = 1024;
/// How long a TCP connect to the container may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A UDP peer silent this long is forgotten (docker-proxy's `UDPConnTrackTimeout`).
const UDP_IDLE: Duration = Duration::from_secs(90);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Go's words, as docker-proxy reports them ("listen tcp4 0.0.0.0:80: bind: ...").
    #[error(transparent)]
    Listen(NetError),
    #[error("listen on the socket dockerd passed on fd 4")]
    ListenFd(#[source] std::io::Error),
    #[error("start the forwarding thread")]
    Thread(#[source] std::io::Error),
}

/// The guest-side socket of a publish.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
    /// The address is not the guest's (`-p 192.168.1.5:80:80` names a host address): only the
    /// host listens.
    HostOnly,
}

impl Listener {
    /// Binds `publish`'s host address in the guest, or takes dockerd's socket (`-use-listen-fd`).
    pub fn open(publish: &Publish, passed: Option<OwnedFd>) -> Result<Listener, Error> {
        if let Some(fd) = passed {
            return Ok(match publish.proto {
                Proto::Tcp => {
                    // dockerd binds; listening again only sets the backlog if it listens too.
                    // SAFETY: listen(2) on a socket this function owns.
                    if unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } != 0 {
                        return Err(Error::ListenFd(std::io::Error::last_os_error()));
                    }
                    Listener::Tcp(TcpListener::from(fd))
                }
                Proto::Udp => Listener::Udp(UdpSocket::from(fd)),
            });
        }
        let addr = SocketAddr::new(publish.host_ip, publish.host_port);
        let bound = match publish.proto {
            Proto::Tcp => inet::listen_tcp(addr).map(Listener::Tcp),
            Proto::Udp => inet::listen_udp(addr).map(Listener::Udp),
        };
        match bound {
            Err(e) if e.is_foreign_address() => Ok(Listener::HostOnly),
            other => other.map_err(Error::Listen),
        }
    }

    /// The port bound in the guest, if any (it differs from the one asked for only with 0).
    pub fn port(&self) -> Option<u16> {
        let addr = match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp(u) => u.local_addr(),
            Listener::HostOnly => return None,
        };
        addr.ok().map(|a| a.port())
    }

    /// Starts forwarding to `backend` on a thread of its own, for the life of the process.
    pub fn start(self, backend: SocketAddr) -> Result<(), Error> {
        let run: Box<dyn FnOnce() + Send> = match self {
            Listener::Tcp(l) => Box::new(move || forward_tcp(&l, backend)),
            Listener::Udp(u) => Box::new(move || forward_udp(&u, backend)),
            Listener::HostOnly => return Ok(()),
        };
        std::thread::Builder::new()
            .name("forward".into())
            .spawn(run)
            .map(drop)
            .map_err(Error::Thread)
    }
}

fn forward_tcp(listener: &TcpListener, backend: SocketAddr) {
    let slots = Arc::new(Slots::default());
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = slots.take(MAX_FLOWS) else {
            continue; // dropped: the client sees a reset
        };
        let spawned = std::thread::Builder::new()
            .name("forward-tcp".into())
            .stack_size(splice::THREAD_STACK)
            .spawn(move || {
                let _slot = slot;
                // As docker-proxy: a container that does not answer closes the client.
                if let Ok(server) = TcpStream::connect_timeout(&backend, CONNECT_TIMEOUT) {
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = splice::splice(client, server);
                }
            });
        drop(spawned);
    }
}

/// Per UDP peer: a socket connected to the container and a thread sending its replies back.
fn forward_udp(listener: &UdpSocket, backend: SocketAddr) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((len, peer)) = listener.recv_from(&mut buf) else {
            continue;
        };
        let known = lock(&flows).get(&peer).cloned();
        let flow = match known {
            Some(flow) => flow,
            None => match new_flow(listener, backend, peer, &flows) {
                Some(flow) => flow,
                None => continue,
            },
        };
        let _ = flow.send(&buf[..len]);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn new_flow(
    listener: &UdpSocket,
    backend: SocketAddr,
    peer: SocketAddr,
    flows: &Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
) -> Option<Arc<UdpSocket>> {
    if lock(flows).len() >= MAX_FLOWS {
        return None;
    }
    let any = match backend.ip() {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).ok()?;
    socket.connect(backend).ok()?;
    socket.set_read_timeout(Some(UDP_IDLE)).ok()?;
    let socket = Arc::new(socket);
    let reply_to = listener.try_clone().ok()?;
    let (flow, table) = (Arc::clone(&socket), Arc::clone(flows));
    std::thread::Builder::new()
        .name("forward-udp".into())
        .stack_size(splice::THREAD_STACK)
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match flow.recv(&mut buf) {
                    Ok(len) => drop(reply_to.send_to(&buf[..len], peer)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break, // idle (the read timeout) or broken
                }
            }
            lock(&table).remove(&peer);
        })
        .ok()?;
    lock(flows).insert(peer, Arc::clone(&socket));
    Some(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::Shutdown;

    fn publish(proto: Proto, backend: SocketAddr) -> Publish {
        Publish {
            proto,
            host_ip: "127.0.0.1".parse().unwrap(),
            host_port: 0,
            container_ip: backend.ip(),
            container_port: backend.port(),
        }
    }

    #[test]
    fn guest_clients_reach_a_tcp_container_with_half_close() {
        let container = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = container.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = container.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            got.reverse();
            conn.write_all(&got).unwrap();
        });
        let listener = Listener::open(&publish(Proto::Tcp, backend), None).unwrap();
        let port = listener.port().unwrap();
        listener.start(backend).unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(b"hello").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).unwrap();
        assert_eq!(back, "olleh");
    }

    #[test]
    fn guest_clients_reach_a_udp_container_and_get_the_answers() {
        let container = UdpSocket::bind("127.0.0.1:0").unwrap();
        let backend = container.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, peer)) = container.recv_from(&mut buf) {
                let _ = container.send_to(&buf[..n], peer);
            }
        });
        let listener = Listener::open(&publish(Proto::Udp, backend), None).unwrap();
        let port = listener.port().unwrap();
        listener.start(backend).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.connect(("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 2048];
        for payload in [&b"x"[..], &[9u8; 1400][..]] {
            client.send(payload).unwrap();
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], payload);
        }
    }

    #[test]
    fn a_port_taken_in_the_guest_is_refused_and_a_host_address_is_host_only() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut p = publish(Proto::Tcp, "172.17.0.2:80".parse().unwrap());
        p.host_port = taken.local_addr().unwrap().port();
        let err = Listener::open(&p, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "listen tcp4 127.0.0.1:{}: bind: address already in use",
                p.host_port
            )
        );
        p.host_ip = "192.0.2.9".parse().unwrap();
        assert!(matches!(Listener::open(&p, None), Ok(Listener::HostOnly)));
    }
}

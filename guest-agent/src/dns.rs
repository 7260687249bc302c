//! The guest's DNS forwarder: listens on eth0's address, port 53 (UDP and TCP), answers
//! `host.docker.internal` and `gateway.docker.internal` itself (A → the gateway, which passt
//! maps to the host's loopback) and relays every other query verbatim to the upstream resolver
//! (passt's DNS address, mapped to the host's resolver, so VPN and split DNS keep working).
//!
//! UDP: one socket towards the upstream; each forwarded query gets a fresh random ID, restored
//! in the reply, which must also repeat the question. At most `MAX_IN_FLIGHT` queries wait for
//! an answer, each at most `UPSTREAM_TIMEOUT`. The upstream is reached over passt's virtual link,
//! which no one else can inject into, so one source port is enough. TCP: one thread per client
//! connection (at most `MAX_TCP_CLIENTS`), each with its own upstream connection.
//!
//! Every packet is untrusted: anything that is not a readable query with one question is
//! dropped, and no packet can end a thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The names the agent answers itself (compared without case and trailing dot).
pub const LOCAL_NAMES: [&str; 2] = ["host.docker.internal", "gateway.docker.internal"];
/// TTL of the agent's own answers.
pub const TTL: u32 = 60;
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_IN_FLIGHT: usize = 256;
pub const MAX_TCP_CLIENTS: usize = 32;
/// The largest DNS message (TCP's two-byte length).
const MAX_MESSAGE: usize = 65535;
const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const THREAD_STACK: usize = 128 * 1024;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind the DNS forwarder's UDP socket on {0}")]
    BindUdp(SocketAddr, #[source] std::io::Error),
    #[error("bind the DNS forwarder's TCP socket on {0}")]
    BindTcp(SocketAddr, #[source] std::io::Error),
    #[error("open the DNS forwarder's socket to {0}")]
    Upstream(SocketAddr, #[source] std::io::Error),
    #[error("start a DNS forwarder thread")]
    Thread(#[source] std::io::Error),
}

/// Where the forwarder listens, where it forwards to, and what the local names resolve to.
#[derive(Clone, Copy, Debug)]
pub struct Forwarder {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub gateway: Ipv4Addr,
}

/// The addresses a started forwarder listens on (the real ports when `listen` had port 0).
#[derive(Clone, Copy, Debug)]
pub struct Running {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
}

/// What to do with one message from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send this answer back.
    Answer(Vec<u8>),
    /// Relay the message to the upstream resolver.
    Forward,
    /// Not a query we can read: drop it.
    Drop,
}

/// The one question of a query.
#[derive(Debug)]
struct Question {
    /// Lower-case, dot-separated, without the trailing dot.
    name: String,
    qtype: u16,
    qclass: u16,
    /// End of the question section in the message.
    end: usize,
}

fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// Reads the single question of `msg`, or `None` if the message is not a query with one
/// readable question (compression pointers in a question are refused too).
fn question(msg: &[u8]) -> Option<Question> {
    let flags = u16_at(msg, 2)?;
    if msg.len() < HEADER_LEN || flags & 0x8000 != 0 || u16_at(msg, 4)? != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
        if at - HEADER_LEN > 255 {
            return None;
        }
    }
    Some(Question {
        name: labels.join("."),
        qtype: u16_at(msg, at)?,
        qclass: u16_at(msg, at + 2)?,
        end: at + 4,
    })
}

/// Whether the agent answers `name` itself.
pub fn is_local_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    LOCAL_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Decides what to do with a client's message.
pub fn handle(msg: &[u8], gateway: Ipv4Addr) -> Verdict {
    let Some(q) = question(msg) else {
        return Verdict::Drop;
    };
    let opcode = (msg[2] >> 3) & 0x0f;
    if opcode != 0 || !is_local_name(&q.name) {
        return Verdict::Forward;
    }
    Verdict::Answer(local_answer(msg, &q, gateway))
}

/// The answer to a query for a local name: A (class IN) → the gateway; anything else → no
/// records, NOERROR (the name exists).
fn local_answer(msg: &[u8], q: &Question, gateway: Ipv4Addr) -> Vec<u8> {
    let has_a = q.qtype == TYPE_A && q.qclass == CLASS_IN;
    let rd = msg[2] & 0x01;
    let mut out = Vec::with_capacity(q.end + 16);
    out.extend_from_slice(&msg[..2]); // ID
    out.push(0x80 | 0x04 | rd); // QR, AA, RD copied; opcode QUERY
    out.push(0x80); // RA, RCODE NOERROR
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&u16::from(has_a).to_be_bytes()); // ANCOUNT
    out.extend_from_slice(&[0, 0, 0, 0]); // NSCOUNT, ARCOUNT
    out.extend_from_slice(&msg[HEADER_LEN..q.end]);
    if has_a {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&gateway.octets());
    }
    out
}

/// A forwarded UDP query waiting for its answer.
#[derive(Debug)]
struct Pending {
    client: SocketAddr,
    id: [u8; 2],
    question: Vec<u8>,
    sent: Instant,
}

/// The in-flight UDP queries, by the ID they carry upstream.
#[derive(Debug)]
struct Table {
    pending: HashMap<u16, Pending>,
    rng: u64,
}

impl Table {
    fn new() -> Table {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Table {
            pending: HashMap::new(),
            rng: nanos | 1,
        }
    }

    /// xorshift64: unpredictable enough for IDs on a link no one else can write to.
    fn next_random(&mut self) -> u16 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 32) as u16
    }

    /// Registers a query and returns its upstream ID; `None` when the table is full.
    fn insert(&mut self, pending: Pending) -> Option<u16> {
        self.pending
            .retain(|_, p| p.sent.elapsed() < UPSTREAM_TIMEOUT);
        if self.pending.len() >= MAX_IN_FLIGHT {
            return None;
        }
        for _ in 0..64 {
            let id = self.next_random();
            if let std::collections::hash_map::Entry::Vacant(slot) = self.pending.entry(id) {
                slot.insert(pending);
                return Some(id);
            }
        }
        None
    }

    /// Takes the query an upstream reply answers; the reply must repeat its question.
    fn take(&mut self, reply: &[u8]) -> Option<Pending> {
        let id = u16_at(reply, 0)?;
        let p = self.pending.get(&id)?;
        let question = reply.get(HEADER_LEN..HEADER_LEN + p.question.len())?;
        let fresh = p.sent.elapsed() < UPSTREAM_TIMEOUT;
        if reply[2] & 0x80 == 0 || question != p.question.as_slice() || !fresh {
            return None;
        }
        self.pending.remove(&id)
    }
}

/// Binds the forwarder's sockets and starts its threads, which run for the agent's life.
pub fn start(config: Forwarder) -> Result<Running, Error> {
    let udp = UdpSocket::bind(config.listen).map_err(|e| Error::BindUdp(config.listen, e))?;
    let udp_addr = udp
        .local_addr()
        .map_err(|e| Error::BindUdp(config.listen, e))?;
    let tcp_listen = SocketAddr::new(config.listen.ip(), udp_addr.port());
    let tcp = TcpListener::bind(tcp_listen).map_err(|e| Error::BindTcp(tcp_listen, e))?;
    let tcp_addr = tcp
        .local_addr()
        .map_err(|e| Error::BindTcp(tcp_listen, e))?;
    let unspecified = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
    let upstream = UdpSocket::bind(unspecified)
        .and_then(|s| s.connect(config.upstream).map(|()| s))
        .map_err(|e| Error::Upstream(config.upstream, e))?;
    let clients = udp
        .try_clone()
        .map_err(|e| Error::Upstream(config.upstream, e))?;
    let upstream_rx = upstream
        .try_clone()
        .map_err(|e| Error::Upstream(config.upstream, e))?;
    let table = Arc::new(Mutex::new(Table::new()));
    let table_rx = Arc::clone(&table);
    let gateway = config.gateway;
    spawn("dns-udp", move || {
        serve_udp(&udp, &upstream, &table, gateway)
    })?;
    spawn("dns-relay", move || {
        relay_udp(&upstream_rx, &clients, &table_rx)
    })?;
    let upstream_addr = config.upstream;
    spawn("dns-tcp", move || serve_tcp(&tcp, upstream_addr, gateway))?;
    Ok(Running {
        udp: udp_addr,
        tcp: tcp_addr,
    })
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<(), Error> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(THREAD_STACK)
        .spawn(body)
        .map(drop)
        .map_err(Error::Thread)
}

/// Reads client queries: answers local names, forwards the rest with a fresh ID.
fn serve_udp(sock: &UdpSocket, upstream: &UdpSocket, table: &Mutex<Table>, gateway: Ipv4Addr) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf) else {
            // Only a transient error (an ICMP error, out of memory): try again shortly.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let msg = &mut buf[..n];
        match handle(msg, gateway) {
            Verdict::Answer(answer) => drop(sock.send_to(&answer, client)),
            Verdict::Drop => {}
            Verdict::Forward => {
                let Some(q) = question(msg) else { continue };
                let pending = Pending {
                    client,
                    id: [msg[0], msg[1]],
                    question: msg[HEADER_LEN..q.end].to_vec(),
                    sent: Instant::now(),
                };
                let id = table
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(pending);
                // A full table drops the query: the client retries as with a lost packet.
                let Some(id) = id else { continue };
                msg[..2].copy_from_slice(&id.to_be_bytes());
                if upstream.send(msg).is_err() {
                    table
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .pending
                        .remove(&id);
                }
            }
        }
    }
}

/// Reads upstream replies and relays each to the client whose query it answers.
fn relay_udp(upstream: &UdpSocket, clients: &UdpSocket, table: &Mutex<Table>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // ECONNREFUSED (the upstream is not listening yet) and the like: keep reading.
        let Ok(n) = upstream.recv(&mut buf) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let reply = &mut buf[..n];
        let pending = table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(reply);
        if let Some(p) = pending {
            reply[..2].copy_from_slice(&p.id);
            drop(clients.send_to(reply, p.client));
        }
    }
}

/// Accepts TCP clients, one thread each, at most `MAX_TCP_CLIENTS` at a time.
fn serve_tcp(listener: &TcpListener, upstream: SocketAddr, gateway: Ipv4Addr) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((conn, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_TCP_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            continue; // dropping `conn` closes it
        }
        let count = Arc::clone(&active);
        let started = spawn("dns-tcp-client", move || {
            drop(tcp_client(conn, upstream, gateway));
            count.fetch_sub(1, Ordering::SeqCst);
        });
        if started.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn read_message(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg)?;
    Ok(msg)
}

fn write_message(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| std::io::ErrorKind::InvalidData)?;
    stream.write_all(&len.to_be_bytes())?;
    stream.write_all(msg)
}

/// One TCP client: queries in, answers out, until it closes, stalls or sends garbage.
fn tcp_client(mut conn: TcpStream, upstream: SocketAddr, gateway: Ipv4Addr) -> std::io::Result<()> {
    conn.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    conn.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    let mut relay: Option<TcpStream> = None;
    loop {
        let msg = read_message(&mut conn)?;
        let answer = match handle(&msg, gateway) {
            Verdict::Answer(answer) => answer,
            Verdict::Drop => return Ok(()),
            Verdict::Forward => {
                let up = match &mut relay {
                    Some(up) => up,
                    None => {
                        let up = TcpStream::connect_timeout(&upstream, UPSTREAM_TIMEOUT)?;
                        up.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
                        up.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
                        relay.insert(up)
                    }
                };
                write_message(up, &msg)?;
                read_message(up)?
            }
        };
        write_message(&mut conn, &answer)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    /// (id, rcode, answer count, first answer's TTL and address if an A record).
    fn read_answer(msg: &[u8]) -> (u16, u8, u16, Option<(u32, Ipv4Addr)>) {
        let q = {
            // Parse the question as a query's: flip QR off in a copy.
            let mut copy = msg.to_vec();
            copy[2] &= 0x7f;
            question(&copy).unwrap()
        };
        assert_ne!(msg[2] & 0x80, 0, "QR set");
        let ancount = u16_at(msg, 6).unwrap();
        let a = (ancount > 0).then(|| {
            let rr = &msg[q.end..];
            assert_eq!(&rr[..2], &[0xc0, 0x0c]);
            assert_eq!(u16_at(rr, 2), Some(TYPE_A));
            assert_eq!(u16_at(rr, 4), Some(CLASS_IN));
            assert_eq!(u16_at(rr, 10), Some(4));
            let ttl = u32::from_be_bytes(rr[6..10].try_into().unwrap());
            (ttl, Ipv4Addr::new(rr[12], rr[13], rr[14], rr[15]))
        });
        (u16_at(msg, 0).unwrap(), msg[3] & 0x0f, ancount, a)
    }

    #[test]
    fn host_docker_internal_resolves_to_the_gateway() {
        for name in [
            "host.docker.internal",
            "HOST.Docker.Internal.",
            "gateway.docker.internal",
        ] {
            let Verdict::Answer(answer) = handle(&query(0x4242, name, TYPE_A), GATEWAY) else {
                panic!("{name} not answered locally")
            };
            assert_eq!(
                read_answer(&answer),
                (0x4242, 0, 1, Some((60, GATEWAY))),
                "{name}"
            );
        }
    }

    #[test]
    fn other_types_for_local_names_are_empty_noerror() {
        for qtype in [28u16, 15, 16] {
            let Verdict::Answer(answer) = handle(&query(7, "host.docker.internal", qtype), GATEWAY)
            else {
                panic!("type {qtype} not answered locally")
            };
            assert_eq!(read_answer(&answer), (7, 0, 0, None), "type {qtype}");
        }
    }

    #[test]
    fn other_names_are_forwarded_and_garbage_dropped() {
        for name in ["example.com", "docker.internal", "x.host.docker.internal"] {
            assert_eq!(
                handle(&query(1, name, TYPE_A), GATEWAY),
                Verdict::Forward,
                "{name}"
            );
        }
        let good = query(1, "host.docker.internal", TYPE_A);
        let mut response = good.clone();
        response[2] |= 0x80;
        let mut two_questions = good.clone();
        two_questions[5] = 2;
        let mut long_label = good.clone();
        long_label[12] = 64;
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        for (what, bad) in [
            ("empty", Vec::new()),
            ("short header", good[..11].to_vec()),
            ("truncated name", good[..20].to_vec()),
            ("no type", good[..good.len() - 3].to_vec()),
            ("a response", response),
            ("two questions", two_questions),
            ("label over 63", long_label),
            ("compression pointer", pointer),
        ] {
            assert_eq!(handle(&bad, GATEWAY), Verdict::Drop, "{what}");
        }
    }

    fn local_forwarder(upstream: SocketAddr) -> Running {
        start(Forwarder {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream,
            gateway: GATEWAY,
        })
        .unwrap()
    }

    #[test]
    fn udp_queries_are_relayed_to_the_upstream_and_back() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let running = local_forwarder(server.local_addr().unwrap());
        let upstream = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            let q = buf[..n].to_vec();
            assert_eq!(question(&q).unwrap().name, "example.com");
            // A stray reply with an unknown ID first: it must not reach the client.
            let mut stray = q.clone();
            stray[0] ^= 0xff;
            stray[2] |= 0x80;
            server.send_to(&stray, from).unwrap();
            let mut reply = q.clone();
            reply[2] |= 0x80;
            reply[3] = 0x83; // NXDOMAIN, as the host's resolver might say
            server.send_to(&reply, from).unwrap();
        });
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Garbage first: dropped, and the forwarder goes on serving.
        client.send_to(b"\x01\x02garbage", running.udp).unwrap();
        client
            .send_to(&query(0x1234, "example.com", TYPE_A), running.udp)
            .unwrap();
        let mut buf = [0u8; 512];
        let n = client.recv(&mut buf).unwrap();
        upstream.join().unwrap();
        assert_eq!(
            u16_at(&buf, 0),
            Some(0x1234),
            "the client's own ID is restored"
        );
        assert_eq!(buf[3] & 0x0f, 3, "the upstream's answer, relayed");
        assert_eq!(n, query(0, "example.com", TYPE_A).len());
        // The local name is answered without the upstream (which is gone now).
        client
            .send_to(&query(9, "host.docker.internal", TYPE_A), running.udp)
            .unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(read_answer(&buf[..n]), (9, 0, 1, Some((60, GATEWAY))));
    }

    #[test]
    fn in_flight_queries_are_bounded_and_expire() {
        let mut table = Table::new();
        let pending = || Pending {
            client: "127.0.0.1:1".parse().unwrap(),
            id: [0, 1],
            question: vec![0],
            sent: Instant::now(),
        };
        let ids: Vec<u16> = (0..MAX_IN_FLIGHT)
            .map(|_| table.insert(pending()).unwrap())
            .collect();
        assert!(table.insert(pending()).is_none(), "the table is full");
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), MAX_IN_FLIGHT);
        for p in table.pending.values_mut() {
            p.sent -= UPSTREAM_TIMEOUT;
        }
        assert!(
            table.insert(pending()).is_some(),
            "expired queries make room"
        );
        assert_eq!(table.pending.len(), 1);
    }

    #[test]
    fn tcp_queries_are_answered_and_relayed() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let running = local_forwarder(server.local_addr().unwrap());
        let upstream = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let q = read_message(&mut conn).unwrap();
            assert_eq!(question(&q).unwrap().name, "example.org");
            let mut reply = q;
            reply[2] |= 0x80;
            write_message(&mut conn, &reply).unwrap();
        });
        let mut client = TcpStream::connect(running.tcp).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write_message(&mut client, &query(5, "gateway.docker.internal", TYPE_A)).unwrap();
        let answer = read_message(&mut client).unwrap();
        assert_eq!(read_answer(&answer), (5, 0, 1, Some((60, GATEWAY))));
        write_message(&mut client, &query(6, "example.org", TYPE_A)).unwrap();
        let reply = read_message(&mut client).unwrap();
        assert_eq!(u16_at(&reply, 0), Some(6));
        assert_eq!(
            question(&{
                let mut r = reply.clone();
                r[2] &= 0x7f;
                r
            })
            .unwrap()
            .name,
            "example.org"
        );
        upstream.join().unwrap();
        // Garbage closes that connection.
        write_message(&mut client, b"junk").unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
    }
}

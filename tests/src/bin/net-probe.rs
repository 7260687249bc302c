//! `net-probe`: the network ends of the published-port tests and benchmarks, the same binary on
//! the test host and in a container (its libraries are copied into the test image).
//!
//!   net-probe tcp-echo PORT                 echo every connection's bytes back (IPv4 and IPv6)
//!   net-probe udp-echo PORT                 echo every datagram to its sender
//!   net-probe tcp-load ADDR CONNS BYTES [--stall]
//!                                           CONNS parallel connections, each sends BYTES of its
//!                                           own pseudo-random stream and checks the echo; with
//!                                           --stall, one more connection that never reads
//!   net-probe udp-check ADDR SIZE...        one datagram of each SIZE, echoed back whole
//!   net-probe latency ADDR N                connect + 1 byte echoed, N times: p50 and p99
//!
//! Every check prints one line and exits non-zero when what it checks fails.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("net-probe: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<()> {
    let arg = |i: usize, what: &str| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing {what}; see the top of tests/src/bin/net-probe.rs"))
    };
    match arg(0, "a command")? {
        "tcp-echo" => tcp_echo(arg(1, "PORT")?.parse()?),
        "udp-echo" => udp_echo(arg(1, "PORT")?.parse()?),
        "tcp-load" => tcp_load(
            addr(arg(1, "ADDR")?)?,
            arg(2, "CONNS")?.parse()?,
            arg(3, "BYTES")?.parse()?,
            args.get(4).is_some_and(|a| a == "--stall"),
        ),
        "udp-check" => {
            let sizes = args[2..]
                .iter()
                .map(|s| s.parse::<usize>())
                .collect::<Result<Vec<_>, _>>()?;
            udp_check(addr(arg(1, "ADDR")?)?, &sizes)
        }
        "latency" => latency(addr(arg(1, "ADDR")?)?, arg(2, "N")?.parse()?),
        other => bail!("unknown command {other:?}"),
    }
}

fn addr(text: &str) -> Result<SocketAddr> {
    text.to_socket_addrs()
        .with_context(|| format!("resolve {text}"))?
        .next()
        .with_context(|| format!("{text} has no address"))
}

fn tcp_echo(port: u16) -> Result<()> {
    // Both families, as a server in a container usually is: [::] with dual stack.
    let listener = TcpListener::bind(("::", port))
        .or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        .with_context(|| format!("listen on port {port}"))?;
    eprintln!("net-probe: tcp echo on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        std::thread::spawn(move || {
            let Ok(mut back) = stream.try_clone() else {
                return;
            };
            let _ = std::io::copy(&mut stream, &mut back);
            let _ = back.shutdown(Shutdown::Write);
        });
    }
    Ok(())
}

fn udp_echo(port: u16) -> Result<()> {
    let socket = UdpSocket::bind(("::", port))
        .or_else(|_| UdpSocket::bind(("0.0.0.0", port)))
        .with_context(|| format!("bind UDP port {port}"))?;
    eprintln!("net-probe: udp echo on {}", socket.local_addr()?);
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], peer);
    }
}

/// The unit the load's streams are generated in.
const BLOCK: usize = 16 * 1024;

/// A connection's own byte stream: xorshift64 seeded by its index.
struct Pattern(u64);

impl Pattern {
    fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Sends `bytes` of connection `index`'s pattern and checks that the same bytes come back.
fn one_connection(addr: SocketAddr, index: u64, bytes: usize) -> Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
        .with_context(|| format!("connection {index}: connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut pattern = Pattern::new(index);
        let mut buf = vec![0u8; BLOCK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            pattern.fill(&mut buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n;
        }
        writer.shutdown(Shutdown::Write)
    });
    // The sender's stream is BLOCK-sized fills of the pattern (the last one shorter): rebuild
    // it block by block and compare what comes back against it.
    let mut expected = Pattern::new(index);
    let mut reader = stream;
    let mut got = vec![0u8; BLOCK];
    let mut block = vec![0u8; BLOCK];
    let (mut block_len, mut block_pos, mut produced, mut seen) = (0usize, 0usize, 0usize, 0usize);
    loop {
        let n = reader
            .read(&mut got)
            .with_context(|| format!("connection {index}: read after {seen} bytes"))?;
        if n == 0 {
            break;
        }
        let mut i = 0;
        while i < n {
            if block_pos == block_len {
                let m = (bytes - produced).min(BLOCK);
                if m == 0 {
                    bail!("connection {index}: more bytes came back than were sent");
                }
                expected.fill(&mut block[..m]);
                (block_len, block_pos, produced) = (m, 0, produced + m);
            }
            let take = (n - i).min(block_len - block_pos);
            if got[i..i + take] != block[block_pos..block_pos + take] {
                bail!("connection {index}: the echo differs from what was sent near byte {seen}");
            }
            (i, block_pos, seen) = (i + take, block_pos + take, seen + take);
        }
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("connection {index}: the sender panicked"))?
        .with_context(|| format!("connection {index}: send"))?;
    if seen != bytes {
        bail!("connection {index}: {seen} bytes came back of {bytes}");
    }
    Ok(())
}

fn tcp_load(addr: SocketAddr, conns: u64, bytes: usize, stall: bool) -> Result<()> {
    let started = Instant::now();
    // The staller sends a lot and never reads: its echo backs up through the whole path.
    let _staller = if stall {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
            .context("the stalled connection: connect")?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0usize;
        while sent < 32 << 20 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        eprintln!(
            "net-probe: the stalled connection wrote {} KiB and stopped reading",
            sent / 1024
        );
        Some(s)
    } else {
        None
    };
    let workers: Vec<_> = (0..conns)
        .map(|i| std::thread::spawn(move || one_connection(addr, i, bytes)))
        .collect();
    let mut failures = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("a connection thread panicked".into()),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if !failures.is_empty() {
        bail!(
            "{} of {conns} connections failed; first: {}",
            failures.len(),
            failures[0]
        );
    }
    let mib = (bytes as f64 * conns as f64) / (1 << 20) as f64;
    println!(
        "tcp-load: {conns}/{conns} connections, {} KiB each way each, checksums ok{}, {secs:.1} s, {:.1} MiB/s each way",
        bytes / 1024,
        if stall { ", beside a stalled reader" } else { "" },
        mib / secs
    );
    Ok(())
}

fn udp_check(addr: SocketAddr, sizes: &[usize]) -> Result<()> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = vec![0u8; 65536];
    let mut report = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let mut payload = vec![0u8; size];
        Pattern::new(i as u64 + 1000).fill(&mut payload);
        // The first datagram of a flow may race the flow's setup: a few tries, each whole.
        let mut answer = None;
        for _ in 0..5 {
            socket.send(&payload)?;
            match socket.recv(&mut buf) {
                Ok(n) => {
                    answer = Some(n);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e).context("receive the echo"),
            }
        }
        let n = answer.with_context(|| format!("no echo of the {size}-byte datagram"))?;
        if n != size || buf[..n] != payload[..] {
            bail!("the {size}-byte datagram came back as {n} bytes or changed");
        }
        report.push(format!("{size} bytes ok"));
    }
    println!("udp-check: {}", report.join(", "));
    Ok(())
}

fn latency(addr: SocketAddr, n: usize) -> Result<()> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connection {i}: connect"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("connection {i}: first byte"))?;
        samples.push(started.elapsed());
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "latency: {n} connections, p50 {:.3} ms, p99 {:.3} ms",
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3
    );
    Ok(())
}

//! The stress scenarios the host runs against `guest-serve`, each ending in one `ok NAME
//! figures…` or `FAIL NAME why` line. Every wait has a deadline: a bug shows as FAIL, not a hang.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::host::{self, GuestServe, Progress, Transfer, THREAD_STACK};
use crate::pattern::{self, guest_seed, Received};
use crate::request::Request;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// Sizes and counts, from the command line.
#[derive(Clone, Debug)]
pub struct Opts {
    pub bulk_conns: u32,
    pub bulk_mib: u64,
    pub many_conns: u32,
    pub many_kib: u64,
    pub slow_mib: u64,
    pub pause: Duration,
    pub side_conns: u32,
    pub side_kib: u64,
    pub dial_conns: u32,
    pub dial_kib: u64,
    pub reset_conns: u32,
    /// No progress for this long on a socket is a failure.
    pub idle: Duration,
}

pub struct Ctx {
    pub socket: PathBuf,
    pub serve: GuestServe,
    pub opts: Opts,
}

pub type Outcome = Result<String, String>;

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

/// Runs `f(i)` for `0..n` on threads of their own and collects the results in order.
fn parallel<T: Send + 'static>(
    n: u32,
    f: impl Fn(u32) -> Result<T, String> + Send + Sync + 'static,
) -> Vec<Result<T, String>> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let f = f.clone();
            std::thread::Builder::new()
                .stack_size(THREAD_STACK)
                .spawn(move || f(i))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| match h {
            Ok(h) => h.join().unwrap_or_else(|_| Err("thread panicked".into())),
            Err(e) => Err(format!("spawn a thread: {e}")),
        })
        .collect()
}

/// Ok with the count, or the failures (the first few of them).
fn all_ok<T>(what: &str, results: &[Result<T, String>]) -> Result<usize, String> {
    let failed: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("#{i}: {e}")))
        .collect();
    if failed.is_empty() {
        return Ok(results.len());
    }
    Err(format!(
        "{} of {} {what} failed: {}",
        failed.len(),
        results.len(),
        failed
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// (a) Many connections moving megabytes both ways at once.
pub fn bulk(ctx: &Ctx) -> Outcome {
    let (n, size) = (ctx.opts.bulk_conns, ctx.opts.bulk_mib * MIB);
    let (socket, port, idle) = (ctx.socket.clone(), ctx.serve.port, ctx.opts.idle);
    let started = Instant::now();
    let results = parallel(n, move |i| {
        host::bidir(&socket, port, size, 1_000 + u64::from(i), idle)
    });
    let took = started.elapsed();
    all_ok("connections", &results)?;
    let total = 2 * u64::from(n) * size;
    Ok(format!(
        "conns={n} per_conn_each_way={}MiB total={}MiB secs={} throughput={:.1}MiB/s",
        size / MIB,
        total / MIB,
        secs(took),
        total as f64 / MIB as f64 / took.as_secs_f64()
    ))
}

/// (b) Hundreds of connections open at once: all connected, and all accepted by guest-serve,
/// before any moves data.
pub fn many(ctx: &Ctx) -> Outcome {
    let (n, size) = (ctx.opts.many_conns, ctx.opts.many_kib * KIB);
    let (socket, port, idle) = (ctx.socket.clone(), ctx.serve.port, ctx.opts.idle);
    let connected_at = Arc::new(Barrier::new(n as usize));
    let accepted_at = Arc::new(Barrier::new(n as usize));
    let connected = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let guest_active = Arc::new(std::sync::Mutex::new(Err::<u64, String>(
        "not asked".into(),
    )));
    let (c, g) = (connected.clone(), guest_active.clone());
    let started = Instant::now();
    let results = parallel(n, move |i| {
        let seed = 50_000 + u64::from(i);
        let conn = host::request(&socket, port, &Request::Bidir { size, seed }, idle);
        if conn.is_ok() {
            c.fetch_add(1, Ordering::SeqCst);
        }
        // Everyone waits at both barriers, failed or not, so nobody waits forever.
        if connected_at.wait().is_leader() {
            let active = wait_for_guest_active(&socket, port, u64::from(n), idle);
            *g.lock().unwrap_or_else(|e| e.into_inner()) = active;
        }
        accepted_at.wait();
        let t = bidir_checked(conn?, size, seed)?;
        Ok(t.ended)
    });
    let took = started.elapsed();
    let connected = connected.load(Ordering::SeqCst);
    all_ok("connections", &results)?;
    let active = guest_active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()?;
    Ok(format!(
        "conns={n} connected_at_once={connected} guest_serving_at_once={active} per_conn_each_way={}KiB secs={}",
        size / KIB,
        secs(took)
    ))
}

/// Asks guest-serve until it serves at least `want` connections besides the asking one.
fn wait_for_guest_active(
    socket: &Path,
    port: u32,
    want: u64,
    idle: Duration,
) -> Result<u64, String> {
    let deadline = Instant::now() + idle;
    loop {
        let mut s = host::request(socket, port, &Request::Stats, idle)?;
        let line = pattern::read_rest(&mut s, 200).map_err(|e| format!("stats: {e}"))?;
        let active = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("active=")?.parse::<u64>().ok())
            .ok_or_else(|| format!("stats: {line:?}"))?
            .saturating_sub(1);
        if active >= want {
            return Ok(active);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "guest-serve had accepted only {active} of {want} connections after {idle:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn bidir_checked(s: UnixStream, size: u64, seed: u64) -> Result<Transfer, String> {
    let t = host::bidir_on(s, size, seed, Arc::default());
    t.check(size)?;
    Ok(t)
}

/// Short transfers started `delay` from now on other threads; the receiver gets when each
/// finished (or why it failed).
fn side_transfers(
    ctx: &Ctx,
    delay: Duration,
    seed: u64,
) -> mpsc::Receiver<Vec<Result<Instant, String>>> {
    let (n, size) = (ctx.opts.side_conns, ctx.opts.side_kib * KIB);
    let (socket, port, idle) = (ctx.socket.clone(), ctx.serve.port, ctx.opts.idle);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let results = parallel(n, move |i| {
            host::bidir(&socket, port, size, seed + u64::from(i), idle).map(|t| t.ended)
        });
        let _ = tx.send(results);
    });
    rx
}

/// The side transfers must all succeed before `limit`.
fn side_check(
    rx: &mpsc::Receiver<Vec<Result<Instant, String>>>,
    t0: Instant,
    limit: Instant,
    wait: Duration,
) -> Result<Duration, String> {
    let results = rx
        .recv_timeout(wait)
        .map_err(|_| format!("the other connections did not finish within {wait:?}"))?;
    all_ok("other connections", &results)?;
    let last = results.iter().flatten().max().copied().unwrap_or(t0);
    if last > limit {
        return Err(format!(
            "the other connections finished {}s after the start, later than the stalled one resumed ({}s): the stalled connection held them up",
            secs(last - t0),
            secs(limit - t0)
        ));
    }
    Ok(last - t0)
}

/// (c) The host stops reading one connection while the guest sends to it; others go on.
pub fn host_slow_reader(ctx: &Ctx) -> Outcome {
    let (size, pause, seed) = (ctx.opts.slow_mib * MIB, ctx.opts.pause, 7_000);
    let t0 = Instant::now();
    let mut slow = host::request(
        &ctx.socket,
        ctx.serve.port,
        &Request::Send { size, seed },
        ctx.opts.idle,
    )?;
    let side = side_transfers(ctx, Duration::from_millis(300), 7_100);
    let resume = t0 + pause;
    std::thread::sleep(resume.saturating_duration_since(Instant::now()));
    let got = pattern::receive(&mut slow, guest_seed(seed), size, &|_| {});
    let tail =
        pattern::read_rest(&mut slow, 200).map_err(|e| format!("read the guest's last line: {e}"));
    let drained = t0.elapsed();
    let others_done = side_check(&side, t0, resume, ctx.opts.idle * 2)?;
    if got != Received::Complete(size) {
        return Err(format!("slow connection: received {got}"));
    }
    let tail = tail?;
    let sent_ms: u64 = tail
        .trim()
        .strip_prefix("sent ")
        .and_then(|ms| ms.parse().ok())
        .ok_or_else(|| format!("slow connection: guest's last line {tail:?}"))?;
    if sent_ms < pause.as_millis() as u64 * 8 / 10 {
        return Err(format!(
            "the guest wrote all {size} bytes in {sent_ms} ms while the host read nothing for {pause:?}: something buffered without limit"
        ));
    }
    Ok(format!(
        "stalled_for={}s bytes={} guest_write_blocked_ms={sent_ms} others={}x{}KiB done_at={}s drained_at={}s",
        secs(pause),
        size,
        ctx.opts.side_conns,
        ctx.opts.side_kib,
        secs(others_done),
        secs(drained)
    ))
}

/// (d) The guest does not read one connection for a while; the host's writes wait on credit.
pub fn guest_slow_reader(ctx: &Ctx) -> Outcome {
    let (size, pause, seed) = (ctx.opts.slow_mib * MIB, ctx.opts.pause, 8_000);
    let t0 = Instant::now();
    let req = Request::SlowRead {
        size,
        seed,
        delay_ms: pause.as_millis() as u64,
    };
    let slow = host::request(&ctx.socket, ctx.serve.port, &req, ctx.opts.idle)?;
    slow.set_write_timeout(Some(pause + ctx.opts.idle))
        .map_err(|e| e.to_string())?;
    let mut out = slow.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        pattern::send(&mut out, seed, size, &|_| {})
            .and_then(|_| out.shutdown(std::net::Shutdown::Write))
            .map(|_| Instant::now())
            .map_err(|e| format!("host send: {e}"))
    });
    let side = side_transfers(ctx, Duration::from_millis(300), 8_100);
    let others_done = side_check(&side, t0, t0 + pause, ctx.opts.idle * 2);
    let written = writer
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()))?;
    let mut slow = slow;
    let verdict =
        pattern::read_rest(&mut slow, 200).map_err(|e| format!("read the verdict: {e}"))?;
    let others_done = others_done?;
    if verdict.trim() != format!("ok {size}") {
        return Err(format!("guest verdict {:?}", verdict.trim()));
    }
    let blocked = written - t0;
    if blocked < pause * 8 / 10 {
        return Err(format!(
            "the host wrote all {size} bytes in {}s while the guest read nothing for {}s: something buffered without limit",
            secs(blocked),
            secs(pause)
        ));
    }
    Ok(format!(
        "stalled_for={}s bytes={size} host_write_blocked={}s others={}x{}KiB done_at={}s",
        secs(pause),
        secs(blocked),
        ctx.opts.side_conns,
        ctx.opts.side_kib,
        secs(others_done)
    ))
}

/// (e) The guest dials the host: many connections to a unix listener at `PATH_<port>`.
pub fn guest_dial(ctx: &Ctx) -> Outcome {
    const PORT: u32 = 6_000;
    let (n, size, seed) = (ctx.opts.dial_conns, ctx.opts.dial_kib * KIB, 90_000);
    let path = host::host_port_path(&ctx.socket, PORT);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("listen on {}: {e}", path.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let req = Request::Dial {
        count: n,
        size,
        seed,
        port: PORT,
    };
    let mut control = host::request(&ctx.socket, ctx.serve.port, &req, ctx.opts.idle)?;
    let deadline = Instant::now() + ctx.opts.idle;
    let mut threads = Vec::new();
    while threads.len() < n as usize && Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => {
                let idle = ctx.opts.idle;
                threads.push(std::thread::spawn(move || -> Result<u32, String> {
                    let mut s = s;
                    s.set_nonblocking(false)
                        .and_then(|_| s.set_read_timeout(Some(idle)))
                        .and_then(|_| s.set_write_timeout(Some(idle)))
                        .map_err(|e| e.to_string())?;
                    let line =
                        pattern::read_line(&mut s, 64).map_err(|e| format!("id line: {e}"))?;
                    let i: u32 = line
                        .as_deref()
                        .and_then(|l| l.strip_prefix("conn "))
                        .and_then(|i| i.parse().ok())
                        .ok_or_else(|| format!("id line {line:?}"))?;
                    bidir_checked(s, size, seed + u64::from(i)).map(|_| i)
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    let accepted = threads.len();
    let results: Vec<Result<u32, String>> = threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    let summary =
        pattern::read_rest(&mut control, 64 * 1024).map_err(|e| format!("guest summary: {e}"));
    let took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    if accepted < n as usize {
        return Err(format!(
            "accepted {accepted} of {n} guest connections within {:?}",
            ctx.opts.idle
        ));
    }
    all_ok("guest-dialed connections", &results)?;
    let ids: BTreeSet<u32> = results.iter().flatten().copied().collect();
    if ids.len() != n as usize {
        return Err(format!("{} distinct connection ids of {n}", ids.len()));
    }
    let summary = summary?;
    if summary.lines().next() != Some(&format!("dialed ok={n} of={n}")) {
        return Err(format!("guest summary: {:?}", summary.trim()));
    }
    Ok(format!(
        "conns={n} per_conn_each_way={}KiB secs={}",
        size / KIB,
        secs(took)
    ))
}

/// (f) The guest goes away mid-transfer: it closes its socket (or its process exits) after
/// part of a stream while the host is still sending. The host must see the end promptly, and
/// later connections must still work.
pub fn peer_abort(ctx: &Ctx, exit: bool) -> Outcome {
    let (after, seed, idle) = (MIB, if exit { 11_000 } else { 10_000 }, ctx.opts.idle);
    // For an exit, a second guest-serve: its exit must not take the main one down.
    let second = if exit {
        Some(GuestServe::start(&ctx.socket, ctx.serve.port + 100, idle)?)
    } else {
        None
    };
    let (port, req) = match &second {
        Some(s) => (s.port, Request::Exit { seed, after }),
        None => (ctx.serve.port, Request::Abort { seed, after }),
    };
    let s = host::request(&ctx.socket, port, &req, idle)?;
    let mut out = s.try_clone().map_err(|e| e.to_string())?;
    let (wtx, wrx) = mpsc::channel();
    std::thread::spawn(move || {
        // Far more than the guest will ever read: this must end in an error.
        let r = pattern::send(&mut out, seed, 1 << 40, &|_| {});
        let _ = wtx.send((r, Instant::now()));
    });
    let mut s = s;
    let got = pattern::receive(&mut s, guest_seed(seed), after, &|_| {});
    let last_byte = Instant::now();
    let end = pattern::read_rest(&mut s, 64);
    let ended = Instant::now();
    let writer = wrx.recv_timeout(idle);
    if writer.is_err() {
        // Unblock the writer before reporting.
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    if got != Received::Complete(after) {
        return Err(format!(
            "want the {after} bytes sent before the abort, got {got}"
        ));
    }
    match &end {
        Ok(rest) if rest.is_empty() => {}
        Ok(rest) => return Err(format!("bytes after the abort: {rest:?}")),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Err(e) => {
            return Err(format!(
                "after the abort the host read failed with {e} instead of an end of stream"
            ))
        }
    }
    let (write_result, write_end) = writer
        .map_err(|_| format!("the host could still write {idle:?} after the guest went away"))?;
    if write_result.is_ok() {
        return Err("the host wrote a TiB into a closed connection".into());
    }
    let session = match &second {
        Some(s) if !s.wait_ended(idle) => {
            return Err("the exited guest-serve's shell session did not end".into())
        }
        Some(_) => " session_ended=yes",
        None => "",
    };
    // Later connections still work.
    host::bidir(&ctx.socket, ctx.serve.port, MIB, seed + 1, idle)
        .map_err(|e| format!("the next connection: {e}"))?;
    Ok(format!(
        "received={after} eof_after={}s write_error_after={}s{session} next_conn=ok",
        secs(ended - last_byte),
        secs(write_end.saturating_duration_since(last_byte))
    ))
}

/// Host connections must end this soon after the unbind is started (it runs 1 s later).
const RESET_LIMIT: Duration = Duration::from_secs(15);

const VSOCK_DRIVER: &str = "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport";

/// (g) The guest unbinds and rebinds its virtio-vsock driver (a device reset) during long
/// transfers: every host connection must end promptly, the VMM must live on, and after the
/// rebind a new guest-serve must move verified data. Returns the new guest-serve.
pub fn device_reset(ctx: &Ctx) -> Result<(String, GuestServe), String> {
    let (n, idle) = (ctx.opts.reset_conns, ctx.opts.idle);
    let listing = host::shell_run(&ctx.socket, &format!("ls {VSOCK_DRIVER}"), b"", idle)?;
    let dev = listing
        .split_whitespace()
        .find(|w| {
            w.strip_prefix("virtio")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .ok_or_else(|| format!("no virtioN device under {VSOCK_DRIVER}: {listing:?}"))?
        .to_string();
    let (tx, rx) = mpsc::channel();
    let mut progress = Vec::new();
    for i in 0..n {
        let p = Arc::new(Progress::default());
        progress.push(p.clone());
        let (socket, port, tx) = (ctx.socket.clone(), ctx.serve.port, tx.clone());
        std::thread::spawn(move || {
            let seed = 12_000 + u64::from(i);
            let size = 1 << 40;
            let t = host::request(&socket, port, &Request::Bidir { size, seed }, idle)
                .map(|s| host::bidir_on(s, size, seed, p));
            let _ = tx.send((i, t));
        });
    }
    drop(tx);
    // All transfers under way in both directions before the reset.
    let under_way = Instant::now() + idle;
    while progress.iter().any(|p| {
        p.sent.load(Ordering::Relaxed) < 256 * KIB || p.received.load(Ordering::Relaxed) < 256 * KIB
    }) {
        if Instant::now() > under_way {
            return Err(format!(
                "the {n} long transfers did not get going within {idle:?}"
            ));
        }
        if let Ok((i, t)) = rx.try_recv() {
            return Err(format!("transfer {i} ended before the reset: {t:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let script = format!(
        "setsid sh -c 'sleep 1; echo {dev} > {VSOCK_DRIVER}/unbind; sleep 1; echo {dev} > {VSOCK_DRIVER}/bind' </dev/null >/dev/null 2>&1 &"
    );
    host::shell_run(&ctx.socket, &script, b"", idle)?;
    let launched = Instant::now();
    let mut ends = Vec::new();
    for _ in 0..n {
        let left = (launched + idle).saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, Ok(t))) => ends.push((i, t)),
            Ok((i, Err(e))) => return Err(format!("transfer {i}: {e}")),
            Err(_) => {
                return Err(format!(
                    "{} of {n} host connections still open {idle:?} after the driver reset",
                    n as usize - ends.len()
                ))
            }
        }
    }
    let mut moved = 0;
    for (i, t) in &ends {
        if let Received::Mismatch(at) = t.received {
            return Err(format!("transfer {i}: wrong byte at {at} before the reset"));
        }
        if t.received.timed_out() || t.ended - launched > RESET_LIMIT {
            return Err(format!(
                "transfer {i} did not end within {RESET_LIMIT:?} of the driver reset: {}",
                t.received
            ));
        }
        moved += t.received.good_bytes();
    }
    let slowest = ends
        .iter()
        .map(|(_, t)| t.ended - launched)
        .max()
        .unwrap_or_default();
    let serve_ended = ctx.serve.wait_ended(idle);
    // The guest comes back: a shell answers and the driver is bound again.
    let back = Instant::now() + idle * 2;
    let seen = loop {
        let check = format!("echo alive; ls {VSOCK_DRIVER}");
        match host::shell_run(&ctx.socket, &check, b"", Duration::from_secs(10)) {
            Ok(out) if out.starts_with("alive") && out.split_whitespace().any(|w| w == dev) => {
                break out
            }
            _ if Instant::now() > back => {
                return Err(format!(
                    "no shell session {:?} after the driver reset",
                    idle * 2
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let _ = seen;
    let back_after = launched.elapsed();
    let serve = GuestServe::start(&ctx.socket, ctx.serve.port + 1, idle)?;
    host::bidir(&ctx.socket, serve.port, 4 * MIB, 13_000, idle)
        .map_err(|e| format!("transfer after the reset: {e}"))?;
    Ok((
        format!(
            "device={dev} conns={n} verified_before_reset={}KiB all_ended_within={}s (reset at ~1s) old_guest_serve_ended={} shell_back_after={}s new_transfer=4MiB ok",
            moved / KIB,
            secs(slowest),
            if serve_ended { "yes" } else { "no" },
            secs(back_after)
        ),
        serve,
    ))
}

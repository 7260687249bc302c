//! `guest-serve PORT`, the guest's half: an AF_VSOCK listener with a thread per connection that
//! does what the connection's request line asks (see `request.rs`). It prints a line when it is
//! listening and one per abnormal event; verdicts go back on the connections themselves.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::pattern::{self, guest_seed, Received};
use crate::request::Request;
use crate::vsock::{raise_nofile, Conn, VsockListener, VsockStream};

/// The host's CID, for connections the guest dials.
const HOST_CID: u32 = 2;
/// No progress for this long and a guest socket gives up (the test never waits this long).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const THREAD_STACK: usize = 256 * 1024;

static ACTIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
static TOTAL: AtomicU64 = AtomicU64::new(0);

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Counts a connection as open until dropped.
struct Active;

impl Active {
    fn new() -> Active {
        let now = ACTIVE.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(now, Ordering::SeqCst);
        TOTAL.fetch_add(1, Ordering::SeqCst);
        Active
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn serve(port: u32) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    let listener =
        VsockListener::bind(port).with_context(|| format!("listen on vsock port {port}"))?;
    say(&format!(
        "guest-serve: listening on vsock port {port} (nofile {nofile})"
    ));
    loop {
        let stream = listener.accept().context("accept")?;
        let active = Active::new();
        let spawned = std::thread::Builder::new()
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _active = active;
                handle(stream);
            });
        if let Err(e) = spawned {
            say(&format!("guest-serve: error: thread for a connection: {e}"));
        }
    }
}

fn handle(mut stream: VsockStream) {
    if let Err(e) = stream.set_timeouts(IDLE_TIMEOUT) {
        say(&format!("guest-serve: error: socket timeouts: {e}"));
    }
    let request = match pattern::read_line(&mut stream, 200) {
        Ok(Some(line)) => Request::parse(&line),
        Ok(None) => return,
        Err(e) => Err(format!("read the request: {e}")),
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            say(&format!("guest-serve: error: {e}"));
            let _ = writeln!(stream, "error {e}");
            return;
        }
    };
    let verdict = match &request {
        Request::Bidir { size, seed } => serve_bidir(stream, *size, *seed),
        Request::Send { size, seed } => send_only(stream, *size, *seed),
        Request::SlowRead {
            size,
            seed,
            delay_ms,
        } => slow_read(stream, *size, *seed, *delay_ms),
        Request::Dial {
            count,
            size,
            seed,
            port,
        } => dial(stream, *count, *size, *seed, *port),
        Request::Abort { seed, after } => abort(stream, *seed, *after, false),
        Request::Exit { seed, after } => abort(stream, *seed, *after, true),
        Request::Stats => {
            let line = format!(
                "stats active={} peak={} total={}",
                ACTIVE.load(Ordering::SeqCst),
                PEAK.load(Ordering::SeqCst),
                TOTAL.load(Ordering::SeqCst)
            );
            let _ = writeln!(stream, "{line}");
            Ok(())
        }
    };
    if let Err(e) = verdict {
        say(&format!("guest-serve: {request}: {e}"));
    }
}

/// Ends a connection with a verdict line; an error if the verdict is not a clean `ok`.
fn finish<C: Conn>(mut stream: C, received: Received, extra: bool) -> Result<(), String> {
    let line = match (&received, extra) {
        (Received::Complete(_), true) => "extra bytes after the expected stream".to_string(),
        _ => received.to_string(),
    };
    let _ = writeln!(stream, "{line}");
    let _ = stream.shutdown_write();
    if received.is_complete() && !extra {
        Ok(())
    } else {
        Err(line)
    }
}

/// After the expected bytes the host must send nothing more.
fn more_after<C: Conn>(stream: &mut C) -> bool {
    let mut byte = [0u8; 1];
    matches!(std::io::Read::read(stream, &mut byte), Ok(n) if n > 0)
}

/// Both directions at once; the verdict on what arrived goes last.
pub fn serve_bidir<C: Conn>(mut stream: C, size: u64, seed: u64) -> Result<(), String> {
    let mut out = stream.try_clone().map_err(|e| format!("clone: {e}"))?;
    let writer = std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || pattern::send(&mut out, guest_seed(seed), size, &|_| {}))
        .map_err(|e| format!("writer thread: {e}"))?;
    let received = pattern::receive(&mut stream, seed, size, &|_| {});
    let extra = received.is_complete() && more_after(&mut stream);
    let sent = writer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    let verdict = finish(stream, received, extra);
    sent.map_err(|e| format!("send: {e}"))?;
    verdict
}

fn send_only(mut stream: VsockStream, size: u64, seed: u64) -> Result<(), String> {
    let started = Instant::now();
    pattern::send(&mut stream, guest_seed(seed), size, &|_| {})
        .map_err(|e| format!("send: {e}"))?;
    writeln!(stream, "sent {}", started.elapsed().as_millis()).map_err(|e| e.to_string())?;
    stream.shutdown_write().map_err(|e| e.to_string())
}

fn slow_read(mut stream: VsockStream, size: u64, seed: u64, delay_ms: u64) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(delay_ms));
    let received = pattern::receive(&mut stream, seed, size, &|_| {});
    let extra = received.is_complete() && more_after(&mut stream);
    finish(stream, received, extra)
}

fn dial(
    mut control: VsockStream,
    count: u32,
    size: u64,
    seed: u64,
    port: u32,
) -> Result<(), String> {
    let mut threads = Vec::new();
    for i in 0..count {
        let thread = std::thread::Builder::new().stack_size(THREAD_STACK).spawn(
            move || -> Result<(), String> {
                let mut s = VsockStream::connect(HOST_CID, port)
                    .map_err(|e| format!("connect to host port {port}: {e}"))?;
                s.set_timeouts(IDLE_TIMEOUT).map_err(|e| e.to_string())?;
                writeln!(s, "conn {i}").map_err(|e| format!("send the id: {e}"))?;
                serve_bidir(s, size, seed + u64::from(i))
            },
        );
        threads.push(thread.map_err(|e| format!("dial thread: {e}")));
    }
    let mut ok = 0;
    let mut lines = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        let result = t.and_then(|t| t.join().unwrap_or_else(|_| Err("panicked".into())));
        match result {
            Ok(()) => ok += 1,
            Err(e) => lines.push(format!("dial-fail {i} {e}")),
        }
    }
    let mut report = format!("dialed ok={ok} of={count}\n");
    for l in &lines {
        report.push_str(l);
        report.push('\n');
    }
    control
        .write_all(report.as_bytes())
        .map_err(|e| e.to_string())?;
    let _ = control.shutdown_write();
    if lines.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {count} dialed connections failed",
            lines.len()
        ))
    }
}

/// Sends part of a stream and then goes away: the socket is closed with the host's bytes
/// unread, or the whole process exits.
fn abort(mut stream: VsockStream, seed: u64, after: u64, exit: bool) -> Result<(), String> {
    pattern::send(&mut stream, guest_seed(seed), after, &|_| {})
        .map_err(|e| format!("send: {e}"))?;
    if exit {
        say(&format!(
            "guest-serve: exiting after sending {after} bytes, as asked"
        ));
        std::process::exit(0);
    }
    drop(stream);
    Ok(())
}

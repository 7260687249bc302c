//! The host's side of one connection: the hybrid-vsock `CONNECT` handshake on the VMM's unix
//! socket, a verified two-way transfer, shell sessions through the agent, and the long-lived
//! `guest-serve` session.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_protocol::{
    write_frame, write_shell_frame, write_stdin, ShellFrame, ShellOutput, ShellRequest, SHELL_PORT,
};

use crate::pattern::{self, guest_seed, Received};
use crate::request::Request;

pub const THREAD_STACK: usize = 256 * 1024;

/// Connects to guest port `port` through the VMM's socket; every later read or write on the
/// stream fails after `idle` without progress.
pub fn connect(socket: &Path, port: u32, idle: Duration) -> Result<UnixStream, String> {
    let mut s =
        UnixStream::connect(socket).map_err(|e| format!("connect to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(idle))
        .and_then(|_| s.set_write_timeout(Some(idle)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("send CONNECT {port}: {e}"))?;
    match pattern::read_line(&mut s, 64) {
        Ok(Some(line)) if line.starts_with("OK ") => Ok(s),
        Ok(Some(line)) => Err(format!("CONNECT {port}: answered {line:?}")),
        Ok(None) => Err(format!(
            "CONNECT {port}: closed without OK (no guest listener?)"
        )),
        Err(e) => Err(format!("CONNECT {port}: {e}")),
    }
}

/// Connects to guest-serve and sends `req`.
pub fn request(
    socket: &Path,
    port: u32,
    req: &Request,
    idle: Duration,
) -> Result<UnixStream, String> {
    let mut s = connect(socket, port, idle)?;
    writeln!(s, "{req}").map_err(|e| format!("send {req}: {e}"))?;
    Ok(s)
}

/// Bytes moved so far on a transfer, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// How a two-way transfer went, from the host's side.
#[derive(Debug)]
pub struct Transfer {
    pub sent: Result<u64, String>,
    pub received: Received,
    /// The guest's verdict line (or why there was none).
    pub verdict: String,
    pub ended: Instant,
}

impl Transfer {
    /// Ok when every byte went both ways and the guest says so.
    pub fn check(&self, size: u64) -> Result<(), String> {
        let sent = self.sent.as_ref().map_err(|e| format!("host send: {e}"))?;
        if *sent != size || self.received != Received::Complete(size) {
            return Err(format!(
                "host sent {sent}, host received {}, guest says {:?}",
                self.received, self.verdict
            ));
        }
        if self.verdict != format!("ok {size}") {
            return Err(format!("guest verdict {:?}", self.verdict));
        }
        Ok(())
    }
}

/// The host's half of a `Bidir` exchange on `stream` (the request already sent, or a
/// guest-dialed connection past its id line): sends stream `seed` while checking
/// `guest_seed(seed)`, then reads the guest's verdict.
pub fn bidir_on(stream: UnixStream, size: u64, seed: u64, progress: Arc<Progress>) -> Transfer {
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            return Transfer {
                sent: Err(format!("clone: {e}")),
                received: Received::Short(0, "not started".into()),
                verdict: String::new(),
                ended: Instant::now(),
            }
        }
    };
    let p = progress.clone();
    let writer = std::thread::Builder::new()
        .stack_size(THREAD_STACK)
        .spawn(move || {
            pattern::send(&mut out, seed, size, &|n| {
                p.sent.store(n, Ordering::Relaxed)
            })
            .and_then(|_| out.shutdown(std::net::Shutdown::Write))
            .map(|_| size)
            .map_err(|e| format!("after {} bytes: {e}", p.sent.load(Ordering::Relaxed)))
        });
    let mut stream = stream;
    let received = pattern::receive(&mut stream, guest_seed(seed), size, &|n| {
        progress.received.store(n, Ordering::Relaxed)
    });
    let verdict = if received.is_complete() {
        match pattern::read_rest(&mut stream, 4096) {
            Ok(rest) => rest.trim().to_string(),
            Err(e) => format!("(no verdict: {e})"),
        }
    } else {
        // The writer may be stuck on a peer that went away: unblock it.
        let _ = stream.shutdown(std::net::Shutdown::Both);
        String::new()
    };
    let sent = match writer {
        Ok(w) => w.join().unwrap_or_else(|_| Err("writer panicked".into())),
        Err(e) => Err(format!("writer thread: {e}")),
    };
    Transfer {
        sent,
        received,
        verdict,
        ended: Instant::now(),
    }
}

/// Runs `Bidir` on a fresh connection, checked.
pub fn bidir(
    socket: &Path,
    port: u32,
    size: u64,
    seed: u64,
    idle: Duration,
) -> Result<Transfer, String> {
    let s = request(socket, port, &Request::Bidir { size, seed }, idle)?;
    let t = bidir_on(s, size, seed, Arc::default());
    t.check(size)?;
    Ok(t)
}

/// Starts `script` with `sh -c` in a shell session (pipes, no tty).
pub fn shell(socket: &Path, script: &str, idle: Duration) -> Result<UnixStream, String> {
    let mut s = connect(socket, SHELL_PORT, idle)?;
    let req = ShellRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        tty: false,
        rows: 24,
        cols: 80,
        term: String::new(),
    };
    write_frame(&mut s, &req).map_err(|e| format!("send the shell request: {e}"))?;
    Ok(s)
}

/// Runs `script` in the guest with `input` as its stdin; returns its output (stdout and stderr)
/// if it exits with status 0.
pub fn shell_run(
    socket: &Path,
    script: &str,
    input: &[u8],
    idle: Duration,
) -> Result<String, String> {
    let s = shell(socket, script, idle)?;
    let mut w = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        write_stdin(&mut w, &input).and_then(|()| write_shell_frame(&mut w, &ShellFrame::StdinEnd))
    });
    let mut r = ShellOutput::new(s);
    let out = pattern::read_rest(&mut r, 1 << 20)
        .map_err(|e| format!("read the output of {script:?}: {e}"))?;
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("send stdin to {script:?}: {e} (output: {out:?})")),
        Err(_) => return Err("stdin writer panicked".into()),
    }
    match r.exit() {
        Some(0) => Ok(out),
        code => Err(format!("{script:?} exited with status {code:?}: {out:?}")),
    }
}

/// Copies `binary` to `/run/vsock-stress` in the guest and checks its SHA-256 there.
pub fn upload(socket: &Path, binary: &Path, idle: Duration) -> Result<u64, String> {
    let bytes = std::fs::read(binary).map_err(|e| format!("read {}: {e}", binary.display()))?;
    let out = shell_run(
        socket,
        "cat > /run/vsock-stress.tmp && chmod 755 /run/vsock-stress.tmp && mv /run/vsock-stress.tmp /run/vsock-stress",
        &bytes,
        idle,
    )?;
    if !out.is_empty() {
        return Err(format!("upload printed {out:?}"));
    }
    let local = std::process::Command::new("sha256sum")
        .arg(binary)
        .output()
        .map_err(|e| format!("run sha256sum: {e}"))?;
    let local = String::from_utf8_lossy(&local.stdout);
    let local = local.split_whitespace().next().unwrap_or_default();
    let remote = shell_run(socket, "sha256sum /run/vsock-stress", b"", idle)?;
    let remote = remote.split_whitespace().next().unwrap_or_default();
    if local.len() != 64 || local != remote {
        return Err(format!("sha256 here {local:?}, in the guest {remote:?}"));
    }
    Ok(bytes.len() as u64)
}

/// `guest-serve` running in a shell session; its lines are printed as they come.
pub struct GuestServe {
    pub port: u32,
    lines: Receiver<String>,
    _session: UnixStream,
}

impl GuestServe {
    pub fn start(socket: &Path, port: u32, idle: Duration) -> Result<GuestServe, String> {
        let session = shell(
            socket,
            &format!("exec /run/vsock-stress guest-serve {port}"),
            idle,
        )?;
        let reader = session.try_clone().map_err(|e| format!("clone: {e}"))?;
        reader
            .set_read_timeout(None)
            .map_err(|e| format!("socket timeout: {e}"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(ShellOutput::new(reader)).lines() {
                let Ok(line) = line else { break };
                println!("  guest[{port}]| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let serve = GuestServe {
            port,
            lines,
            _session: session,
        };
        let deadline = Instant::now() + idle;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match serve.lines.recv_timeout(left) {
                Ok(line) if line.contains("listening on vsock port") => return Ok(serve),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("guest-serve {port}: not listening after {idle:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "guest-serve {port}: session ended before listening"
                    ))
                }
            }
        }
    }

    /// Waits up to `timeout` for the session to end; true if it did.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return false,
            }
        }
    }
}

/// Where the VMM delivers guest connections to host port `port`.
pub fn host_port_path(socket: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", socket.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_and_guest_halves_agree_over_a_socket_pair() {
        let (h, g) = UnixStream::pair().unwrap();
        let guest = std::thread::spawn(move || crate::guest::serve_bidir(g, 300_001, 5));
        let t = bidir_on(h, 300_001, 5, Arc::default());
        t.check(300_001).unwrap();
        guest.join().unwrap().unwrap();
    }

    #[test]
    fn a_wrong_stream_fails_on_both_sides() {
        let (h, g) = UnixStream::pair().unwrap();
        // The guest expects seed 6; the host sends seed 5.
        let guest = std::thread::spawn(move || crate::guest::serve_bidir(g, 100_000, 6));
        let t = bidir_on(h, 100_000, 5, Arc::default());
        assert!(t.check(100_000).is_err(), "{t:?}");
        assert!(guest.join().unwrap().is_err());
    }
}

//! Shell sessions on `SHELL_PORT`: one `ShellRequest` frame, then the command (a login shell
//! when empty) runs as root in `/`, on a pty or on pipes, with the stream relayed to it until
//! it exits. A host that hangs up ends the session with SIGHUP to its process group.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use berth_protocol::{read_frame, ShellRequest};

use crate::children::{self, ExitWatch};
use crate::vsock::{self, Duplex};
use crate::{console, daemons, pty, splice};

/// How long the output may keep flowing after the command exited (background processes that
/// still hold it get SIGHUP after that).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// How long a hung-up session gets between SIGHUP and SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read the shell request")]
    Request(#[from] berth_protocol::Error),
    #[error("the connection closed before a shell request")]
    NoRequest,
    #[error(transparent)]
    Pty(#[from] pty::Error),
    #[error(transparent)]
    Child(#[from] children::Error),
    #[error("share a descriptor")]
    Dup(#[source] std::io::Error),
    #[error("start a relay thread")]
    Thread(#[source] std::io::Error),
}

/// The program and arguments to run: the request's, or a login shell.
pub fn argv(command: &[String], have_bash: bool) -> Vec<String> {
    if command.is_empty() {
        let shell = if have_bash { "/bin/bash" } else { "/bin/sh" };
        vec![shell.to_string(), "-l".to_string()]
    } else {
        command.to_vec()
    }
}

/// TERM for the session: the host's, else `xterm` on a pty and `dumb` on pipes.
pub fn term(req: &ShellRequest) -> String {
    let valid = !req.term.is_empty() && req.term.len() <= 64 && !req.term.contains('\0');
    match (valid, req.tty) {
        (true, _) => req.term.clone(),
        (false, true) => "xterm".to_string(),
        (false, false) => "dumb".to_string(),
    }
}

/// A started command: its exit, where its input goes and where its output comes from.
struct Session {
    pid: libc::pid_t,
    exit: ExitWatch,
    input: Option<File>,
    output: File,
    tty: bool,
}

/// Serves one shell connection to its end.
pub fn serve<S: Duplex>(mut stream: S) -> Result<(), Error> {
    let req: ShellRequest = read_frame(&mut stream)?.ok_or(Error::NoRequest)?;
    let argv = argv(&req.command, Path::new("/bin/bash").exists());
    let session = match start(&argv, &req) {
        Ok(session) => session,
        Err(e) => {
            let line = format!("berth-agent: {}\r\n", console::chain(&e));
            let _ = stream.write_all(line.as_bytes());
            let _ = stream.shutdown(Shutdown::Both);
            return Err(e);
        }
    };
    run(session, stream)
}

fn base_command(argv: &[String], req: &ShellRequest) -> Command {
    let mut cmd = Command::new(argv.first().map_or("/bin/sh", String::as_str));
    cmd.args(argv.iter().skip(1))
        .env_clear()
        .env("PATH", daemons::PATH)
        .env("HOME", "/root")
        .env("TERM", term(req))
        .current_dir("/");
    cmd
}

fn start(argv: &[String], req: &ShellRequest) -> Result<Session, Error> {
    let mut cmd = base_command(argv, req);
    if req.tty {
        let pty = pty::open(req.rows, req.cols)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(Error::Dup);
        cmd.stdin(Stdio::from(dup(&pty.slave)?))
            .stdout(Stdio::from(dup(&pty.slave)?))
            .stderr(Stdio::from(pty.slave));
        pty::new_session(&mut cmd, true);
        let spawned = children::spawn(&mut cmd)?;
        // The terminal side now lives only in the session, so the master sees its hangup.
        drop(cmd);
        let master = File::from(pty.master);
        return Ok(Session {
            pid: spawned.pid,
            exit: spawned.exit,
            input: Some(master.try_clone().map_err(Error::Dup)?),
            output: master,
            tty: true,
        });
    }
    let (out_read, out_write) = children::pipe()?;
    let out_write_err = out_write.try_clone().map_err(Error::Dup)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::from(out_write))
        .stderr(Stdio::from(out_write_err));
    pty::new_session(&mut cmd, false);
    let spawned = children::spawn(&mut cmd)?;
    drop(cmd);
    Ok(Session {
        pid: spawned.pid,
        exit: spawned.exit,
        input: spawned.stdin.map(|s| File::from(OwnedFd::from(s))),
        output: File::from(out_read),
        tty: false,
    })
}

/// Ends a session whose host went away: SIGHUP now, SIGKILL if it lingers.
#[derive(Debug)]
struct Hangup {
    pgid: libc::pid_t,
    at: std::sync::Mutex<Option<Instant>>,
    ended: AtomicBool,
}

impl Hangup {
    fn hang_up(&self) {
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if at.is_none() {
            *at = Some(Instant::now());
            children::signal_group(self.pgid, libc::SIGHUP);
        }
    }

    fn overdue(&self) -> bool {
        let at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        at.is_some_and(|t| t.elapsed() >= HANGUP_GRACE)
    }
}

fn run<S: Duplex>(session: Session, stream: S) -> Result<(), Error> {
    let hangup = Arc::new(Hangup {
        pgid: session.pid,
        at: std::sync::Mutex::new(None),
        ended: AtomicBool::new(false),
    });
    let from_host = stream.try_clone().map_err(Error::Dup)?;
    let to_host = stream.try_clone().map_err(Error::Dup)?;
    let (input, output, tty) = (session.input, session.output, session.tty);
    let h = Arc::clone(&hangup);
    spawn_relay("shell-in", move || relay_input(from_host, input, tty, &h))?;
    let (done_tx, done_rx) = mpsc::channel();
    let h = Arc::clone(&hangup);
    spawn_relay("shell-out", move || {
        relay_output(output, to_host, &h);
        let _ = done_tx.send(());
    })?;
    while session.exit.wait_timeout(Duration::from_secs(1)).is_none() {
        if hangup.overdue() {
            children::signal_group(session.pid, libc::SIGKILL);
        }
    }
    if done_rx.recv_timeout(OUTPUT_GRACE).is_err() {
        children::signal_group(session.pid, libc::SIGHUP);
        let _ = done_rx.recv_timeout(OUTPUT_GRACE);
    }
    hangup.ended.store(true, Ordering::SeqCst);
    // Ends the input relay too: a socket shut down both ways reads EOF and polls as hung up.
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn spawn_relay(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), Error> {
    std::thread::Builder::new()
        .name(name.to_string())
        .stack_size(splice::THREAD_STACK)
        .spawn(f)
        .map(drop)
        .map_err(Error::Thread)
}

/// Host → command. At the host's end of stream a pipe session's stdin is closed (a pty has no
/// such thing); then the relay waits for the host to hang up completely.
fn relay_input<S: Duplex>(mut from_host: S, mut input: Option<File>, tty: bool, hangup: &Hangup) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from_host.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delivered = input
            .as_mut()
            .is_some_and(|i| i.write_all(&buf[..n]).is_ok());
        if !delivered && !tty {
            // The command closed its stdin; later bytes have nowhere to go.
            input = None;
        }
    }
    drop(input);
    vsock::wait_for_hangup(&from_host);
    hangup.hang_up();
}

/// Command → host, until the command's side closes (EOF on a pipe, EIO on a pty master).
fn relay_output<S: Duplex>(mut output: File, mut to_host: S, hangup: &Hangup) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match output.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to_host.write_all(&buf[..n]).is_err() {
            hangup.hang_up();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::write_frame;
    use std::os::unix::net::UnixStream;

    fn request(command: &[&str], tty: bool) -> ShellRequest {
        ShellRequest {
            command: command.iter().map(|s| s.to_string()).collect(),
            tty,
            rows: 33,
            cols: 101,
            term: String::new(),
        }
    }

    /// Runs a session over a UnixStream pair, sends `input` then half-closes, returns output.
    fn session(req: &ShellRequest, input: &[u8]) -> (String, Result<(), Error>) {
        children::start_test_reaper();
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let server = std::thread::spawn(move || serve(guest));
        write_frame(&mut host, req).unwrap();
        host.write_all(input).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut out = Vec::new();
        host.read_to_end(&mut out).unwrap();
        (
            String::from_utf8_lossy(&out).into_owned(),
            server.join().unwrap(),
        )
    }

    #[test]
    fn pipe_mode_runs_the_command_and_closes_when_it_exits() {
        let (out, result) = session(&request(&["echo", "hi"], false), b"");
        assert_eq!(out, "hi\n");
        assert!(result.is_ok());
    }

    #[test]
    fn pipe_mode_feeds_stdin_merges_stderr_and_sets_the_environment() {
        let script = "cat; echo \"err $TERM $HOME $(pwd)\" >&2";
        let (out, _) = session(&request(&["sh", "-c", script], false), b"from host\n");
        assert_eq!(out, "from host\nerr dumb /root /\n");
    }

    #[test]
    fn pty_mode_has_a_terminal_of_the_requested_size() {
        let script = "stty size; tty; echo \"term=$TERM\"";
        let mut req = request(&["sh", "-c", script], true);
        req.term = "vt100".into();
        let (out, _) = session(&req, b"");
        assert!(out.contains("33 101\r\n"), "{out:?}");
        assert!(out.contains("/dev/pts/"), "{out:?}");
        assert!(out.contains("term=vt100"), "{out:?}");
    }

    #[test]
    fn a_host_that_hangs_up_ends_the_session() {
        children::start_test_reaper();
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(guest));
        // Would run for a minute; reads no stdin, prints nothing.
        write_frame(&mut host, &request(&["sleep", "60"], false)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        drop(host);
        assert!(server.join().unwrap().is_ok());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_command_that_cannot_start_is_reported_on_the_stream() {
        let (out, result) = session(&request(&["/nonexistent/tool"], false), b"");
        assert!(
            out.starts_with("berth-agent: start /nonexistent/tool: "),
            "{out}"
        );
        assert!(result.is_err());
    }

    #[test]
    fn login_shell_and_term_defaults() {
        assert_eq!(argv(&[], true), ["/bin/bash", "-l"]);
        assert_eq!(argv(&[], false), ["/bin/sh", "-l"]);
        assert_eq!(argv(&["ls".into()], true), ["ls"]);
        let mut req = request(&[], true);
        assert_eq!(term(&req), "xterm");
        req.tty = false;
        assert_eq!(term(&req), "dumb");
        req.term = "xterm-256color".into();
        assert_eq!(term(&req), "xterm-256color");
    }
}

//! Shell sessions on `SHELL_PORT`: one `ShellRequest` frame, then the command (a login shell
//! when empty) runs as root in `/`, on a pty or on pipes, with `ShellFrame`s relayed both ways
//! (stdin and resizes in; stdout, stderr and at the end the exit status out). A host that hangs
//! up ends the session with SIGHUP to its process group.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use berth_protocol::{
    read_frame, read_shell_frame, write_shell_frame, ShellFrame, ShellRequest, EXIT_CANNOT_RUN,
    EXIT_NOT_FOUND, MAX_DATA,
};

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

/// The exit status as a shell reports it: the code, or 128 + the signal that killed it.
pub fn shell_status(wait_status: libc::c_int) -> i32 {
    if libc::WIFEXITED(wait_status) {
        libc::WEXITSTATUS(wait_status)
    } else if libc::WIFSIGNALED(wait_status) {
        128 + libc::WTERMSIG(wait_status)
    } else {
        EXIT_CANNOT_RUN
    }
}

/// A started command: its exit, where its input goes and where its output comes from.
struct Session {
    pid: libc::pid_t,
    exit: ExitWatch,
    input: Option<File>,
    /// stdout, or the pty master (where the command's whole terminal output appears).
    output: File,
    /// stderr of a pipe session; `None` on a pty.
    errors: Option<File>,
    /// The pty master, for resizes; `None` on pipes.
    terminal: Option<File>,
}

/// The host's side of the stream, shared by the output relays; one frame per lock.
type ToHost<S> = Arc<Mutex<S>>;

fn send<S: Duplex>(to_host: &ToHost<S>, frame: &ShellFrame) -> bool {
    let mut s = to_host.lock().unwrap_or_else(|p| p.into_inner());
    write_shell_frame(&mut *s, frame).is_ok()
}

/// Serves one shell connection to its end.
pub fn serve<S: Duplex>(mut stream: S) -> Result<(), Error> {
    let req: ShellRequest = read_frame(&mut stream)?.ok_or(Error::NoRequest)?;
    let argv = argv(&req.command, Path::new("/bin/bash").exists());
    let session = match start(&argv, &req) {
        Ok(session) => session,
        Err(e) => {
            let line = format!("berth-agent: {}\n", console::chain(&e));
            let code = match &e {
                Error::Child(children::Error::Spawn(_, io))
                    if io.kind() == std::io::ErrorKind::NotFound =>
                {
                    EXIT_NOT_FOUND
                }
                _ => EXIT_CANNOT_RUN,
            };
            let _ = write_shell_frame(&mut stream, &ShellFrame::Stderr(line.into_bytes()));
            let _ = write_shell_frame(&mut stream, &ShellFrame::Exit(code));
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
            terminal: Some(master.try_clone().map_err(Error::Dup)?),
            output: master,
            errors: None,
        });
    }
    let (out_read, out_write) = children::pipe()?;
    let (err_read, err_write) = children::pipe()?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::from(out_write))
        .stderr(Stdio::from(err_write));
    pty::new_session(&mut cmd, false);
    let spawned = children::spawn(&mut cmd)?;
    drop(cmd);
    Ok(Session {
        pid: spawned.pid,
        exit: spawned.exit,
        input: spawned.stdin.map(|s| File::from(OwnedFd::from(s))),
        output: File::from(out_read),
        errors: Some(File::from(err_read)),
        terminal: None,
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
    let to_host: ToHost<S> = Arc::new(Mutex::new(stream.try_clone().map_err(Error::Dup)?));
    let Session {
        pid,
        exit,
        input,
        output,
        errors,
        terminal,
    } = session;
    let h = Arc::clone(&hangup);
    spawn_relay("shell-in", move || {
        relay_input(from_host, input, terminal, &h)
    })?;
    let (done_tx, done_rx) = mpsc::channel();
    let mut relays = 0;
    for (source, stderr) in [(Some(output), false), (errors, true)] {
        let Some(source) = source else { continue };
        let (h, to_host, done) = (Arc::clone(&hangup), Arc::clone(&to_host), done_tx.clone());
        spawn_relay("shell-out", move || {
            relay_output(source, &to_host, stderr, &h);
            let _ = done.send(());
        })?;
        relays += 1;
    }
    let status = loop {
        if let Some(exit) = exit.wait_timeout(Duration::from_secs(1)) {
            break shell_status(exit.status);
        }
        if hangup.overdue() {
            children::signal_group(pid, libc::SIGKILL);
        }
    };
    let drained = |relays: usize| (0..relays).all(|_| done_rx.recv_timeout(OUTPUT_GRACE).is_ok());
    if !drained(relays) {
        children::signal_group(pid, libc::SIGHUP);
        let _ = drained(relays);
    }
    hangup.ended.store(true, Ordering::SeqCst);
    send(&to_host, &ShellFrame::Exit(status));
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

/// Host → command: stdin bytes, end of input (closes a pipe session's stdin; a pty has no such
/// thing) and resizes. When the host's frames end, or it sends garbage, the relay waits for the
/// host to hang up completely, then ends the session.
fn relay_input<S: Duplex>(
    mut from_host: S,
    mut input: Option<File>,
    terminal: Option<File>,
    hangup: &Hangup,
) {
    let tty = terminal.is_some();
    loop {
        match read_shell_frame(&mut from_host) {
            Ok(Some(ShellFrame::Stdin(data))) => {
                let delivered = input.as_mut().is_some_and(|i| i.write_all(&data).is_ok());
                if !delivered && !tty {
                    // The command closed its stdin; later bytes have nowhere to go.
                    input = None;
                }
            }
            Ok(Some(ShellFrame::StdinEnd)) if !tty => input = None,
            Ok(Some(ShellFrame::Resize { rows, cols })) => {
                if let Some(t) = &terminal {
                    if let Err(e) = pty::resize(t, rows, cols) {
                        console::warn(&format!("shell session: {}", console::chain(&e)));
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                console::warn(&format!("shell session: {}", console::chain(&e)));
                break;
            }
        }
    }
    drop(input);
    vsock::wait_for_hangup(&from_host);
    hangup.hang_up();
}

/// Command → host as `Stdout` or `Stderr` frames, until the command's side closes (EOF on a
/// pipe, EIO on a pty master).
fn relay_output<S: Duplex>(mut source: File, to_host: &ToHost<S>, stderr: bool, hangup: &Hangup) {
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let data = buf[..n].to_vec();
        let frame = if stderr {
            ShellFrame::Stderr(data)
        } else {
            ShellFrame::Stdout(data)
        };
        if !send(to_host, &frame) {
            hangup.hang_up();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::{write_frame, write_stdin};
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

    /// What a session sent back: stdout, stderr, the exit status, and anything after it.
    #[derive(Debug, Default)]
    struct Outcome {
        stdout: String,
        stderr: String,
        exit: Option<i32>,
        after_exit: usize,
    }

    fn collect(host: &mut UnixStream) -> Outcome {
        let mut o = Outcome::default();
        loop {
            let frame = match read_shell_frame(host) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                // The guest closes with our unread input still queued: a reset, after its frames.
                Err(berth_protocol::Error::Io(e))
                    if o.exit.is_some() && e.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    break
                }
                Err(e) => panic!("reading the session: {e}; so far {o:?}"),
            };
            match frame {
                _ if o.exit.is_some() => o.after_exit += 1,
                ShellFrame::Stdout(d) => o.stdout.push_str(&String::from_utf8_lossy(&d)),
                ShellFrame::Stderr(d) => o.stderr.push_str(&String::from_utf8_lossy(&d)),
                ShellFrame::Exit(code) => o.exit = Some(code),
                other => panic!("the guest sent {other:?}"),
            }
        }
        o
    }

    /// A session served on its own thread, its request sent: the host's end and the server.
    fn open(req: &ShellRequest) -> (UnixStream, std::thread::JoinHandle<Result<(), Error>>) {
        children::start_test_reaper();
        let (mut host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let server = std::thread::spawn(move || serve(guest));
        write_frame(&mut host, req).unwrap();
        (host, server)
    }

    /// Runs a session over a UnixStream pair: sends `frames` (typically stdin, then its end),
    /// and collects what comes back until the guest closes.
    fn session(req: &ShellRequest, frames: &[ShellFrame]) -> (Outcome, Result<(), Error>) {
        let (mut host, server) = open(req);
        // Written beside the reading: a command echoing its input would fill both buffers.
        let mut w = host.try_clone().unwrap();
        let frames = frames.to_vec();
        let writer = std::thread::spawn(move || {
            // A session that ends early (a command that cannot start) closes before all is sent.
            for f in &frames {
                if write_shell_frame(&mut w, f).is_err() {
                    return;
                }
            }
        });
        let outcome = collect(&mut host);
        writer.join().unwrap();
        (outcome, server.join().unwrap())
    }

    fn input(bytes: &[u8]) -> Vec<ShellFrame> {
        vec![ShellFrame::Stdin(bytes.to_vec()), ShellFrame::StdinEnd]
    }

    #[test]
    fn pipe_mode_runs_the_command_and_reports_its_exit_status() {
        let (out, result) = session(&request(&["echo", "hi"], false), &input(b""));
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.exit, Some(0));
        assert_eq!(out.after_exit, 0);
        assert!(result.is_ok());
        let (out, _) = session(&request(&["sh", "-c", "exit 7"], false), &input(b""));
        assert_eq!(out.exit, Some(7));
        let (out, _) = session(&request(&["sh", "-c", "kill -9 $$"], false), &input(b""));
        assert_eq!(out.exit, Some(128 + 9));
    }

    #[test]
    fn pipe_mode_feeds_stdin_keeps_stderr_apart_and_sets_the_environment() {
        let script = "cat; echo \"err $TERM $HOME $(pwd)\" >&2";
        let (out, _) = session(
            &request(&["sh", "-c", script], false),
            &input(b"from host\n"),
        );
        assert_eq!(out.stdout, "from host\n");
        assert_eq!(out.stderr, "err dumb /root /\n");
        assert_eq!(out.exit, Some(0));
    }

    #[test]
    fn pipe_mode_moves_megabytes_both_ways_intact() {
        let data: String = (0..3_000_000u32)
            .map(|i| char::from(b'!' + (i % 94) as u8))
            .collect();
        let mut wire = Vec::new();
        write_stdin(&mut wire, data.as_bytes()).unwrap();
        let mut r = wire.as_slice();
        let mut frames = Vec::new();
        while let Some(f) = read_shell_frame(&mut r).unwrap() {
            frames.push(f);
        }
        assert!(frames.len() > 40, "stdin went in {} frames", frames.len());
        frames.push(ShellFrame::StdinEnd);
        let (out, _) = session(&request(&["cat"], false), &frames);
        assert_eq!(out.stdout.len(), data.len());
        assert!(out.stdout == data, "the bytes came back changed");
        assert_eq!(out.exit, Some(0));
    }

    #[test]
    fn pty_mode_has_a_terminal_of_the_requested_size() {
        let script = "stty size; tty; echo \"term=$TERM\"";
        let mut req = request(&["sh", "-c", script], true);
        req.term = "vt100".into();
        let (out, _) = session(&req, &[]);
        assert!(out.stdout.contains("33 101\r\n"), "{out:?}");
        assert!(out.stdout.contains("/dev/pts/"), "{out:?}");
        assert!(out.stdout.contains("term=vt100"), "{out:?}");
        assert_eq!(out.exit, Some(0));
    }

    #[test]
    fn pty_mode_follows_resizes() {
        let req = request(&["sh", "-c", "stty size; read line; stty size"], true);
        let (mut host, server) = open(&req);
        // Only once the first size is out: then the command waits for its line.
        let mut seen = String::new();
        while !seen.contains("33 101\r\n") {
            match read_shell_frame(&mut host).unwrap() {
                Some(ShellFrame::Stdout(d)) => seen.push_str(&String::from_utf8_lossy(&d)),
                other => panic!("{other:?} before the first size; output {seen:?}"),
            }
        }
        write_shell_frame(
            &mut host,
            &ShellFrame::Resize {
                rows: 40,
                cols: 120,
            },
        )
        .unwrap();
        write_shell_frame(&mut host, &ShellFrame::Stdin(b"go\r".to_vec())).unwrap();
        let out = collect(&mut host);
        assert!(out.stdout.ends_with("40 120\r\n"), "{out:?}");
        assert_eq!(out.exit, Some(0));
        assert!(server.join().unwrap().is_ok());
    }

    #[test]
    fn a_host_that_hangs_up_ends_the_session() {
        // Would run for a minute; reads no stdin, prints nothing.
        let (host, server) = open(&request(&["sleep", "60"], false));
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        drop(host);
        assert!(server.join().unwrap().is_ok());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_host_that_sends_garbage_ends_the_session() {
        let (mut host, server) = open(&request(&["sleep", "60"], false));
        host.write_all(&[42, 0, 0, 0, 0]).unwrap();
        host.shutdown(Shutdown::Both).unwrap();
        let started = Instant::now();
        assert!(server.join().unwrap().is_ok());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_command_that_cannot_start_is_reported_with_status_127() {
        let (out, result) = session(&request(&["/nonexistent/tool"], false), &input(b""));
        assert!(
            out.stderr
                .starts_with("berth-agent: start /nonexistent/tool: "),
            "{out:?}"
        );
        assert_eq!(out.exit, Some(EXIT_NOT_FOUND));
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

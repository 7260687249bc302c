//! `berth shell [-- CMD...]`: a shell (or one command) in the VM through the host proxy's
//! `POST /v1/shell` upgrade, with the local terminal in raw mode and its size followed when
//! stdin is one. stdout and stderr stay apart, and `berth shell` exits with the command's status.

use std::io::{Cursor, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::Layout;
use berth_protocol::{read_shell_frame, write_shell_frame, ShellFrame, ShellRequest, MAX_DATA};

use crate::host_proxy::{self, bounded};
use crate::terminal::{self, RawMode};

#[derive(clap::Args, Debug)]
pub struct ShellArgs {
    /// The command and its arguments (after `--`); a login shell when empty.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs the session; returns the command's exit status.
pub fn shell(args: &ShellArgs) -> anyhow::Result<i32> {
    let layout = Layout::from_env()?;
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (rows, cols) = terminal::size();
    let request = ShellRequest {
        command: args.command.clone(),
        tty,
        rows,
        cols,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
    };
    let session = connect(&layout, &request)?;
    let raw = if tty {
        RawMode::enable().context("cannot put the terminal in raw mode")?
    } else {
        None
    };
    let to_guest = Arc::new(Mutex::new(
        session
            .stream
            .try_clone()
            .context("cannot share the shell stream")?,
    ));
    forward_stdin(Arc::clone(&to_guest));
    if tty {
        forward_resizes(to_guest)?;
    }
    let result = print_output(session.output());
    drop(raw);
    result
}

/// A session in the VM after its `ShellRequest`: `ShellFrame`s both ways, blocking.
pub struct Session {
    pub stream: UnixStream,
    /// What the host proxy sent after its 101 and the HTTP layer had already read.
    buffered: Vec<u8>,
}

impl Session {
    /// What the guest sends, in order.
    pub fn output(self) -> impl Read {
        Cursor::new(self.buffered).chain(self.stream)
    }
}

/// Opens a session in the running VM through the host proxy's shell upgrade.
pub fn connect(layout: &Layout, request: &ShellRequest) -> anyhow::Result<Session> {
    if lock::probe(layout)? == Status::Stopped {
        bail!("Berth is not running (`berth start` first)");
    }
    let client = host_proxy::client(layout);
    let (mut stream, buffered) = host_proxy::runtime()?.block_on(async {
        let upgraded = bounded("cannot open a shell in the VM", client.shell()).await?;
        upgraded.into_std().context("cannot open a shell in the VM")
    })?;
    berth_protocol::write_frame(&mut stream, request)
        .context("cannot send the shell request to the VM")?;
    Ok(Session {
        stream,
        buffered: buffered.to_vec(),
    })
}

/// Runs `command` in the running VM without a terminal and with its stdin closed: read its
/// output and exit status from the session.
pub fn run(layout: &Layout, command: Vec<String>) -> anyhow::Result<Session> {
    let request = ShellRequest {
        command,
        tty: false,
        rows: 0,
        cols: 0,
        term: String::new(),
    };
    let mut session = connect(layout, &request)?;
    write_shell_frame(&mut session.stream, &ShellFrame::StdinEnd)
        .context("cannot close the command's stdin")?;
    Ok(session)
}

fn send(to_guest: &Mutex<UnixStream>, frame: &ShellFrame) -> bool {
    let mut s = to_guest.lock().unwrap_or_else(|p| p.into_inner());
    write_shell_frame(&mut *s, frame).is_ok()
}

/// Copies stdin to the guest, then says it ended. Not joined: at the end of the session it may
/// still be blocked reading the terminal.
fn forward_stdin(to_guest: Arc<Mutex<UnixStream>>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; MAX_DATA];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
                Ok(n) => {
                    if !send(&to_guest, &ShellFrame::Stdin(buf[..n].to_vec())) {
                        return;
                    }
                }
            }
        }
        send(&to_guest, &ShellFrame::StdinEnd);
    });
}

/// Sends the terminal's size to the guest each time it changes (SIGWINCH).
fn forward_resizes(to_guest: Arc<Mutex<UnixStream>>) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGWINCH])
        .context("cannot watch the terminal's size")?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            let (rows, cols) = terminal::size();
            if !send(&to_guest, &ShellFrame::Resize { rows, cols }) {
                return;
            }
        }
    });
    Ok(())
}

/// Writes the session's stdout and stderr where they belong until its exit status arrives.
pub fn print_output(mut from_guest: impl Read) -> anyhow::Result<i32> {
    let mut stdout = std::io::stdout().lock();
    loop {
        let frame = read_shell_frame(&mut from_guest).context("shell session")?;
        match frame {
            Some(ShellFrame::Stdout(data)) => {
                stdout.write_all(&data)?;
                stdout.flush()?;
            }
            Some(ShellFrame::Stderr(data)) => {
                stdout.flush()?;
                let mut stderr = std::io::stderr().lock();
                stderr.write_all(&data)?;
                stderr.flush()?;
            }
            Some(ShellFrame::Exit(code)) => return Ok(code),
            Some(other) => bail!("shell session: the guest sent {other:?}"),
            None => bail!("the shell session ended without an exit status (did the VM stop?)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_sends(frames: &[ShellFrame]) -> anyhow::Result<i32> {
        let (host, mut guest) = UnixStream::pair().unwrap();
        for f in frames {
            write_shell_frame(&mut guest, f).unwrap();
        }
        drop(guest);
        print_output(host)
    }

    #[test]
    fn the_session_ends_with_the_commands_exit_status() {
        let frames = [
            ShellFrame::Stdout(b"out\n".to_vec()),
            ShellFrame::Stderr(b"err\n".to_vec()),
            ShellFrame::Exit(3),
        ];
        assert_eq!(guest_sends(&frames).unwrap(), 3);
    }

    #[test]
    fn a_session_cut_off_before_its_exit_status_is_an_error() {
        let err = guest_sends(&[ShellFrame::Stdout(b"partial".to_vec())]).unwrap_err();
        assert!(err.to_string().contains("without an exit status"), "{err}");
        let err = guest_sends(&[ShellFrame::StdinEnd]).unwrap_err();
        assert!(err.to_string().contains("the guest sent"), "{err}");
    }
}

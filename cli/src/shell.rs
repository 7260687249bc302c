//! `berth shell [-- CMD...]`: a shell (or one command) in the VM over the guest's shell port,
//! with the local terminal in raw mode when stdin is one.
//!
//! The protocol has no exit-status frame yet, so `berth shell` exits 0 whenever the session
//! ends normally, whatever the remote command returned.

use std::io::{IsTerminal, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context};
use berth_host_proxy::lock::{self, Status};
use berth_host_proxy::{control, Layout};
use berth_protocol::ShellRequest;

use crate::lifecycle::{runtime, CONTROL_TIMEOUT};
use crate::terminal::{self, RawMode};

#[derive(clap::Args, Debug)]
pub struct ShellArgs {
    /// The command and its arguments (after `--`); a login shell when empty.
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn shell(args: &ShellArgs) -> anyhow::Result<()> {
    let layout = Layout::from_env()?;
    if lock::probe(&layout)? == Status::Stopped {
        bail!("Berth is not running (`berth start` first)");
    }
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let (rows, cols) = terminal::size();
    let request = ShellRequest {
        command: args.command.clone(),
        tty,
        rows,
        cols,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
    };
    let stream = runtime()?.block_on(async {
        let stream = control::open_shell(&layout.vsock_socket(), &request, CONTROL_TIMEOUT)
            .await
            .context("cannot reach the guest's shell service")?;
        let stream = stream
            .into_std()
            .context("cannot take over the shell stream")?;
        stream
            .set_nonblocking(false)
            .context("cannot take over the shell stream")?;
        anyhow::Ok(stream)
    })?;
    let raw = if tty {
        RawMode::enable().context("cannot put the terminal in raw mode")?
    } else {
        None
    };
    let result = relay(stream);
    drop(raw);
    result
}

/// Copies stdin to the guest (half-closing at EOF) and the guest to stdout until it closes.
fn relay(stream: UnixStream) -> anyhow::Result<()> {
    let mut to_guest = stream
        .try_clone()
        .context("cannot share the shell stream")?;
    // Not joined: at the end of the session it may still be blocked reading the terminal.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_guest.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = to_guest.shutdown(Shutdown::Write);
    });
    let mut from_guest = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from_guest.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context("shell connection"),
        };
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
}

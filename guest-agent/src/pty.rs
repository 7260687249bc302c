//! Pseudo-terminals for shell sessions: a master/slave pair of the requested size, opened
//! close-on-exec (other sessions must not inherit it), and the `pre_exec` steps that give a
//! child a session of its own, with the pty as its controlling terminal.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open /dev/ptmx")]
    OpenMaster(#[source] std::io::Error),
    #[error("unlock the pty")]
    Unlock(#[source] std::io::Error),
    #[error("open the pty's terminal side")]
    OpenSlave(#[source] std::io::Error),
    #[error("set the pty's window size")]
    WindowSize(#[source] std::io::Error),
}

/// A pseudo-terminal pair.
#[derive(Debug)]
pub struct Pty {
    /// The agent's side.
    pub master: OwnedFd,
    /// The session's terminal (its stdin, stdout and stderr).
    pub slave: OwnedFd,
}

/// Opens a pty of `rows` × `cols` (24 × 80 when either is 0).
pub fn open(rows: u16, cols: u16) -> Result<Pty, Error> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: posix_openpt takes flags only; the result is checked.
    let raw = unsafe { libc::posix_openpt(flags) };
    if raw < 0 {
        return Err(Error::OpenMaster(std::io::Error::last_os_error()));
    }
    // SAFETY: posix_openpt just returned this descriptor and nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: unlockpt on the master descriptor owned right here.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(Error::Unlock(std::io::Error::last_os_error()));
    }
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor.
    let raw = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if raw < 0 {
        return Err(Error::OpenSlave(std::io::Error::last_os_error()));
    }
    // SAFETY: the ioctl just returned this descriptor and nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(raw) };
    resize(&master, rows, cols)?;
    Ok(Pty { master, slave })
}

/// Sets the terminal size of the pty whose master is `master` (24 × 80 when either is 0); the
/// session's foreground process group gets SIGWINCH.
pub fn resize(master: &impl AsRawFd, rows: u16, cols: u16) -> Result<(), Error> {
    let (rows, cols) = if rows == 0 || cols == 0 {
        (24, 80)
    } else {
        (rows, cols)
    };
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which `size` is, for the duration of the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(Error::WindowSize(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the child a session leader (its own process group, so the whole session can be
/// signalled) and, with `controlling_tty`, makes its stdin (the pty) its controlling terminal.
pub fn new_session(cmd: &mut Command, controlling_tty: bool) {
    let hook = move || {
        // SAFETY: setsid and ioctl are async-signal-safe; the child is single-threaded here.
        unsafe {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls async-signal-safe functions and allocates nothing.
    unsafe { cmd.pre_exec(hook) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_has_the_requested_size() {
        let pty = open(33, 101).unwrap();
        // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: `size` is a writable winsize for the call.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_row, size.ws_col), (33, 101));
        let pty = open(0, 0).unwrap();
        // SAFETY: as above.
        unsafe { libc::ioctl(pty.master.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!((size.ws_row, size.ws_col), (24, 80));
    }
}

//! PID 1's signals: blocked from the first instruction and read from a signalfd, so none is
//! lost during boot and the event loop can later wait on it beside other descriptors (epoll).
//!
//! Blocked signals are queued even for PID 1, which the kernel otherwise shields from
//! signals it has no handler for.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The signals the agent acts on.
const HANDLED: [libc::c_int; 7] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGPWR,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGHUP,
];

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("block signals")]
    Block(#[source] std::io::Error),
    #[error("create signalfd")]
    Create(#[source] std::io::Error),
    #[error("read signalfd")]
    Read(#[source] std::io::Error),
}

/// What a signal asks PID 1 to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGCHLD: collect exited children.
    Reap,
    /// SIGTERM, SIGINT (ctrl-alt-del), SIGPWR, SIGUSR2: clean power-off.
    PowerOff,
    /// SIGUSR1: clean reboot.
    Reboot,
    /// Anything else (SIGHUP: nothing to reload yet).
    Ignore,
}

/// Maps a signal number to the agent's reaction.
pub fn action_for(signo: libc::c_int) -> Action {
    match signo {
        libc::SIGCHLD => Action::Reap,
        libc::SIGTERM | libc::SIGINT | libc::SIGPWR | libc::SIGUSR2 => Action::PowerOff,
        libc::SIGUSR1 => Action::Reboot,
        _ => Action::Ignore,
    }
}

/// A signalfd for the handled signals.
#[derive(Debug)]
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks the handled signals for this (single) thread and opens a signalfd for them.
    /// Call it first in `main`, before any thread or child exists: children get an empty mask
    /// back from std's `Command`.
    pub fn block_and_open() -> Result<Signals, Error> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it right below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, writable sigset_t; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for sig in HANDLED {
                libc::sigaddset(&mut set, sig);
            }
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::Block(std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: `set` is initialised; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: signalfd just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    /// Blocks until a handled signal arrives and returns its number.
    pub fn wait(&self) -> Result<libc::c_int, Error> {
        loop {
            // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let len = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: `info` is a writable buffer of exactly `len` bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    len,
                )
            };
            if n == len as isize {
                return Ok(info.ssi_signo as libc::c_int);
            }
            let err = std::io::Error::last_os_error();
            if n < 0 && err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Read(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_actions() {
        assert_eq!(action_for(libc::SIGCHLD), Action::Reap);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGPWR, libc::SIGUSR2] {
            assert_eq!(action_for(sig), Action::PowerOff, "signal {sig}");
        }
        assert_eq!(action_for(libc::SIGUSR1), Action::Reboot);
        assert_eq!(action_for(libc::SIGHUP), Action::Ignore);
        assert!(HANDLED
            .iter()
            .all(|&s| s == libc::SIGHUP || action_for(s) != Action::Ignore));
    }
}

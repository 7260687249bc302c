//! Collecting exited children. As PID 1 the agent inherits every orphan in the guest and must
//! wait for each, or zombies pile up. Exits are handed to a callback so that the service
//! supervisor (containerd, dockerd) can claim the ones that are its own.

use std::time::{Duration, Instant};

/// An exited child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub pid: libc::pid_t,
    /// The raw wait status (decode with `libc::WIFEXITED` and friends).
    pub status: libc::c_int,
}

/// Whether children remain after a `reap` pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remaining {
    /// Some children are still running.
    Some,
    /// The agent has no children at all.
    None,
}

/// Waits for every child that has exited, without blocking, calling `on_exit` for each.
pub fn reap(mut on_exit: impl FnMut(Exit)) -> Remaining {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable int; WNOHANG keeps the call from blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return Remaining::Some,
            p if p > 0 => on_exit(Exit { pid: p, status }),
            _ => {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // ECHILD: no children left.
                return Remaining::None;
            }
        }
    }
}

/// Reaps until no children are left or `timeout` passes; returns whether all are gone.
pub fn reap_until_none(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if reap(|_| {}) == Remaining::None {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The child is waited for by `reap`, which is what this test checks.
    #[allow(clippy::zombie_processes)]
    fn collects_an_exited_child_with_its_status() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.iter().any(|e: &Exit| e.pid == pid) && Instant::now() < deadline {
            reap(|e| seen.push(e));
            std::thread::sleep(Duration::from_millis(10));
        }
        let exit = seen.iter().find(|e| e.pid == pid).expect("child reaped");
        assert!(libc::WIFEXITED(exit.status));
        assert_eq!(libc::WEXITSTATUS(exit.status), 3);
    }
}

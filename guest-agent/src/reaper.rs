//! Collecting exited children. As PID 1 the agent inherits every orphan in the guest and must
//! wait for each, or zombies pile up. This is the agent's only `waitpid(-1)`: exits are handed
//! to a callback, `children::dispatch` in the agent, so that the supervisor and the shell
//! sessions get the ones that are their own.

use std::time::{Duration, Instant};

use crate::children;

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
        let spawning = children::spawn_guard();
        // SAFETY: `status` is a valid, writable int; WNOHANG keeps the call from blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        drop(spawning);
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

/// Reaps (handing exits to their owners) until no children are left or `timeout` passes;
/// returns whether all are gone.
pub fn reap_until_none(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if reap(children::dispatch) == Remaining::None {
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
    fn collects_an_exited_child_and_hands_it_to_its_owner() {
        // Registered like every child of the agent: other tests' children, reaped here or by
        // their test reaper, reach their owners the same way.
        let spawned =
            children::spawn(std::process::Command::new("sh").args(["-c", "exit 3"])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let exit = loop {
            reap(children::dispatch);
            if let Some(exit) = spawned.exit.wait_timeout(Duration::from_millis(10)) {
                break exit;
            }
            assert!(Instant::now() < deadline, "child not reaped");
        };
        assert_eq!(exit.pid, spawned.pid);
        assert!(libc::WIFEXITED(exit.status));
        assert_eq!(libc::WEXITSTATUS(exit.status), 3);
    }
}

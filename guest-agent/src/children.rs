//! The one registry of the agent's own children (supervised daemons, shell sessions): who
//! started which PID and wants its exit status.
//!
//! PID 1 collects every exit with `waitpid(-1)` (the reaper) and hands each to `dispatch`, which
//! forwards it to the owner that registered the PID. Nothing else in the agent may wait for a
//! child, or the two waits would race for the same status. A child is registered under the
//! registry's lock from before fork until its PID is recorded, and `dispatch` takes the same
//! lock, so an exit that the reaper collects in between is still delivered.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{ChildStdin, Command};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::reaper::Exit;

/// PID → where its exit goes.
static OWNERS: Mutex<BTreeMap<libc::pid_t, Sender<Exit>>> = Mutex::new(BTreeMap::new());
/// Held across each `Command::spawn` and each of the reaper's waits. When exec fails, std
/// waits for the failed child itself inside `spawn`; had the reaper collected it first, that
/// wait would find no child and std would panic — in PID 1, a dead VM (seen in tests with
/// `berth shell -- /nonexistent/tool`).
static SPAWNING: Mutex<()> = Mutex::new(());

/// Keeps the reaper from waiting while a child is being started (see `SPAWNING`).
pub fn spawn_guard() -> MutexGuard<'static, ()> {
    SPAWNING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("start {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("create a pipe")]
    Pipe(#[source] std::io::Error),
}

/// A registered child. Its exit arrives through `exit`; there is deliberately no `wait`.
#[derive(Debug)]
pub struct Spawned {
    pub pid: libc::pid_t,
    /// The child's stdin when it was `Stdio::piped()`.
    pub stdin: Option<ChildStdin>,
    pub exit: ExitWatch,
}

/// The receiving end for one child's exit.
#[derive(Debug)]
pub struct ExitWatch {
    rx: Receiver<Exit>,
}

impl ExitWatch {
    /// Blocks until the child has exited; `None` only if the registry dropped it (never).
    pub fn wait(&self) -> Option<Exit> {
        self.rx.recv().ok()
    }

    /// Waits at most `timeout`; `None` while the child still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Exit> {
        self.rx.recv_timeout(timeout).ok()
    }
}

fn owners() -> MutexGuard<'static, BTreeMap<libc::pid_t, Sender<Exit>>> {
    // A panic while holding the lock leaves a consistent map: insert and remove are atomic.
    OWNERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts `cmd` and registers its PID. std resets the signal mask in the child, so it does not
/// inherit the signals PID 1 blocks for its signalfd.
pub fn spawn(cmd: &mut Command) -> Result<Spawned, Error> {
    let spawning = spawn_guard();
    let mut owners = owners();
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Spawn(cmd.get_program().to_string_lossy().into_owned(), e))?;
    drop(spawning);
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    owners.insert(pid, tx);
    drop(owners);
    // Dropping a std Child neither waits for nor kills it; its stdin is taken first.
    Ok(Spawned {
        pid,
        stdin: child.stdin.take(),
        exit: ExitWatch { rx },
    })
}

/// Hands a collected exit to the child's owner; exits of orphans nobody registered are dropped.
pub fn dispatch(exit: Exit) {
    if let Some(owner) = owners().remove(&exit.pid) {
        // The owner may have given up on the child (a closed session): nothing to do then.
        let _ = owner.send(exit);
    }
}

/// A close-on-exec pipe: `(read end, write end)`.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Error> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2(2) requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Pipe(std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just returned these two descriptors and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How a wait status reads in a console line and an event: `exit status 1` or `killed by
/// signal 9`.
pub fn describe(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Sends `sig` to the process group `pgid` (a session leader's PID).
pub fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill(2) with a negative PID only signals that process group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Raises the agent's open-file limit to the kernel's ceiling (`fs.nr_open`), for the many
/// connections it relays and for the daemons and containers, which inherit it.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let limit = libc::rlimit {
        rlim_cur: ceiling,
        rlim_max: ceiling,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ceiling)
}

/// Test support: a background reaper that stands in for PID 1's signal loop, so that tests
/// which start children through the registry see their exits.
#[cfg(test)]
pub fn start_test_reaper() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| loop {
            crate::reaper::reap(dispatch);
            std::thread::sleep(Duration::from_millis(5));
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reaches_the_owner_that_spawned_the_child() {
        start_test_reaper();
        let spawned = spawn(Command::new("sh").args(["-c", "exit 7"])).unwrap();
        let exit = spawned
            .exit
            .wait_timeout(Duration::from_secs(10))
            .expect("exit delivered");
        assert_eq!(exit.pid, spawned.pid);
        assert_eq!(describe(exit.status), "exit status 7");
    }

    #[test]
    fn a_killed_child_is_described_by_its_signal() {
        start_test_reaper();
        let spawned = spawn(Command::new("sleep").arg("30")).unwrap();
        // SAFETY: signals only the child just started.
        unsafe { libc::kill(spawned.pid, libc::SIGKILL) };
        let exit = spawned.exit.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(describe(exit.status), "killed by signal 9");
    }

    #[test]
    fn unknown_exits_are_dropped_and_missing_programs_are_errors() {
        dispatch(Exit {
            pid: 999_999_999,
            status: 0,
        });
        let err = spawn(&mut Command::new("/nonexistent/berth-daemon")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/berth-daemon"));
    }
}

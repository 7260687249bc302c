//! One Berth instance per home: an exclusive `flock` on `run/berth.lock`, held by the host proxy
//! for its lifetime, plus `run/berth.pid`. The kernel drops the lock when the holder dies, so a
//! crash leaves nothing to clean by hand: whoever finds the lock free removes the stale files.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use crate::layout::Layout;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Berth is already running{}", .pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { pid: Option<u32> },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    WritePid {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while this process is the instance; dropping it releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Takes the lock, retrying for up to `wait` (a `berth status` probing it holds it shared
    /// for an instant).
    pub fn acquire(layout: &Layout, wait: Duration) -> Result<Self, Error> {
        let path = layout.lock_file();
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| Error::Open {
                path: path.clone(),
                source,
            })?;
        let deadline = Instant::now() + wait;
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(InstanceLock { _file: file }),
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(Error::Held {
                        pid: read_pid(&layout.pid_file()),
                    })
                }
                Err(e) => {
                    return Err(Error::Lock {
                        path,
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// Records the holder's pid in `run/berth.pid`.
    pub fn write_pid(&self, layout: &Layout, pid: u32) -> Result<(), Error> {
        let path = layout.pid_file();
        crate::layout::write_atomic(&path, format!("{pid}\n").as_bytes())
            .map_err(|source| Error::WritePid { path, source })
    }
}

/// What `probe` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The lock is held; `pid` is the host proxy's (`None` for an instant while it starts).
    Running {
        pid: Option<u32>,
    },
    Stopped,
}

/// Is an instance running in `layout`? When not, files a crashed one left (pid, state, its
/// sockets) are removed.
pub fn probe(layout: &Layout) -> Result<Status, Error> {
    let path = layout.lock_file();
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            remove_stale(layout);
            return Ok(Status::Stopped);
        }
        Err(source) => return Err(Error::Open { path, source }),
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            // Nobody can take the exclusive lock while we hold this one: safe to clean up.
            remove_stale(layout);
            Ok(Status::Stopped)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(Status::Running {
            pid: read_pid(&layout.pid_file()),
        }),
        Err(e) => Err(Error::Lock {
            path,
            source: e.into(),
        }),
    }
}

fn remove_stale(layout: &Layout) {
    for path in [
        layout.pid_file(),
        layout.docker_socket(),
        layout.control_socket(),
        layout.vsock_socket(),
        layout.vmm_api_socket(),
    ] {
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!("removed stale {}", path.display());
        }
    }
}

/// The pid in a pid file, if it holds one.
pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        layout.create_dirs().unwrap();
        (dir, layout)
    }

    #[test]
    fn a_second_instance_is_refused_while_the_first_holds_the_lock() {
        let (_dir, layout) = layout();
        let first = InstanceLock::acquire(&layout, Duration::ZERO).unwrap();
        first.write_pid(&layout, 4242).unwrap();
        assert_eq!(probe(&layout).unwrap(), Status::Running { pid: Some(4242) });
        let err = InstanceLock::acquire(&layout, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, Error::Held { pid: Some(4242) }), "{err}");
        assert_eq!(err.to_string(), "Berth is already running (pid 4242)");
        drop(first);
        assert!(InstanceLock::acquire(&layout, Duration::ZERO).is_ok());
    }

    #[test]
    fn stale_files_of_a_crashed_instance_are_recovered() {
        let (_dir, layout) = layout();
        // What a SIGKILLed host proxy leaves: the lock file, no holder, and its files.
        std::fs::write(layout.lock_file(), b"").unwrap();
        std::fs::write(layout.pid_file(), b"999999\n").unwrap();
        std::os::unix::net::UnixListener::bind(layout.docker_socket()).unwrap();
        std::os::unix::net::UnixListener::bind(layout.control_socket()).unwrap();
        assert_eq!(probe(&layout).unwrap(), Status::Stopped);
        assert!(!layout.pid_file().exists());
        assert!(!layout.docker_socket().exists());
        assert!(!layout.control_socket().exists());
        let lock = InstanceLock::acquire(&layout, Duration::ZERO).unwrap();
        lock.write_pid(&layout, 7).unwrap();
        assert_eq!(read_pid(&layout.pid_file()), Some(7));
    }

    #[test]
    fn a_probe_in_progress_only_delays_the_instance() {
        let (_dir, layout) = layout();
        std::fs::write(layout.lock_file(), b"").unwrap();
        let prober = File::open(layout.lock_file()).unwrap();
        flock(&prober, FlockOperation::NonBlockingLockShared).unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            drop(prober);
        });
        assert!(InstanceLock::acquire(&layout, Duration::from_secs(5)).is_ok());
        releaser.join().unwrap();
    }

    #[test]
    fn no_lock_file_means_stopped() {
        let (_dir, layout) = layout();
        assert_eq!(probe(&layout).unwrap(), Status::Stopped);
    }
}

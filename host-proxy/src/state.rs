//! `run/state.json`: what the running host proxy tells `berth status` (pids, start time,
//! sockets, the settings the VM was started with).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::settings::VmSettings;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a Berth state file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The host proxy's pid.
    pub pid: u32,
    pub vmm_pid: Option<u32>,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub docker_socket: PathBuf,
    pub vsock_socket: PathBuf,
    pub settings: VmSettings,
    pub version: String,
}

impl State {
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let mut json = serde_json::to_vec_pretty(self).map_err(|e| Error::Write {
            path: path.into(),
            source: e.into(),
        })?;
        json.push(b'\n');
        write_atomic(path, &json).map_err(|source| Error::Write {
            path: path.into(),
            source,
        })
    }

    /// `Ok(None)` when there is no state file (not running, or starting).
    pub fn read(path: &Path) -> Result<Option<State>, Error> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Parse {
                path: path.into(),
                source,
            })
    }
}

/// Replaces `path` with `bytes` so that readers see the old or the new content, never half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(State::read(&path).unwrap(), None);
        let state = State {
            pid: 10,
            vmm_pid: Some(11),
            started_at: 1_700_000_000,
            docker_socket: "/x/run/docker.sock".into(),
            vsock_socket: "/x/run/vsock.sock".into(),
            settings: VmSettings {
                vmm: "/bin/vmm".into(),
                kernel: "/k".into(),
                rootfs: "/r".into(),
                cpus: 2,
                memory_mib: 2048,
                disk_size_gib: 64,
                cmdline_extra: String::new(),
            },
            version: "0.1.0".into(),
        };
        state.write(&path).unwrap();
        assert_eq!(State::read(&path).unwrap(), Some(state));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(State::read(&path), Err(Error::Parse { .. })));
    }
}

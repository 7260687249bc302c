//! Where Berth keeps its files: `~/.berth` (or `$BERTH_HOME`) with `run/`, `logs/` and the data disk.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that moves Berth's home (tests use it).
pub const HOME_ENV: &str = "BERTH_HOME";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot find the home directory: set {HOME_ENV}")]
    NoHome,
    #[error("cannot create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The paths of one Berth instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    home: PathBuf,
}

impl Layout {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Layout { home: home.into() }
    }

    /// `$BERTH_HOME`, else `~/.berth`.
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var_os(HOME_ENV) {
            Some(home) if !home.is_empty() => Ok(Layout::new(home)),
            _ => dirs::home_dir()
                .map(|home| Layout::new(home.join(".berth")))
                .ok_or(Error::NoHome),
        }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }
    pub fn run_dir(&self) -> PathBuf {
        self.home.join("run")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.home.join("logs")
    }
    /// The guest's data disk (`/var/lib/docker` lives there).
    pub fn data_disk(&self) -> PathBuf {
        self.home.join("data.img")
    }
    pub fn docker_socket(&self) -> PathBuf {
        self.run_dir().join("docker.sock")
    }
    pub fn vsock_socket(&self) -> PathBuf {
        self.run_dir().join("vsock.sock")
    }
    /// The control API (`host-proxy/API.md`).
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("berth.sock")
    }
    /// The VMM's API socket, for the host proxy only.
    pub fn vmm_api_socket(&self) -> PathBuf {
        self.run_dir().join("vmm.sock")
    }
    /// The machine description the VMM boots (`berth-vmm --config run/vm.json`).
    pub fn vm_config(&self) -> PathBuf {
        self.run_dir().join("vm.json")
    }
    /// passt's directory: its socket is created there (by passt's own user when it drops root).
    pub fn passt_dir(&self) -> PathBuf {
        self.run_dir().join("passt")
    }
    /// The VM's network backend: passt listens here, the VMM's net device connects.
    pub fn passt_socket(&self) -> PathBuf {
        self.passt_dir().join(crate::passt::SOCKET_NAME)
    }
    pub fn lock_file(&self) -> PathBuf {
        self.run_dir().join("berth.lock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir().join("berth.pid")
    }
    /// The VMM's serial console: kernel and agent output.
    pub fn console_log(&self) -> PathBuf {
        self.logs_dir().join("console.log")
    }
    /// passt's output, appended to across its restarts.
    pub fn passt_log(&self) -> PathBuf {
        self.logs_dir().join("passt.log")
    }
    pub fn host_proxy_log(&self) -> PathBuf {
        self.logs_dir().join("host-proxy.log")
    }

    /// Creates `home`, `run/` (owner only: it holds the Docker socket) and `logs/`.
    pub fn create_dirs(&self) -> Result<(), Error> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [self.home.clone(), self.run_dir(), self.logs_dir()] {
            builder.create(&dir).map_err(|source| Error::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        // An older run dir may have looser permissions; the socket inside must not be reachable.
        let run = self.run_dir();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| Error::CreateDir { path: run, source })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_dir_is_private_even_if_it_existed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("b"));
        std::fs::create_dir_all(layout.run_dir()).unwrap();
        std::fs::set_permissions(layout.run_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        layout.create_dirs().unwrap();
        let mode = std::fs::metadata(layout.run_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(layout.logs_dir().is_dir());
        assert_eq!(layout.docker_socket(), dir.path().join("b/run/docker.sock"));
    }
}

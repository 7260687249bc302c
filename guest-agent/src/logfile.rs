//! Size-rotated log files for the supervised daemons (`/var/log/berth/dockerd.log`): when the
//! next write would pass the limit, the file becomes `<name>.1` (replacing the older one) and a
//! new file starts, so a chatty daemon never fills the data disk.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Rotation limit of the daemons' logs.
pub const MAX_BYTES: u64 = 10 << 20;

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("rotate {0}")]
    Rotate(PathBuf, #[source] std::io::Error),
    #[error("write {0}: the log is closed (the guest is shutting down)")]
    Closed(PathBuf),
}

/// An append-only log file with one rotated predecessor.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    /// `None` once closed for shutdown: an open file keeps the data disk from unmounting.
    file: Option<File>,
    size: u64,
}

impl RotatingLog {
    /// Opens `path` for appending (creating it), continuing its current size.
    pub fn open(path: &Path, max_bytes: u64) -> Result<RotatingLog, Error> {
        let file = open_append(path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingLog {
            path: path.to_path_buf(),
            max_bytes,
            file: Some(file),
            size,
        })
    }

    /// The rotated predecessor of `path`: `path` with `.1` appended.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Appends `data`, rotating first if it would take a non-empty file past the limit.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        // A closed log is never rotated: rotating would open the file again.
        if self.file.is_some() && self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(Error::Closed(self.path.clone()));
        };
        file.write_all(data)
            .map_err(|e| Error::Write(self.path.clone(), e))?;
        self.size += data.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), Error> {
        std::fs::rename(&self.path, Self::rotated_path(&self.path))
            .map_err(|e| Error::Rotate(self.path.clone(), e))?;
        self.file = Some(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }

    /// Closes the file for good (at shutdown, so its filesystem can be unmounted); later
    /// writes fail with `Closed`.
    pub fn close(&mut self) {
        self.file = None;
    }
}

fn open_append(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::Open(path.to_path_buf(), e))
}

/// Copies everything `source` yields into `log` until end of file, then returns. Write errors
/// (a full disk) drop that chunk but keep draining, so the daemon never blocks on its output.
pub fn pump(mut source: impl Read, log: &std::sync::Mutex<RotatingLog>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = log.write(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_log_lets_go_of_its_file_and_refuses_writes() {
        let dir = temp_dir("closed");
        let path = dir.join("d.log");
        let mut log = RotatingLog::open(&path, 1 << 20).unwrap();
        log.write(b"before\n").unwrap();
        let holds_it = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .any(|target| target == path)
        };
        assert!(holds_it());
        log.close();
        assert!(!holds_it(), "the closed log still holds {}", path.display());
        assert!(matches!(log.write(b"after\n"), Err(Error::Closed(_))));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "before\n");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("berth-agent-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rotates_at_the_limit_and_keeps_one_old_file() {
        let dir = temp_dir("rotate");
        let path = dir.join("dockerd.log");
        let mut log = RotatingLog::open(&path, 10).unwrap();
        log.write(b"aaaa\n").unwrap();
        log.write(b"bbbb\n").unwrap(); // exactly 10: no rotation yet
        assert_eq!(std::fs::read(&path).unwrap(), b"aaaa\nbbbb\n");
        log.write(b"cc\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"cc\n");
        let old = RotatingLog::rotated_path(&path);
        assert_eq!(old, dir.join("dockerd.log.1"));
        assert_eq!(std::fs::read(&old).unwrap(), b"aaaa\nbbbb\n");
        log.write(b"dddddddd\n").unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"cc\n", "older file replaced");
        assert_eq!(std::fs::read(&path).unwrap(), b"dddddddd\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reopening_continues_the_size_and_oversized_chunks_are_kept_whole() {
        let dir = temp_dir("reopen");
        let path = dir.join("containerd.log");
        RotatingLog::open(&path, 8)
            .unwrap()
            .write(b"12345")
            .unwrap();
        let mut log = RotatingLog::open(&path, 8).unwrap();
        log.write(b"6789").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"6789");
        log.write(b"a chunk longer than the limit").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"a chunk longer than the limit"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pump_copies_until_end_of_file() {
        let dir = temp_dir("pump");
        let path = dir.join("x.log");
        let log = std::sync::Mutex::new(RotatingLog::open(&path, MAX_BYTES).unwrap());
        pump(&b"line one\nline two\n"[..], &log);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "line one\nline two\n"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! The boot counter in `/var/lib/berth/boot-count`: one decimal number and a newline, bumped
//! once per boot with a crash-safe write (temporary file, fsync, rename, fsync of the folder).
//!
//! A missing file means "never booted with this disk" (this boot is 1). A file that does not
//! hold a number cannot come from our own writes (they are atomic), so something else wrote it:
//! the count restarts at 1 with a warning rather than stopping the boot over a statistic.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// File name of the counter inside the data disk's root.
pub const FILE_NAME: &str = "boot-count";

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("rename {0} into place")]
    Rename(PathBuf, #[source] std::io::Error),
    #[error("sync folder {0}")]
    SyncDir(PathBuf, #[source] std::io::Error),
}

/// The outcome of `bump`.
#[derive(Debug, PartialEq, Eq)]
pub struct Bumped {
    /// This boot's number, starting at 1.
    pub count: u64,
    /// Set when the old file was unreadable as a number and the count restarted.
    pub warning: Option<String>,
}

/// Reads the counter at `path`, adds one, and stores the result atomically.
pub fn bump(path: &Path) -> Result<Bumped, Error> {
    let (previous, warning) = match std::fs::read_to_string(path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(n) => (n, None),
            Err(_) => (
                0,
                Some(format!(
                    "{} held {:?}, not a boot count; restarting the count at 1",
                    path.display(),
                    text.chars().take(32).collect::<String>()
                )),
            ),
        },
        Err(e) if e.kind() == ErrorKind::NotFound => (0, None),
        Err(e) => return Err(Error::Read(path.to_path_buf(), e)),
    };
    let count = previous.saturating_add(1);
    write_atomic(path, format!("{count}\n").as_bytes())?;
    Ok(Bumped { count, warning })
}

/// Replaces `path` with `contents` so that after a crash the file holds either the old or the
/// new contents, never a mix or nothing.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let write = |tmp: &Path| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    };
    write(&tmp).map_err(|e| Error::Write(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Rename(path.to_path_buf(), e))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::SyncDir(dir.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("berth-agent-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn missing_file_starts_at_one_then_counts_up() {
        let dir = TempDir::new("count");
        let path = dir.0.join(FILE_NAME);
        assert_eq!(
            bump(&path).unwrap(),
            Bumped {
                count: 1,
                warning: None
            }
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        assert_eq!(bump(&path).unwrap().count, 2);
        assert_eq!(bump(&path).unwrap().count, 3);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3\n");
        assert_eq!(
            names(&dir.0),
            vec![FILE_NAME.to_string()],
            "no temporary file left behind"
        );
    }

    #[test]
    fn accepts_hand_written_value_without_newline() {
        let dir = TempDir::new("handwritten");
        let path = dir.0.join(FILE_NAME);
        std::fs::write(&path, " 41 ").unwrap();
        assert_eq!(
            bump(&path).unwrap(),
            Bumped {
                count: 42,
                warning: None
            }
        );
    }

    #[test]
    fn corrupt_file_restarts_at_one_with_a_warning() {
        let dir = TempDir::new("corrupt");
        let path = dir.0.join(FILE_NAME);
        for junk in [
            "",
            "abc\n",
            "-3\n",
            "\u{0}\u{0}\u{0}",
            "99999999999999999999999",
        ] {
            std::fs::write(&path, junk).unwrap();
            let b = bump(&path).unwrap();
            assert_eq!(b.count, 1, "for {junk:?}");
            let warning = b.warning.expect("a corrupt counter is reported");
            assert!(warning.contains("restarting the count at 1"), "{warning}");
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        }
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let dir = TempDir::new("max");
        let path = dir.0.join(FILE_NAME);
        std::fs::write(&path, format!("{}\n", u64::MAX)).unwrap();
        assert_eq!(bump(&path).unwrap().count, u64::MAX);
    }

    #[test]
    fn stale_temporary_file_from_a_crash_is_replaced() {
        let dir = TempDir::new("stale");
        let path = dir.0.join(FILE_NAME);
        std::fs::write(&path, "7\n").unwrap();
        std::fs::write(dir.0.join("boot-count.tmp"), "garbage that is much longer").unwrap();
        assert_eq!(bump(&path).unwrap().count, 8);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "8\n");
        assert_eq!(names(&dir.0), vec![FILE_NAME.to_string()]);
    }

    #[test]
    fn unreadable_counter_is_an_error_not_a_reset() {
        let dir = TempDir::new("isdir");
        let path = dir.0.join(FILE_NAME);
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(bump(&path), Err(Error::Read(..))));
    }
}

//! Host file events reproduced in the guest: each `FileEvent` the host sends becomes one line
//! written to the guest kernel's `/proc/berth-notify` (Berth's `berth_notify` driver), which
//! raises the inotify events a local change would have. Only paths inside a share are accepted.
//!
//! The line format is the driver's: `KIND PATH\n`, or `rename OLD\tNEW\n`, where a backslash, a
//! tab and a newline in a path are written `\\`, `\t` and `\n`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use berth_protocol::cmdline::{GuestShare, SHARE_PARAM};
use berth_protocol::files::{FileEvent, FileEventKind};

use crate::console;

/// The driver's file.
pub const PROC_PATH: &str = "/proc/berth-notify";
/// At most one failure line per this long (the host, and so a guest process writing files, can
/// cause failures at any rate).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The share paths named on a kernel command line (`berth.share=TAG,MODE,PATH`); malformed
/// entries are skipped (the mount code reports them).
pub fn shares_from_cmdline(cmdline: &str) -> Vec<PathBuf> {
    let prefix = format!("{SHARE_PARAM}=");
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(&prefix))
        .filter_map(|value| GuestShare::parse(value).ok())
        .map(|share| share.path)
        .collect()
}

/// Whether `path` is absolute, has no `..` and lies inside (or is) one of `shares`.
pub fn inside_shares(path: &Path, shares: &[PathBuf]) -> bool {
    path.is_absolute()
        && !path.components().any(|c| c == Component::ParentDir)
        && shares.iter().any(|share| path.starts_with(share))
}

/// The driver's line for `event` (with its newline).
pub fn proc_line(event: &FileEvent) -> Vec<u8> {
    let (word, from) = match &event.kind {
        FileEventKind::Create => ("create", None),
        FileEventKind::Mkdir => ("mkdir", None),
        FileEventKind::Modify => ("modify", None),
        FileEventKind::Attrib => ("attrib", None),
        FileEventKind::Delete => ("delete", None),
        FileEventKind::Rmdir => ("rmdir", None),
        FileEventKind::Rename { from } => ("rename", Some(from)),
    };
    let mut line = Vec::with_capacity(word.len() + 2 + event.path.as_os_str().len());
    line.extend_from_slice(word.as_bytes());
    line.push(b' ');
    if let Some(from) = from {
        escape_into(from, &mut line);
        line.push(b'\t');
    }
    escape_into(&event.path, &mut line);
    line.push(b'\n');
    line
}

fn escape_into(path: &Path, out: &mut Vec<u8>) {
    for &b in path.as_os_str().as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            _ => out.push(b),
        }
    }
}

/// How writing one line failed (logged, never returned: see `Notifier::raise`).
enum Failed {
    Open(std::io::Error),
    Write(std::io::Error),
}

/// Writes events to the driver's file.
pub struct Notifier {
    shares: Vec<PathBuf>,
    target: PathBuf,
    file: Option<File>,
    /// Failures since the last line logged, and when that was.
    failed: u64,
    last_log: Option<Instant>,
}

impl Notifier {
    /// A notifier writing to `target` (`PROC_PATH` in the agent) for paths inside `shares`.
    pub fn new(shares: Vec<PathBuf>, target: PathBuf) -> Notifier {
        Notifier {
            shares,
            target,
            file: None,
            failed: 0,
            last_log: None,
        }
    }

    /// Raises each event in turn; returns how many the driver took. Events outside the shares
    /// and events the driver refuses are counted and logged, rate-limited.
    pub fn raise(&mut self, events: &[FileEvent]) -> usize {
        let mut raised = 0;
        for event in events {
            let from_ok = match &event.kind {
                FileEventKind::Rename { from } => inside_shares(from, &self.shares),
                _ => true,
            };
            if !from_ok || !inside_shares(&event.path, &self.shares) {
                self.failure(|| format!("{} is outside every share", event.path.display()));
                continue;
            }
            match self.write(&proc_line(event)) {
                Ok(()) => raised += 1,
                // The host's change is already gone again (created and deleted within a
                // window): nothing to report, nothing wrong.
                Err(Failed::Write(e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(Failed::Write(e)) => {
                    let path = event.path.display().to_string();
                    self.failure(|| format!("raise the event for {path}: {e}"));
                }
                Err(Failed::Open(e)) => {
                    let target = self.target.display().to_string();
                    self.failure(|| format!("open {target} (a kernel without berth_notify?): {e}"));
                }
            }
        }
        raised
    }

    fn write(&mut self, line: &[u8]) -> Result<(), Failed> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(
                OpenOptions::new()
                    .append(true)
                    .open(&self.target)
                    .map_err(Failed::Open)?,
            ),
        };
        // One write(2) is one event to the driver.
        let written = file.write(line).map_err(Failed::Write)?;
        if written != line.len() {
            return Err(Failed::Write(std::io::Error::other(
                "the event line was cut short",
            )));
        }
        Ok(())
    }

    fn failure(&mut self, message: impl FnOnce() -> String) {
        self.failed += 1;
        let now = Instant::now();
        if self.last_log.is_some_and(|at| now - at < LOG_EVERY) {
            return;
        }
        let more = self.failed - 1;
        let tail = if more > 0 {
            format!(" ({more} more since the last report)")
        } else {
            String::new()
        };
        console::warn(&format!("host file events: {}{tail}", message()));
        self.failed = 0;
        self.last_log = Some(now);
    }
}

/// Raises `events` through the agent's notifier (shares from /proc/cmdline, `PROC_PATH`).
pub fn raise(events: &[FileEvent]) {
    static NOTIFIER: OnceLock<Mutex<Notifier>> = OnceLock::new();
    let notifier = NOTIFIER.get_or_init(|| {
        let cmdline = std::fs::read_to_string(crate::config::CMDLINE_PATH).unwrap_or_default();
        Mutex::new(Notifier::new(
            shares_from_cmdline(&cmdline),
            PathBuf::from(PROC_PATH),
        ))
    });
    // A panic mid-batch leaves at worst a half-open file handle, which `write` reopens.
    notifier
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .raise(events);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn event(kind: FileEventKind, path: &str) -> FileEvent {
        FileEvent {
            kind,
            path: path.into(),
        }
    }

    #[test]
    fn lines_escape_what_would_break_them() {
        assert_eq!(
            proc_line(&event(FileEventKind::Create, "/home/u/a b/c")),
            b"create /home/u/a b/c\n"
        );
        assert_eq!(
            proc_line(&event(FileEventKind::Modify, "/h/tab\there\nnl\\bs")),
            b"modify /h/tab\\there\\nnl\\\\bs\n"
        );
        let rename = FileEvent {
            kind: FileEventKind::Rename {
                from: "/h/old\tname".into(),
            },
            path: "/h/new name".into(),
        };
        assert_eq!(proc_line(&rename), b"rename /h/old\\tname\t/h/new name\n");
        // Non-UTF-8 bytes pass through as they are.
        let odd = FileEvent {
            kind: FileEventKind::Delete,
            path: PathBuf::from(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(
                b"/h/\xff",
            )),
        };
        assert_eq!(proc_line(&odd), b"delete /h/\xff\n");
        for (kind, word) in [
            (FileEventKind::Mkdir, "mkdir"),
            (FileEventKind::Attrib, "attrib"),
            (FileEventKind::Rmdir, "rmdir"),
        ] {
            assert_eq!(
                proc_line(&event(kind, "/x")),
                format!("{word} /x\n").as_bytes()
            );
        }
    }

    #[test]
    fn shares_come_from_the_command_line() {
        let shares = shares_from_cmdline(
            "console=ttyS0 berth.share=home,rw,/home/u%20x berth.share=bad berth.share=t,ro,/tmp",
        );
        assert_eq!(
            shares,
            vec![PathBuf::from("/home/u x"), PathBuf::from("/tmp")]
        );
    }

    #[test]
    fn only_paths_inside_a_share_are_accepted() {
        let shares = vec![PathBuf::from("/home/u")];
        assert!(inside_shares(Path::new("/home/u"), &shares));
        assert!(inside_shares(Path::new("/home/u/app/x"), &shares));
        assert!(!inside_shares(Path::new("/home/user2/x"), &shares));
        assert!(!inside_shares(
            Path::new("/home/u/../../etc/passwd"),
            &shares
        ));
        assert!(!inside_shares(Path::new("home/u/x"), &shares));
        assert!(!inside_shares(Path::new("/etc/passwd"), &shares));
    }

    #[test]
    fn events_are_written_one_line_each_and_outsiders_dropped() {
        let dir = std::env::temp_dir().join(format!("berth-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("proc");
        std::fs::write(&target, b"").unwrap();
        let mut notifier = Notifier::new(vec!["/home/u".into()], target.clone());
        let raised = notifier.raise(&[
            event(FileEventKind::Create, "/home/u/a"),
            event(FileEventKind::Modify, "/etc/shadow"),
            FileEvent {
                kind: FileEventKind::Rename {
                    from: "/etc/x".into(),
                },
                path: "/home/u/b".into(),
            },
            event(FileEventKind::Delete, "/home/u/a"),
        ]);
        assert_eq!(raised, 2);
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"create /home/u/a\ndelete /home/u/a\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_driver_is_a_logged_failure_not_a_panic() {
        let mut notifier =
            Notifier::new(vec!["/home/u".into()], "/nonexistent/berth-notify".into());
        assert_eq!(
            notifier.raise(&[event(FileEventKind::Create, "/home/u/a")]),
            0
        );
        assert_eq!(notifier.failed, 0, "the first failure is logged at once");
        assert_eq!(
            notifier.raise(&[event(FileEventKind::Create, "/home/u/a")]),
            0
        );
        assert_eq!(
            notifier.failed, 1,
            "the second is held back by the rate limit"
        );
    }
}

//! The guest's mount table: the early pseudo filesystems, a reader for
//! `/proc/self/mountinfo`, and unmounting everything at shutdown.
//!
//! Every mount is idempotent: a target that already carries the filesystem type is left alone,
//! so the agent can run over a root that something else (the kernel's devtmpfs automount, a
//! restarted agent) has partly set up.

use std::ffi::{CString, NulError};
use std::fs::DirBuilder;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::console;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create mount point {0}")]
    CreateMountPoint(PathBuf, #[source] std::io::Error),
    #[error("read {MOUNTINFO}")]
    ReadMountInfo(#[source] std::io::Error),
    #[error("statfs {0}")]
    Statfs(PathBuf, #[source] std::io::Error),
    #[error("path or option holds a NUL byte")]
    Nul(#[from] NulError),
}

/// One mount(2) call.
#[derive(Clone, Debug)]
pub struct Mount<'a> {
    pub source: &'a str,
    pub target: &'a Path,
    pub fstype: &'a str,
    pub flags: libc::c_ulong,
    pub data: &'a str,
}

const PSEUDO: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// The pseudo filesystems, in order; proc comes first and is mounted by `mount_early` itself.
fn early_mounts() -> [(Mount<'static>, Option<u32>); 7] {
    let m = |source, target: &'static str, fstype, flags, data| Mount {
        source,
        target: Path::new(target),
        fstype,
        flags,
        data,
    };
    [
        (m("sysfs", "/sys", "sysfs", PSEUDO, ""), None),
        (
            m("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
            None,
        ),
        (
            m(
                "devpts",
                "/dev/pts",
                "devpts",
                libc::MS_NOSUID | libc::MS_NOEXEC,
                "ptmxmode=0666,mode=0620,gid=5",
            ),
            Some(0o755),
        ),
        (
            m(
                "shm",
                "/dev/shm",
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                "mode=1777",
            ),
            Some(0o1777),
        ),
        (
            m(
                "tmpfs",
                "/run",
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                "mode=0755",
            ),
            Some(0o755),
        ),
        (
            m(
                "tmpfs",
                "/tmp",
                "tmpfs",
                libc::MS_NOSUID | libc::MS_NODEV,
                "mode=1777",
            ),
            Some(0o1777),
        ),
        (
            m("cgroup2", "/sys/fs/cgroup", "cgroup2", PSEUDO, "nsdelegate"),
            None,
        ),
    ]
}

/// Mounts proc, sysfs, devtmpfs, devpts, /dev/shm, /run, /tmp and cgroup2, skipping any that
/// are already there, and adds the /dev/fd and /dev/std{in,out,err} links devtmpfs lacks.
pub fn mount_early() -> Result<(), Error> {
    let proc_path = Path::new("/proc");
    if !has_magic(proc_path, libc::PROC_SUPER_MAGIC)? {
        mount(&Mount {
            source: "proc",
            target: proc_path,
            fstype: "proc",
            flags: PSEUDO,
            data: "",
        })?;
    }
    for (spec, mkdir_mode) in early_mounts() {
        if is_mounted(spec.target, spec.fstype)? {
            continue;
        }
        if let Some(mode) = mkdir_mode {
            ensure_dir(spec.target, mode)?;
        }
        mount(&spec)?;
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        // Already there is fine; any other failure only hurts programs that use the links.
        match std::os::unix::fs::symlink(to, link) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                console::warn(&format!("create {link}: {e}"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates `path` (and parents) if missing. On the read-only root this only succeeds when the
/// image already has the directory, which the image script guarantees for our mount points.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|e| Error::CreateMountPoint(path.to_path_buf(), e))
}

/// Calls mount(2).
pub fn mount(m: &Mount<'_>) -> Result<(), Error> {
    let source = CString::new(m.source)?;
    let target = CString::new(m.target.as_os_str().as_bytes())?;
    let fstype = CString::new(m.fstype)?;
    let data = CString::new(m.data)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; the kernel
    // copies them and keeps no reference.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(Error::Mount {
            fstype: m.fstype.to_string(),
            target: m.target.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Bind-mounts `source` onto `target` unless `target` is already a mount point.
pub fn bind(source: &Path, target: &Path) -> Result<(), Error> {
    if table()?.iter().any(|e| e.mount_point == target) {
        return Ok(());
    }
    let source = source.to_string_lossy();
    mount(&Mount {
        source: &source,
        target,
        fstype: "none",
        flags: libc::MS_BIND,
        data: "",
    })
}

fn has_magic(path: &Path, magic: libc::c_long) -> Result<bool, Error> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs is plain data; all-zero is a valid value for it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid C string and st a valid, writable statfs for the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(Error::Statfs(
            path.to_path_buf(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(st.f_type == magic)
}

/// Whether a filesystem of type `fstype` is mounted at `target`.
pub fn is_mounted(target: &Path, fstype: &str) -> Result<bool, Error> {
    Ok(table()?
        .iter()
        .any(|e| e.mount_point == target && e.fstype == fstype))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The current mount table, in mount order.
pub fn table() -> Result<Vec<MountEntry>, Error> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(Error::ReadMountInfo)?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo text (proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (mount_fields, fs_fields) = line.split_once(" - ")?;
            let mount_point = mount_fields.split(' ').nth(4)?;
            let mut fs = fs_fields.split(' ');
            let fstype = fs.next()?;
            let source = fs.next().unwrap_or("");
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\134` for a backslash...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(value as u8);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether shutdown leaves this mount alone: the root (already read-only) and the kernel's
/// pseudo filesystems, which hold nothing to flush.
fn kept_at_shutdown(mount_point: &Path) -> bool {
    mount_point == Path::new("/")
        || ["/proc", "/sys", "/dev"]
            .iter()
            .any(|p| mount_point.starts_with(p))
}

/// The mounts to take down at shutdown, innermost (most recent) first.
pub fn shutdown_order(entries: &[MountEntry]) -> Vec<MountEntry> {
    entries
        .iter()
        .rev()
        .filter(|e| !kept_at_shutdown(&e.mount_point))
        .cloned()
        .collect()
}

/// Unmounts everything but the root and pseudo filesystems; a mount that will not go (still
/// busy) is remounted read-only instead, so that its disk is clean when the VM stops.
pub fn unmount_for_shutdown() {
    let entries = match table() {
        Ok(entries) => entries,
        Err(e) => {
            console::warn(&format!("unmounting at shutdown: {e}"));
            return;
        }
    };
    for entry in shutdown_order(&entries) {
        let Ok(target) = CString::new(entry.mount_point.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: target is a valid C string for the duration of the call.
        if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
            continue;
        }
        let umount_err = std::io::Error::last_os_error();
        // SAFETY: as above; null source/fstype/data are allowed for MS_REMOUNT.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 && entry.source.starts_with("/dev/") {
            console::warn(&format!(
                "unmount {} ({umount_err}) and read-only remount ({}) failed",
                entry.mount_point.display(),
                std::io::Error::last_os_error()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / ro,relatime shared:1 - ext4 /dev/root ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
24 22 0:5 / /dev rw,nosuid shared:3 - devtmpfs devtmpfs rw,size=1000k,mode=755
25 24 0:22 / /dev/pts rw,nosuid,noexec,relatime shared:4 - devpts devpts rw,gid=5,mode=620,ptmxmode=666
26 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:5 - sysfs sysfs rw
27 26 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:6 - cgroup2 cgroup2 rw,nsdelegate
28 22 0:25 / /run rw,nosuid,nodev shared:7 - tmpfs tmpfs rw,mode=755
29 22 254:16 / /var/lib/berth rw,noatime shared:8 - ext4 /dev/vdb rw,discard
30 22 254:16 /docker /var/lib/docker rw,noatime shared:8 - ext4 /dev/vdb rw,discard
31 30 0:40 / /var/lib/docker/overlay2/a\\040b/merged rw - overlay overlay rw
garbage line
";

    #[test]
    fn parses_mount_points_types_and_sources() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 10);
        assert_eq!(
            t[0],
            MountEntry {
                mount_point: "/".into(),
                fstype: "ext4".into(),
                source: "/dev/root".into()
            }
        );
        assert_eq!(t[2].fstype, "devtmpfs");
        assert_eq!(t[5].mount_point, Path::new("/sys/fs/cgroup"));
        assert_eq!(t[8].source, "/dev/vdb");
        assert_eq!(
            t[9].mount_point,
            Path::new("/var/lib/docker/overlay2/a b/merged")
        );
    }

    #[test]
    fn unescapes_octal_only() {
        assert_eq!(unescape(r"a\040b\134c\011d"), "a b\\c\td");
        assert_eq!(unescape(r"trail\04"), r"trail\04");
        assert_eq!(unescape(r"x\999"), r"x\999");
    }

    #[test]
    fn shutdown_unmounts_innermost_first_and_keeps_root_and_pseudo_fs() {
        let order: Vec<_> = shutdown_order(&parse_mountinfo(SAMPLE))
            .into_iter()
            .map(|e| e.mount_point)
            .collect();
        let expected: Vec<PathBuf> = [
            "/var/lib/docker/overlay2/a b/merged",
            "/var/lib/docker",
            "/var/lib/berth",
            "/run",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(order, expected);
    }
}

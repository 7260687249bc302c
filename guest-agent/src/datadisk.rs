//! The data disk: finding it (by its virtio-blk serial, or a configured device path), deciding
//! whether it is blank, ext4 or someone else's data, formatting a blank one, mounting it on `/var/lib/berth` and binding its `docker`, `containerd` and `log`
//! folders onto `/var/lib/docker`, `/var/lib/containerd` and `/var/log`.
//!
//! A disk is formatted only when it is provably blank (no ext superblock magic and an all-zero
//! first 64 KiB, as a fresh sparse file is): user data is never overwritten. Without a usable
//! disk the same layout is built on a tmpfs, so the services still start, with nothing kept.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::config::DataDisk;
use crate::console::chain;
use crate::{bootcount, console, disks, mounts};

/// Where the data disk is mounted.
pub const MOUNT_POINT: &str = "/var/lib/berth";
/// `(folder on the data disk, its mode, where it is bound)`.
const LAYOUT: [(&str, u32, &str); 3] = [
    ("docker", 0o711, "/var/lib/docker"),
    ("containerd", 0o711, "/var/lib/containerd"),
    ("log", 0o755, "/var/log"),
];
const MKFS: &str = "/sbin/mkfs.ext4";
/// How much of the disk must be zero for it to count as blank.
const PROBE_LEN: usize = 64 * 1024;
/// Offset of `s_magic` in an ext2/3/4 superblock (superblock at 1024, field at 56).
const EXT_MAGIC_OFFSET: usize = 1080;
const EXT_MAGIC: [u8; 2] = 0xEF53u16.to_le_bytes();

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("open {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("read the start of {0}")]
    Probe(PathBuf, #[source] std::io::Error),
    #[error("{0} holds data that is not an ext4 filesystem; it will not be formatted")]
    Foreign(PathBuf),
    #[error("run {MKFS} on {0}")]
    SpawnMkfs(PathBuf, #[source] std::io::Error),
    #[error("{MKFS} {0} failed ({1})")]
    Mkfs(PathBuf, std::process::ExitStatus),
    #[error(transparent)]
    Mount(#[from] mounts::Error),
    #[error(transparent)]
    Find(#[from] disks::Error),
}

/// What the first bytes of a disk say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// All zeros and no superblock: safe to format.
    Blank,
    /// An ext2/3/4 superblock: mount it.
    Ext4,
    /// Anything else: leave it alone.
    Foreign,
}

/// Classifies the first bytes of a disk (up to `PROBE_LEN`; a shorter slice is a shorter disk).
pub fn classify(head: &[u8]) -> Contents {
    if head.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2) == Some(&EXT_MAGIC[..]) {
        Contents::Ext4
    } else if head.iter().take(PROBE_LEN).all(|&b| b == 0) {
        Contents::Blank
    } else {
        Contents::Foreign
    }
}

/// Reads the first `PROBE_LEN` bytes of `device` (fewer if it is smaller) and classifies them.
pub fn probe(device: &Path) -> Result<Contents, Error> {
    let file = File::open(device).map_err(|e| Error::Open(device.to_path_buf(), e))?;
    let mut head = Vec::with_capacity(PROBE_LEN);
    file.take(PROBE_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::Probe(device.to_path_buf(), e))?;
    Ok(classify(&head))
}

/// The data disk's state as the readiness line reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataState {
    /// Blank disk, formatted and mounted this boot.
    Formatted,
    /// Existing filesystem mounted.
    Mounted,
    /// `berth.data=none`.
    None,
    /// A disk was configured but could not be used.
    Error,
}

impl DataState {
    pub fn as_str(self) -> &'static str {
        match self {
            DataState::Formatted => "formatted",
            DataState::Mounted => "mounted",
            DataState::None => "none",
            DataState::Error => "error",
        }
    }
}

/// The result of `setup`.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub state: DataState,
    /// This boot's number on the disk; 0 without a data disk.
    pub boot_count: u64,
}

/// Brings up `/var/lib/berth` and its bind mounts. A disk that cannot be found or used is
/// reported and replaced by a tmpfs; only failures of the layout itself are returned.
pub fn setup(data: &DataDisk) -> anyhow::Result<Outcome> {
    let state = match data {
        DataDisk::None => DataState::None,
        DataDisk::Device(device) => reported(attach(device)),
        DataDisk::Serial(serial) => reported(find(serial).and_then(|device| attach(&device))),
    };
    let on_disk = matches!(state, DataState::Formatted | DataState::Mounted);
    let root = Path::new(MOUNT_POINT);
    if !on_disk && !mounts::is_mounted(root, "tmpfs")? {
        mounts::mount(&mounts::Mount {
            source: "tmpfs",
            target: root,
            fstype: "tmpfs",
            flags: libc::MS_NOATIME,
            data: "mode=0755",
        })
        .context("mount a tmpfs in place of the data disk")?;
    }
    for (folder, mode, target) in LAYOUT {
        let source = root.join(folder);
        mounts::ensure_dir(&source, mode)?;
        mounts::ensure_dir(Path::new(target), mode)
            .with_context(|| format!("{target} must exist in the image"))?;
        mounts::bind(&source, Path::new(target))
            .with_context(|| format!("bind {} onto {target}", source.display()))?;
    }
    let boot_count = if on_disk { count_boot(root) } else { 0 };
    Ok(Outcome { state, boot_count })
}

/// Bumps the boot counter; a failure costs the statistic, not the boot.
fn count_boot(root: &Path) -> u64 {
    match bootcount::bump(&root.join(bootcount::FILE_NAME)) {
        Ok(b) => {
            if let Some(w) = b.warning {
                console::warn(&w);
            }
            b.count
        }
        Err(e) => {
            console::warn(&format!("boot counter: {}", chain(&e)));
            0
        }
    }
}

/// The state of a disk that was attached, or `Error` after one console line saying why not.
fn reported(attached: Result<DataState, Error>) -> DataState {
    attached.unwrap_or_else(|e| {
        console::say(&format!(
            "data disk error: {}; continuing without a data disk",
            chain(&e)
        ));
        DataState::Error
    })
}

/// The device node of the virtio disk with `serial`, announced on the console.
fn find(serial: &str) -> Result<PathBuf, Error> {
    let device = disks::find_by_serial(Path::new("/"), serial, disks::SERIAL_WAIT)?;
    console::say(&format!(
        "data disk {} (serial {serial:?})",
        device.display()
    ));
    Ok(device)
}

/// Mounts `device` on `MOUNT_POINT`, formatting it first if it is blank.
fn attach(device: &Path) -> Result<DataState, Error> {
    let dev_str = device.to_string_lossy();
    let already = mounts::table()?
        .into_iter()
        .any(|e| e.mount_point == Path::new(MOUNT_POINT) && e.source == dev_str);
    if already {
        return Ok(DataState::Mounted);
    }
    let state = match probe(device)? {
        Contents::Ext4 => DataState::Mounted,
        Contents::Foreign => return Err(Error::Foreign(device.to_path_buf())),
        Contents::Blank => {
            format(device)?;
            console::say(&format!("formatted {} as ext4", device.display()));
            DataState::Formatted
        }
    };
    mounts::mount(&mounts::Mount {
        source: &dev_str,
        target: Path::new(MOUNT_POINT),
        fstype: "ext4",
        // Deleted data goes back to the host's sparse file through discard.
        flags: libc::MS_NOATIME,
        data: "discard",
    })?;
    shorten_writeback();
    Ok(state)
}

/// What containers and dockerd write reaches the disk within about 4 s instead of the kernel's
/// default 30 s: a guest that crashes (a kernel panic, a killed VMM) loses only that much of
/// what was not fsync'd. Seen without it: a `--restart=always` container started 11 s before a
/// panic was not there after the restart, as dockerd's record of it had not been written yet.
fn shorten_writeback() {
    for (knob, centisecs) in [
        ("/proc/sys/vm/dirty_expire_centisecs", "300"),
        ("/proc/sys/vm/dirty_writeback_centisecs", "100"),
    ] {
        if let Err(e) = std::fs::write(knob, centisecs) {
            console::warn(&format!("set {knob} to {centisecs}: {e}"));
        }
    }
}

fn format(device: &Path) -> Result<(), Error> {
    // std resets the signal mask in the child, so mkfs does not inherit PID 1's blocked set.
    let status = Command::new(MKFS)
        .args([
            "-q",
            "-L",
            "berth-data",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(device)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| Error::SpawnMkfs(device.to_path_buf(), e))?;
    if !status.success() {
        return Err(Error::Mkfs(device.to_path_buf(), status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_disk(name: &str, contents: &[u8], len: u64) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("berth-agent-disk-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        // Extend sparsely, like `truncate -s 8G data.img` on the host.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len)
            .unwrap();
        path
    }

    fn ext4_head() -> Vec<u8> {
        let mut head = vec![0u8; 4096];
        head[1080] = 0x53;
        head[1081] = 0xEF;
        head[1024] = 0x40; // some superblock fields are non-zero
        head
    }

    #[test]
    fn fresh_sparse_file_is_blank() {
        let path = temp_disk("sparse", &[], 8 << 20);
        assert_eq!(probe(&path).unwrap(), Contents::Blank);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn ext4_superblock_magic_is_recognised() {
        let path = temp_disk("ext4", &ext4_head(), 8 << 20);
        assert_eq!(probe(&path).unwrap(), Contents::Ext4);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn other_data_is_foreign_and_never_blank() {
        // A partition table signature at the end of the first sector.
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        let path = temp_disk("mbr", &mbr, 8 << 20);
        assert_eq!(probe(&path).unwrap(), Contents::Foreign);
        std::fs::remove_file(path).unwrap();

        // One stray byte at the very end of the probed area is enough.
        let mut late = vec![0u8; PROBE_LEN];
        late[PROBE_LEN - 1] = 1;
        let path = temp_disk("late", &late, 8 << 20);
        assert_eq!(probe(&path).unwrap(), Contents::Foreign);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn data_beyond_the_probe_window_does_not_count() {
        let mut head = vec![0u8; PROBE_LEN + 1];
        head[PROBE_LEN] = 0xFF;
        assert_eq!(classify(&head), Contents::Blank);
    }

    #[test]
    fn wrong_byte_order_magic_is_not_ext4() {
        let mut head = ext4_head();
        head.swap(1080, 1081);
        assert_eq!(classify(&head), Contents::Foreign);
    }

    #[test]
    fn tiny_disks() {
        assert_eq!(classify(&[]), Contents::Blank);
        assert_eq!(classify(&[0u8; 1081]), Contents::Blank);
        assert_eq!(classify(&[7u8; 100]), Contents::Foreign);
    }

    #[test]
    fn missing_device_is_an_open_error() {
        let err = probe(Path::new("/nonexistent/berth-vdb")).unwrap_err();
        assert!(matches!(err, Error::Open(..)));
        assert_eq!(
            chain(&err),
            "open /nonexistent/berth-vdb: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn readiness_names() {
        let names: Vec<_> = [
            DataState::Formatted,
            DataState::Mounted,
            DataState::None,
            DataState::Error,
        ]
        .iter()
        .map(|s| s.as_str())
        .collect();
        assert_eq!(names, ["formatted", "mounted", "none", "error"]);
    }
}

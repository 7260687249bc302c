//! Finding a virtio disk by its virtio-blk serial (`/sys/block/vdX/serial`), so the data disk
//! is the disk the host labelled, not whichever the guest happened to probe second.
//!
//! Block devices probe asynchronously, so the lookup waits a bounded time for the disk (and its
//! device node) to appear. Everything is read below a root directory that is `/` in the guest
//! and a fake tree in tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `find_by_serial` waits for a disk with the serial to appear.
pub const SERIAL_WAIT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(25);

/// Errors of this module; each names the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("list {0}")]
    List(PathBuf, #[source] std::io::Error),
    #[error(
        "no virtio disk has serial {serial:?} after {} s (disks seen: {})",
        waited.as_secs_f64(),
        Seen(seen)
    )]
    NotFound {
        serial: String,
        waited: Duration,
        seen: Vec<Disk>,
    },
    #[error("disk {name} has serial {serial:?} but no device node {}", node.display())]
    NoNode {
        name: String,
        serial: String,
        node: PathBuf,
    },
}

/// A virtio disk as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// `vda`, `vdb`, ...
    pub name: String,
    /// `None` when the device reports none (an empty `serial` file) or it cannot be read.
    pub serial: Option<String>,
}

/// `vda serial "berth-root", vdc no serial`, or `none`.
struct Seen<'a>(&'a [Disk]);

impl std::fmt::Display for Seen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, disk) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match &disk.serial {
                // Debug quoting escapes anything odd the device reported.
                Some(serial) => write!(f, "{} serial {serial:?}", disk.name)?,
                None => write!(f, "{} no serial", disk.name)?,
            }
        }
        Ok(())
    }
}

/// The virtio disks under `root`'s `sys/block`, sorted by name.
pub fn scan(root: &Path) -> Result<Vec<Disk>, Error> {
    let dir = root.join("sys/block");
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::List(dir.clone(), e))?;
    let mut disks: Vec<Disk> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.starts_with("vd").then(|| Disk {
                serial: read_serial(&entry.path().join("serial")),
                name,
            })
        })
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(disks)
}

/// A `serial` attribute's value: virtio-blk writes up to 20 bytes, NUL-padded, no newline.
fn read_serial(path: &Path) -> Option<String> {
    let raw = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let serial = text.trim_end_matches(['\0', '\n']).trim();
    (!serial.is_empty()).then(|| serial.to_string())
}

/// The device node (`<root>/dev/vdX`) of the virtio disk whose serial is `serial`, waiting up
/// to `wait` for it to appear.
pub fn find_by_serial(root: &Path, serial: &str, wait: Duration) -> Result<PathBuf, Error> {
    let started = Instant::now();
    loop {
        let disks = scan(root)?;
        let found = disks.iter().find(|d| d.serial.as_deref() == Some(serial));
        let node = found.map(|d| root.join("dev").join(&d.name));
        if let Some(node) = node.as_ref().filter(|n| n.exists()) {
            return Ok(node.clone());
        }
        if started.elapsed() >= wait {
            return Err(match (found, node) {
                (Some(disk), Some(node)) => Error::NoNode {
                    name: disk.name.clone(),
                    serial: serial.to_string(),
                    node,
                },
                _ => Error::NotFound {
                    serial: serial.to_string(),
                    waited: wait,
                    seen: disks,
                },
            });
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake root with `sys/block/<name>/serial` (absent for `None`) and `dev/<name>` nodes.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(tag: &str) -> FakeRoot {
            let root = std::env::temp_dir()
                .join(format!("berth-agent-disks-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("sys/block")).unwrap();
            std::fs::create_dir_all(root.join("dev")).unwrap();
            FakeRoot(root)
        }

        fn disk(&self, name: &str, serial: Option<&[u8]>) {
            add_disk(&self.0, name, serial);
        }
    }

    fn add_disk(root: &Path, name: &str, serial: Option<&[u8]>) {
        let dir = root.join("sys/block").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(serial) = serial {
            std::fs::write(dir.join("serial"), serial).unwrap();
        }
        std::fs::write(root.join("dev").join(name), b"").unwrap();
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_disk_with_the_serial_is_found_whatever_its_probe_order() {
        let root = FakeRoot::new("found");
        root.disk("vda", Some(b"berth-root"));
        root.disk("vdb", Some(b"scratch"));
        root.disk("vdc", Some(b"berth-data\0\0\0\0\0\0\0\0\0\0"));
        root.disk("loop0", None);
        let node = find_by_serial(&root.0, "berth-data", Duration::ZERO).unwrap();
        assert_eq!(node, root.0.join("dev/vdc"));
        // A serial is matched whole, not as a prefix.
        assert!(find_by_serial(&root.0, "berth", Duration::ZERO).is_err());
    }

    #[test]
    fn a_missing_serial_names_it_and_every_disk_seen() {
        let root = FakeRoot::new("missing");
        root.disk("vdb", None);
        root.disk("vda", Some(b"berth-root"));
        root.disk("vdc", Some(b""));
        root.disk("sda", Some(b"not-virtio"));
        let started = Instant::now();
        let err = find_by_serial(&root.0, "berth-data", Duration::from_millis(200)).unwrap_err();
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "did not wait"
        );
        assert_eq!(
            err.to_string(),
            "no virtio disk has serial \"berth-data\" after 0.2 s (disks seen: \
             vda serial \"berth-root\", vdb no serial, vdc no serial)"
        );
        let empty = FakeRoot::new("empty");
        let err = find_by_serial(&empty.0, "berth-data", Duration::ZERO).unwrap_err();
        assert!(err.to_string().ends_with("(disks seen: none)"), "{err}");
    }

    #[test]
    fn a_disk_that_appears_while_waiting_is_found() {
        let root = FakeRoot::new("late");
        root.disk("vda", Some(b"berth-root"));
        let dir = root.0.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            add_disk(&dir, "vdb", Some(b"berth-data"));
        });
        let node = find_by_serial(&root.0, "berth-data", Duration::from_secs(10)).unwrap();
        assert_eq!(node, root.0.join("dev/vdb"));
        late.join().unwrap();
    }

    #[test]
    fn a_serial_without_a_device_node_is_its_own_error() {
        let root = FakeRoot::new("nonode");
        root.disk("vdb", Some(b"berth-data"));
        std::fs::remove_file(root.0.join("dev/vdb")).unwrap();
        let err = find_by_serial(&root.0, "berth-data", Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::NoNode { .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with("disk vdb has serial \"berth-data\" but no device node"));
    }

    #[test]
    fn no_sys_block_is_a_listing_error() {
        let root = FakeRoot::new("nosys");
        std::fs::remove_dir_all(root.0.join("sys")).unwrap();
        let err = find_by_serial(&root.0, "berth-data", Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, Error::List(..)), "{err:?}");
    }
}

//! Entry point for the `block_queue` fuzz target in `vmm/fuzz/` (feature `fuzzing`): the
//! virtio-blk request path on a split queue whose descriptor table, avail ring and buffers come
//! from the fuzzer's bytes, against a small disk image in a scratch file.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use virtio_queue::QueueT;

use super::disk::Disk;
use super::request::BlockHandler;
use super::SECTOR_SIZE;
use crate::devices::virtio::event_loop::DeviceHandler;
use crate::devices::virtio::net::fuzzing::{queue_from, Input};

/// The image: 128 whole sectors and a partial one the guest never sees.
const IMAGE_LEN: u64 = 128 * SECTOR_SIZE + 100;

/// The same image opened read-write and read-only.
struct Disks {
    read_write: Arc<Disk>,
    read_only: Arc<Disk>,
    path: std::path::PathBuf,
}

static DISKS: OnceLock<Disks> = OnceLock::new();

fn disks() -> &'static Disks {
    DISKS.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("berth-fuzz-blk-{}", std::process::id()));
        let bytes: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, bytes).expect("the scratch disk image");
        Disks {
            read_write: Arc::new(Disk::open(&path, false).expect("the image opens")),
            read_only: Arc::new(Disk::open(&path, true).expect("the image opens read-only")),
            path,
        }
    })
}

/// Serves every chain the input lays out. The first byte picks the disk (read-only or not), the
/// negotiated DISCARD and WRITE_ZEROES, and EVENT_IDX. Oracles: no panic, a used length never
/// beyond the chain's device-writable bytes, and an image whose size never changes.
pub fn block_queue(data: &[u8]) {
    let disks = disks();
    let mut input = Input(data);
    let bits = input.byte();
    let disk = if bits & 1 != 0 {
        &disks.read_only
    } else {
        &disks.read_write
    };
    let mut handler = BlockHandler {
        disk: disk.clone(),
        serial: *b"fuzz-serial-00000001",
        discard: bits & 2 != 0,
        write_zeroes: bits & 4 != 0,
    };
    let Some((mem, mut queue)) = queue_from(&mut input, bits & 8 != 0) else {
        return;
    };
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let writable: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        let used = handler.handle_chain(&mem, 0, chain);
        assert!(
            u64::from(used) <= writable,
            "used length {used} beyond the chain's {writable} writable bytes"
        );
    }
    check_size(&disks.path);
}

fn check_size(path: &Path) {
    let len = std::fs::metadata(path).expect("the image is there").len();
    assert_eq!(len, IMAGE_LEN, "a request changed the image's size");
}

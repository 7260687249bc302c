//! The virtio-blk device model: features, configuration space, the serial, and the event loop's
//! lifecycle.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::disk::Disk;
use super::request::BlockHandler;
use super::{
    Error, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX,
};
use crate::devices::virtio::event_loop::EventLoop;
use crate::devices::virtio::{
    feature, features, read_config_space, ActivateError, Interrupt, VirtioDevice, TYPE_BLOCK,
};
use crate::memory::GuestMemory;
use berth_errors::Chain;

const CONFIG_SIZE: usize = size_of::<virtio_blk_config>();

/// Numbers the event loop threads: "virtio-blk-0", "virtio-blk-1"...
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A virtio-blk device backed by a disk image file.
pub struct Block {
    disk: Arc<Disk>,
    serial: [u8; ID_BYTES],
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_SIZE],
    event_loop: EventLoop<BlockHandler>,
}

impl Block {
    /// Opens the image at `path` (read-write unless `read_only`). The guest reads `serial` with
    /// GET_ID (Linux shows it in /sys/block/vdX/serial); it is at most 20 printable ASCII
    /// characters, and without one the guest reads an empty serial.
    pub fn new(path: &Path, read_only: bool, serial: Option<String>) -> Result<Self, Error> {
        let serial = serial_id(path, serial)?;
        let disk = Disk::open(path, read_only)?;
        let mut avail_features = feature(features::VERSION_1)
            | feature(features::RING_EVENT_IDX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if read_only {
            avail_features |= feature(VIRTIO_BLK_F_RO);
        } else {
            avail_features |= feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config = config_space(disk.capacity());
        tracing::info!(
            path = %path.display(),
            sectors = disk.capacity(),
            read_only,
            "virtio-blk disk opened"
        );
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            disk: Arc::new(disk),
            serial,
            avail_features,
            acked_features: 0,
            config,
            event_loop: EventLoop::new(format!("virtio-blk-{id}"), 1),
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
}

/// The GET_ID answer for `serial` (virtio 1.2 section 5.2.6): its bytes, NUL-padded to 20.
fn serial_id(path: &Path, serial: Option<String>) -> Result<[u8; ID_BYTES], Error> {
    let mut id = [0u8; ID_BYTES];
    let Some(serial) = serial else {
        return Ok(id);
    };
    if !serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(Error::SerialNotPrintable {
            path: path.to_owned(),
            serial,
        });
    }
    if serial.len() > ID_BYTES {
        return Err(Error::SerialTooLong {
            path: path.to_owned(),
            serial,
        });
    }
    id[..serial.len()].copy_from_slice(serial.as_bytes());
    Ok(id)
}

/// The configuration space (virtio 1.2 section 5.2.4), little endian.
fn config_space(capacity: u64) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    for field in [
        offset_of!(virtio_blk_config, max_discard_sectors),
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
    ] {
        put(field, &MAX_DISCARD_SECTORS.to_le_bytes());
    }
    for field in [
        offset_of!(virtio_blk_config, max_discard_seg),
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
    ] {
        put(field, &MAX_DISCARD_SEG.to_le_bytes());
    }
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &1u32.to_le_bytes(),
    );
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // No writable field is offered (CONFIG_WCE is not negotiable).
        warn_rate_limited!("virtio-blk: ignoring config write at {offset:#x}");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        let handler = BlockHandler {
            disk: self.disk.clone(),
            serial: self.serial,
            discard: self.acked_features & feature(VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: self.acked_features & feature(VIRTIO_BLK_F_WRITE_ZEROES) != 0,
        };
        self.event_loop
            .activate(mem, interrupt, queues, || Ok(handler))
    }

    fn reset(&mut self) {
        self.event_loop.stop();
        self.acked_features = 0;
    }

    /// Joins the event loop (a request it was serving completes first), then syncs the image.
    fn shutdown(&mut self) {
        self.reset();
        if !self.disk.read_only() {
            if let Err(e) = self.disk.flush() {
                tracing::error!(
                    error = %Chain(&e),
                    "syncing the disk image at stop failed"
                );
            }
        }
    }
}

//! virtio-blk: a disk image file served to the guest, with flush, discard and write-zeroes
//! that keep the image sparse, and the serial the guest finds it by.

mod device;
mod disk;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod request;

use std::io;
use std::path::PathBuf;

pub use device::Block;

/// The sector size of the virtio-blk protocol, in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// The one queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request (the queue minus the header and status descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The largest discard or write-zeroes range, in sectors (4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
/// Ranges per discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// The length of the GET_ID answer, and the longest serial.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("disk image {path} cannot be read")]
    NotReadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} cannot be written (attach it read-only or fix its permissions)")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is a directory")]
    IsDirectory { path: PathBuf },
    #[error("finding the size of disk image {path} failed")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
    #[error("disk image {path} is {size} bytes, less than one {SECTOR_SIZE}-byte sector")]
    TooSmall { path: PathBuf, size: u64 },
    #[error(
        "the serial {serial:?} of disk image {path} is {} bytes, more than the {ID_BYTES} a virtio-blk serial holds",
        .serial.len()
    )]
    SerialTooLong { path: PathBuf, serial: String },
    #[error(
        "the serial {serial:?} of disk image {path} has a character that is not printable ASCII"
    )]
    SerialNotPrintable { path: PathBuf, serial: String },
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{FileExt, MetadataExt};

    use virtio_bindings::virtio_blk::*;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::devices::virtio::test_utils::{TestQueue, DATA, OUTSIDE, WRITE};
    use crate::devices::virtio::VirtioDevice;

    const HEADER: u64 = DATA;
    const STATUS: u64 = DATA + 0x100;
    const BUF: u64 = DATA + 0x1000;
    const UNTOUCHED: u8 = 0xee;

    /// A disk image whose byte `i` is `pattern(i)`.
    fn image(len: usize) -> TempFile {
        let file = TempFile::new_in(std::path::Path::new("/tmp")).unwrap();
        let bytes: Vec<u8> = (0..len).map(pattern).collect();
        file.as_file().write_all_at(&bytes, 0).unwrap();
        file
    }

    fn pattern(i: usize) -> u8 {
        (i % 251) as u8 + 1
    }

    /// A block device on `file`, activated with every feature it offers.
    fn start(file: &TempFile, read_only: bool) -> (Block, TestQueue) {
        start_with_serial(file, read_only, None)
    }

    fn start_with_serial(
        file: &TempFile,
        read_only: bool,
        serial: Option<&str>,
    ) -> (Block, TestQueue) {
        let serial = serial.map(str::to_string);
        let mut block = Block::new(file.as_path(), read_only, serial).unwrap();
        block.set_acked_features(block.avail_features());
        let queue = TestQueue::new();
        queue.activate(&mut block, true);
        (block, queue)
    }

    /// Writes a header and a poisoned status byte; returns the header and status descriptors.
    fn header(q: &TestQueue, kind: u32, sector: u64) -> [(u64, u32, u16); 2] {
        let mut bytes = kind.to_le_bytes().to_vec();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&sector.to_le_bytes());
        q.write(HEADER, &bytes);
        q.write(STATUS, &[UNTOUCHED]);
        [(HEADER, 16, 0), (STATUS, 1, WRITE)]
    }

    /// Sends one request with `data` descriptors; returns (used len, status byte).
    fn request(q: &mut TestQueue, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u32, u8) {
        let [head, status] = header(q, kind, sector);
        let mut chain = vec![head];
        chain.extend_from_slice(data);
        chain.push(status);
        let index = q.add_chain(&chain);
        let used = q.kick(1);
        assert_eq!(used[0].0, u32::from(index));
        (used[0].1, q.read(STATUS, 1)[0])
    }

    fn ranges(q: &TestQueue, ranges: &[(u64, u32, u32)]) -> (u64, u32, u16) {
        let mut bytes = Vec::new();
        for &(sector, count, flags) in ranges {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&count.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        q.write(BUF, &bytes);
        (BUF, bytes.len() as u32, 0)
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn expected(offset: usize, len: usize) -> Vec<u8> {
        (offset..offset + len).map(pattern).collect()
    }

    #[test]
    fn new_reports_capacity_features_and_config_space() {
        let file = image(8192 + 100);
        let block = Block::new(file.as_path(), false, None).unwrap();
        assert_eq!(block.capacity(), 16);
        let features = block.avail_features();
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            32,
        ] {
            assert_ne!(features & (1 << bit), 0, "feature {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        let mut config = [0u8; 60];
        block.read_config(0, &mut config);
        let u32_at = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 16);
        assert_eq!(u32_at(12), SEG_MAX);
        assert_eq!(u32_at(20), 512);
        assert_eq!(u32_at(36), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(40), MAX_DISCARD_SEG);
        assert_eq!(u32_at(48), MAX_DISCARD_SECTORS);
        assert_eq!(u32_at(52), MAX_DISCARD_SEG);
        assert_eq!(config[56], 1, "write_zeroes_may_unmap");
        // A read at an offset inside the space, and beyond it.
        let mut capacity_low = [0u8; 4];
        block.read_config(0, &mut capacity_low);
        assert_eq!(capacity_low, [16, 0, 0, 0]);
        let mut beyond = [0xffu8; 4];
        block.read_config(0x1000, &mut beyond);
        assert_eq!(beyond, [0; 4]);

        let read_only = Block::new(file.as_path(), true, None).unwrap();
        let features = read_only.avail_features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }

    #[test]
    fn new_explains_unusable_images() {
        let dir = std::env::temp_dir().join(format!("berth-blk-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.img");
        assert!(matches!(
            Block::new(&missing, false, None),
            Err(Error::NotFound { .. })
        ));
        let empty = dir.join("empty.img");
        fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Block::new(&empty, true, None),
            Err(Error::Empty { .. })
        ));
        let tiny = dir.join("tiny.img");
        fs::write(&tiny, [1u8; 100]).unwrap();
        assert!(matches!(
            Block::new(&tiny, true, None),
            Err(Error::TooSmall { size: 100, .. })
        ));
        assert!(matches!(
            Block::new(&dir, true, None),
            Err(Error::IsDirectory { .. })
        ));
        // Refused for writing even to root, readable by all.
        let sysfs = std::path::Path::new("/sys/kernel/notes");
        let err = Block::new(sysfs, false, None).map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::NotWritable { .. }), "{err}");
        assert!(err.to_string().contains("read-only"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_sectors_into_a_split_buffer() {
        let file = image(8192);
        let (_block, mut q) = start(&file, false);
        q.write(BUF, &[0; 1024]);
        let data = [(BUF, 512, WRITE), (BUF + 0x800, 512, WRITE)];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_IN, 3, &data), (1025, OK));
        assert_eq!(q.read(BUF, 512), expected(3 * 512, 512));
        assert_eq!(q.read(BUF + 0x800, 512), expected(4 * 512, 512));
    }

    #[test]
    fn writes_reach_the_file_and_read_back() {
        let file = image(8192);
        let (_block, mut q) = start(&file, false);
        let payload: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
        q.write(BUF, &payload);
        let data = [(BUF, 1024, 0)];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_OUT, 2, &data), (1, OK));
        let on_disk = fs::read(file.as_path()).unwrap();
        assert_eq!(&on_disk[1024..2048], &payload[..]);
        assert_eq!(
            &on_disk[..1024],
            &expected(0, 1024)[..],
            "sectors before untouched"
        );
        assert_eq!(&on_disk[2048..], &expected(2048, 8192 - 2048)[..]);

        q.write(BUF, &[0; 1024]);
        let data = [(BUF, 1024, WRITE)];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_IN, 2, &data), (1025, OK));
        assert_eq!(q.read(BUF, 1024), payload);
        assert_eq!(request(&mut q, VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
    }

    /// Sends GET_ID with a poisoned buffer of `descs` (offset into BUF, length); returns
    /// (used len, status, the whole poisoned area after the request).
    fn get_id(q: &mut TestQueue, descs: &[(u64, u32)]) -> (u32, u8, Vec<u8>) {
        q.write(BUF, &[0xaa; 64]);
        let data: Vec<_> = descs
            .iter()
            .map(|&(offset, len)| (BUF + offset, len, WRITE))
            .collect();
        let (len, status) = request(q, VIRTIO_BLK_T_GET_ID, 0, &data);
        (len, status, q.read(BUF, 64))
    }

    #[test]
    fn get_id_answers_the_serial_nul_padded_to_20_bytes() {
        let file = image(4096);
        let (_block, mut q) = start_with_serial(&file, false, Some("berth-data 1"));
        let (len, status, id) = get_id(&mut q, &[(0, ID_BYTES as u32)]);
        assert_eq!((len, status), (ID_BYTES as u32 + 1, OK));
        assert_eq!(&id[..12], b"berth-data 1");
        assert_eq!(&id[12..ID_BYTES], &[0; 8], "NUL padded");
        assert!(id[ID_BYTES..].iter().all(|&b| b == 0xaa), "nothing past 20");

        // The same answer across two buffers.
        let (len, status, id) = get_id(&mut q, &[(0, 5), (32, 15)]);
        assert_eq!((len, status), (ID_BYTES as u32 + 1, OK));
        assert_eq!(&id[..5], b"berth");
        assert_eq!(&id[32..39], b"-data 1");
        assert_eq!(&id[39..47], &[0; 8]);
    }

    #[test]
    fn get_id_fills_a_20_byte_serial_without_nul_and_truncates_to_a_short_buffer() {
        let file = image(4096);
        let serial = "ABCDEFGHIJKLMNOPQRST";
        let (_block, mut q) = start_with_serial(&file, false, Some(serial));
        let (len, status, id) = get_id(&mut q, &[(0, ID_BYTES as u32)]);
        assert_eq!((len, status), (ID_BYTES as u32 + 1, OK));
        assert_eq!(&id[..ID_BYTES], serial.as_bytes());
        // A driver buffer shorter than 20 bytes gets the serial's start.
        let (len, status, id) = get_id(&mut q, &[(0, 8)]);
        assert_eq!((len, status), (9, OK));
        assert_eq!(&id[..8], b"ABCDEFGH");
        assert!(
            id[8..].iter().all(|&b| b == 0xaa),
            "nothing past the buffer"
        );
    }

    #[test]
    fn get_id_without_a_serial_answers_an_empty_id() {
        let file = image(4096);
        let (_block, mut q) = start(&file, true);
        let (len, status, id) = get_id(&mut q, &[(0, ID_BYTES as u32)]);
        assert_eq!((len, status), (ID_BYTES as u32 + 1, OK));
        assert_eq!(
            &id[..ID_BYTES],
            &[0; ID_BYTES],
            "an empty, NUL-filled serial"
        );
    }

    #[test]
    fn new_refuses_serials_the_guest_could_not_show() {
        let file = image(4096);
        let new = |serial: &str| Block::new(file.as_path(), false, Some(serial.to_string()));
        let err = new("a-serial-of-21-bytes!").map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::SerialTooLong { .. }), "{err}");
        assert!(
            err.to_string().contains("21 bytes, more than the 20"),
            "{err}"
        );
        for bad in ["tab\there", "new\nline", "caf\u{e9}", "nul\0"] {
            let err = new(bad).map(|_| ()).unwrap_err();
            assert!(
                matches!(err, Error::SerialNotPrintable { .. }),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("printable ASCII"), "{err}");
        }
        // Exactly 20 printable characters, spaces included, and an empty serial are fine.
        assert!(new("~20 printable chars!").is_ok());
        assert!(new("").is_ok());
    }

    #[test]
    fn discard_makes_the_image_sparse_again() {
        let len = 1 << 20;
        let file = image(len);
        file.as_file().sync_all().unwrap();
        let blocks_before = fs::metadata(file.as_path()).unwrap().blocks();
        assert!(
            blocks_before >= 2048,
            "image fully allocated: {blocks_before}"
        );
        let (_block, mut q) = start(&file, false);
        let sectors = (len / 512) as u32;
        let data = [ranges(
            &q,
            &[
                (0, sectors / 2, 0),
                (u64::from(sectors / 2), sectors / 2, 0),
            ],
        )];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_DISCARD, 0, &data), (1, OK));
        let meta = fs::metadata(file.as_path()).unwrap();
        assert_eq!(meta.len(), len as u64, "size kept");
        assert!(
            meta.blocks() < blocks_before / 8,
            "blocks {} after discard",
            meta.blocks()
        );
        assert!(fs::read(file.as_path()).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn write_zeroes_zeroes_exactly_the_range_with_or_without_unmap() {
        let file = image(64 * 1024);
        let (_block, mut q) = start(&file, false);
        let data = [ranges(&q, &[(8, 8, 0)])];
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_WRITE_ZEROES, 0, &data),
            (1, OK)
        );
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let data = [ranges(&q, &[(64, 64, unmap)])];
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_WRITE_ZEROES, 0, &data),
            (1, OK)
        );
        let on_disk = fs::read(file.as_path()).unwrap();
        assert_eq!(on_disk.len(), 64 * 1024);
        for (range, zero) in [
            (0..4096, false),
            (4096..8192, true),
            (8192..32768, false),
            (32768..65536, true),
        ] {
            let bytes = &on_disk[range.clone()];
            if zero {
                assert!(bytes.iter().all(|&b| b == 0), "{range:?} zeroed");
            } else {
                assert_eq!(
                    bytes,
                    &expected(range.start, range.len())[..],
                    "{range:?} kept"
                );
            }
        }
        // Unknown flags and discard with UNMAP are refused.
        let data = [ranges(&q, &[(0, 8, 0x2)])];
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_WRITE_ZEROES, 0, &data),
            (1, UNSUPP)
        );
        let data = [ranges(&q, &[(0, 8, unmap)])];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_DISCARD, 0, &data), (1, UNSUPP));
        let data = [ranges(&q, &[(120, 16, 0)])];
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_DISCARD, 0, &data),
            (1, IOERR),
            "beyond end"
        );
        assert_eq!(
            &fs::read(file.as_path()).unwrap()[..4096],
            &expected(0, 4096)[..]
        );
    }

    #[test]
    fn read_only_disk_refuses_writes_and_keeps_the_file() {
        let file = image(8192);
        let (_block, mut q) = start(&file, true);
        q.write(BUF, &[0x55; 512]);
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, 0)]),
            (1, IOERR)
        );
        let data = [ranges(&q, &[(0, 16, 0)])];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_DISCARD, 0, &data), (1, IOERR));
        let data = [ranges(&q, &[(0, 16, 0)])];
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_WRITE_ZEROES, 0, &data),
            (1, IOERR)
        );
        assert_eq!(fs::read(file.as_path()).unwrap(), expected(0, 8192));
        // Reads still work.
        let data = [(BUF, 512, WRITE)];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_IN, 15, &data), (513, OK));
        assert_eq!(q.read(BUF, 512), expected(15 * 512, 512));
    }

    #[test]
    fn bad_requests_fail_alone_and_the_device_keeps_serving() {
        let file = image(8192);
        let (_block, mut q) = start(&file, false);
        let good = |q: &mut TestQueue| {
            q.write(BUF, &[0; 512]);
            assert_eq!(
                request(q, VIRTIO_BLK_T_IN, 1, &[(BUF, 512, WRITE)]),
                (513, OK)
            );
            assert_eq!(q.read(BUF, 512), expected(512, 512));
        };
        // Sector range beyond capacity, and overflowing.
        let data = [(BUF, 1024, WRITE)];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_IN, 15, &data), (1, IOERR));
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_OUT, u64::MAX, &[(BUF, 512, 0)]),
            (1, IOERR)
        );
        good(&mut q);
        // Data outside guest memory, straddling its end, or of the wrong direction.
        let data = [(OUTSIDE, 512, WRITE)];
        assert_eq!(request(&mut q, VIRTIO_BLK_T_IN, 0, &data), (1, IOERR));
        let end = crate::devices::virtio::test_utils::MEM_SIZE as u64 - 256;
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_IN, 0, &[(end, 512, WRITE)]),
            (1, IOERR)
        );
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_IN, 0, &[(BUF, 512, 0)]),
            (1, IOERR)
        );
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_IN, 0, &[(BUF, 100, WRITE)]),
            (1, IOERR)
        );
        assert_eq!(request(&mut q, 0xdead, 0, &[]), (1, UNSUPP));
        good(&mut q);
        assert_eq!(fs::read(file.as_path()).unwrap(), expected(0, 8192));
    }

    #[test]
    fn malformed_chains_get_no_status_and_the_device_keeps_serving() {
        let file = image(8192);
        let (_block, mut q) = start(&file, false);
        let [head, status] = header(&q, VIRTIO_BLK_T_IN, 0);

        // Header outside guest memory: answered with IOERR.
        q.add_chain(&[(OUTSIDE, 16, 0), (BUF, 512, WRITE), status]);
        assert_eq!(q.kick(1)[0].1, 1);
        assert_eq!(q.read(STATUS, 1)[0], IOERR);

        // No status descriptor: the last one is driver-readable.
        q.write(STATUS, &[UNTOUCHED]);
        q.add_chain(&[head, (BUF, 512, 0)]);
        assert_eq!(q.kick(1)[0].1, 0);
        // Status byte outside guest memory.
        q.add_chain(&[head, (BUF, 512, WRITE), (OUTSIDE, 1, WRITE)]);
        assert_eq!(q.kick(1)[0].1, 0);
        // A loop: header -> data -> status -> data -> ...
        q.add_raw(&[
            (HEADER, 16, 1, 1),
            (BUF, 512, WRITE | 1, 2),
            (STATUS, 1, WRITE | 1, 1),
        ]);
        assert_eq!(q.kick(1)[0].1, 0);
        // `next` outside the descriptor table.
        q.add_raw(&[(HEADER, 16, 1, 1000)]);
        assert_eq!(q.kick(1)[0].1, 0);
        assert_eq!(q.read(STATUS, 1)[0], UNTOUCHED, "no status written");
        assert_eq!(fs::read(file.as_path()).unwrap(), expected(0, 8192));

        q.write(BUF, &[0; 512]);
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_IN, 2, &[(BUF, 512, WRITE)]),
            (513, OK)
        );
        assert_eq!(q.read(BUF, 512), expected(1024, 512));
    }

    #[test]
    fn reset_stops_the_event_loop_and_allows_activating_again() {
        let file = image(4096);
        let (mut block, q) = start(&file, false);
        assert!(matches!(
            block.activate(q.mem.clone(), q.interrupt.clone(), Vec::new()),
            Err(crate::devices::virtio::ActivateError::AlreadyActive)
        ));
        block.reset();
        let mut q = TestQueue::new();
        block.set_acked_features(block.avail_features());
        q.activate(&mut block, false);
        q.write(BUF, &[0; 512]);
        assert_eq!(
            request(&mut q, VIRTIO_BLK_T_IN, 7, &[(BUF, 512, WRITE)]),
            (513, OK)
        );
        assert_eq!(q.read(BUF, 512), expected(7 * 512, 512));
    }
}

//! virtio-blk requests (virtio 1.2 section 5.2.6): checking a descriptor chain from the guest,
//! turning it into a request, and carrying the request out on the disk image.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};

use super::disk::Disk;
use super::{ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE, SEG_MAX};
use crate::devices::virtio::event_loop::DeviceHandler;
use crate::memory::GuestMemory;
use berth_errors::Chain;

/// The request header: type, reserved, sector.
const HEADER_LEN: u32 = 16;
/// One discard or write-zeroes range: sector, num_sectors, flags.
const RANGE_LEN: usize = 16;
/// Header + data descriptors + status.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// Why a request failed; it is answered with `status()` when the chain has a status byte.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error("the chain loops, is longer than {MAX_DESCRIPTORS} descriptors or has a bad `next`")]
    MalformedChain,
    #[error("the chain does not end with a device-writable status byte in guest memory")]
    NoStatus,
    #[error("the header is missing, too short, device-writable or outside guest memory")]
    BadHeader,
    #[error("a data buffer has the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("a data buffer {addr:#x}+{len:#x} is outside guest memory")]
    DataOutsideMemory { addr: u64, len: u32 },
    #[error("{len} data bytes are not a whole number of sectors")]
    PartialSector { len: u64 },
    #[error("sectors {sector}+{count} are beyond the disk's {capacity} sectors")]
    BeyondCapacity {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("the discard or write-zeroes ranges are malformed or too many")]
    BadRanges,
    #[error("range flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("disk I/O failed")]
    Io(#[from] std::io::Error),
}

impl Error {
    fn status(&self) -> u8 {
        match self {
            Error::Unsupported(_) | Error::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A guest buffer, checked to lie in guest memory.
#[derive(Clone, Copy)]
struct Buffer {
    addr: GuestAddress,
    len: u32,
}

/// A request whose buffers have been checked.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Buffer>,
    data_len: u64,
}

/// Serves the block queue on the device's event loop.
pub(super) struct BlockHandler {
    pub(super) disk: Arc<Disk>,
    /// The GET_ID answer.
    pub(super) serial: [u8; ID_BYTES],
    /// Whether the driver negotiated DISCARD and WRITE_ZEROES.
    pub(super) discard: bool,
    pub(super) write_zeroes: bool,
}

impl DeviceHandler for BlockHandler {
    fn handle_chain(
        &mut self,
        mem: &GuestMemory,
        _queue_index: usize,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let (descriptors, status) = match split_chain(mem, chain) {
            Ok(parts) => parts,
            Err(e) => {
                warn_rate_limited!("virtio-blk: dropping request: {e}");
                return 0;
            }
        };
        let (status_byte, written) = match self.serve(mem, &descriptors) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                warn_rate_limited!("virtio-blk: request failed: {}", Chain(&e));
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status_byte, status) {
            warn_rate_limited!("virtio-blk: writing the status byte failed: {e}");
            return 0;
        }
        written.saturating_add(1)
    }
}

impl BlockHandler {
    /// Carries out the request in `descriptors` (header first, status removed); returns the
    /// number of bytes written into guest buffers.
    fn serve(&self, mem: &GuestMemory, descriptors: &[Descriptor]) -> Result<u32, Error> {
        let request = parse(mem, descriptors)?;
        let writes = matches!(
            request.kind,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        );
        if writes && self.disk.read_only() {
            return Err(Error::ReadOnly);
        }
        match request.kind {
            VIRTIO_BLK_T_IN => self.read(mem, &request),
            VIRTIO_BLK_T_OUT => self.write(mem, &request).map(|()| 0),
            VIRTIO_BLK_T_FLUSH => self.disk.flush().map(|()| 0).map_err(Error::Io),
            VIRTIO_BLK_T_GET_ID => Ok(self.get_id(mem, &request)),
            VIRTIO_BLK_T_DISCARD if self.discard => self.ranges(mem, &request).map(|()| 0),
            VIRTIO_BLK_T_WRITE_ZEROES if self.write_zeroes => {
                self.ranges(mem, &request).map(|()| 0)
            }
            kind => Err(Error::Unsupported(kind)),
        }
    }

    /// Checks that the request's data fits the disk; returns the byte offset.
    fn byte_range(&self, request: &Request) -> Result<u64, Error> {
        if request.data_len % SECTOR_SIZE != 0 {
            return Err(Error::PartialSector {
                len: request.data_len,
            });
        }
        check_sectors(
            request.sector,
            request.data_len / SECTOR_SIZE,
            self.disk.capacity(),
        )?;
        Ok(request.sector * SECTOR_SIZE)
    }

    fn read(&self, mem: &GuestMemory, request: &Request) -> Result<u32, Error> {
        let mut offset = self.byte_range(request)?;
        for buffer in &request.data {
            self.disk
                .read_to_guest(mem, buffer.addr, buffer.len as usize, offset)?;
            offset += u64::from(buffer.len);
        }
        // The chain is at most 4 GiB long, checked by the descriptor iterator.
        Ok(u32::try_from(request.data_len).unwrap_or(u32::MAX))
    }

    fn write(&self, mem: &GuestMemory, request: &Request) -> Result<(), Error> {
        let mut offset = self.byte_range(request)?;
        for buffer in &request.data {
            self.disk
                .write_from_guest(mem, buffer.addr, buffer.len as usize, offset)?;
            offset += u64::from(buffer.len);
        }
        Ok(())
    }

    /// Writes the serial into the driver's buffers (as much as fits); returns the bytes written.
    fn get_id(&self, mem: &GuestMemory, request: &Request) -> u32 {
        let mut serial: &[u8] = &self.serial;
        let mut written = 0u32;
        for buffer in &request.data {
            let len = serial.len().min(buffer.len as usize);
            // The buffer was checked to lie in guest memory.
            if mem.write_slice(&serial[..len], buffer.addr).is_err() {
                break;
            }
            serial = &serial[len..];
            written += len as u32;
        }
        written
    }

    /// Discard or write-zeroes: reads the ranges, checks them all, then applies them.
    fn ranges(&self, mem: &GuestMemory, request: &Request) -> Result<(), Error> {
        let len = usize::try_from(request.data_len).map_err(|_| Error::BadRanges)?;
        if len == 0 || len % RANGE_LEN != 0 || len / RANGE_LEN > MAX_DISCARD_SEG as usize {
            return Err(Error::BadRanges);
        }
        let mut bytes = Vec::with_capacity(len);
        for buffer in &request.data {
            let start = bytes.len();
            bytes.resize(start + buffer.len as usize, 0);
            mem.read_slice(&mut bytes[start..], buffer.addr)
                .map_err(|_| Error::BadRanges)?;
        }
        let ranges: Vec<(u64, u32, u32)> = bytes.chunks_exact(RANGE_LEN).map(range).collect();
        let discard = request.kind == VIRTIO_BLK_T_DISCARD;
        let allowed_flags = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        for &(sector, count, flags) in &ranges {
            if flags & !allowed_flags != 0 {
                return Err(Error::UnsupportedFlags(flags));
            }
            if count > MAX_DISCARD_SECTORS {
                return Err(Error::BadRanges);
            }
            check_sectors(sector, count.into(), self.disk.capacity())?;
        }
        for (sector, count, flags) in ranges {
            let (offset, len) = (sector * SECTOR_SIZE, u64::from(count) * SECTOR_SIZE);
            if discard {
                self.discard(offset, len)?;
            } else {
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                self.disk.write_zeroes(offset, len, unmap)?;
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        match self.disk.punch_hole(offset, len) {
            // Discard is a hint: a filesystem without hole punching just keeps the blocks.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            result => result.map_err(Error::Io),
        }
    }
}

/// Decodes one little-endian discard/write-zeroes range.
fn range(bytes: &[u8]) -> (u64, u32, u32) {
    let mut sector = [0u8; 8];
    let mut count = [0u8; 4];
    let mut flags = [0u8; 4];
    sector.copy_from_slice(&bytes[0..8]);
    count.copy_from_slice(&bytes[8..12]);
    flags.copy_from_slice(&bytes[12..16]);
    (
        u64::from_le_bytes(sector),
        u32::from_le_bytes(count),
        u32::from_le_bytes(flags),
    )
}

fn check_sectors(sector: u64, count: u64, capacity: u64) -> Result<(), Error> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Error::BeyondCapacity {
            sector,
            count,
            capacity,
        }),
    }
}

/// One descriptor of a chain, copied out of guest memory.
#[derive(Clone, Copy)]
struct Descriptor {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Collects the chain and takes off its status byte. Without a usable status byte the request
/// cannot be answered at all.
fn split_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> Result<(Vec<Descriptor>, GuestAddress), Error> {
    let mut descriptors = Vec::new();
    let mut ended = false;
    for desc in chain {
        if descriptors.len() == MAX_DESCRIPTORS {
            return Err(Error::MalformedChain);
        }
        descriptors.push(Descriptor {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        ended = !desc.has_next();
    }
    // The iterator stops early, with `next` still set, on loops and out-of-table indices.
    if !ended {
        return Err(Error::MalformedChain);
    }
    let status = match descriptors.pop() {
        Some(last) if last.writable && last.len >= 1 && mem.check_range(last.addr, 1) => last.addr,
        _ => return Err(Error::NoStatus),
    };
    Ok((descriptors, status))
}

/// Reads the header and checks every data buffer.
fn parse(mem: &GuestMemory, descriptors: &[Descriptor]) -> Result<Request, Error> {
    let (header, data) = descriptors.split_first().ok_or(Error::BadHeader)?;
    if header.writable || header.len < HEADER_LEN {
        return Err(Error::BadHeader);
    }
    let kind: u32 = mem.read_obj(header.addr).map_err(|_| Error::BadHeader)?;
    let sector_addr = header.addr.checked_add(8).ok_or(Error::BadHeader)?;
    let sector: u64 = mem.read_obj(sector_addr).map_err(|_| Error::BadHeader)?;
    let (kind, sector) = (u32::from_le(kind), u64::from_le(sector));

    let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let device_reads = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    let mut buffers = Vec::with_capacity(data.len());
    let mut data_len = 0u64;
    for desc in data {
        if (device_writes && !desc.writable) || (device_reads && desc.writable) {
            return Err(Error::WrongDirection(kind));
        }
        if !mem.check_range(desc.addr, desc.len as usize) {
            return Err(Error::DataOutsideMemory {
                addr: desc.addr.0,
                len: desc.len,
            });
        }
        data_len += u64::from(desc.len);
        buffers.push(Buffer {
            addr: desc.addr,
            len: desc.len,
        });
    }
    Ok(Request {
        kind,
        sector,
        data: buffers,
        data_len,
    })
}

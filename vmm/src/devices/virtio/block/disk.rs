//! The disk image file behind a virtio-blk device: opening it, positional I/O straight between
//! the file and guest memory, flush, discard (hole punching) and write-zeroes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemory as _, VolatileSlice};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::{Error, SECTOR_SIZE};
use crate::memory::GuestMemory;

/// Chunk of zeros written when the filesystem cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// An open disk image.
pub(super) struct Disk {
    file: File,
    /// Size in sectors; a trailing partial sector is not exposed.
    capacity: u64,
    read_only: bool,
}

impl Disk {
    pub(super) fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let file = open_file(path, read_only)?;
        let metadata = file.metadata().map_err(|source| Error::Size {
            path: path.to_owned(),
            source,
        })?;
        if metadata.is_dir() {
            return Err(Error::IsDirectory {
                path: path.to_owned(),
            });
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| Error::Size {
                path: path.to_owned(),
                source,
            })?;
        match size {
            0 => {
                return Err(Error::Empty {
                    path: path.to_owned(),
                })
            }
            1..SECTOR_SIZE => {
                return Err(Error::TooSmall {
                    path: path.to_owned(),
                    size,
                })
            }
            _ if size % SECTOR_SIZE != 0 => tracing::warn!(
                "disk image {} is not a whole number of sectors: its last {} bytes are hidden",
                path.display(),
                size % SECTOR_SIZE
            ),
            _ => {}
        }
        Ok(Self {
            file,
            capacity: size / SECTOR_SIZE,
            read_only,
        })
    }

    /// Size in 512-byte sectors.
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `len` bytes at file `offset` into guest memory at `addr`.
    pub(super) fn read_to_guest(
        &self,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
    ) -> io::Result<()> {
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            pread_exact(&self.file, &slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to file `offset`.
    pub(super) fn write_from_guest(
        &self,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
    ) -> io::Result<()> {
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            pwrite_all(&self.file, &slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    pub(super) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Gives `len` bytes at `offset` back to the host filesystem; they then read as zeros.
    pub(super) fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocateMode::PunchHole, true, offset, len)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// Makes `len` bytes at `offset` read as zeros, unmapping them if `unmap`; falls back to
    /// writing zeros when the filesystem cannot do either.
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            FallocateMode::PunchHole
        } else {
            FallocateMode::ZeroRange
        };
        if fallocate(&self.file, mode, true, offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&zeros[..chunk], offset + done)?;
            done += chunk as u64;
        }
        Ok(())
    }
}

fn open_file(path: &Path, read_only: bool) -> Result<File, Error> {
    let opened = OpenOptions::new().read(true).write(!read_only).open(path);
    let source = match opened {
        Ok(file) => return Ok(file),
        Err(source) => source,
    };
    let path = path.to_owned();
    if source.kind() == io::ErrorKind::NotFound {
        return Err(Error::NotFound { path });
    }
    // Tell "cannot write" apart from "cannot read": only the former has a read-only fix.
    if !read_only && File::open(&path).is_ok() {
        return Err(Error::NotWritable { path, source });
    }
    Err(Error::NotReadable { path, source })
}

fn file_offset(offset: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Fills `slice` from `file` at `offset`, with pread(2) straight into guest memory.
fn pread_exact<B: BitmapSlice>(
    file: &File,
    slice: &VolatileSlice<B>,
    mut offset: u64,
) -> io::Result<()> {
    let guard = slice.ptr_guard_mut();
    let mut done = 0usize;
    while done < slice.len() {
        // SAFETY: `guard` points at `slice.len()` bytes of mapped guest memory that stay mapped
        // while `slice` borrows the memory; the kernel writes at most `len - done` bytes from
        // `done`, inside the slice. Guest memory is only accessed through volatile slices and raw
        // pointers, so no Rust reference aliases the bytes written.
        let read = unsafe {
            libc::pread64(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset(offset)?,
            )
        };
        match read {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                slice.bitmap().mark_dirty(done, n as usize);
                done += n as usize;
                offset += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writes all of `slice` to `file` at `offset`, with pwrite(2) straight from guest memory.
fn pwrite_all<B: BitmapSlice>(
    file: &File,
    slice: &VolatileSlice<B>,
    mut offset: u64,
) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let mut done = 0usize;
    while done < slice.len() {
        // SAFETY: `guard` points at `slice.len()` bytes of mapped guest memory that stay mapped
        // while `slice` borrows the memory; the kernel reads `len - done` bytes from `done`,
        // inside the slice.
        let written = unsafe {
            libc::pwrite64(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset(offset)?,
            )
        };
        match written {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                done += n as usize;
                offset += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

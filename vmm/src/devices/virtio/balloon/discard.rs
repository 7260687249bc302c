//! Giving guest pages back to the host: a guest-physical range, checked to lie inside one
//! region of guest memory, becomes its host mapping and is released with the host's madvise.

use std::io;
use std::sync::OnceLock;

use vm_memory::{Address, GuestAddress, GuestMemory as _, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("the range {addr:#x}+{len:#x} is not inside one region of guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("releasing the host pages of {addr:#x}+{len:#x} failed")]
    Release {
        addr: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

/// Frees the host memory behind the guest range `addr..addr + len`: the guest reads zeros
/// there afterwards, and the host gets the pages back at once. Only whole host pages inside
/// the range are released (a host page larger than the guest's 4 KiB would otherwise take its
/// neighbours' data along). Returns the bytes released.
pub(crate) fn discard(mem: &GuestMemory, addr: GuestAddress, len: u64) -> Result<u64, Error> {
    if len == 0 {
        return Ok(0);
    }
    let outside = || Error::OutsideMemory { addr: addr.0, len };
    let region = mem.find_region(addr).ok_or_else(outside)?;
    let offset = addr.unchecked_offset_from(region.start_addr());
    let end = offset.checked_add(len).ok_or_else(outside)?;
    if end > region.len() {
        return Err(outside());
    }
    let page = host_page_size();
    let start = offset.next_multiple_of(page);
    let end = end - end % page;
    if start >= end {
        return Ok(0);
    }
    let host = region
        .get_host_address(MemoryRegionAddress(start))
        .map_err(|_| outside())?;
    let bytes = usize::try_from(end - start).map_err(|_| outside())?;
    // SAFETY: `host..host + bytes` lies inside the region's mapping, checked above; the guest
    // gave these pages up, and nothing in the VMM keeps references into guest memory, so
    // their contents may vanish.
    unsafe { release_host_pages(host, bytes) }.map_err(|source| Error::Release {
        addr: addr.0,
        len,
        source,
    })?;
    Ok(end - start)
}

fn host_page_size() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Releases `len` bytes of anonymous private memory at the page-aligned `host`.
///
/// Linux: MADV_DONTNEED drops the pages at once and the next touch maps a zero page (KVM's
/// MMU notifier unmaps them from the guest too). macOS will need another advice here:
/// MADV_DONTNEED does not release memory there (libkrun PR #703); MADV_FREE_REUSABLE (which
/// the process footprint accounts for) or MADV_FREE, as libkrun uses, and guest reads of a
/// released page then need not be zero. That macOS backend is a file to add beside this one.
///
/// # Safety
/// `host..host + len` must be a mapping the caller owns whose contents may be discarded.
unsafe fn release_host_pages(host: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller's contract.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

//! Loads the guest kernel (PVH ELF `vmlinux`, plain ELF or `bzImage`), its command line and the
//! boot information it reads (PVH `start_info` or the Linux zero page with its E820 map).

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _, GuestMemoryRegion};

use super::gdt;
use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};
use crate::hypervisor::BootState;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel this VMM can boot (neither ELF vmlinux nor bzImage)")]
    LoadKernel { path: String, source: loader::Error },
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("writing the kernel command line failed")]
    WriteCmdline(#[source] loader::Error),
    #[error("writing the boot information into guest memory failed")]
    WriteBootInfo(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    BootTables(#[from] gdt::Error),
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// The 64-bit entry point of a bzImage is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// The guest's memory map: RAM, with the BIOS area below 1 MiB (EBDA, ACPI, MP table) reserved.
fn memory_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let start = start.max(HIMEM_START);
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Loads `kernel` with `cmdline` and returns the state the boot vCPU starts in.
pub fn load_kernel(
    mem: &GuestMemory,
    kernel: &Path,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootState, Error> {
    let path = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|source| Error::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let (loaded, bzimage) = match Elf::load(mem, None, &mut file, highmem) {
        Ok(loaded) => (loaded, false),
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let loaded = BzImage::load(mem, None, &mut file, highmem).map_err(|source| {
                Error::LoadKernel {
                    path: path.clone(),
                    source,
                }
            })?;
            (loaded, true)
        }
        Err(source) => return Err(Error::LoadKernel { path, source }),
    };

    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    line.insert_str(cmdline).map_err(Error::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &line).map_err(Error::WriteCmdline)?;
    let cmdline_size = line
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(1) as u32;

    if let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap {
        write_start_info(mem, rsdp)?;
        return Ok(gdt::pvh_boot_state(mem, entry.raw_value(), PVH_INFO_START)?);
    }
    let mut params = boot_params::default();
    if let Some(header) = loaded.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.acpi_rsdp_addr = rsdp;
    let map = memory_map(mem);
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    let entry = loaded.kernel_load.raw_value()
        + if bzimage {
            BZIMAGE_64BIT_ENTRY_OFFSET
        } else {
            0
        };
    Ok(gdt::long_mode_boot_state(mem, entry, ZERO_PAGE_START)?)
}

fn write_start_info(mem: &GuestMemory, rsdp: u64) -> Result<(), Error> {
    let map = memory_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_ranges;

    fn memory(size: u64) -> GuestMemory {
        let ranges: Vec<_> = ram_ranges(size)
            .into_iter()
            .map(|(s, l)| (GuestAddress(s), l as usize))
            .collect();
        GuestMemory::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn memory_map_reserves_the_bios_area_and_skips_the_gap() {
        let map = memory_map(&memory(5 << 30));
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(
            map[1],
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)
        );
        assert_eq!(map[2], (HIMEM_START, 0xc000_0000 - HIMEM_START, E820_RAM));
        assert_eq!(map[3], (1 << 32, (5 << 30) - 0xc000_0000, E820_RAM));
    }

    #[test]
    fn a_file_that_is_no_kernel_is_refused_clearly() {
        let mem = memory(64 << 20);
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(file.as_path(), b"#!/bin/sh\necho not a kernel\n").unwrap();
        let err = load_kernel(&mem, file.as_path(), "console=ttyS0", 0).unwrap_err();
        assert!(matches!(err, Error::LoadKernel { .. }), "{err}");
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux"), "", 0).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}

//! The GDT, identity page tables and register state the kernel is entered with, for the 32-bit
//! PVH entry and the 64-bit Linux boot protocol.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START};
use crate::hypervisor::{BootState, Segment};
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the boot GDT, IDT or page tables into guest memory failed")]
    WriteBootTables(#[from] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from its flags, base and limit, as the CPU's descriptor format wants it.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment the hypervisor loads for selector `index * 8`.
fn segment(entry: u64, index: u16) -> Segment {
    Segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g: (entry >> 55) & 1 == 1,
    }
}

fn write_gdt(mem: &GuestMemory, gdt: &[u64]) -> Result<(), Error> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    Ok(())
}

fn state_from_gdt(gdt: &[u64; 4]) -> BootState {
    BootState {
        code: segment(gdt[1], 1),
        data: segment(gdt[2], 2),
        tss: segment(gdt[3], 3),
        gdt: (GDT_START, (std::mem::size_of_val(gdt) - 1) as u16),
        idt: (IDT_START, 7),
        rflags: 0x2,
        ..Default::default()
    }
}

/// The PVH entry: 32-bit protected mode, paging off, `%ebx` pointing at `hvm_start_info`.
pub fn pvh_boot_state(mem: &GuestMemory, entry: u64, start_info: u64) -> Result<BootState, Error> {
    let gdt = [
        0,
        gdt_entry(0xc09b, 0, 0xfffff), // CODE32: execute/read, 4 GiB
        gdt_entry(0xc093, 0, 0xfffff), // DATA: read/write, 4 GiB
        gdt_entry(0x008b, 0, 0x67),    // TSS
    ];
    write_gdt(mem, &gdt)?;
    Ok(BootState {
        rip: entry,
        rbx: start_info,
        cr0: X86_CR0_PE | X86_CR0_ET,
        ..state_from_gdt(&gdt)
    })
}

/// The Linux 64-bit boot protocol: long mode, the first GiB identity mapped, `%rsi` pointing at
/// `boot_params`.
pub fn long_mode_boot_state(
    mem: &GuestMemory,
    entry: u64,
    zero_page: u64,
) -> Result<BootState, Error> {
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // CODE64
        gdt_entry(0xc093, 0, 0xfffff), // DATA
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    write_gdt(mem, &gdt)?;
    // PML4[0] -> PDPTE[0] -> PDE with 512 2-MiB pages: the first GiB, identity mapped.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    Ok(BootState {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        cr0: X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        cr3: PML4_START,
        cr4: X86_CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        ..state_from_gdt(&gdt)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_intended_segments() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert!(code64.l && code64.present && code64.s && code64.g && !code64.db);
        assert_eq!(
            (code64.selector, code64.type_, code64.limit),
            (8, 0xb, 0xffff_ffff)
        );
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert!(code32.db && !code32.l);
        let tss = segment(gdt_entry(0x008b, 0, 0x67), 3);
        assert!(!tss.s && tss.present && !tss.g);
        assert_eq!((tss.limit, tss.type_, tss.selector), (0x67, 0xb, 24));
        let based = segment(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 2);
        assert_eq!(based.base, 0x1234_5678);
    }

    #[test]
    fn long_mode_state_maps_the_first_gigabyte() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let state = long_mode_boot_state(&mem, 0x100_0200, 0x7000).unwrap();
        assert_eq!(
            (state.rip, state.rsi, state.cr3),
            (0x100_0200, 0x7000, PML4_START)
        );
        assert_ne!(state.efer & EFER_LMA, 0);
        let last: u64 = mem.read_obj(GuestAddress(PDE_START + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
    }
}

//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT, then IDT          0x000e_0000  ACPI tables (RSDP first)
//! 0x0000_6000  PVH start_info         0x000f_0000  MP table
//! 0x0000_7000  boot_params (zero page) 0x0010_0000  kernel (1 MiB and up), RAM up to 3 GiB
//! 0x0000_8ff0  boot stack             0xc000_0000  MMIO gap: virtio-mmio devices at 0xd000_0000,
//! 0x0000_9000  page tables (3 pages)              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x0002_0000  kernel command line    0x1_0000_0000 RAM above 3 GiB continues here
//! ```

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux's x86 COMMAND_LINE_SIZE, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of conventional memory usable by the guest (the EBDA would start here).
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const MPTABLE_START: u64 = 0xf0000;
/// Where the BIOS area ends and the kernel may be loaded.
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// IOAPIC pins: 4 is COM1, virtio devices take 5 and up.
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_START: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

/// The guest RAM ranges (start, length) for `mem_size` bytes: below the MMIO gap first, the
/// rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(8 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (8 << 30) - MMIO_GAP_START)
            ]
        );
    }
}

//! The Intel MultiProcessor table (spec 1.4): CPUs, the ISA bus and the IOAPIC, for guests
//! booted with `acpi=off` (with ACPI, the MADT says the same).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MPTABLE_START};
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("an MP table for {0} vCPUs does not fit below 1 MiB")]
    TooManyCpus(u8),
    #[error("writing the MP table into guest memory failed")]
    WriteMpTable(#[from] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// The table may use 0xf0000..0x100000.
const MPTABLE_MAX_SIZE: usize = 0x10000;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The bytes of the configuration table (header and entries) for `cpus` vCPUs, placed at `addr`.
fn config_table(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus.saturating_add(1);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS as u8 {
        // ISA IRQ n is IOAPIC pin n, edge triggered, active high (bus defaults).
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 of every local APIC is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum below
    table.extend_from_slice(b"BERTH   ");
    table.extend_from_slice(b"BERTHVMM    ");
    table.extend_from_slice(&[0; 6]); // OEM table pointer and size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the floating pointer and the configuration table at `MPTABLE_START`.
pub fn setup_mptable(mem: &GuestMemory, cpus: u8) -> Result<(), Error> {
    let table = config_table(cpus);
    if 16 + table.len() > MPTABLE_MAX_SIZE {
        return Err(Error::TooManyCpus(cpus));
    }
    let table_addr = MPTABLE_START + 16;
    let mut floating = [0u8; 16];
    floating[..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4; // spec revision 1.4
    floating[10] = checksum(&floating);
    mem.write_slice(&floating, GuestAddress(MPTABLE_START))?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let mut floating = [0u8; 16];
        mem.read_slice(&mut floating, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(sum(&floating), 0);
        let table_addr = u32::from_le_bytes(floating[4..8].try_into().unwrap()) as u64;
        let mut header = [0u8; 44];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);
        let count = u16::from_le_bytes([header[34], header[35]]);
        assert_eq!(count, 4 + 2 + IOAPIC_PINS as u16 + 2);
        // The first processor entry is the bootstrap processor, APIC ID 0.
        assert_eq!(
            &table[44..48],
            &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOTSTRAP]
        );
        assert_eq!(&table[64..68], &[0, 1, APIC_VERSION, CPU_ENABLED]);
    }

    #[test]
    fn the_largest_vm_still_fits() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 254).unwrap();
    }
}

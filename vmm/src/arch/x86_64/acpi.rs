//! ACPI tables: RSDP, XSDT, FADT, DSDT (`\_S5` only) and MADT. They tell the guest its CPUs
//! and IOAPIC and give it the PM1 and reset registers that `crate::devices::power` answers, so
//! the guest can power off and reboot.
//!
//! The platform is not "hardware-reduced": that mode makes Linux drop the legacy PIC and with it
//! the ISA interrupt lines that the serial port and the command-line virtio-mmio devices use.
//! Fixed hardware costs only the PM1 blocks (no PM timer, no GPEs, no SMI command port: ACPI
//! mode is always on).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_START};
use crate::devices::power::{
    ACPI_PM1_CNT_LEN, ACPI_PM1_CNT_PORT, ACPI_PM1_EVT_LEN, ACPI_PM1_EVT_PORT, ACPI_RESET_PORT,
    ACPI_RESET_VALUE,
};
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables for {0} vCPUs do not fit below the MP table")]
    TooManyCpus(u8),
    #[error("writing the ACPI tables into guest memory failed")]
    WriteAcpiTables(#[from] vm_memory::GuestMemoryError),
}

const OEM_ID: &[u8; 6] = b"BERTH ";
const OEM_TABLE_ID: &[u8; 8] = b"BERTHVMM";

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// A system description table: the 36-byte header followed by `body`, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let length = (36 + body.len()) as u32;
    let mut t = Vec::with_capacity(length as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&length.to_le_bytes());
    t.extend_from_slice(&[revision, 0]);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"BRTH");
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for a register block of `bytes` bytes in I/O space.
fn io_port_gas(port: u16, bytes: u8) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = 1; // system I/O
    gas[1] = bytes * 8; // bit width
    gas[3] = bytes.min(4).trailing_zeros() as u8 + 1; // access size: 1 byte, 2 bytes, 4 bytes
    gas[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    gas
}

fn dsdt() -> Vec<u8> {
    // Name (_S5, Package (4) { 5, 0, 0, 0 }): S5 (soft off) is sleep type 5.
    const AML_S5: [u8; 13] = [
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0,
    ];
    sdt(b"DSDT", 2, &AML_S5)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const FADT_LEN: usize = 276;
    const FLAG_WBINVD: u32 = 1 << 0;
    /// No fixed-feature power or sleep button: the guest is stopped through the agent.
    const FLAG_PWR_BUTTON: u32 = 1 << 4;
    const FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    /// The SCI: ISA IRQ 9, as on a PC. Nothing ever raises it.
    const SCI_IRQ: u16 = 9;
    // IAPC_BOOT_ARCH: no VGA, no MSI, no CMOS RTC (the guest takes wall time from kvmclock).
    const BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 5);
    let mut body = vec![0u8; FADT_LEN - 36];
    let at = |offset: usize| offset - 36;
    body[at(46)..at(48)].copy_from_slice(&SCI_IRQ.to_le_bytes());
    // SMI_CMD (offset 48) stays 0: the platform is always in ACPI mode.
    body[at(56)..at(60)].copy_from_slice(&u32::from(ACPI_PM1_EVT_PORT).to_le_bytes());
    body[at(64)..at(68)].copy_from_slice(&u32::from(ACPI_PM1_CNT_PORT).to_le_bytes());
    body[at(88)] = ACPI_PM1_EVT_LEN;
    body[at(89)] = ACPI_PM1_CNT_LEN;
    body[at(109)..at(111)].copy_from_slice(&BOOT_ARCH.to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(
        &(FLAG_WBINVD | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP).to_le_bytes(),
    );
    body[at(116)..at(128)].copy_from_slice(&io_port_gas(ACPI_RESET_PORT, 1));
    body[at(128)] = ACPI_RESET_VALUE;
    body[at(131)] = 0; // FADT minor version
    body[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes()); // X_DSDT
    body[at(148)..at(160)].copy_from_slice(&io_port_gas(ACPI_PM1_EVT_PORT, ACPI_PM1_EVT_LEN));
    body[at(172)..at(184)].copy_from_slice(&io_port_gas(ACPI_PM1_CNT_PORT, ACPI_PM1_CNT_LEN));
    body[at(268)..at(276)].copy_from_slice(b"BERTHVMM"); // hypervisor vendor identity
    sdt(b"FACP", 6, &body)
}

fn madt(cpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for cpu in 0..cpus {
        // Processor Local APIC: UID, APIC ID, enabled.
        body.extend_from_slice(&[0, 8, cpu, cpu]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: ID, address, GSI base 0.
    body.extend_from_slice(&[1, 12, cpus.saturating_add(1), 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI on LINT1 of all processors.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &body)
}

/// Writes the tables from `ACPI_START` and returns the RSDP's address.
pub fn setup_acpi(mem: &GuestMemory, cpus: u8) -> Result<u64, Error> {
    const RSDP_LEN: u64 = 36;
    let dsdt_addr = ACPI_START + RSDP_LEN.next_multiple_of(16);
    let dsdt = dsdt();
    let fadt_addr = (dsdt_addr + dsdt.len() as u64).next_multiple_of(16);
    let fadt = fadt(dsdt_addr);
    let madt_addr = (fadt_addr + fadt.len() as u64).next_multiple_of(16);
    let madt = madt(cpus);
    let xsdt_addr = (madt_addr + madt.len() as u64).next_multiple_of(16);
    let mut pointers = Vec::new();
    pointers.extend_from_slice(&fadt_addr.to_le_bytes());
    pointers.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = sdt(b"XSDT", 1, &pointers);
    if xsdt_addr + xsdt.len() as u64 > MPTABLE_START {
        return Err(Error::TooManyCpus(cpus));
    }

    let mut rsdp = [0u8; RSDP_LEN as usize];
    rsdp[..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(OEM_ID);
    rsdp[15] = 2; // ACPI 2.0+: the XSDT is used
    rsdp[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    mem.write_slice(&rsdp, GuestAddress(ACPI_START))?;
    for (addr, table) in [
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(table, GuestAddress(addr))?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn read_table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut t = vec![0u8; len as usize];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "checksum of {:?}", std::str::from_utf8(&t[..4]));
        t
    }

    #[test]
    fn the_guest_finds_every_table_from_the_rsdp() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp_addr = setup_acpi(&mem, 2).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let xsdt = read_table(&mem, u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
        let fadt_addr = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(xsdt[44..52].try_into().unwrap());
        let fadt = read_table(&mem, fadt_addr);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_eq!(
            flags & (1 << 20),
            0,
            "not hardware-reduced: Linux would drop the ISA IRQs"
        );
        assert_eq!(
            u32::from_le_bytes(fadt[64..68].try_into().unwrap()),
            u32::from(ACPI_PM1_CNT_PORT)
        );
        assert_eq!(fadt[89], 2, "PM1 control block length");
        assert_eq!(
            u16::from_le_bytes(fadt[176..178].try_into().unwrap()),
            ACPI_PM1_CNT_PORT
        );
        assert_eq!(fadt[173], 16, "X_PM1a_CNT_BLK is 16 bits wide");
        let dsdt = read_table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[36..41], &[0x08, b'_', b'S', b'5', b'_']);
        let madt = read_table(&mem, madt_addr);
        assert_eq!(&madt[..4], b"APIC");
        // Two local APIC entries, then the IOAPIC.
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..64], &[1, 12, 3, 0]);
    }

    #[test]
    fn many_cpus_still_fit_below_the_mp_table() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_acpi(&mem, 254).unwrap();
    }
}

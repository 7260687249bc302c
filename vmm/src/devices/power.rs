//! The guest's ways to power off and reset: the ACPI PM1 event and control registers and the
//! ACPI reset register (described to the guest by `arch::x86_64::acpi`), and the i8042
//! controller's reset line (`reboot=k`).

use super::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

/// PM1a event block: status (2 bytes) then enable (2 bytes).
pub const ACPI_PM1_EVT_PORT: u16 = 0x600;
pub const ACPI_PM1_EVT_LEN: u8 = 4;
/// PM1a control block (2 bytes).
pub const ACPI_PM1_CNT_PORT: u16 = 0x604;
pub const ACPI_PM1_CNT_LEN: u8 = 2;
pub const ACPI_RESET_PORT: u16 = 0x608;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// All of the above, from `ACPI_PM1_EVT_PORT`.
pub const ACPI_PORTS_LEN: u64 = 9;
pub const I8042_PORT: u16 = 0x60;
/// Data port 0x60 through command/status port 0x64.
pub const I8042_PORTS_LEN: u64 = 5;

/// PM1 control: SLP_EN and SLP_TYP (ACPI 6.4, table 4.13).
const SLEEP_ENABLE: u16 = 1 << 13;
const SLEEP_TYPE_SHIFT: u16 = 10;
const SLEEP_TYPE_MASK: u16 = 0x7;
/// `\_S5` in the DSDT says soft-off is sleep type 5.
const S5_SLEEP_TYPE: u16 = 5;
const PM1_EN_OFFSET: u64 = 2;
const PM1_CNT_OFFSET: u64 = (ACPI_PM1_CNT_PORT - ACPI_PM1_EVT_PORT) as u64;
const RESET_OFFSET: u64 = (ACPI_RESET_PORT - ACPI_PM1_EVT_PORT) as u64;
const I8042_CMD_RESET_CPU: u8 = 0xfe;
const I8042_STATUS_OFFSET: u64 = 4;

/// The ACPI PM1 registers and the reset register, from `ACPI_PM1_EVT_PORT`. Nothing ever
/// sleeps or wakes, so status and enable read as zero and only S5 and reset have an effect.
pub struct AcpiPm {
    exit: ExitNotifier,
    /// PM1 enable: kept so the guest reads back what it enabled (ACPICA checks).
    pm1_enable: u16,
}

impl AcpiPm {
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            exit,
            pm1_enable: 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // Status and control read as zero: no event is ever pending, nothing ever sleeps.
        let enable = self.pm1_enable.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            if let Some(&b) = (offset + i as u64)
                .checked_sub(PM1_EN_OFFSET)
                .and_then(|o| enable.get(o as usize))
            {
                *byte = b;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&low) = data.first() else { return };
        let value = u16::from(low) | data.get(1).map_or(0, |&high| u16::from(high) << 8);
        match offset {
            PM1_CNT_OFFSET
                if value & SLEEP_ENABLE != 0
                    && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE =>
            {
                self.exit.notify(ExitReason::PowerOff)
            }
            RESET_OFFSET if low == ACPI_RESET_VALUE => self.exit.notify(ExitReason::Reset),
            PM1_EN_OFFSET => self.pm1_enable = value,
            _ => tracing::debug!("ignored ACPI register write {value:#x} at offset {offset}"),
        }
    }
}

/// Enough of an i8042 keyboard controller for Linux's `reboot=k`: an always-empty status and
/// the CPU reset command.
pub struct I8042 {
    exit: ExitNotifier,
}

impl I8042 {
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_STATUS_OFFSET && data.first() == Some(&I8042_CMD_RESET_CPU) {
            self.exit.notify(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_sleep_powers_off_and_the_reset_register_resets() {
        let (exit, rx) = ExitNotifier::new();
        let mut pm = AcpiPm::new(exit);
        let cnt = |typ: u16, en: bool| {
            (typ << SLEEP_TYPE_SHIFT | if en { SLEEP_ENABLE } else { 0 }).to_le_bytes()
        };
        pm.write(PM1_CNT_OFFSET, &cnt(3, true)); // S3: not supported, ignored
        pm.write(PM1_CNT_OFFSET, &cnt(S5_SLEEP_TYPE, false)); // SLP_TYP first, no SLP_EN
        pm.write(0, &cnt(S5_SLEEP_TYPE, true)); // the status register, not control
        assert!(rx.try_recv().is_err());
        pm.write(PM1_CNT_OFFSET, &cnt(S5_SLEEP_TYPE, true));
        assert_eq!(rx.try_recv(), Ok(ExitReason::PowerOff));
        pm.write(RESET_OFFSET, &[0x7]);
        assert!(rx.try_recv().is_err());
        pm.write(RESET_OFFSET, &[ACPI_RESET_VALUE]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
        let mut status = [0xff, 0xff];
        pm.read(0, &mut status);
        assert_eq!(status, [0, 0]);
        pm.write(PM1_EN_OFFSET, &0x0120u16.to_le_bytes());
        let mut enable = [0u8; 2];
        pm.read(PM1_EN_OFFSET, &mut enable);
        assert_eq!(u16::from_le_bytes(enable), 0x0120, "enable bits read back");
        let mut both = [0xffu8; 4];
        pm.read(0, &mut both);
        assert_eq!(both, [0, 0, 0x20, 0x01]);
    }

    #[test]
    fn i8042_reset_command_resets() {
        let (exit, rx) = ExitNotifier::new();
        let mut kbd = I8042::new(exit);
        kbd.write(0, &[I8042_CMD_RESET_CPU]); // data port: not a command
        assert!(rx.try_recv().is_err());
        kbd.write(4, &[I8042_CMD_RESET_CPU]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
    }
}

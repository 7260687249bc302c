//! The guest's ways to power off and reset: the ACPI hardware-reduced sleep-control and reset
//! registers (described to the guest by `arch::x86_64::acpi`) and the i8042 controller's reset
//! line (`reboot=k`).

use super::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The three ACPI registers are consecutive byte ports.
pub const ACPI_PORTS_LEN: u64 = 3;
pub const I8042_PORT: u16 = 0x60;
/// Data port 0x60 through command/status port 0x64.
pub const I8042_PORTS_LEN: u64 = 5;

const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
/// `\_S5` in the DSDT says soft-off is sleep type 5.
const S5_SLEEP_TYPE: u8 = 5;
const I8042_CMD_RESET_CPU: u8 = 0xfe;
const I8042_STATUS_OFFSET: u64 = 4;

/// The ACPI sleep-control, sleep-status and reset registers, from `ACPI_SLEEP_CONTROL_PORT`.
pub struct AcpiPm {
    exit: ExitNotifier,
}

impl AcpiPm {
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Nothing is ever asleep: sleep status reads as zero, the others too.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLEEP_ENABLE != 0
                && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE =>
            {
                self.exit.notify(ExitReason::PowerOff)
            }
            2 if value == ACPI_RESET_VALUE => self.exit.notify(ExitReason::Reset),
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
        pm.write(0, &[(3 << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE]); // S3: not supported, ignored
        pm.write(0, &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]); // no SLP_EN: ignored
        assert!(rx.try_recv().is_err());
        pm.write(0, &[(S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::PowerOff));
        pm.write(2, &[0x7]);
        assert!(rx.try_recv().is_err());
        pm.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::Reset));
        let mut status = [0xff];
        pm.read(1, &mut status);
        assert_eq!(status, [0]);
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

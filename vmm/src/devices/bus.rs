//! The address buses (port I/O and MMIO) that route guest exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes on a bus.
///
/// `offset` is relative to the base the device was inserted at. A read must fill all of `data`
/// (with zeros for registers it does not implement); a write the device does not understand is
/// ignored. Neither may panic on any guest input.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<Range, Arc<Mutex<dyn BusDevice>>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::InvalidRange { base, len })?;
        let overlaps = self
            .devices
            .keys()
            .any(|r| base < r.base + r.len && r.base < end);
        if overlaps {
            return Err(Error::Overlap { base, len });
        }
        self.devices.insert(Range { base, len }, device);
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (range, dev) = self
            .devices
            .range(
                ..=Range {
                    base: addr,
                    len: u64::MAX,
                },
            )
            .next_back()?;
        let offset = addr - range.base;
        // The whole access must fall inside the device's range.
        (offset.checked_add(size as u64)? <= range.len).then_some((offset, dev))
    }

    /// Routes a read; returns false (and leaves `data` untouched) when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panic is still served: the panic already ended the
/// thread that caused it, and devices keep their state consistent between register accesses.
fn lock(dev: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.fill.wrapping_add(offset as u8));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            last_write: None,
            fill,
        }))
    }

    #[test]
    fn routes_to_the_owning_device_with_relative_offsets() {
        let mut bus = Bus::new();
        let a = recorder(0x10);
        let b = recorder(0x80);
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x1000, 0x100).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [0x12]);
        assert!(bus.write(0x1004, &[1, 2, 3, 4]));
        assert_eq!(b.lock().unwrap().last_write, Some((4, vec![1, 2, 3, 4])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unowned_and_straddling_accesses_are_refused() {
        let mut bus = Bus::new();
        bus.insert(recorder(0), 0x1000, 0x10).unwrap();
        let mut data = [0xaau8; 4];
        assert!(!bus.read(0xfff, &mut data));
        assert!(
            !bus.read(0x100e, &mut data),
            "access straddling the end of a device"
        );
        assert!(!bus.write(0x1010, &[0]));
        assert_eq!(data, [0xaa; 4]);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(recorder(0), 0x1000, 0x10).unwrap();
        assert_eq!(
            bus.insert(recorder(0), 0x100f, 1),
            Err(Error::Overlap {
                base: 0x100f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(recorder(0), 0xff0, 0x11),
            Err(Error::Overlap {
                base: 0xff0,
                len: 0x11
            })
        );
        assert_eq!(
            bus.insert(recorder(0), 0x2000, 0),
            Err(Error::InvalidRange {
                base: 0x2000,
                len: 0
            })
        );
        assert_eq!(
            bus.insert(recorder(0), u64::MAX, 2),
            Err(Error::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(recorder(0), 0x1010, 0x10).unwrap();
    }
}

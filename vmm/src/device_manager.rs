//! The device manager: builds each virtio device the machine description lists, hands it an
//! MMIO window and an interrupt line, wires its queue notifications and interrupt into the
//! hypervisor, and writes the `virtio_mmio.device=` kernel arguments that announce it. Devices
//! never pick their own addresses or IRQs.
//!
//! Adding a device type: a folder under `devices/virtio/` and one arm in [`build_device`].

use std::ops::Range;
use std::sync::{Arc, Mutex};

use berth_machine::DeviceConfig;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::balloon::BalloonHandle;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::{Muxer, Vsock};
use crate::devices::virtio::{mmio, Balloon, Block, MmioTransport, Rng, VirtioDevice};
use crate::devices::{bus, Bus};
use crate::hypervisor::{self, Vm};
use crate::memory::GuestMemory;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating device `{field}` ({what})")]
    CreateDevice {
        field: String,
        what: String,
        #[source]
        source: BoxError,
    },
    #[error("no interrupt line is left for another virtio device: the guest has {count} (IRQs {first}-{last})", count = .irqs.len(), first = .irqs.start, last = .irqs.end.saturating_sub(1))]
    OutOfIrqs { irqs: Range<u32> },
    #[error("no MMIO space is left for another {len:#x}-byte device window in {start:#x}-{end:#x}", start = .space.start, end = .space.end)]
    OutOfMmio { space: Range<u64>, len: u64 },
    #[error("creating the interrupt eventfd of the device at {base:#x}")]
    CreateIrqEvent {
        base: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("routing IRQ {irq} to the device at {base:#x}")]
    RegisterIrq {
        base: u64,
        irq: u32,
        #[source]
        source: hypervisor::Error,
    },
    #[error("routing queue {queue}'s notifications of the device at {base:#x}")]
    RegisterNotify {
        base: u64,
        queue: usize,
        #[source]
        source: hypervisor::Error,
    },
    #[error("creating the virtio-mmio transport of the device at {base:#x}")]
    Transport {
        base: u64,
        #[source]
        source: mmio::Error,
    },
    #[error("placing the device at {base:#x} on the MMIO bus")]
    Bus {
        base: u64,
        #[source]
        source: bus::Error,
    },
}

/// Where a device sits: its MMIO window `[base, base + len)` and its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel argument announcing a virtio-mmio device in this slot.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len / 1024,
            self.base,
            self.irq
        )
    }
}

/// Hands out MMIO windows (aligned to their size, never overlapping) and interrupt lines
/// (each once), in order.
#[derive(Clone, Debug)]
pub struct SlotAllocator {
    space: Range<u64>,
    irqs: Range<u32>,
    next_base: u64,
    next_irq: u32,
}

impl SlotAllocator {
    pub fn new(space: Range<u64>, irqs: Range<u32>) -> Self {
        SlotAllocator {
            next_base: space.start,
            next_irq: irqs.start,
            space,
            irqs,
        }
    }

    /// The next slot with a window of `len` bytes (a power of two).
    pub fn allocate(&mut self, len: u64) -> Result<MmioSlot, Error> {
        debug_assert!(len.is_power_of_two(), "MMIO windows are a power of two");
        let out_of_mmio = || Error::OutOfMmio {
            space: self.space.clone(),
            len,
        };
        let base = self
            .next_base
            .checked_next_multiple_of(len)
            .ok_or_else(out_of_mmio)?;
        let end = base.checked_add(len).ok_or_else(out_of_mmio)?;
        if end > self.space.end {
            return Err(out_of_mmio());
        }
        if !self.irqs.contains(&self.next_irq) {
            return Err(Error::OutOfIrqs {
                irqs: self.irqs.clone(),
            });
        }
        let slot = MmioSlot {
            base,
            len,
            irq: self.next_irq,
        };
        self.next_base = end;
        self.next_irq += 1;
        Ok(slot)
    }
}

/// What the device manager needs from the hypervisor: interrupt and notification routing.
pub trait Wiring {
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> hypervisor::Result<()>;
    fn register_ioeventfd(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> hypervisor::Result<()>;
}

impl<T: Vm + ?Sized> Wiring for T {
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> hypervisor::Result<()> {
        Vm::register_irqfd(self, event, gsi)
    }
    fn register_ioeventfd(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> hypervisor::Result<()> {
        Vm::register_ioeventfd(self, event, addr, datamatch)
    }
}

/// What the VMM API drives in the devices built: filled in as they are.
#[derive(Clone, Default)]
pub struct Controls {
    pub balloon: Option<BalloonHandle>,
}

/// The one place a device description becomes a device: `config` is `devices[index]`; a
/// device the VMM API drives leaves its handle in `controls`.
pub fn build_device(
    index: usize,
    config: &DeviceConfig,
    controls: &mut Controls,
) -> Result<Box<dyn VirtioDevice>, Error> {
    let failed = |what: String| {
        move |source: BoxError| Error::CreateDevice {
            field: format!("devices[{index}]"),
            what,
            source,
        }
    };
    Ok(match config {
        DeviceConfig::Disk(disk) => Box::new(
            Block::new(&disk.path, disk.read_only, disk.serial.clone())
                .map_err(|e| failed(format!("disk {}", disk.path.display()))(e.into()))?,
        ),
        DeviceConfig::Rng => Box::new(Rng::new().map_err(|e| failed("rng".into())(e.into()))?),
        DeviceConfig::Vsock(vsock) => {
            let muxer = Muxer::new(vsock.cid, &vsock.socket)
                .map_err(|e| failed(format!("vsock {}", vsock.socket.display()))(e.into()))?;
            Box::new(Vsock::new(vsock.cid, muxer))
        }
        DeviceConfig::Net(net) => Box::new(
            Net::new(&net.socket, &net.mac, net.mtu)
                .map_err(|e| failed(format!("net {}", net.socket.display()))(e.into()))?,
        ),
        DeviceConfig::Fs(fs) => {
            Box::new(Fs::new(fs).map_err(|e| failed(format!("fs share {:?}", fs.tag))(e.into()))?)
        }
        DeviceConfig::Balloon(balloon) => {
            let period = std::time::Duration::from_secs(balloon.stats_period_s.into());
            let device = Balloon::new(Some(period));
            controls.balloon = Some(device.handle());
            Box::new(device)
        }
    })
}

/// The virtio devices of one VM: their slots, the MMIO bus they answer on, and their kernel
/// arguments.
pub struct DeviceManager {
    slots: SlotAllocator,
    mmio_bus: Bus,
    placed: Vec<MmioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    controls: Controls,
}

impl DeviceManager {
    /// A manager that places devices in `space` with interrupt lines from `irqs`.
    pub fn new(space: Range<u64>, irqs: Range<u32>) -> Self {
        DeviceManager {
            slots: SlotAllocator::new(space, irqs),
            mmio_bus: Bus::new(),
            placed: Vec::new(),
            transports: Vec::new(),
            controls: Controls::default(),
        }
    }

    /// Builds every device `devices` lists and places it, in order.
    pub fn add_devices(
        &mut self,
        vm: &(impl Wiring + ?Sized),
        mem: &GuestMemory,
        devices: &[DeviceConfig],
    ) -> Result<(), Error> {
        for (index, config) in devices.iter().enumerate() {
            let device = build_device(index, config, &mut self.controls)?;
            self.add(vm, mem, device)?;
        }
        Ok(())
    }

    /// Places `device` in the next slot behind a virtio-mmio transport.
    pub fn add(
        &mut self,
        vm: &(impl Wiring + ?Sized),
        mem: &GuestMemory,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioSlot, Error> {
        let slot = self.slots.allocate(mmio::MMIO_SIZE)?;
        let base = slot.base;
        let irq =
            EventFd::new(EFD_NONBLOCK).map_err(|source| Error::CreateIrqEvent { base, source })?;
        vm.register_irqfd(&irq, slot.irq)
            .map_err(|source| Error::RegisterIrq {
                base,
                irq: slot.irq,
                source,
            })?;
        let transport = MmioTransport::new(mem.clone(), device, irq)
            .map_err(|source| Error::Transport { base, source })?;
        for (queue, event) in transport.queue_notify_events().iter().enumerate() {
            let datamatch = u32::try_from(queue).expect("a device has a handful of queues");
            vm.register_ioeventfd(event, base + mmio::QUEUE_NOTIFY_OFFSET, datamatch)
                .map_err(|source| Error::RegisterNotify {
                    base,
                    queue,
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), base, slot.len)
            .map_err(|source| Error::Bus { base, source })?;
        self.transports.push(transport);
        tracing::info!(
            base = format_args!("{base:#x}"),
            irq = slot.irq,
            "virtio device placed"
        );
        self.placed.push(slot);
        Ok(slot)
    }

    /// What the VMM API drives in the devices added.
    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    /// The slots handed out, in order.
    pub fn slots(&self) -> &[MmioSlot] {
        &self.placed
    }

    /// The `virtio_mmio.device=` kernel arguments, one per device, in order.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.placed.iter().map(MmioSlot::cmdline_arg).collect()
    }

    /// The MMIO bus the vCPUs route guest accesses through.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio_bus
    }

    /// Shuts every device down (in-flight requests finish, event loops stop, disks sync their
    /// images); returns how many. Called once the vCPUs have stopped.
    pub fn shutdown_devices(&self) -> usize {
        for transport in &self.transports {
            transport
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .shutdown_device();
        }
        self.transports.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::cell::RefCell;
    use std::os::unix::fs::FileExt;

    use std::path::PathBuf;

    use berth_machine::DiskConfig;
    use vm_memory::GuestAddress;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::arch::x86_64::layout;

    const SPACE: Range<u64> = layout::VIRTIO_MMIO_START..layout::IOAPIC_ADDR as u64;
    const IRQS: Range<u32> = layout::VIRTIO_IRQ_START..layout::IOAPIC_PINS;

    /// Records what the device manager routes.
    #[derive(Default)]
    struct FakeVm {
        irqfds: RefCell<Vec<u32>>,
        ioeventfds: RefCell<Vec<(u64, u32)>>,
    }

    impl Wiring for FakeVm {
        fn register_irqfd(&self, _: &EventFd, gsi: u32) -> hypervisor::Result<()> {
            self.irqfds.borrow_mut().push(gsi);
            Ok(())
        }
        fn register_ioeventfd(&self, _: &EventFd, addr: u64, dm: u32) -> hypervisor::Result<()> {
            self.ioeventfds.borrow_mut().push((addr, dm));
            Ok(())
        }
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn rng() -> Box<dyn VirtioDevice> {
        Box::new(Rng::new().unwrap())
    }

    #[test]
    fn windows_are_aligned_and_disjoint_and_irqs_distinct_within_the_ioapic() {
        // A start that is not window-aligned must still give aligned windows.
        let mut slots = SlotAllocator::new(SPACE.start + 0x10..SPACE.end, IRQS);
        let all: Vec<MmioSlot> = (0..IRQS.len())
            .map(|_| slots.allocate(0x1000).unwrap())
            .collect();
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a.base % a.len, 0, "{a:?} is not aligned");
            assert!(
                SPACE.contains(&a.base) && a.base + a.len <= SPACE.end,
                "{a:?}"
            );
            assert!(
                a.irq >= layout::VIRTIO_IRQ_START && a.irq < layout::IOAPIC_PINS,
                "{a:?}"
            );
            assert_ne!(a.irq, layout::SERIAL_IRQ);
            for b in &all[i + 1..] {
                assert!(
                    a.base + a.len <= b.base || b.base + b.len <= a.base,
                    "{a:?} {b:?}"
                );
                assert_ne!(a.irq, b.irq);
            }
        }
    }

    #[test]
    fn running_out_of_irqs_or_mmio_space_is_a_clear_error() {
        let mut slots = SlotAllocator::new(SPACE, 5..7);
        slots.allocate(0x1000).unwrap();
        slots.allocate(0x1000).unwrap();
        let e = slots.allocate(0x1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no interrupt line is left for another virtio device: the guest has 2 (IRQs 5-6)"
        );
        let mut slots = SlotAllocator::new(0xd000_0000..0xd000_1800, IRQS);
        slots.allocate(0x1000).unwrap();
        let e = slots.allocate(0x1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no MMIO space is left for another 0x1000-byte device window in 0xd0000000-0xd0001800"
        );
        let mut slots = SlotAllocator::new(u64::MAX - 0x800..u64::MAX, IRQS);
        assert!(matches!(
            slots.allocate(0x1000),
            Err(Error::OutOfMmio { .. })
        ));
    }

    #[test]
    fn a_device_beyond_the_last_irq_is_refused_and_not_placed() {
        let vm = FakeVm::default();
        let mut devices = DeviceManager::new(SPACE, 5..6);
        let only = devices.add(&vm, &memory(), rng()).unwrap();
        let e = devices.add(&vm, &memory(), rng()).err().unwrap();
        assert!(matches!(e, Error::OutOfIrqs { .. }), "{e}");
        assert_eq!(devices.slots(), [only]);
        assert_eq!(devices.cmdline_args().len(), 1);
        assert_eq!(*vm.irqfds.borrow(), [5]);
        assert!(!devices.mmio_bus().read(only.base + only.len, &mut [0u8; 4]));
    }

    #[test]
    fn placed_devices_answer_in_their_window_and_the_cmdline_announces_them() {
        let vm = FakeVm::default();
        let mut devices = DeviceManager::new(SPACE, IRQS);
        let first = devices.add(&vm, &memory(), rng()).unwrap();
        let second = devices.add(&vm, &memory(), rng()).unwrap();
        assert_eq!(devices.slots(), [first, second]);
        assert_eq!(
            devices.cmdline_args(),
            [
                format!("virtio_mmio.device=4K@{:#x}:{}", first.base, first.irq),
                format!("virtio_mmio.device=4K@{:#x}:{}", second.base, second.irq),
            ]
        );
        assert_eq!(
            first.cmdline_arg(),
            "virtio_mmio.device=4K@0xd0000000:5",
            "the first device sits where the guest kernel has always found it"
        );
        assert_eq!(*vm.irqfds.borrow(), [first.irq, second.irq]);
        // rng has one queue: its notifications are routed at its own window's notify register.
        assert_eq!(
            *vm.ioeventfds.borrow(),
            [
                (first.base + mmio::QUEUE_NOTIFY_OFFSET, 0),
                (second.base + mmio::QUEUE_NOTIFY_OFFSET, 0)
            ]
        );
        for slot in [first, second] {
            let mut magic = [0u8; 4];
            assert!(devices
                .mmio_bus()
                .read(slot.base + mmio::MAGIC_VALUE_OFFSET, &mut magic));
            assert_eq!(u32::from_le_bytes(magic), mmio::MAGIC_VALUE);
            let mut id = [0u8; 4];
            assert!(devices
                .mmio_bus()
                .read(slot.base + mmio::DEVICE_ID_OFFSET, &mut id));
            assert_eq!(u32::from_le_bytes(id), crate::devices::virtio::TYPE_RNG);
        }
        assert!(!devices
            .mmio_bus()
            .read(second.base + second.len, &mut [0u8; 4]));
    }

    #[test]
    fn devices_come_from_their_description_and_a_bad_one_names_its_field() {
        let image = TempFile::new().unwrap();
        image.as_file().write_all_at(&[7u8; 4096], 0).unwrap();
        let disk = |path: PathBuf, read_only| {
            DeviceConfig::Disk(DiskConfig {
                path,
                read_only,
                serial: Some("berth-data".into()),
            })
        };
        let vm = FakeVm::default();
        let mut devices = DeviceManager::new(SPACE, IRQS);
        let configs = [
            disk(image.as_path().into(), false),
            DeviceConfig::Rng,
            disk(image.as_path().into(), true),
        ];
        devices.add_devices(&vm, &memory(), &configs).unwrap();
        assert_eq!(devices.slots().len(), 3);
        assert_eq!(devices.shutdown_devices(), 3, "each device is shut down");
        let mut id = [0u8; 4];
        devices
            .mmio_bus()
            .read(devices.slots()[0].base + mmio::DEVICE_ID_OFFSET, &mut id);
        assert_eq!(u32::from_le_bytes(id), crate::devices::virtio::TYPE_BLOCK);

        assert!(devices.controls().balloon.is_none());

        let mut devices = DeviceManager::new(SPACE, IRQS);
        let balloon = DeviceConfig::Balloon(berth_machine::BalloonConfig::default());
        devices
            .add_devices(&vm, &memory(), &[DeviceConfig::Rng, balloon])
            .unwrap();
        let balloon = devices
            .controls()
            .balloon
            .clone()
            .expect("the API's handle");
        balloon.set_target_pages(256);
        let mut id = [0u8; 4];
        let base = devices.slots()[1].base;
        devices
            .mmio_bus()
            .read(base + mmio::DEVICE_ID_OFFSET, &mut id);
        assert_eq!(u32::from_le_bytes(id), crate::devices::virtio::TYPE_BALLOON);
        let mut num_pages = [0u8; 4];
        devices
            .mmio_bus()
            .read(base + mmio::CONFIG_OFFSET, &mut num_pages);
        assert_eq!(
            u32::from_le_bytes(num_pages),
            256,
            "the target set through the handle"
        );

        let configs = [DeviceConfig::Rng, disk("/no/such/disk.img".into(), true)];
        let e = DeviceManager::new(SPACE, IRQS)
            .add_devices(&vm, &memory(), &configs)
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "creating device `devices[1]` (disk /no/such/disk.img)"
        );
        assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
    }
}

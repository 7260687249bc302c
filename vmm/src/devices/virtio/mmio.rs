//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2.2): the register file a driver
//! programs, the device status state machine, and activation of the device behind it.

use std::io;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use berth_errors::Chain;

use super::{feature, features, status, Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// The size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "BRTH" in little endian.
pub const VENDOR_ID: u32 = 0x4854_5242;

/// Register offsets (virtio 1.2 section 4.2.2).
pub const MAGIC_VALUE_OFFSET: u64 = 0x00;
pub const VERSION_OFFSET: u64 = 0x04;
pub const DEVICE_ID_OFFSET: u64 = 0x08;
pub const VENDOR_ID_OFFSET: u64 = 0x0c;
pub const DEVICE_FEATURES_OFFSET: u64 = 0x10;
pub const DEVICE_FEATURES_SEL_OFFSET: u64 = 0x14;
pub const DRIVER_FEATURES_OFFSET: u64 = 0x20;
pub const DRIVER_FEATURES_SEL_OFFSET: u64 = 0x24;
pub const QUEUE_SEL_OFFSET: u64 = 0x30;
pub const QUEUE_NUM_MAX_OFFSET: u64 = 0x34;
pub const QUEUE_NUM_OFFSET: u64 = 0x38;
pub const QUEUE_READY_OFFSET: u64 = 0x44;
/// Where the VMM registers each queue's ioeventfd, with the queue index as datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
pub const INTERRUPT_STATUS_OFFSET: u64 = 0x60;
pub const INTERRUPT_ACK_OFFSET: u64 = 0x64;
pub const STATUS_OFFSET: u64 = 0x70;
pub const QUEUE_DESC_LOW_OFFSET: u64 = 0x80;
pub const QUEUE_DESC_HIGH_OFFSET: u64 = 0x84;
pub const QUEUE_DRIVER_LOW_OFFSET: u64 = 0x90;
pub const QUEUE_DRIVER_HIGH_OFFSET: u64 = 0x94;
pub const QUEUE_DEVICE_LOW_OFFSET: u64 = 0xa0;
pub const QUEUE_DEVICE_HIGH_OFFSET: u64 = 0xa4;
pub const CONFIG_GENERATION_OFFSET: u64 = 0xfc;
pub const CONFIG_OFFSET: u64 = 0x100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating queue {index} failed")]
    CreateQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("creating the notification eventfd of queue {index} failed")]
    CreateNotifyEvent {
        index: usize,
        #[source]
        source: io::Error,
    },
}

/// Which half of a 64-bit queue address a register holds.
#[derive(Clone, Copy)]
enum Half {
    Low,
    High,
}

/// Which ring address a register sets.
#[derive(Clone, Copy)]
enum Ring {
    Desc,
    Driver,
    Device,
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<Interrupt>,
    /// The queues as the driver configures them; copies go to the device on activation.
    queues: Vec<Queue>,
    notify_events: Vec<EventFd>,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    driver_features_beyond_64: bool,
    queue_sel: u32,
    active: bool,
}

impl MmioTransport {
    /// Puts `device` behind a transport whose interrupt is raised through `irq`.
    pub fn new(
        mem: GuestMemory,
        mut device: Box<dyn VirtioDevice>,
        irq: EventFd,
    ) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut notify_events = Vec::new();
        for (index, &max) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(max).map_err(|source| Error::CreateQueue { index, source })?);
            notify_events.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| Error::CreateNotifyEvent { index, source })?,
            );
        }
        let interrupt = Arc::new(Interrupt::new(irq));
        device.attach_interrupt(&interrupt);
        Ok(Self {
            mem,
            device,
            interrupt,
            queues,
            notify_events,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            queue_sel: 0,
            active: false,
        })
    }

    /// One eventfd per queue, written when the driver notifies that queue. The VMM registers
    /// them as ioeventfds at `base + QUEUE_NOTIFY_OFFSET` with the queue index as datamatch.
    /// The VM is stopping: the device finishes what is in flight and makes it durable.
    pub fn shutdown_device(&mut self) {
        self.device.shutdown();
    }

    pub fn queue_notify_events(&self) -> &[EventFd] {
        &self.notify_events
    }

    /// The interrupt shared with the device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    fn has_status(&self, bits: u32) -> bool {
        self.device_status & bits == bits
    }

    /// The driver may negotiate features between DRIVER and FEATURES_OK.
    fn features_writable(&self) -> bool {
        self.has_status(status::DRIVER) && !self.has_status(status::FEATURES_OK)
    }

    /// The driver may configure queues between FEATURES_OK and DRIVER_OK.
    fn queues_writable(&self) -> bool {
        self.has_status(status::FEATURES_OK) && !self.has_status(status::DRIVER_OK)
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may change it now.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if !self.queues_writable() {
            warn_rate_limited!("virtio-mmio: queue register written outside queue setup");
            return None;
        }
        let queue = self.queues.get_mut(self.queue_sel as usize)?;
        (!queue.ready()).then_some(queue)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let features_page = |features: u64, sel: u32| match sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        match offset {
            MAGIC_VALUE_OFFSET => MAGIC_VALUE,
            VERSION_OFFSET => MMIO_VERSION,
            DEVICE_ID_OFFSET => self.device.device_type(),
            VENDOR_ID_OFFSET => VENDOR_ID,
            DEVICE_FEATURES_OFFSET => {
                features_page(self.device.avail_features(), self.device_features_sel)
            }
            QUEUE_NUM_MAX_OFFSET => self.selected_queue().map_or(0, |q| q.max_size().into()),
            QUEUE_NUM_OFFSET => self.selected_queue().map_or(0, |q| q.size().into()),
            QUEUE_READY_OFFSET => self.selected_queue().map_or(0, |q| q.ready().into()),
            QUEUE_DESC_LOW_OFFSET..=QUEUE_DEVICE_HIGH_OFFSET => self.read_ring_address(offset),
            INTERRUPT_STATUS_OFFSET => self.interrupt.status(),
            STATUS_OFFSET => self.device_status,
            CONFIG_GENERATION_OFFSET => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn read_ring_address(&self, offset: u64) -> u32 {
        let Some(queue) = self.selected_queue() else {
            return 0;
        };
        let address = match offset & !0xf {
            QUEUE_DESC_LOW_OFFSET => queue.desc_table(),
            QUEUE_DRIVER_LOW_OFFSET => queue.avail_ring(),
            QUEUE_DEVICE_LOW_OFFSET => queue.used_ring(),
            _ => return 0,
        };
        match offset & 0xf {
            0 => address as u32,
            4 => (address >> 32) as u32,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL_OFFSET => self.device_features_sel = value,
            DRIVER_FEATURES_OFFSET => self.write_driver_features(value),
            DRIVER_FEATURES_SEL_OFFSET => self.driver_features_sel = value,
            QUEUE_SEL_OFFSET => self.queue_sel = value,
            QUEUE_NUM_OFFSET => self.write_queue_num(value),
            QUEUE_READY_OFFSET => self.write_queue_ready(value),
            QUEUE_NOTIFY_OFFSET => self.notify_queue(value),
            INTERRUPT_ACK_OFFSET => self.interrupt.ack(value),
            STATUS_OFFSET => self.write_status(value),
            QUEUE_DESC_LOW_OFFSET => self.write_ring_address(Ring::Desc, Half::Low, value),
            QUEUE_DESC_HIGH_OFFSET => self.write_ring_address(Ring::Desc, Half::High, value),
            QUEUE_DRIVER_LOW_OFFSET => self.write_ring_address(Ring::Driver, Half::Low, value),
            QUEUE_DRIVER_HIGH_OFFSET => self.write_ring_address(Ring::Driver, Half::High, value),
            QUEUE_DEVICE_LOW_OFFSET => self.write_ring_address(Ring::Device, Half::Low, value),
            QUEUE_DEVICE_HIGH_OFFSET => self.write_ring_address(Ring::Device, Half::High, value),
            _ => warn_rate_limited!(
                "virtio-mmio: write to read-only or unknown register {offset:#x}"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if !self.features_writable() {
            warn_rate_limited!("virtio-mmio: DriverFeatures written outside feature negotiation");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            // No device offers features beyond bit 63: accepting one fails FEATURES_OK.
            _ => {
                self.driver_features_beyond_64 |= value != 0;
                return;
            }
        };
        let mask = 0xffff_ffffu64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(value) << shift);
    }

    fn write_queue_num(&mut self, value: u32) {
        let Some(queue) = self.configurable_queue() else {
            return;
        };
        let valid = u16::try_from(value)
            .ok()
            .filter(|&size| size.is_power_of_two() && size <= queue.max_size());
        match valid {
            Some(size) => queue.set_size(size),
            None => warn_rate_limited!("virtio-mmio: ignoring invalid queue size {value}"),
        }
    }

    fn write_ring_address(&mut self, ring: Ring, half: Half, value: u32) {
        let Some(queue) = self.configurable_queue() else {
            return;
        };
        let old = match ring {
            Ring::Desc => queue.desc_table(),
            Ring::Driver => queue.avail_ring(),
            Ring::Device => queue.used_ring(),
        };
        let new = GuestAddress(match half {
            Half::Low => (old & !0xffff_ffff) | u64::from(value),
            Half::High => (old & 0xffff_ffff) | (u64::from(value) << 32),
        });
        let result = match ring {
            Ring::Desc => queue.try_set_desc_table_address(new),
            Ring::Driver => queue.try_set_avail_ring_address(new),
            Ring::Device => queue.try_set_used_ring_address(new),
        };
        if let Err(e) = result {
            warn_rate_limited!("virtio-mmio: ignoring queue address {:#x}: {e}", new.0);
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        if !self.queues_writable() {
            warn_rate_limited!("virtio-mmio: QueueReady written outside queue setup");
            return;
        }
        let mem = &self.mem;
        let Some(queue) = self.queues.get_mut(self.queue_sel as usize) else {
            return;
        };
        if value != 1 {
            queue.set_ready(false);
            return;
        }
        queue.set_ready(true);
        // Rings must lie in guest memory; a queue whose rings do not stays not ready, and the
        // device then fails activation.
        if !queue.is_valid(mem) {
            warn_rate_limited!("virtio-mmio: queue rings outside guest memory, not ready");
            queue.set_ready(false);
        }
    }

    fn notify_queue(&self, index: u32) {
        match self.notify_events.get(index as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    warn_rate_limited!("virtio-mmio: notifying queue {index} failed: {e}");
                }
            }
            None => warn_rate_limited!("virtio-mmio: notify of queue {index} which does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        // Only the device sets DEVICE_NEEDS_RESET; only a reset clears bits.
        let new = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & old != old {
            warn_rate_limited!("virtio-mmio: driver cleared status bits {old:#x} -> {value:#x}");
            return;
        }
        let added = new & !old;
        let requires = [
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needed) in requires {
            if added & bit != 0 && new & needed == 0 {
                warn_rate_limited!("virtio-mmio: status bit {bit:#x} set before {needed:#x}");
                return;
            }
        }
        let mut new = new;
        if added & status::FEATURES_OK != 0 && !self.accept_features() {
            new &= !status::FEATURES_OK;
        }
        self.device_status = new;
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 {
            self.activate();
        }
    }

    /// Checks the driver's features at FEATURES_OK and hands them to the device.
    fn accept_features(&mut self) -> bool {
        let offered = self.device.avail_features();
        let unknown = self.driver_features & !offered;
        if unknown != 0 || self.driver_features_beyond_64 {
            warn_rate_limited!("virtio-mmio: driver accepted features not offered: {unknown:#x}");
            return false;
        }
        if self.driver_features & feature(features::VERSION_1) == 0 {
            warn_rate_limited!("virtio-mmio: driver did not accept VERSION_1 (legacy driver)");
            return false;
        }
        self.device.set_acked_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        if self.active {
            return;
        }
        let event_idx = self.driver_features & feature(features::RING_EVENT_IDX) != 0;
        let count = self.device.active_queue_count().min(self.queues.len());
        let mut queues = Vec::with_capacity(count);
        for (index, queue) in self.queues.iter().enumerate().take(count) {
            if !queue.ready() {
                warn_rate_limited!("virtio-mmio: DRIVER_OK with queue {index} not ready");
                return self.needs_reset();
            }
            let mut state = queue.state();
            state.event_idx_enabled = event_idx;
            let copy = match Queue::try_from(state) {
                Ok(copy) => copy,
                Err(e) => {
                    warn_rate_limited!("virtio-mmio: queue {index} is invalid: {e}");
                    return self.needs_reset();
                }
            };
            match self.notify_events[index].try_clone() {
                Ok(event) => queues.push((copy, event)),
                Err(e) => {
                    tracing::error!("virtio-mmio: cloning queue {index}'s eventfd failed: {e}");
                    return self.needs_reset();
                }
            }
        }
        let activated = self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues);
        match activated {
            Ok(()) => {
                self.active = true;
                tracing::info!(
                    device = self.device.device_type(),
                    "virtio device activated"
                );
            }
            Err(e) => {
                tracing::error!("virtio-mmio: activating the device failed: {}", Chain(&e));
                self.needs_reset();
            }
        }
    }

    /// Marks the device broken until the driver resets it, and tells the driver.
    fn needs_reset(&mut self) {
        self.device_status |= status::DEVICE_NEEDS_RESET;
        if self.has_status(status::DRIVER_OK) {
            if let Err(e) = self.interrupt.signal_config_changed() {
                warn_rate_limited!("virtio-mmio: raising the interrupt failed: {e}");
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        for event in &self.notify_events {
            // Drop notifications of the old queues; an error only means none was pending.
            let _ = event.read();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.queue_sel = 0;
        self.interrupt.clear();
        tracing::info!(device = self.device.device_type(), "virtio device reset");
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            data.fill(0);
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset % 4 == 0 => *bytes = self.read_register(offset).to_le_bytes(),
            _ => {
                warn_rate_limited!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
            _ => warn_rate_limited!("virtio-mmio: {}-byte write at {offset:#x}", data.len()),
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, MEM_SIZE};
    use crate::devices::virtio::{ActivateError, INT_CONFIG, INT_USED_RING};

    const OFFERED: u64 = (1 << 32) | (1 << 29) | (1 << 3) | (1 << 40);
    const MAX_SIZES: [u16; 2] = [16, 8];

    /// A queue as the device received it: (size, desc, avail, used, event_idx).
    type QueueSeen = (u16, u64, u64, u64, bool);

    /// What the transport did to the fake device.
    #[derive(Default)]
    struct Seen {
        acked: Option<u64>,
        /// Per activation, each queue.
        activations: Vec<Vec<QueueSeen>>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        seen: Arc<Mutex<Seen>>,
        fail_activation: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &MAX_SIZES
        }
        fn avail_features(&self) -> u64 {
            OFFERED
        }
        fn set_acked_features(&mut self, features: u64) {
            self.seen.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = 0x10 + offset as u8 + i as u8;
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.seen
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<Interrupt>,
            queues: Vec<(Queue, EventFd)>,
        ) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::AlreadyActive);
            }
            let queues = queues
                .iter()
                .map(|(q, _)| {
                    let s = q.state();
                    (
                        s.size,
                        s.desc_table,
                        s.avail_ring,
                        s.used_ring,
                        s.event_idx_enabled,
                    )
                })
                .collect();
            self.seen.lock().unwrap().activations.push(queues);
            Ok(())
        }
        fn reset(&mut self) {
            self.seen.lock().unwrap().resets += 1;
        }
    }

    fn transport(fail_activation: bool) -> (MmioTransport, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let device = FakeDevice {
            seen: seen.clone(),
            fail_activation,
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(guest_memory(), Box::new(device), irq).unwrap();
        (t, seen)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    const ACK_DRIVER: u32 = status::ACKNOWLEDGE | status::DRIVER;

    /// ACKNOWLEDGE, DRIVER, accept `features`, FEATURES_OK; returns the status read back.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        write(t, STATUS_OFFSET, status::ACKNOWLEDGE);
        write(t, STATUS_OFFSET, ACK_DRIVER);
        for page in 0..2 {
            write(t, DRIVER_FEATURES_SEL_OFFSET, page);
            write(t, DRIVER_FEATURES_OFFSET, (features >> (32 * page)) as u32);
        }
        write(t, STATUS_OFFSET, ACK_DRIVER | status::FEATURES_OK);
        read(t, STATUS_OFFSET)
    }

    /// Sets up queue `index` with `size` and rings at `base`, then marks it ready.
    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        write(t, QUEUE_SEL_OFFSET, index);
        write(t, QUEUE_NUM_OFFSET, size);
        for (offset, addr) in [
            (QUEUE_DESC_LOW_OFFSET, base),
            (QUEUE_DRIVER_LOW_OFFSET, base + 0x1000),
            (QUEUE_DEVICE_LOW_OFFSET, base + 0x2000),
        ] {
            write(t, offset, addr as u32);
            write(t, offset + 4, (addr >> 32) as u32);
        }
        write(t, QUEUE_READY_OFFSET, 1);
    }

    const FULL: u32 = ACK_DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identifies_as_a_version_2_device() {
        let (mut t, _) = transport(false);
        assert_eq!(read(&mut t, MAGIC_VALUE_OFFSET), 0x7472_6976);
        assert_eq!(read(&mut t, VERSION_OFFSET), 2);
        assert_eq!(read(&mut t, DEVICE_ID_OFFSET), 42);
        assert_eq!(read(&mut t, VENDOR_ID_OFFSET), VENDOR_ID);
        assert_eq!(t.queue_notify_events().len(), 2);
        // Unaligned or odd-sized register accesses read zeros and write nothing.
        let mut odd = [0xffu8; 2];
        t.read(MAGIC_VALUE_OFFSET, &mut odd);
        assert_eq!(odd, [0, 0]);
        assert_eq!(read(&mut t, MAGIC_VALUE_OFFSET + 1), 0);
        t.write(STATUS_OFFSET, &[1]);
        write(&mut t, STATUS_OFFSET + 2, 1);
        assert_eq!(read(&mut t, STATUS_OFFSET), 0);
        // Config space: any size, relative offsets, both directions.
        let mut config = [0u8; 2];
        t.read(CONFIG_OFFSET + 4, &mut config);
        assert_eq!(config, [0x14, 0x15]);
        assert_eq!(read(&mut t, CONFIG_OFFSET), 0x1312_1110);
    }

    #[test]
    fn feature_negotiation_across_both_pages() {
        let (mut t, seen) = transport(false);
        for (page, expected) in [(0, OFFERED as u32), (1, (OFFERED >> 32) as u32), (2, 0)] {
            write(&mut t, DEVICE_FEATURES_SEL_OFFSET, page);
            assert_eq!(
                read(&mut t, DEVICE_FEATURES_OFFSET),
                expected,
                "page {page}"
            );
        }
        let wanted = (1 << 32) | (1 << 3) | (1 << 40);
        let status = negotiate(&mut t, wanted);
        assert_eq!(status, ACK_DRIVER | status::FEATURES_OK);
        assert_eq!(seen.lock().unwrap().acked, Some(wanted));
        // Features are frozen after FEATURES_OK.
        write(&mut t, DRIVER_FEATURES_SEL_OFFSET, 0);
        write(&mut t, DRIVER_FEATURES_OFFSET, 0);
        assert_eq!(t.driver_features, wanted);
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        for features in [(1 << 32) | (1 << 5), 1 << 3, (1 << 32) | (1 << 63)] {
            let (mut t, seen) = transport(false);
            assert_eq!(negotiate(&mut t, features), ACK_DRIVER, "{features:#x}");
            assert_eq!(seen.lock().unwrap().acked, None);
        }
        // A feature beyond bit 63 is refused too.
        let (mut t, _) = transport(false);
        write(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE);
        write(&mut t, STATUS_OFFSET, ACK_DRIVER);
        write(&mut t, DRIVER_FEATURES_SEL_OFFSET, 2);
        write(&mut t, DRIVER_FEATURES_OFFSET, 1);
        write(&mut t, DRIVER_FEATURES_SEL_OFFSET, 1);
        write(&mut t, DRIVER_FEATURES_OFFSET, 1);
        write(&mut t, STATUS_OFFSET, ACK_DRIVER | status::FEATURES_OK);
        assert_eq!(read(&mut t, STATUS_OFFSET), ACK_DRIVER);
    }

    #[test]
    fn status_bits_must_come_in_order_and_cannot_be_cleared() {
        let (mut t, _) = transport(false);
        write(&mut t, STATUS_OFFSET, status::DRIVER);
        assert_eq!(read(&mut t, STATUS_OFFSET), 0, "DRIVER before ACKNOWLEDGE");
        write(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE);
        write(
            &mut t,
            STATUS_OFFSET,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );
        assert_eq!(read(&mut t, STATUS_OFFSET), status::ACKNOWLEDGE);
        write(&mut t, STATUS_OFFSET, ACK_DRIVER);
        write(&mut t, STATUS_OFFSET, status::ACKNOWLEDGE);
        assert_eq!(
            read(&mut t, STATUS_OFFSET),
            ACK_DRIVER,
            "cleared bit ignored"
        );
        write(
            &mut t,
            STATUS_OFFSET,
            ACK_DRIVER | status::DEVICE_NEEDS_RESET,
        );
        assert_eq!(
            read(&mut t, STATUS_OFFSET),
            ACK_DRIVER,
            "driver cannot set NEEDS_RESET"
        );
        write(&mut t, STATUS_OFFSET, ACK_DRIVER | status::DRIVER_OK);
        assert_eq!(
            read(&mut t, STATUS_OFFSET),
            ACK_DRIVER,
            "DRIVER_OK before FEATURES_OK"
        );
    }

    #[test]
    fn queue_setup_then_driver_ok_activates_the_device() {
        let (mut t, seen) = transport(false);
        // Queue registers are ignored before FEATURES_OK.
        write(&mut t, QUEUE_NUM_OFFSET, 4);
        assert_eq!(read(&mut t, QUEUE_NUM_OFFSET), 16);
        negotiate(&mut t, (1 << 32) | (1 << 29));
        write(&mut t, QUEUE_SEL_OFFSET, 1);
        assert_eq!(read(&mut t, QUEUE_NUM_MAX_OFFSET), 8);
        write(&mut t, QUEUE_SEL_OFFSET, 0);
        assert_eq!(read(&mut t, QUEUE_NUM_MAX_OFFSET), 16);
        write(&mut t, QUEUE_NUM_OFFSET, 8);
        for invalid in [12, 32, 0, 0x1_0000] {
            write(&mut t, QUEUE_NUM_OFFSET, invalid);
            assert_eq!(read(&mut t, QUEUE_NUM_OFFSET), 8, "size {invalid} ignored");
        }
        setup_queue(&mut t, 0, 8, 0x10_0000);
        setup_queue(&mut t, 1, 4, 0x20_0000);
        assert_eq!(read(&mut t, QUEUE_READY_OFFSET), 1);
        assert_eq!(read(&mut t, QUEUE_DEVICE_LOW_OFFSET), 0x20_2000);
        // A nonexistent queue reads as absent.
        write(&mut t, QUEUE_SEL_OFFSET, 2);
        assert_eq!(read(&mut t, QUEUE_NUM_MAX_OFFSET), 0);
        assert!(seen.lock().unwrap().activations.is_empty());

        write(&mut t, STATUS_OFFSET, FULL);
        assert_eq!(read(&mut t, STATUS_OFFSET), FULL);
        let activations = seen.lock().unwrap().activations.clone();
        assert_eq!(
            activations,
            vec![vec![
                (8, 0x10_0000, 0x10_1000, 0x10_2000, true),
                (4, 0x20_0000, 0x20_1000, 0x20_2000, true),
            ]]
        );
        // Queue configuration is frozen once the device runs.
        write(&mut t, QUEUE_SEL_OFFSET, 0);
        write(&mut t, QUEUE_DESC_LOW_OFFSET, 0x30_0000);
        assert_eq!(read(&mut t, QUEUE_DESC_LOW_OFFSET), 0x10_0000);
        // A QueueNotify that reaches the transport kicks that queue's eventfd.
        write(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(t.queue_notify_events()[1].read().unwrap(), 1);
        assert!(t.queue_notify_events()[0].read().is_err());
        write(&mut t, QUEUE_NOTIFY_OFFSET, 7);
    }

    #[test]
    fn rings_outside_guest_memory_leave_the_queue_not_ready_and_need_reset() {
        let (mut t, seen) = transport(false);
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 16, 0x10_0000);
        setup_queue(&mut t, 1, 8, MEM_SIZE as u64 - 0x100);
        assert_eq!(read(&mut t, QUEUE_READY_OFFSET), 0);
        // Misaligned addresses are not taken.
        write(&mut t, QUEUE_DESC_LOW_OFFSET, 0x10_0008);
        assert_eq!(
            read(&mut t, QUEUE_DESC_LOW_OFFSET),
            (MEM_SIZE - 0x100) as u32
        );
        write(&mut t, STATUS_OFFSET, FULL);
        assert_eq!(
            read(&mut t, STATUS_OFFSET),
            FULL | status::DEVICE_NEEDS_RESET
        );
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), INT_CONFIG);
        assert!(seen.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let (mut t, _) = transport(true);
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 16, 0x10_0000);
        setup_queue(&mut t, 1, 8, 0x20_0000);
        write(&mut t, STATUS_OFFSET, FULL);
        assert_eq!(
            read(&mut t, STATUS_OFFSET),
            FULL | status::DEVICE_NEEDS_RESET
        );
        assert_eq!(
            t.interrupt().irq().read().unwrap(),
            1,
            "config change signalled"
        );
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, _) = transport(false);
        t.interrupt().signal_used_queue().unwrap();
        t.interrupt().signal_config_changed().unwrap();
        assert_eq!(
            read(&mut t, INTERRUPT_STATUS_OFFSET),
            INT_USED_RING | INT_CONFIG
        );
        write(&mut t, INTERRUPT_ACK_OFFSET, INT_USED_RING);
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), INT_CONFIG);
        write(&mut t, INTERRUPT_ACK_OFFSET, INT_CONFIG);
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), 0);
    }

    /// A device whose configuration changes on its own, as the balloon's target does when the
    /// VMM API sets it: the change and the generation bump happen under the lock that
    /// `read_config` takes.
    #[derive(Clone, Default)]
    struct ChangingConfig(Arc<Mutex<(u32, Option<Arc<Interrupt>>)>>);

    impl ChangingConfig {
        fn change(&self, value: u32) {
            let mut state = self.0.lock().unwrap();
            state.0 = value;
            let interrupt = state.1.as_ref().expect("attached by the transport");
            interrupt.signal_config_changed().unwrap();
        }
    }

    impl VirtioDevice for ChangingConfig {
        fn device_type(&self) -> u32 {
            5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn avail_features(&self) -> u64 {
            1 << 32
        }
        fn set_acked_features(&mut self, _features: u64) {}
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let bytes = self.0.lock().unwrap().0.to_le_bytes();
            data.fill(0);
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&bytes);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn attach_interrupt(&mut self, interrupt: &Arc<Interrupt>) {
            self.0.lock().unwrap().1 = Some(interrupt.clone());
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<Interrupt>,
            _queues: Vec<(Queue, EventFd)>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }

    #[test]
    fn a_config_change_bumps_the_generation_and_raises_the_config_interrupt() {
        let device = ChangingConfig::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(guest_memory(), Box::new(device.clone()), irq).unwrap();
        // Before DRIVER_OK (a driver reading the space while it probes) the generation moves
        // too.
        let before = read(&mut t, CONFIG_GENERATION_OFFSET);
        device.change(1);
        assert_ne!(read(&mut t, CONFIG_GENERATION_OFFSET), before);
        write(&mut t, INTERRUPT_ACK_OFFSET, INT_CONFIG);
        let _ = t.interrupt().irq().read();

        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 8, 0x10_0000);
        write(&mut t, STATUS_OFFSET, FULL);
        assert_eq!(read(&mut t, STATUS_OFFSET), FULL);

        // The driver's read of the space: generation, bytes, generation.
        let generation = read(&mut t, CONFIG_GENERATION_OFFSET);
        assert_eq!(read(&mut t, CONFIG_OFFSET), 1);
        assert_eq!(read(&mut t, CONFIG_GENERATION_OFFSET), generation, "stable");
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), 0);
        assert!(t.interrupt().irq().read().is_err(), "no interrupt yet");

        device.change(42);
        let changed = read(&mut t, CONFIG_GENERATION_OFFSET);
        assert_ne!(changed, generation, "a read spanning the change is retried");
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), INT_CONFIG);
        assert_eq!(t.interrupt().irq().read().unwrap(), 1, "irq fired");
        assert_eq!(read(&mut t, CONFIG_OFFSET), 42);

        write(&mut t, INTERRUPT_ACK_OFFSET, INT_CONFIG);
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), 0);
        assert_eq!(
            read(&mut t, CONFIG_GENERATION_OFFSET),
            changed,
            "stable again"
        );
    }

    #[test]
    fn writing_zero_resets_and_the_driver_can_start_again() {
        let (mut t, seen) = transport(false);
        negotiate(&mut t, (1 << 32) | (1 << 29));
        setup_queue(&mut t, 0, 8, 0x10_0000);
        setup_queue(&mut t, 1, 8, 0x20_0000);
        write(&mut t, STATUS_OFFSET, FULL);
        t.interrupt().signal_used_queue().unwrap();
        t.write(CONFIG_OFFSET + 2, &[7]);

        write(&mut t, STATUS_OFFSET, 0);
        assert_eq!(read(&mut t, STATUS_OFFSET), 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert_eq!(read(&mut t, INTERRUPT_STATUS_OFFSET), 0);
        write(&mut t, QUEUE_SEL_OFFSET, 0);
        assert_eq!(read(&mut t, QUEUE_READY_OFFSET), 0);
        assert_eq!(read(&mut t, QUEUE_NUM_OFFSET), 16, "size back to max");

        // Second initialisation, without EVENT_IDX this time.
        negotiate(&mut t, 1 << 32);
        setup_queue(&mut t, 0, 16, 0x30_0000);
        setup_queue(&mut t, 1, 8, 0x40_0000);
        write(&mut t, STATUS_OFFSET, FULL);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.activations.len(), 2);
        assert_eq!(
            seen.activations[1][0],
            (16, 0x30_0000, 0x30_1000, 0x30_2000, false)
        );
        assert_eq!(seen.config_writes, vec![(2, vec![7])]);
    }
}

//! Builds a VM from a `VmConfig` (memory, interrupt controller, devices, kernel, vCPUs) and runs
//! it until the guest powers off, resets or fails.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Address, GuestAddress, GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{acpi, boot, cpuid, layout, mptable};
use crate::config::{self, VmConfig};
use crate::devices::power::{self, AcpiPm, I8042};
use crate::devices::serial::{self, ConsoleSink, Serial};
use crate::devices::virtio::vsock::{Muxer, Vsock};
use crate::devices::virtio::{self, Block, MmioTransport, Rng, VirtioDevice};
use crate::devices::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::hypervisor::{self, Hypervisor, Vm};
use crate::memory::GuestMemory;
use crate::vcpu::{self, VcpuContext};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    #[error("allocating {0} MiB of guest memory failed: {1}")]
    AllocateMemory(u64, vm_memory::mmap::FromRangesError),
    #[error("cannot create the console log {path}: {source}")]
    SerialLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating an eventfd failed: {0}")]
    EventFd(std::io::Error),
    #[error("placing a device on the bus failed: {0}")]
    Bus(#[from] crate::devices::bus::Error),
    #[error("disk {path}: {source}")]
    Disk {
        path: PathBuf,
        source: virtio::block::Error,
    },
    #[error("creating the entropy device failed: {0}")]
    Rng(virtio::rng::Error),
    #[error("creating the virtio-mmio transport failed: {0}")]
    Transport(virtio::mmio::Error),
    #[error("vsock: {0}")]
    Vsock(virtio::vsock::muxer::Error),
    #[error("too many devices: the guest has {} interrupt lines for virtio", layout::IOAPIC_PINS - layout::VIRTIO_IRQ_START)]
    TooManyDevices,
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error("starting vCPU thread failed: {0}")]
    SpawnVcpu(std::io::Error),
}

/// The guest's vsock context ID (0-2 are reserved: hypervisor, local, host).
pub const GUEST_CID: u64 = 3;

/// Everything the guest is wired to before its vCPUs start.
struct Machine {
    vm: Box<dyn Vm>,
    mem: GuestMemory,
    io_bus: Bus,
    mmio_bus: Bus,
    /// `virtio_mmio.device=` arguments announcing the devices to the guest.
    device_args: Vec<String>,
    next_irq: u32,
}

fn create_memory(vm: &dyn Vm, memory_mib: u64) -> Result<GuestMemory, Error> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(memory_mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem =
        GuestMemory::from_ranges(&ranges).map_err(|e| Error::AllocateMemory(memory_mib, e))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        // SAFETY: the region is an mmap owned by `mem`, which the VMM keeps (through the
        // devices and this function's caller) until the process exits.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().raw_value(),
                region.len(),
                host,
            )
        }?;
    }
    Ok(mem)
}

impl Machine {
    fn new(hv: &dyn Hypervisor, config: &VmConfig) -> Result<Self, Error> {
        let vm = hv.create_vm()?;
        let mem = create_memory(vm.as_ref(), config.memory_mib)?;
        vm.create_irq_controller()?;
        Ok(Machine {
            vm,
            mem,
            io_bus: Bus::new(),
            mmio_bus: Bus::new(),
            device_args: vec![],
            next_irq: layout::VIRTIO_IRQ_START,
        })
    }

    fn irq_event(&self, gsi: u32) -> Result<EventFd, Error> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        self.vm.register_irqfd(&event, gsi)?;
        Ok(event)
    }

    fn add_legacy_devices(
        &mut self,
        config: &VmConfig,
        exit: &ExitNotifier,
        panicked: Arc<AtomicBool>,
    ) -> Result<(), Error> {
        let log = match &config.serial_log {
            Some(path) => Some(File::create(path).map_err(|source| Error::SerialLog {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let serial = Serial::new(
            self.irq_event(layout::SERIAL_IRQ)?,
            ConsoleSink::new(log, config.console, panicked),
        );
        self.io_bus.insert(
            Arc::new(Mutex::new(serial)),
            u64::from(serial::COM1_PORT),
            serial::COM1_PORTS_LEN,
        )?;
        let pm = AcpiPm::new(exit.clone());
        self.io_bus.insert(
            Arc::new(Mutex::new(pm)),
            u64::from(power::ACPI_PM1_EVT_PORT),
            power::ACPI_PORTS_LEN,
        )?;
        let i8042 = I8042::new(exit.clone());
        self.io_bus.insert(
            Arc::new(Mutex::new(i8042)),
            u64::from(power::I8042_PORT),
            power::I8042_PORTS_LEN,
        )?;
        Ok(())
    }

    fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), Error> {
        if self.next_irq >= layout::IOAPIC_PINS {
            return Err(Error::TooManyDevices);
        }
        let irq = self.next_irq;
        let base = layout::VIRTIO_MMIO_START
            + u64::from(irq - layout::VIRTIO_IRQ_START) * virtio::mmio::MMIO_SIZE;
        let transport = MmioTransport::new(self.mem.clone(), device, self.irq_event(irq)?)
            .map_err(Error::Transport)?;
        for (queue, event) in transport.queue_notify_events().iter().enumerate() {
            self.vm.register_ioeventfd(
                event,
                base + virtio::mmio::QUEUE_NOTIFY_OFFSET,
                queue as u32,
            )?;
        }
        self.mmio_bus.insert(
            Arc::new(Mutex::new(transport)),
            base,
            virtio::mmio::MMIO_SIZE,
        )?;
        self.device_args
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.next_irq += 1;
        Ok(())
    }

    fn add_virtio_devices(&mut self, config: &VmConfig) -> Result<(), Error> {
        for disk in &config.disks {
            let block =
                Block::new(&disk.path, disk.read_only, None).map_err(|source| Error::Disk {
                    path: disk.path.clone(),
                    source,
                })?;
            self.add_virtio(Box::new(block))?;
        }
        if config.rng {
            self.add_virtio(Box::new(Rng::new().map_err(Error::Rng)?))?;
        }
        if let Some(path) = &config.vsock {
            let muxer = Muxer::new(GUEST_CID, path).map_err(Error::Vsock)?;
            self.add_virtio(Box::new(Vsock::new(GUEST_CID, muxer)))?;
        }
        Ok(())
    }
}

/// The kernel command line: the VMM's console and devices first, then the user's arguments.
fn kernel_cmdline(device_args: &[String], user: &str) -> String {
    let mut args = vec!["console=ttyS0".to_string(), "panic=-1".to_string()];
    args.extend(device_args.iter().cloned());
    if !user.trim().is_empty() {
        args.push(user.trim().to_string());
    }
    args.join(" ")
}

/// Boots the VM described by `config` and runs it until it stops.
pub fn run(config: &VmConfig) -> Result<ExitReason, Error> {
    config.validate()?;
    let hv = hypervisor::open()?;
    let mut machine = Machine::new(hv.as_ref(), config)?;
    let (exit, exits) = ExitNotifier::new();
    let panicked = Arc::new(AtomicBool::new(false));
    machine.add_legacy_devices(config, &exit, panicked.clone())?;
    machine.add_virtio_devices(config)?;

    let rsdp = acpi::setup_acpi(&machine.mem, config.cpus)?;
    mptable::setup_mptable(&machine.mem, config.cpus)?;
    let cmdline = kernel_cmdline(&machine.device_args, &config.cmdline);
    tracing::info!("kernel command line: {cmdline}");
    let boot_state = boot::load_kernel(&machine.mem, &config.kernel, &cmdline, rsdp)?;

    let supported = hv.supported_cpuid()?;
    let ctx = VcpuContext {
        io_bus: Arc::new(machine.io_bus),
        mmio_bus: Arc::new(machine.mmio_bus),
        exit,
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut threads = Vec::new();
    for id in 0..config.cpus {
        let vcpu = machine.vm.create_vcpu(id)?;
        vcpu.set_cpuid(&cpuid::guest_cpuid(&supported, id, config.cpus))?;
        vcpu.setup_lapic()?;
        vcpu.set_boot_state(&boot_state)?;
        threads.push(vcpu::spawn_vcpu(id, vcpu, ctx.clone()).map_err(Error::SpawnVcpu)?);
    }

    // Every sender lives in a device or vCPU context that outlives this wait.
    let reason = exits
        .recv()
        .unwrap_or_else(|_| ExitReason::Error("all vCPUs vanished".into()));
    vcpu::stop_vcpus(&ctx.stop, threads);
    Ok(match reason {
        ExitReason::Reset | ExitReason::Crashed(_) if panicked.load(Ordering::SeqCst) => {
            ExitReason::Panic
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmdline_puts_console_and_devices_before_the_users_arguments() {
        let devices = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            kernel_cmdline(&devices, " root=/dev/vda ro "),
            "console=ttyS0 panic=-1 virtio_mmio.device=4K@0xd0000000:5 root=/dev/vda ro"
        );
        assert_eq!(kernel_cmdline(&[], ""), "console=ttyS0 panic=-1");
    }
}

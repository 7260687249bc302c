//! Builds a VM from a `VmConfig` (memory, interrupt controller, devices, kernel, vCPUs) and runs
//! it until the guest powers off, resets or fails.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Address, GuestAddress, GuestMemory as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{self, ApiServer, DeviceControls, VmInfo};
use crate::arch::x86_64::{acpi, boot, cpuid, layout, mptable};
use crate::config::{self, VmConfig};
use crate::device_manager::{self, DeviceManager};
use crate::devices::power::{self, AcpiPm, I8042};
use crate::devices::serial::{self, ConsoleSink, Serial};
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
    #[error("allocating {mib} MiB of guest memory")]
    AllocateMemory {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("creating the console log {path}")]
    SerialLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("placing a legacy device on the I/O port bus")]
    Bus(#[source] crate::devices::bus::Error),
    #[error(transparent)]
    Devices(#[from] device_manager::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error("starting a vCPU thread")]
    SpawnVcpu(#[source] std::io::Error),
}

/// Everything the guest is wired to before its vCPUs start.
struct Machine {
    vm: Box<dyn Vm>,
    mem: GuestMemory,
    io_bus: Bus,
    devices: DeviceManager,
}

fn create_memory(vm: &dyn Vm, memory_mib: u64) -> Result<GuestMemory, Error> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(memory_mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|source| Error::AllocateMemory {
        mib: memory_mib,
        source,
    })?;
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
            devices: DeviceManager::new(
                layout::VIRTIO_MMIO_START..u64::from(layout::IOAPIC_ADDR),
                layout::VIRTIO_IRQ_START..layout::IOAPIC_PINS,
            ),
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
        self.io_bus
            .insert(
                Arc::new(Mutex::new(serial)),
                u64::from(serial::COM1_PORT),
                serial::COM1_PORTS_LEN,
            )
            .map_err(Error::Bus)?;
        let pm = AcpiPm::new(exit.clone());
        self.io_bus
            .insert(
                Arc::new(Mutex::new(pm)),
                u64::from(power::ACPI_PM1_EVT_PORT),
                power::ACPI_PORTS_LEN,
            )
            .map_err(Error::Bus)?;
        let i8042 = I8042::new(exit.clone());
        self.io_bus
            .insert(
                Arc::new(Mutex::new(i8042)),
                u64::from(power::I8042_PORT),
                power::I8042_PORTS_LEN,
            )
            .map_err(Error::Bus)?;
        Ok(())
    }
}

/// Serves the VMM API socket, if the description asks for one, until the returned server is
/// dropped.
fn start_api(
    config: &VmConfig,
    exit: &ExitNotifier,
    devices: &DeviceControls,
) -> Result<Option<ApiServer>, Error> {
    let Some(path) = &config.api_socket else {
        return Ok(None);
    };
    let info = VmInfo {
        cpus: config.cpus,
        memory_mib: config.memory_mib,
    };
    Ok(Some(ApiServer::start(
        path,
        info,
        exit.clone(),
        devices.clone(),
    )?))
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
///
/// With `config.api_socket`, the VMM serves its API there from before the devices are built
/// until it returns; a `Stop` there stops the vCPUs, flushes the disks and returns
/// `ExitReason::Stopped`.
pub fn run(config: &VmConfig) -> Result<ExitReason, Error> {
    config::validate(config)?;
    let (exit, exits) = ExitNotifier::new();
    let api_devices = DeviceControls::default();
    let _api = start_api(config, &exit, &api_devices)?;
    let hv = hypervisor::open()?;
    let mut machine = Machine::new(hv.as_ref(), config)?;
    let panicked = Arc::new(AtomicBool::new(false));
    machine.add_legacy_devices(config, &exit, panicked.clone())?;
    machine
        .devices
        .add_devices(machine.vm.as_ref(), &machine.mem, &config.devices)?;
    api_devices.set(machine.devices.controls().clone());

    let rsdp = acpi::setup_acpi(&machine.mem, config.cpus)?;
    mptable::setup_mptable(&machine.mem, config.cpus)?;
    let cmdline = kernel_cmdline(&machine.devices.cmdline_args(), &config.cmdline);
    tracing::info!("kernel command line: {cmdline}");
    let boot_state = boot::load_kernel(&machine.mem, &config.kernel, &cmdline, rsdp)?;

    let supported = hv.supported_cpuid()?;
    let ctx = VcpuContext {
        io_bus: Arc::new(machine.io_bus),
        mmio_bus: Arc::new(machine.devices.mmio_bus().clone()),
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
    tracing::info!("the VM stops: {reason:?}");
    vcpu::stop_vcpus(&ctx.stop, threads);
    let devices = machine.devices.shutdown_devices();
    tracing::info!(
        devices,
        "vCPUs stopped, devices shut down, disk images synced"
    );
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

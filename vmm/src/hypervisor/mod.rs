//! The hypervisor abstraction: what the VMM needs from KVM (today) or Hypervisor.framework and
//! the Windows Hypervisor Platform (later). Only `kvm.rs` imports KVM; everything else in the
//! VMM speaks these traits and types.

pub mod kvm;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the hypervisor ({path}): {source}")]
    Open {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("hypervisor API version {0} is not supported")]
    ApiVersion(i32),
    #[error("the hypervisor lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn ioctl(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        Error::Ioctl {
            op,
            source: e.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// One CPUID leaf/subleaf as the guest will see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Non-zero when `index` is significant (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// An x86 segment descriptor in the form the hypervisor loads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operand size 32-bit.
    pub db: bool,
    /// Code/data (true) rather than system segment.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Limit in 4 KiB units.
    pub g: bool,
}

/// The register state a vCPU starts the guest kernel with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootState {
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rbx: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub code: Segment,
    pub data: Segment,
    pub tss: Segment,
    pub gdt: (u64, u16),
    pub idt: (u64, u16),
}

/// Why a vCPU returned to the VMM.
#[derive(Debug)]
pub enum VmExit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The vCPU executed HLT (only seen without an in-kernel interrupt controller).
    Hlt,
    /// The vCPU shut down: on x86 a triple fault.
    Shutdown,
    /// The hypervisor reported a system event (reset, shutdown, crash) of this kind.
    SystemEvent(u32),
    /// The run was interrupted by a signal, e.g. to stop the vCPU.
    Interrupted,
    /// The hypervisor could not enter or continue the guest; the text says why.
    Failed(String),
}

/// A hypervisor: makes VMs and says what the host CPU offers.
pub trait Hypervisor: Send + Sync {
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// The CPUID leaves the hypervisor can expose, before the VMM's own adjustments.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// A virtual machine: its memory, interrupt controller and vCPUs.
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped and writable for the life of the VM.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Creates the in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.
    fn create_irq_controller(&self) -> Result<()>;
    /// Makes every write to `event` raise interrupt line `gsi`.
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()>;
    /// Signals `event` instead of exiting when the guest writes the 32-bit `datamatch` at `addr`.
    fn register_ioeventfd(&self, event: &EventFd, addr: u64, datamatch: u32) -> Result<()>;
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
}

/// One virtual CPU. `run` is called from the vCPU's own thread.
pub trait Vcpu: Send {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// Loads the boot state, FPU defaults and boot MSRs.
    fn set_boot_state(&self, state: &BootState) -> Result<()>;
    /// Sets up the local APIC's LINT0 (ExtINT) and LINT1 (NMI) as a PC expects.
    fn setup_lapic(&self) -> Result<()>;
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Makes the next `run` return `Interrupted` at once (cleared by the VMM).
    fn set_immediate_exit(&mut self, exit: bool);
    /// The vCPU's registers in one line (instruction pointer, control registers, segments),
    /// for the log when the guest crashed.
    fn describe_state(&self) -> String;
}

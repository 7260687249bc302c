//! The hypervisor abstraction: what the VMM needs from KVM (today) or Hypervisor.framework and
//! the Windows Hypervisor Platform (later), and `open()`, which picks the backend. Each backend
//! is one file here (`kvm.rs`); only this module says which are built for which host, and
//! nothing outside it names one. The generic traits carry what every backend does; the
//! architecture's vCPU state (`x86_64.rs`) is a supertrait chosen here once.

#[cfg(target_os = "linux")]
mod kvm;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{BootState, CpuidEntry, Segment, X86Hypervisor, X86Vcpu};
#[cfg(target_arch = "x86_64")]
use self::x86_64::{X86Hypervisor as ArchHypervisor, X86Vcpu as ArchVcpu};

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening the hypervisor ({what}) failed")]
    Open {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("hypervisor API version {0} is not supported")]
    ApiVersion(i32),
    #[error("the hypervisor lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("no hypervisor backend is built for this host")]
    NoBackend,
    /// A call into the hypervisor failed; `op` is the backend's name for it (`KVM_CREATE_VM`).
    #[error("{op} failed")]
    Call {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("building the {count} entries for {op} failed")]
    TooManyEntries {
        op: &'static str,
        count: usize,
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    #[error("{op} took {accepted} of {wanted} entries")]
    PartialWrite {
        op: &'static str,
        accepted: usize,
        wanted: usize,
    },
}

impl Error {
    pub(crate) fn call(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        Error::Call {
            op,
            source: e.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A hypervisor backend this build can use.
pub struct Backend {
    /// How logs and tests name it ("KVM").
    pub name: &'static str,
    open: fn() -> Result<Box<dyn Hypervisor>>,
}

impl Backend {
    /// Opens this backend; fails when the host does not offer it (no `/dev/kvm`, say).
    pub fn open(&self) -> Result<Box<dyn Hypervisor>> {
        (self.open)()
    }
}

/// The backends built for this host OS, the preferred first. Hypervisor.framework (macOS) and
/// WHP (Windows) become a file beside `kvm.rs` and a line here.
#[cfg(target_os = "linux")]
const BACKENDS: &[Backend] = &[Backend {
    name: "KVM",
    open: kvm::open,
}];
#[cfg(not(target_os = "linux"))]
const BACKENDS: &[Backend] = &[];

/// Every backend built for this host, whether or not the host offers it right now.
pub fn backends() -> &'static [Backend] {
    BACKENDS
}

/// Opens the first backend the host offers. When none opens, the error is the preferred
/// backend's (the one a user most likely has to fix).
pub fn open() -> Result<Box<dyn Hypervisor>> {
    let mut first_error = None;
    for backend in backends() {
        match backend.open() {
            Ok(hv) => {
                tracing::info!("hypervisor: {}", backend.name);
                return Ok(hv);
            }
            Err(e) => {
                tracing::debug!("hypervisor {} is not available: {e}", backend.name);
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(Error::NoBackend))
}

/// How a guest crashed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// The vCPU met a fault it could not deliver and stopped, with nothing having asked for a
    /// reset: on x86 a triple fault.
    CpuFault,
    /// The guest told the hypervisor that it crashed (a paravirtual crash report).
    GuestReported,
}

/// Why a vCPU returned to the VMM, in terms every backend can map its exits onto.
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
    /// The guest asked the hypervisor to power the machine off.
    PowerOff,
    /// The guest asked the hypervisor to reset the machine.
    Reset,
    /// The guest crashed.
    Crash(Crash),
    /// The guest asked for something this VMM does not model (a suspend, say); it runs on.
    Unsupported(&'static str),
    /// The run was interrupted by a signal, e.g. to stop the vCPU.
    Interrupted,
    /// The hypervisor could not enter or continue the guest; the text says why.
    Failed(String),
}

/// A hypervisor: makes VMs. Its architecture part says what the host CPU offers.
pub trait Hypervisor: ArchHypervisor + Send + Sync {
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
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
    /// Creates the platform's interrupt controllers and timer in the hypervisor (on x86 the
    /// PIC, IOAPIC, local APICs and PIT).
    fn create_irq_controller(&self) -> Result<()>;
    /// Makes every write to `event` raise interrupt line `gsi`.
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()>;
    /// Signals `event` instead of exiting when the guest writes the 32-bit `datamatch` at `addr`.
    fn register_ioeventfd(&self, event: &EventFd, addr: u64, datamatch: u32) -> Result<()>;
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
}

/// One virtual CPU. `run` is called from the vCPU's own thread; the architecture part sets its
/// registers before the first run.
pub trait Vcpu: ArchVcpu + Send {
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Makes the next `run` return `Interrupted` at once (cleared by the VMM).
    fn set_immediate_exit(&mut self, exit: bool);
    /// The vCPU's registers in one line, instruction pointer first (on x86 `rip=0x...`, then
    /// control registers and segments), for the log when the guest crashed.
    fn describe_state(&self) -> String;
}

//! The x86 part of the hypervisor traits: the CPUID, local APIC and boot registers that every
//! x86 backend (KVM today; Hypervisor.framework on Intel Macs or WHP later) sets on a vCPU.

use super::Result;

/// One CPUID leaf/subleaf as the guest will see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// The leaf has subleaves: `index` selects among them.
    pub significant_index: bool,
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

/// What an x86 hypervisor says about the host CPU.
pub trait X86Hypervisor {
    /// The CPUID leaves the hypervisor can expose, before the VMM's own adjustments.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// The x86 state of one vCPU, set before it first runs.
pub trait X86Vcpu {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    /// Loads the boot state, FPU defaults and boot MSRs.
    fn set_boot_state(&self, state: &BootState) -> Result<()>;
    /// Sets up the local APIC's LINT0 (ExtINT) and LINT1 (NMI) as a PC expects.
    fn setup_lapic(&self) -> Result<()>;
}

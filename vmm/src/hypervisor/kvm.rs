//! The KVM backend of the hypervisor traits (Linux): the only place in the VMM that imports
//! KVM. It maps KVM's exits onto the neutral `VmExit`.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SEV_TERM, KVM_SYSTEM_EVENT_SHUTDOWN, KVM_SYSTEM_EVENT_SUSPEND,
    KVM_SYSTEM_EVENT_WAKEUP,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::x86_64::{BootState, CpuidEntry, Segment, X86Hypervisor, X86Vcpu};
use super::{Crash, Error, Hypervisor, Result, Vcpu, Vm, VmExit};

/// Where KVM puts the three pages of its TSS, just below the 4 GiB BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Opens `/dev/kvm` and checks that it offers what the VMM uses.
pub(super) fn open() -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(KvmHypervisor::new()?))
}

struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| Error::Open {
            what: "/dev/kvm",
            source: e.into(),
        })?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::call("KVM_CREATE_VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::call("KVM_SET_TSS_ADDR", e))?;
        Ok(Box::new(KvmVm { fd }))
    }
}

impl X86Hypervisor for KvmHypervisor {
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::call("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                significant_index: e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

struct KvmVm {
    fd: VmFd,
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the life of the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| Error::call("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_irq_controller(&self) -> Result<()> {
        self.fd
            .create_irq_chip()
            .map_err(|e| Error::call("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| Error::call("KVM_CREATE_PIT2", e))
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|e| Error::call("KVM_IRQFD", e))
    }

    fn register_ioeventfd(&self, event: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| Error::call("KVM_IOEVENTFD", e))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::call("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu { fd }))
    }
}

struct KvmVcpu {
    fd: VcpuFd,
}

fn kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: 0,
        unusable: u8::from(!s.present),
        padding: 0,
    }
}

/// MSRs a kernel expects in a known state at entry (as a BIOS would leave them).
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// What a KVM_EXIT_SYSTEM_EVENT of this kind means.
fn system_event(kind: u32) -> VmExit<'static> {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
        KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
        KVM_SYSTEM_EVENT_CRASH => VmExit::Crash(Crash::GuestReported),
        KVM_SYSTEM_EVENT_WAKEUP => VmExit::Unsupported("a wakeup system event"),
        KVM_SYSTEM_EVENT_SUSPEND => VmExit::Unsupported("a suspend"),
        KVM_SYSTEM_EVENT_SEV_TERM => VmExit::Unsupported("an SEV termination request"),
        _ => VmExit::Unsupported("a system event of an unknown kind"),
    }
}

impl KvmVcpu {
    fn set_registers(&self, state: &BootState) -> Result<()> {
        let regs = kvm_regs {
            rip: state.rip,
            rsp: state.rsp,
            rbp: state.rbp,
            rsi: state.rsi,
            rbx: state.rbx,
            rflags: state.rflags,
            ..Default::default()
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::call("KVM_SET_REGS", e))?;

        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", e))?;
        sregs.cs = kvm_segment(&state.code);
        let data = kvm_segment(&state.data);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment(&state.tss);
        (sregs.gdt.base, sregs.gdt.limit) = state.gdt;
        (sregs.idt.base, sregs.idt.limit) = state.idt;
        sregs.cr0 = state.cr0;
        sregs.cr3 = state.cr3;
        sregs.cr4 = state.cr4;
        sregs.efer = state.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| Error::call("KVM_SET_SREGS", e))
    }

    fn set_fpu_and_msrs(&self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| Error::call("KVM_SET_FPU", e))?;

        let entries = boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|source| Error::TooManyEntries {
            op: "KVM_SET_MSRS",
            count: entries.len(),
            source,
        })?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| Error::call("KVM_SET_MSRS", e))?;
        if written != entries.len() {
            return Err(Error::PartialWrite {
                op: "KVM_SET_MSRS",
                accepted: written,
                wanted: entries.len(),
            });
        }
        Ok(())
    }
}

impl X86Vcpu for KvmVcpu {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.significant_index {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries).map_err(|source| Error::TooManyEntries {
            op: "KVM_SET_CPUID2",
            count: kvm_entries.len(),
            source,
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::call("KVM_SET_CPUID2", e))
    }

    fn set_boot_state(&self, state: &BootState) -> Result<()> {
        self.set_registers(state)?;
        self.set_fpu_and_msrs()
    }

    fn setup_lapic(&self) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const APIC_MODE_NMI: u32 = 0x4;
        const APIC_MODE_EXTINT: u32 = 0x7;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::call("KVM_GET_LAPIC", e))?;
        let set_mode = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
            let mut bytes = [0u8; 4];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = regs[offset + i] as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                regs[offset + i] = *b as std::os::raw::c_char;
            }
        };
        set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::call("KVM_SET_LAPIC", e))
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
                VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::Hlt => VmExit::Hlt,
                // Nothing asks for a reset by triple fault: a PC's reset comes through the
                // keyboard controller or ACPI, which the VMM's own devices answer.
                VcpuExit::Shutdown => VmExit::Crash(Crash::CpuFault),
                VcpuExit::SystemEvent(kind, _) => system_event(kind),
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::FailEntry(reason, cpu) => VmExit::Failed(format!(
                    "entry failed: hardware reason {reason:#x} on cpu {cpu}"
                )),
                VcpuExit::InternalError => VmExit::Failed("KVM internal error".into()),
                other => VmExit::Failed(format!("unexpected exit {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(Error::call("KVM_RUN", e)),
        }
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    fn describe_state(&self) -> String {
        let (regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => return format!("registers unavailable: {e}"),
        };
        format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} \
             efer={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
            regs.rip,
            regs.rsp,
            regs.rflags,
            sregs.cs.selector,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            sregs.idt.base,
            sregs.idt.limit,
            sregs.gdt.base,
            sregs.gdt.limit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_events_map_onto_what_the_guest_asked_for() {
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_SHUTDOWN),
            VmExit::PowerOff
        ));
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_RESET),
            VmExit::Reset
        ));
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_CRASH),
            VmExit::Crash(Crash::GuestReported)
        ));
        assert!(matches!(
            system_event(KVM_SYSTEM_EVENT_SUSPEND),
            VmExit::Unsupported(_)
        ));
        assert!(matches!(system_event(99), VmExit::Unsupported(_)));
    }
}

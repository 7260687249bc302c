//! The CPUID a vCPU shows the guest: the hypervisor's supported set, with topology filled in
//! per vCPU and the features that misbehave in a VM hidden.

use crate::hypervisor::CpuidEntry;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// KVM_FEATURE_ASYNC_PF_INT: on AMD hosts it causes interrupt storms in the guest.
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;

/// Adjusts `supported` for vCPU `cpu_id` of `cpu_count`: each vCPU is one core of one socket.
pub fn guest_cpuid(supported: &[CpuidEntry], cpu_id: u8, cpu_count: u8) -> Vec<CpuidEntry> {
    let count = u32::from(cpu_count.max(1));
    // Bits of the APIC ID that number the cores of the package.
    let core_bits = 32 - (count - 1).leading_zeros();
    supported
        .iter()
        .map(|entry| {
            let mut e = *entry;
            match e.function {
                LEAF_FEATURES => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(cpu_id) << 24) | (count << 16);
                    e.ebx = (e.ebx & !0xff00) | (8 << 8); // CLFLUSH line size: 64 bytes
                    e.ecx |= ECX_HYPERVISOR;
                    if count > 1 {
                        e.edx |= EDX_HTT;
                    } else {
                        e.edx &= !EDX_HTT;
                    }
                }
                LEAF_CACHE_PARAMS => {
                    // Cores per package - 1 in EAX[31:26]; one thread per cache share.
                    e.eax = (e.eax & 0x3ff) | ((count - 1) << 26);
                }
                LEAF_EXT_TOPOLOGY => {
                    e.edx = u32::from(cpu_id);
                    (e.eax, e.ebx, e.ecx) = match e.index {
                        0 => (0, 1, 1 << 8),                   // SMT level: one thread
                        1 => (core_bits, count, (2 << 8) | 1), // core level
                        i => (0, 0, i),                        // invalid level
                    };
                }
                LEAF_KVM_FEATURES => e.eax &= !KVM_FEATURE_ASYNC_PF_INT,
                LEAF_AMD_SIZES => e.ecx = (e.ecx & !0xff) | (count - 1),
                _ => {}
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 0,
            significant_index: false,
        }
    }

    #[test]
    fn topology_and_apic_ids_follow_the_vcpu() {
        let supported = [
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x4000_0001, 0),
        ];
        let cpuid = guest_cpuid(&supported, 3, 4);
        assert_eq!(cpuid[0].ebx >> 24, 3, "initial APIC ID");
        assert_eq!((cpuid[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_ne!(cpuid[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(cpuid[0].edx & EDX_HTT, 0);
        assert_eq!((cpuid[2].eax, cpuid[2].ebx, cpuid[2].edx), (2, 4, 3));
        assert_eq!(cpuid[3].ecx, 2);
        assert_eq!(cpuid[4].eax & KVM_FEATURE_ASYNC_PF_INT, 0);
    }

    #[test]
    fn a_single_vcpu_has_no_htt() {
        let mut e = entry(1, 0);
        e.edx = EDX_HTT;
        let cpuid = guest_cpuid(&[e, entry(0xb, 1)], 0, 1);
        assert_eq!(cpuid[0].edx & EDX_HTT, 0);
        assert_eq!((cpuid[1].eax, cpuid[1].ebx), (0, 1));
    }
}

//! CPUID normalisation: per-vCPU topology leaves, APIC IDs and the hypervisor bit.
//!
//! `KVM_GET_SUPPORTED_CPUID` describes what the host can offer, not one vCPU of one VM. Each
//! vCPU's table needs its own APIC ID in the topology leaves and a processor count matching
//! the VM, or guests disagree with the MADT about who is who.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: multi-threading (more than one logical processor in the package).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Where a vCPU sits in the VM's topology: one package, one thread per core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// This vCPU's APIC ID.
    pub apic_id: u8,
    /// Number of vCPUs in the VM (at least 1).
    pub vcpu_count: u8,
}

/// Number of APIC ID bits needed to number `n` processors.
fn id_bits(n: u8) -> u32 {
    (u32::from(n.max(1)) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
}

/// Rewrites `entries` in place for the vCPU described by `topo`.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], topo: Topology) {
    let count = u32::from(topo.vcpu_count.max(1));
    let apic = u32::from(topo.apic_id);
    let core_bits = id_bits(topo.vcpu_count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | (count << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Intel deterministic cache parameters: cores per package; caches private to a
            // core except the last level, which the package shares.
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            // Extended topology: SMT level (1 thread per core), then the core level.
            0xb | 0x1f => {
                let (eax, ebx, ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (core_bits, count, (2 << 8) | 1),
                    n => (0, 0, n),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = ecx;
                e.edx = apic;
            }
            // AMD: cores per package, and APIC ID size.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            // AMD extended APIC ID, compute unit and node.
            0x8000_001e => {
                e.eax = apic;
                e.ebx = (e.ebx & !0xffff) | apic;
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x00ff_0800, // a host value: 255 logical CPUs, CLFLUSH size 8
            edx: LEAF1_EDX_HTT,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_and_topology() {
        let mut e = vec![entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        normalize(
            &mut e,
            Topology {
                apic_id: 3,
                vcpu_count: 4,
            },
        );
        assert_eq!(e[0].ebx, (3 << 24) | (4 << 16) | 0x0800);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].ecx >> 8, e[1].edx), (1, 1, 3));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8, e[2].edx), (2, 4, 2, 3));
        assert_eq!((e[3].ebx, e[3].ecx, e[3].edx), (0, 2, 3));

        let mut e = vec![entry(1, 0)];
        normalize(
            &mut e,
            Topology {
                apic_id: 0,
                vcpu_count: 1,
            },
        );
        assert_eq!(e[0].ebx >> 16, 1);
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn id_bit_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}

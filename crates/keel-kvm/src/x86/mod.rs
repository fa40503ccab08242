//! x86_64 CPU state: descriptor tables, page tables, entry register states, CPUID, MSRs.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod msr;

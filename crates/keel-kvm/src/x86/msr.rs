//! MSR indices and the boot MSR set.

/// `IA32_TSC`.
pub const IA32_TSC: u32 = 0x10;
/// `IA32_APIC_BASE`.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// `IA32_SYSENTER_CS`.
pub const IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `STAR`.
pub const STAR: u32 = 0xc000_0081;
/// `LSTAR`.
pub const LSTAR: u32 = 0xc000_0082;
/// `CSTAR`.
pub const CSTAR: u32 = 0xc000_0083;
/// `SFMASK` (syscall flag mask).
pub const SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`.
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE` bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled, default type write-back.
pub const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSR values a vCPU starts with: syscall MSRs cleared, TSC at zero, fast strings on and
/// MTRRs enabled with write-back as the default type (without it, guests that honour MTRRs
/// run uncached).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (LSTAR, 0),
        (CSTAR, 0),
        (SYSCALL_MASK, 0),
        (KERNEL_GS_BASE, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

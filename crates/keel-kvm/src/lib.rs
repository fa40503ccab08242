//! A typed wrapper over kvm-ioctls for x86_64 VMMs.
//!
//! [`Vm`] opens `/dev/kvm`, checks the capabilities Keel needs and owns the VM: memory
//! slots registered from vm-memory's `GuestMemoryMmap`, the in-kernel irqchip and PIT or the
//! split irqchip ([`IrqchipMode`]), irqfds, ioeventfds, the GSI routing table and dirty
//! logging. [`Vcpu`] sets up x86 CPU state
//! (CPUID, MSRs, FPU, LAPIC, and the register states of real mode, the Linux 64-bit boot
//! protocol and PVH) and runs the guest, dispatching port and MMIO exits to keel-bus
//! [`Buses`]. [`VcpuHandle`] pauses, resumes or stops a running vCPU from another thread.
//! [`interrupt`] implements keel-bus's interrupt traits over irqfd and MSI routes.
//!
//! ```no_run
//! use keel_kvm::{Buses, DirtyLog, Vm, VcpuExitReason};
//! use keel_memory::{MemoryLayout, MemoryOptions, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let layout = MemoryLayout::new(16 * MIB)?;
//! let mem = layout.create_guest_memory(&MemoryOptions::default())?;
//! mem.write_slice(&[0xf4], GuestAddress(0x1000))?; // hlt
//! let vm = Vm::new()?;
//! vm.register_memory(&mem, DirtyLog::Off)?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.setup_real_mode(0x1000)?;
//! assert_eq!(vcpu.run(&Buses::default())?, VcpuExitReason::Halted);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod interrupt;
mod vcpu;
mod vm;
pub mod x86;

pub use vcpu::{
    kick_signal, Buses, Error as VcpuError, IoAccess, Result as VcpuResult, Vcpu, VcpuExitReason,
    VcpuHandle, VcpuState, VcpuThread,
};
pub use vm::{
    DataMatch, DirtyLog, Error, IoEventAddr, IrqchipMode, MemorySlot, Result, Vm, IOAPIC_PINS,
    REQUIRED_CAPS,
};

/// Whether `/dev/kvm` can be opened read-write: a VMM, test or benchmark can check this to
/// say in one clear line that the host has no KVM (keel-testutil's `require_kvm!` does).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

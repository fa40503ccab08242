//! Shared helpers for tests that run real guest code: KVM detection, an assembler front end
//! (binutils), a recording bus device and VM set-up.
#![allow(dead_code)]

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use keel_bus::{MmioDevice, PioDevice};
use keel_kvm::{DirtyLog, Vm};
use keel_memory::{x86, GuestMemoryMmap, MemoryLayout, MemoryOptions, MIB};
use vm_memory::{Bytes, GuestAddress};

pub use keel_testutil::assemble;

/// One guest access seen by a [`Recorder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read of `len` bytes at `offset`.
    Read { offset: u64, len: usize },
    /// A write of `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
}

/// A device that records every access, answers reads with `read_value`'s bytes, and sends
/// each access on a channel so tests can wait for guest progress.
pub struct Recorder {
    pub log: Mutex<Vec<Access>>,
    pub read_value: u64,
    tx: Mutex<Sender<Access>>,
}

impl Recorder {
    pub fn new(read_value: u64) -> (Arc<Self>, Receiver<Access>) {
        let (tx, rx) = channel();
        (
            Arc::new(Recorder {
                log: Mutex::new(Vec::new()),
                read_value,
                tx: Mutex::new(tx),
            }),
            rx,
        )
    }

    fn record(&self, a: Access) {
        self.log.lock().unwrap().push(a.clone());
        let _ = self.tx.lock().unwrap().send(a);
    }

    pub fn accesses(&self) -> Vec<Access> {
        self.log.lock().unwrap().clone()
    }

    fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.read_value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes[i % 8];
        }
        self.record(Access::Read {
            offset,
            len: data.len(),
        });
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.record(Access::Write {
            offset,
            data: data.to_vec(),
        });
    }
}

impl PioDevice for Recorder {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        self.read(offset, data)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        self.write(offset, data)
    }
}

impl MmioDevice for Recorder {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.read(offset, data)
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.write(offset, data)
    }
}

/// A VM with `mib` MiB of RAM registered (and, with `irqchip`, the irqchip created after
/// the memory, as Keel recommends).
pub fn vm_with_memory(mib: u64, irqchip: bool) -> (Arc<Vm>, GuestMemoryMmap, MemoryLayout) {
    let layout = MemoryLayout::new(mib * MIB).unwrap();
    let opts = MemoryOptions::default();
    let mem = layout.create_guest_memory(&opts).unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, DirtyLog::Off).unwrap();
    if irqchip {
        vm.set_identity_map_address(GuestAddress(x86::IDENTITY_MAP_START))
            .unwrap();
        vm.set_tss_address(GuestAddress(x86::TSS_START)).unwrap();
        vm.setup_irqchip().unwrap();
    }
    (Arc::new(vm), mem, layout)
}

/// Writes `code` at `addr`.
pub fn load(mem: &GuestMemoryMmap, addr: u64, code: &[u8]) {
    mem.write_slice(code, GuestAddress(addr)).unwrap();
}

/// Base of the platform MMIO window, where tests place MMIO devices.
pub const PLATFORM: u64 = 0xf000_0000;
/// Where real-mode test code is loaded.
pub const REAL_ENTRY: u64 = 0x1000;
/// Where 64-bit test code is loaded.
pub const LONG_ENTRY: u64 = 0x10_0000;

/// Points `vcpu` at [`REAL_ENTRY`] in real mode, with DS based at [`PLATFORM`]: real mode
/// reaches 1 MiB only, and the DS base lets 16-bit code make MMIO accesses too.
pub fn reset_real_mode(vcpu: &keel_kvm::Vcpu) {
    vcpu.setup_real_mode(REAL_ENTRY).unwrap();
    let mut sregs = vcpu.sregs().unwrap();
    sregs.ds.base = PLATFORM;
    vcpu.set_sregs(&sregs).unwrap();
}

/// A VM (4 MiB, no irqchip) whose vCPU 0 is about to run `code` in real mode.
pub fn real_mode_guest(code: &[u8]) -> (Arc<Vm>, GuestMemoryMmap, keel_kvm::Vcpu) {
    let (vm, mem, _) = vm_with_memory(4, false);
    load(&mem, REAL_ENTRY, code);
    let vcpu = vm.create_vcpu(0).unwrap();
    reset_real_mode(&vcpu);
    (vm, mem, vcpu)
}

/// A VM (4 MiB, no irqchip) whose vCPU 0 is about to run `code` in 64-bit mode at `cpl`,
/// with the boot tables written and the stack at 0x80000.
pub fn long_mode_guest(
    code: &[u8],
    cpl: keel_kvm::x86::boot::Cpl,
) -> (Arc<Vm>, GuestMemoryMmap, keel_kvm::Vcpu) {
    use keel_kvm::x86::boot::{BootTables, Cpl};
    let (vm, mem, _) = vm_with_memory(4, false);
    load(&mem, LONG_ENTRY, code);
    let tables = BootTables::default();
    tables.write(&mem, 0x7_0000, cpl == Cpl::User).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(&vm, 1, false).unwrap();
    vcpu.setup_long_mode(&tables, cpl, LONG_ENTRY, 0x8_0000, 0)
        .unwrap();
    (vm, mem, vcpu)
}

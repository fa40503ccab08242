//! Shared helpers for tests that run real guest code: KVM detection, an assembler front end
//! (binutils), a recording bus device and VM set-up.
#![allow(dead_code)]

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use keel_bus::BusRange;
use keel_bus::{MmioDevice, PioDevice};
use keel_kvm::x86::boot::{BootTables, Cpl, SEL_CODE64};
use keel_kvm::{Buses, DirtyLog, IrqchipMode, Vcpu, Vm};
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
    new_vm(
        mib,
        irqchip.then_some(|vm: &Vm| vm.setup_irqchip().unwrap()),
    )
}

/// A VM with `mib` MiB of RAM registered and then the irqchip in `mode`.
pub fn vm_with_irqchip_mode(
    mib: u64,
    mode: IrqchipMode,
) -> (Arc<Vm>, GuestMemoryMmap, MemoryLayout) {
    new_vm(mib, Some(|vm: &Vm| vm.setup_irqchip_mode(mode).unwrap()))
}

fn new_vm(mib: u64, irqchip: Option<impl FnOnce(&Vm)>) -> (Arc<Vm>, GuestMemoryMmap, MemoryLayout) {
    let layout = MemoryLayout::new(mib * MIB).unwrap();
    let opts = MemoryOptions::default();
    let mem = layout.create_guest_memory(&opts).unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, DirtyLog::Off).unwrap();
    if let Some(setup) = irqchip {
        vm.set_identity_map_address(GuestAddress(x86::IDENTITY_MAP_START))
            .unwrap();
        vm.set_tss_address(GuestAddress(x86::TSS_START)).unwrap();
        setup(&vm);
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

/// Enables its LAPIC, reports ready on port 0x10, then halts with interrupts on. Each
/// handler reports its vector on port 0x11, sends EOI and returns: vector 0x30's at
/// [`IRQ_HANDLER`], vector 0x31's 0x80 bytes after it.
pub const IRQ_GUEST: &str = r#"
    .code64
    mov $0xfee00000, %ebx
    movl $0x1ff, 0xf0(%rbx)     # spurious vector register: APIC on
    out %al, $0x10              # ready
1:  sti
    hlt
    jmp 1b

    .org 0x100                  # vector 0x30
    push %rax
    mov $0x30, %al
    jmp 2f
    .org 0x180                  # vector 0x31
    push %rax
    mov $0x31, %al
2:  out %al, $0x11
    push %rbx
    mov $0xfee00000, %ebx
    movl $0, 0xb0(%rbx)         # EOI
    pop %rbx
    pop %rax
    iretq
"#;

/// Where [`IRQ_GUEST`]'s interrupt handlers start (see `.org` in its source).
pub const IRQ_HANDLER: u64 = LONG_ENTRY + 0x100;

/// Writes a present 64-bit interrupt gate (DPL 0) for `vector` to `handler` into the IDT at `idt`.
pub fn set_gate(mem: &GuestMemoryMmap, idt: u64, vector: u8, handler: u64) {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&SEL_CODE64.to_le_bytes());
    gate[5] = 0x8e; // present, DPL 0, 64-bit interrupt gate
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    mem.write_slice(&gate, GuestAddress(idt + 16 * u64::from(vector)))
        .unwrap();
}

/// vCPU 0 of `vm` (with its in-kernel LAPIC) about to run [`IRQ_GUEST`] at [`LONG_ENTRY`]
/// in 64-bit kernel mode, the boot tables and stack at 0x80000, and an interrupt gate for
/// each `(vector, handler)` of `gates`.
pub fn irq_guest_vcpu(vm: &Arc<Vm>, mem: &GuestMemoryMmap, gates: &[(u8, u64)]) -> Vcpu {
    load(mem, LONG_ENTRY, &assemble(IRQ_GUEST, LONG_ENTRY));
    let tables = BootTables::default();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(vm, 1, true).unwrap();
    tables.write(mem, 0x8_0000, false).unwrap();
    vcpu.setup_long_mode(&tables, Cpl::Kernel, LONG_ENTRY, 0x8_0000, 0)
        .unwrap();
    for &(vector, handler) in gates {
        set_gate(mem, tables.idt, vector, handler);
    }
    vcpu
}

/// Buses with a [`Recorder`] on the `ports` I/O ports from 0x10, and its accesses.
pub fn port_recorder(ports: u64) -> (Buses, Receiver<Access>) {
    let (rec, events) = Recorder::new(0);
    let buses = Buses::default();
    buses
        .pio
        .insert(BusRange::new(0x10, ports).unwrap(), rec)
        .unwrap();
    (buses, events)
}

//! Local APIC and IOAPIC access (MMIO from CPL3) and the `irq` scenario.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::Acpi;
use crate::arch::{self, mmio_read32, mmio_write32};
use crate::idt::{COUNTED, VEC_DEVICE, VEC_SPURIOUS, VEC_TIMER};
use crate::{serial, Outcome};

pub const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_SVR: u64 = 0xf0;
pub const LAPIC_ICR_LO: u64 = 0x300;
pub const LAPIC_ICR_HI: u64 = 0x310;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_CUR: u64 = 0x390;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;

/// Serial IRQ on the PC/ISA map (keel, QEMU microvm, Firecracker, CH).
const SERIAL_ISA_IRQ: u8 = 4;
const IOAPIC_DEFAULT: u64 = 0xfec0_0000;

extern "C" {
    /// Incremented by the CPL0 stubs in boot.s.
    static irq_timer_count: AtomicU64;
    static irq_device_count: AtomicU64;
    static irq_other_count: AtomicU64;
    static irq_vec_count: [AtomicU64; COUNTED];
}

/// Interrupts taken so far on vector `VEC_COUNTED + i`.
pub fn vec_count(i: usize) -> u64 {
    // SAFETY: atomics in .data, only ever accessed atomically.
    unsafe { irq_vec_count[i].load(Ordering::SeqCst) }
}

fn timer_count() -> u64 {
    // SAFETY: an atomic in .data, only ever accessed atomically.
    unsafe { irq_timer_count.load(Ordering::SeqCst) }
}
fn device_count() -> u64 {
    // SAFETY: as timer_count.
    unsafe { irq_device_count.load(Ordering::SeqCst) }
}
fn other_count() -> u64 {
    // SAFETY: as timer_count.
    unsafe { irq_other_count.load(Ordering::SeqCst) }
}

pub fn lapic_read(reg: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped; register reads are side-effect free.
    unsafe { mmio_read32(LAPIC_BASE + reg) }
}

pub fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the xAPIC page is identity-mapped; callers program only this
    // CPU's own LAPIC registers.
    unsafe { mmio_write32(LAPIC_BASE + reg, v) }
}

/// This CPU's APIC ID, from the LAPIC itself (CPUID may show host values).
pub fn apic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

/// Software-enable this CPU's LAPIC, accepting every priority.
pub fn lapic_enable() {
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | u32::from(VEC_SPURIOUS));
}

pub struct IoApic(pub u64);

impl IoApic {
    pub fn read(&self, reg: u32) -> u32 {
        // SAFETY: IOREGSEL/IOWIN of the IOAPIC the MADT (or the PC default) names.
        unsafe {
            mmio_write32(self.0, reg);
            mmio_read32(self.0 + 0x10)
        }
    }
    pub fn write(&self, reg: u32, v: u32) {
        // SAFETY: as read; callers only touch the redirection entry they own.
        unsafe {
            mmio_write32(self.0, reg);
            mmio_write32(self.0 + 0x10, v);
        }
    }
}

/// Route `gsi` to `vector` on this CPU (fixed delivery, physical
/// destination), edge-triggered active-high or as given. Returns the
/// IOAPIC address and pin, or why it cannot.
pub fn route_gsi(
    acpi: &Acpi,
    gsi: u32,
    vector: u8,
    active_low: bool,
    level: bool,
) -> Result<(u64, u32), crate::text::Text<160>> {
    let mut t = crate::text::Text::new();
    let default = [(IOAPIC_DEFAULT, 0)];
    let list = if acpi.nioapics == 0 {
        &default[..]
    } else {
        &acpi.ioapics[..acpi.nioapics]
    };
    for &(addr, base) in list {
        let io = IoApic(addr);
        let ver = io.read(1);
        if ver == u32::MAX {
            continue;
        }
        let pins = ((ver >> 16) & 0xff) + 1;
        if let Some(pin) = gsi.checked_sub(base).filter(|&p| p < pins) {
            let low = u32::from(vector) | (u32::from(active_low) << 13) | (u32::from(level) << 15);
            io.write(0x11 + 2 * pin, apic_id() << 24);
            io.write(0x10 + 2 * pin, low);
            return Ok((addr, pin));
        }
    }
    let _ = core::fmt::Write::write_fmt(
        &mut t,
        format_args!(
            "GSI {gsi} is on none of the {} IOAPICs the MADT lists",
            acpi.nioapics
        ),
    );
    Err(t)
}

/// Mask the IOAPIC pin `route_gsi` returned.
pub fn mask_pin(ioapic: u64, pin: u32) {
    let io = IoApic(ioapic);
    let low = io.read(0x10 + 2 * pin);
    io.write(0x10 + 2 * pin, low | LVT_MASKED);
}

/// Scenario `irq`: one interrupt from a device (the UART's THR-empty
/// interrupt through IOAPIC pin 4) and one from the LAPIC timer.
pub fn scenario(acpi: &Acpi) -> Outcome {
    lapic_enable();
    let me = apic_id();

    // Device interrupt: UART THRE -> IOAPIC -> VEC_DEVICE on this CPU.
    let ioapic = IoApic(if acpi.ioapic_addr != 0 {
        acpi.ioapic_addr
    } else {
        IOAPIC_DEFAULT
    });
    let (gsi, active_low, level) = acpi.isa_irq(SERIAL_ISA_IRQ);
    let ver = ioapic.read(1);
    if ver == u32::MAX {
        crate::fail!(
            "no IOAPIC at {:#x} (version register reads all ones)",
            ioapic.0
        );
    }
    let pins = ((ver >> 16) & 0xff) + 1;
    let Some(pin) = gsi.checked_sub(acpi.ioapic_gsi_base).filter(|&p| p < pins) else {
        crate::fail!(
            "serial GSI {gsi} is not on the IOAPIC at {:#x} ({pins} pins)",
            ioapic.0
        );
    };
    println!(
        "keel-test: irq: IOAPIC at {:#x} ({pins} pins), serial IRQ {SERIAL_ISA_IRQ} -> pin {pin}, \
         vector {VEC_DEVICE:#x} -> APIC ID {me}",
        ioapic.0
    );
    let low = u32::from(VEC_DEVICE) | (u32::from(active_low) << 13) | (u32::from(level) << 15);
    ioapic.write(0x11 + 2 * pin, me << 24);
    ioapic.write(0x10 + 2 * pin, low);

    let base = device_count();
    serial::set_ier(0x02); // THR empty: fires at once, the transmitter is idle
    let device = arch::wait_for(arch::TIMEOUT_CYCLES, || device_count() > base);
    serial::set_ier(0);
    let _ = serial::read_iir();
    ioapic.write(0x10 + 2 * pin, low | LVT_MASKED);
    if device {
        println!(
            "keel-test: irq: device interrupt arrived (UART THR empty, vector {VEC_DEVICE:#x})"
        );
    }

    // LAPIC timer: one-shot, divide by 1, 1,000,000 ticks.
    let base = timer_count();
    lapic_write(LAPIC_TIMER_DIV, 0b1011);
    lapic_write(LAPIC_LVT_TIMER, u32::from(VEC_TIMER));
    lapic_write(LAPIC_TIMER_INIT, 1_000_000);
    let timer = arch::wait_for(arch::TIMEOUT_CYCLES, || timer_count() > base);
    let left = lapic_read(LAPIC_TIMER_CUR);
    lapic_write(LAPIC_LVT_TIMER, u32::from(VEC_TIMER) | LVT_MASKED);
    lapic_write(LAPIC_TIMER_INIT, 0);
    if timer {
        println!("keel-test: irq: LAPIC timer interrupt arrived (vector {VEC_TIMER:#x}, current count now {left})");
    }

    let others = other_count();
    if others != 0 {
        println!("keel-test: irq: {others} interrupt(s) on unexpected vectors");
    }
    match (device, timer) {
        (true, true) => Ok(()),
        (false, true) => {
            crate::fail!("no device interrupt from the UART (IOAPIC pin {pin}) within the timeout")
        }
        (true, false) => crate::fail!("no LAPIC timer interrupt within the timeout"),
        (false, false) => crate::fail!(
            "neither the UART (IOAPIC pin {pin}) nor the LAPIC timer interrupt arrived"
        ),
    }
}

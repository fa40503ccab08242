//! 16550 UART at I/O port 0x3f8, driven from CPL3, shared by all CPUs
//! through a spin lock (plain atomics: CPL3 code runs natively).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{inb, outb};
use crate::Outcome;

pub const COM1: u16 = 0x3f8;
const THR: u16 = 0;
const IER: u16 = 1;
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const SCR: u16 = 7;
const LSR_THRE: u8 = 1 << 5;

static LOCK: AtomicBool = AtomicBool::new(false);

pub fn init() {
    // SAFETY: programming COM1 (8N1, divisor 1, FIFOs on, OUT2 so the IRQ
    // line is connected on PC-style boards, no interrupts enabled yet).
    unsafe {
        outb(COM1 + IER, 0);
        outb(COM1 + LCR, 0x80);
        outb(COM1, 1);
        outb(COM1 + 1, 0);
        outb(COM1 + LCR, 0x03);
        outb(COM1 + IIR_FCR, 0x07);
        outb(COM1 + MCR, 0x0b);
    }
}

/// Set or clear the UART's interrupt-enable register (used by `irq`).
pub fn set_ier(v: u8) {
    // SAFETY: IER only gates the UART's interrupt outputs.
    unsafe { outb(COM1 + IER, v) }
}

/// Read IIR (acknowledges a THR-empty interrupt).
pub fn read_iir() -> u8 {
    // SAFETY: reading IIR only clears the pending THRE condition.
    unsafe { inb(COM1 + IIR_FCR) }
}

fn putc(c: u8) {
    // Bounded wait: a VMM that never sets THRE must not hang the guest.
    let mut spins = 0u32;
    // SAFETY: LSR reads have no side effects relevant here (clears error bits).
    while unsafe { inb(COM1 + LSR) } & LSR_THRE == 0 && spins < 10_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    // SAFETY: writing THR transmits one byte.
    unsafe { outb(COM1 + THR, c) }
}

struct Port;

impl Write for Port {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                putc(b'\r');
            }
            putc(b);
        }
        Ok(())
    }
}

pub fn print(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Port.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// For the panic/fault path: the lock holder may be the CPU that died.
pub fn force_unlock() {
    LOCK.store(false, Ordering::Release);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Scenario `serial`: check that a 16550 answers (scratch register and
/// transmitter status) and say hello from CPL3.
pub fn scenario() -> Outcome {
    for v in [0x5au8, 0xa5] {
        // SAFETY: the scratch register has no function besides storage.
        let got = unsafe {
            outb(COM1 + SCR, v);
            inb(COM1 + SCR)
        };
        if got != v {
            crate::fail!("no 16550 at 0x3f8: scratch register wrote {v:#x}, read {got:#x}");
        }
    }
    // SAFETY: LSR read, see putc.
    let lsr = unsafe { inb(COM1 + LSR) };
    if lsr == 0xff {
        crate::fail!("no 16550 at 0x3f8: LSR reads 0xff");
    }
    let cs = crate::arch::cs();
    println!(
        "keel-test: hello from the keel test guest (CS={cs:#x}, CPL{})",
        cs & 3
    );
    Ok(())
}

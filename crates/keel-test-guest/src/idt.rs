//! The IDT, filled in at CPL3 by the BSP (its memory is user-accessible;
//! `lidt` already ran at CPL0 in boot.s and only loads base and limit).

pub const VEC_TIMER: u8 = 0x40;
pub const VEC_DEVICE: u8 = 0x41;
pub const VEC_SPURIOUS: u8 = 0xff;
/// `VEC_COUNTED + i` for `i < COUNTED` each have their own counter
/// (`irq::vec_count`): MSI-X and virtio interrupts.
pub const VEC_COUNTED: u8 = 0x50;
pub const COUNTED: usize = 8;

const SEL_KCODE64: u64 = 0x08;

extern "C" {
    static mut idt: [u64; 512];
    static exc_stubs: [u64; 32];
    /// timer, device, other, spurious (see boot.s).
    static irq_stubs: [u64; 4];
    /// VEC_COUNTED + i (see boot.s).
    static irq_vec_stubs: [u64; COUNTED];
}

fn gate(handler: u64) -> (u64, u64) {
    let attr = 0x8e; // present, 64-bit interrupt gate (clears IF)
    let lo = (handler & 0xffff)
        | (SEL_KCODE64 << 16)
        | (attr << 40)
        | (((handler >> 16) & 0xffff) << 48);
    (lo, handler >> 32)
}

pub fn init() {
    // SAFETY: read-only tables of stub addresses emitted by boot.s.
    let (exc, irq, counted) = unsafe { (exc_stubs, irq_stubs, irq_vec_stubs) };
    let first = usize::from(VEC_COUNTED);
    let [timer, device, other, spurious] = irq;
    for v in 0..256usize {
        let handler = match v {
            0..=31 => exc[v & 31],
            _ if v == usize::from(VEC_TIMER) => timer,
            _ if v == usize::from(VEC_DEVICE) => device,
            _ if v == usize::from(VEC_SPURIOUS) => spurious,
            _ if (first..first + COUNTED).contains(&v) => counted[v - first],
            _ => other,
        };
        let (lo, hi) = gate(handler);
        // SAFETY: only the BSP writes the IDT, once, before any other CPU
        // runs and before anything can raise an exception or interrupt.
        unsafe {
            let p = (&raw mut idt).cast::<u64>();
            p.add(2 * v).write_volatile(lo);
            p.add(2 * v + 1).write_volatile(hi);
        }
    }
}

//! TSC calibration against the 8254 PIT (channel 0, 1.193182 MHz).
//!
//! Channel 0 is used rather than channel 2 because channel 2's gate sits
//! behind port 0x61, which QEMU microvm does not emulate. Channel 0 runs
//! as a rate generator over its full 16-bit range and its count is
//! latched and read from CPL3 (ports 0x40 and 0x43, open in the TSS I/O
//! bitmap). Its interrupt (ISA IRQ 0) stays masked: the 8259s are masked
//! at entry and IOAPIC pins are masked until a scenario routes them.

use crate::arch::{inb, outb, rdtsc};

const PIT_HZ: u64 = 1_193_182;
const CH0: u16 = 0x40;
const CMD: u16 = 0x43;

/// Channel 0, low byte then high byte, mode 2 (rate generator), binary.
const CH0_RATE: u8 = 0x34;
/// Channel 0, low/high, mode 0, binary: with no count written the
/// channel waits, which stops the rate generator.
const CH0_STOP: u8 = 0x30;
/// Latch channel 0's count.
const CH0_LATCH: u8 = 0x00;

fn count() -> u16 {
    // SAFETY: the PIT's command and channel-0 data ports; latching and
    // reading the count has no other effect.
    unsafe {
        outb(CMD, CH0_LATCH);
        let lo = inb(CH0);
        let hi = inb(CH0);
        u16::from(lo) | (u16::from(hi) << 8)
    }
}

/// TSC cycles per second over `ticks` PIT ticks (bounded by 2^34 TSC
/// cycles). The count goes down by one per tick and wraps every 65536,
/// so samples must come less than 55 ms apart.
fn measure(ticks: u64) -> Option<u64> {
    let mut prev = count();
    let t0 = rdtsc();
    let mut elapsed = 0u64;
    loop {
        let c = count();
        let now = rdtsc();
        elapsed += u64::from(prev.wrapping_sub(c));
        prev = c;
        let cycles = now.wrapping_sub(t0);
        if elapsed >= ticks {
            return Some(cycles.checked_mul(PIT_HZ)? / elapsed);
        }
        if cycles > 1 << 34 {
            return None;
        }
    }
}

/// [`tsc_hz`], tried up to five times (a busy host can make the three
/// measurements of one try disagree).
pub fn tsc_hz_tries() -> Option<u64> {
    (0..5).find_map(|_| tsc_hz())
}

/// The TSC frequency in Hz: the median of three 20 ms measurements, if
/// the PIT counts and the three agree within 2 %.
pub fn tsc_hz() -> Option<u64> {
    // SAFETY: programs PIT channel 0 only; its interrupt is masked (see
    // the module comment).
    unsafe {
        outb(CMD, CH0_RATE);
        outb(CH0, 0);
        outb(CH0, 0);
    }
    let mut m = [0u64; 3];
    let mut ok = true;
    for v in m.iter_mut() {
        match measure(PIT_HZ / 50) {
            Some(hz) => *v = hz,
            None => ok = false,
        }
    }
    // SAFETY: as above; stops channel 0.
    unsafe { outb(CMD, CH0_STOP) };
    if !ok {
        return None;
    }
    m.sort_unstable();
    let (lo, mid, hi) = (m[0], m[1], m[2]);
    // Between 10 MHz and 100 GHz, and consistent.
    if !(10_000_000..100_000_000_000).contains(&mid) || (hi - lo) * 50 > mid {
        return None;
    }
    Some(mid)
}

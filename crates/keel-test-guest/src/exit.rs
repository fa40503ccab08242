//! The verdict line and the ways to end the VM.

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::acpi::Acpi;
use crate::arch::{self, outb, outl, outw};
use crate::Outcome;

/// isa-debug-exit style port: write 0 for PASS, 1 for FAIL.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

static SCENARIO: [AtomicU8; 32] = [const { AtomicU8::new(0) }; 32];
static SCENARIO_LEN: AtomicUsize = AtomicUsize::new(0);

static PM1A_CNT: AtomicU16 = AtomicU16::new(0);
static PM1B_CNT: AtomicU16 = AtomicU16::new(0);
/// Hardware-reduced ACPI sleep control register: address, space (0 = MMIO, 1 = port).
static SLEEP_CTL: AtomicU64 = AtomicU64::new(0);
static SLEEP_CTL_SPACE: AtomicU8 = AtomicU8::new(0);
static SLP_TYP: AtomicU32 = AtomicU32::new(5);

pub fn set_scenario(name: &str) {
    let n = name.len().min(SCENARIO.len());
    for (slot, b) in SCENARIO.iter().zip(name.bytes().take(n)) {
        slot.store(b, Ordering::Relaxed);
    }
    SCENARIO_LEN.store(n, Ordering::Release);
}

fn scenario(buf: &mut [u8; 32]) -> &str {
    let n = SCENARIO_LEN.load(Ordering::Acquire);
    for (b, slot) in buf.iter_mut().zip(SCENARIO.iter()).take(n) {
        *b = slot.load(Ordering::Relaxed);
    }
    match core::str::from_utf8(&buf[..n]) {
        Ok("") | Err(_) => "boot",
        Ok(s) => s,
    }
}

pub fn set_acpi_shutdown(acpi: &Acpi) {
    PM1A_CNT.store(acpi.pm1a_cnt, Ordering::Relaxed);
    PM1B_CNT.store(acpi.pm1b_cnt, Ordering::Relaxed);
    SLEEP_CTL.store(acpi.sleep_ctl, Ordering::Relaxed);
    SLEEP_CTL_SPACE.store(acpi.sleep_ctl_space, Ordering::Relaxed);
    SLP_TYP.store(u32::from(acpi.slp_typ_s5), Ordering::Relaxed);
}

/// Power off through ACPI S5 (the PM1 control blocks, or the hardware-reduced
/// sleep control register), as an OS does after its power button is
/// pressed. If the VMM does not act on it, the run ends as a failure.
pub fn power_off() -> ! {
    if s5() {
        arch::wait_for(4 * arch::TIMEOUT_CYCLES, || false);
    }
    let mut t = crate::text::Text::new();
    t.push_str("ACPI S5 did not power the VM off");
    finish(Err(t))
}

/// Write SLP_TYP(S5) | SLP_EN where the FADT says; false if it gives nowhere.
fn s5() -> bool {
    let slp_typ = SLP_TYP.load(Ordering::Relaxed) as u16 & 7;
    let pm1a = PM1A_CNT.load(Ordering::Relaxed);
    let pm1b = PM1B_CNT.load(Ordering::Relaxed);
    let ctl = SLEEP_CTL.load(Ordering::Relaxed);
    let mut tried = false;
    if pm1a != 0 {
        // SAFETY: PM1a_CNT from the FADT: SLP_TYP(S5) | SLP_EN powers off.
        unsafe { outw(pm1a, (slp_typ << 10) | (1 << 13)) };
        if pm1b != 0 {
            // SAFETY: as above for the PM1b control block.
            unsafe { outw(pm1b, (slp_typ << 10) | (1 << 13)) };
        }
        tried = true;
    }
    if ctl != 0 {
        // Hardware-reduced ACPI: SLP_TYP in bits 2-4, SLP_EN is bit 5.
        let v = ((slp_typ as u8) << 2) | (1 << 5);
        match SLEEP_CTL_SPACE.load(Ordering::Relaxed) {
            // SAFETY: the FADT's sleep control register; writing S5 powers off.
            1 => unsafe { outb(ctl as u16, v) },
            0 if ctl < (1 << 32) => {
                // SAFETY: as above, memory-mapped (identity map covers 0-4 GiB).
                unsafe { core::ptr::write_volatile(ctl as *mut u8, v) }
            }
            _ => {}
        }
        tried = true;
    }
    tried
}

/// Print the verdict and end the VM: debug-exit port, then ACPI S5, then
/// an i8042 reset. A CPU that survives all three parks itself.
pub fn finish(outcome: Outcome) -> ! {
    let mut buf = [0u8; 32];
    let name = scenario(&mut buf);
    match &outcome {
        Ok(()) => println!("keel-test: PASS {name}"),
        Err(reason) => println!("keel-test: FAIL {name}: {reason}"),
    }
    let code = if outcome.is_ok() { 0 } else { 1 };
    // SAFETY: 0xf4 is the debug-exit port; where nothing answers, the
    // write is dropped.
    unsafe { outl(DEBUG_EXIT_PORT, code) };
    // A VMM may stop the VM asynchronously after the write (keel does);
    // don't race it with an ACPI power-off that would report status 0.
    arch::wait_for(arch::TIMEOUT_CYCLES / 2, || false);

    let slp_typ = SLP_TYP.load(Ordering::Relaxed) as u16 & 7;
    let pm1a = PM1A_CNT.load(Ordering::Relaxed);
    let ctl = SLEEP_CTL.load(Ordering::Relaxed);
    if pm1a != 0 || ctl != 0 {
        println!(
            "keel-test: debug-exit port {DEBUG_EXIT_PORT:#x} did not end the VM; ACPI S5 (SLP_TYP {slp_typ}, \
             PM1a_CNT {pm1a:#x}, sleep control {ctl:#x})"
        );
    }
    let tried_acpi = s5();
    if tried_acpi {
        // The VMM may act on S5 asynchronously; give it time before the
        // reset fallback (a reset would reboot a VMM that does both).
        arch::wait_for(4 * arch::TIMEOUT_CYCLES, || false);
    }
    println!("keel-test: trying an i8042 reset");
    // SAFETY: i8042 pulse-reset command; ends the VM in VMMs that stop on reset.
    unsafe { outb(0x64, 0xfe) };
    arch::wait_for(arch::TIMEOUT_CYCLES, || false);
    println!("keel-test: no exit device answered; halting");
    arch::park()
}

/// Record of the first CPU exception, filled by `exc_common` in boot.s.
#[repr(C)]
struct FaultInfo {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rsp: u64,
    cr2: u64,
}

extern "C" {
    static fault_info: FaultInfo;
}

/// Entry from `fault_user_entry`: a CPU exception was redirected here (CPL3).
#[no_mangle]
extern "C" fn keel_fault() -> ! {
    crate::serial::force_unlock();
    // SAFETY: fault_info was written by the faulting CPU before it iretq'd
    // here, and is never written again (fault_claimed).
    let f = unsafe { core::ptr::read_volatile(&raw const fault_info) };
    let mut t = crate::text::Text::<160>::new();
    let _ = core::fmt::Write::write_fmt(
        &mut t,
        format_args!(
            "CPU exception {} (error {:#x}) at rip {:#x} cs {:#x} rsp {:#x} cr2 {:#x}",
            f.vector, f.error, f.rip, f.cs, f.rsp, f.cr2
        ),
    );
    finish(Err(t))
}

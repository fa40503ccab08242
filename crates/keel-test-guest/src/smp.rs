//! Scenario `smp`: start every CPU the MADT lists with INIT-SIPI-SIPI.
//! Each AP goes real mode -> protected mode -> long mode (boot.s), then
//! CPL3, prints its APIC ID and parks.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::acpi::{Acpi, MAX_CPUS};
use crate::arch;
use crate::irq::{apic_id, lapic_enable, lapic_read, lapic_write, LAPIC_ICR_HI, LAPIC_ICR_LO};
use crate::Outcome;

/// Where the real-mode trampoline is copied (page-aligned, below 1 MiB).
const TRAMPOLINE: u64 = 0x8000;

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    /// CPU index the next AP takes (read by ap_entry32 at CPL0).
    static mut ap_boot_index: u32;
}

/// APIC ID + 1 reported by the AP with that CPU index (0: not up yet).
static UP: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

fn send_ipi(dest: u32, low: u32) {
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, low);
    // Delivery status (bit 12) clears once the IPI is sent.
    arch::wait_for(arch::TIMEOUT_CYCLES, || {
        lapic_read(LAPIC_ICR_LO) & (1 << 12) == 0
    });
}

pub fn scenario(acpi: &Acpi) -> Outcome {
    if acpi.cpu_source.is_empty() {
        crate::fail!(
            "no ACPI MADT (RSDP {:#x}) and no MP table: cannot enumerate the CPUs",
            acpi.rsdp
        );
    }
    if acpi.cpus_dropped != 0 {
        crate::fail!(
            "{} CPUs in the {}; this guest supports {MAX_CPUS}",
            acpi.ncpus + acpi.cpus_dropped,
            acpi.cpu_source
        );
    }
    if acpi.lapic_addr != crate::irq::LAPIC_BASE {
        crate::fail!(
            "LAPIC at {:#x}; this guest supports only {:#x}",
            acpi.lapic_addr,
            crate::irq::LAPIC_BASE
        );
    }
    let cpus = &acpi.cpus[..acpi.ncpus];
    lapic_enable();
    let bsp = apic_id();
    println!(
        "keel-test: smp: {} CPUs in the {}",
        cpus.len(),
        acpi.cpu_source
    );
    println!("keel-test: cpu {bsp} up (BSP)");
    if !cpus.contains(&bsp) {
        crate::fail!(
            "the BSP's APIC ID {bsp} is not among the {}'s {cpus:?}",
            acpi.cpu_source
        );
    }

    let (start, end) = (
        &raw const ap_tramp_start as u64,
        &raw const ap_tramp_end as u64,
    );
    let len = (end - start) as usize;
    assert!(len <= 4096, "trampoline larger than a page");
    // SAFETY: copies the trampoline into low RAM that nothing else uses
    // (below the image; boot data was copied out at start-up).
    unsafe { core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len) };

    if let Some(big) = cpus.iter().find(|&&id| id > 255) {
        crate::fail!("APIC ID {big} needs x2APIC, which this guest does not use");
    }

    let mut idx = 1usize;
    for &id in cpus.iter().filter(|&&id| id != bsp) {
        // SAFETY: only the BSP writes this, before sending the SIPI; the AP
        // reads it after it starts. One AP is started at a time.
        unsafe { (&raw mut ap_boot_index).write_volatile(idx as u32) };
        let up = || UP[idx].load(Ordering::Acquire) != 0;
        send_ipi(id, 0x4500); // INIT, assert
        arch::wait_for(1 << 24, || false); // ~10 ms at real-hardware pace
        let sipi = 0x4600 | (TRAMPOLINE >> 12) as u32;
        send_ipi(id, sipi);
        if !arch::wait_for(arch::TIMEOUT_CYCLES / 4, up) {
            send_ipi(id, sipi);
            if !arch::wait_for(arch::DEVICE_TIMEOUT_CYCLES, up) {
                crate::fail!("cpu {id} (index {idx}) did not come up after INIT-SIPI-SIPI");
            }
        }
        let got = UP[idx].load(Ordering::Acquire) - 1;
        if got != id {
            crate::fail!("started APIC ID {id}, but the CPU that came up reports APIC ID {got}");
        }
        idx += 1;
    }
    println!("keel-test: smp: {} of {} CPUs up", idx, cpus.len());
    Ok(())
}

/// Entry from `ap_user_entry` (CPL3) with this AP's CPU index.
#[no_mangle]
extern "C" fn keel_ap_main(idx: u64) -> ! {
    let id = apic_id();
    println!("keel-test: cpu {id} up");
    if let Some(slot) = UP.get(idx as usize) {
        slot.store(id + 1, Ordering::Release);
    }
    arch::park()
}

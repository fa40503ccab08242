//! Scenario `memory`: write and read back a pattern across all RAM (type 1)
//! in the PVH memory map, except the guest's own image, stacks and tables.
//! Runs at CPL3 natively.

use crate::arch::rdtsc;
use crate::pvh::BootInfo;
use crate::Outcome;

/// The identity map covers 0-4 GiB (boot.s).
const MAPPED_END: u64 = 1 << 32;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

fn pattern(addr: u64, pass: u32) -> u64 {
    let v = addr ^ 0x5a5a_a5a5_c3c3_3c3c ^ (addr << 32);
    if pass == 0 { v } else { !v }
}

/// Fill then verify `[start, end)` (8-byte aligned, mapped, unused).
fn test_range(start: u64, end: u64) -> Result<(), (u64, u64, u64)> {
    for pass in 0..2 {
        let mut a = start;
        while a < end {
            // SAFETY: the range is RAM from the boot map, below 4 GiB
            // (identity-mapped), and outside everything this guest uses.
            unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a, pass)) };
            a += 8;
        }
        let mut a = start;
        while a < end {
            // SAFETY: as above.
            let got = unsafe { core::ptr::read_volatile(a as *const u64) };
            let want = pattern(a, pass);
            if got != want {
                return Err((a, want, got));
            }
            a += 8;
        }
    }
    Ok(())
}

pub fn scenario(boot: &BootInfo) -> Outcome {
    if boot.version < 1 || boot.memmap().is_empty() {
        crate::fail!(
            "no memory map: hvm_start_info version {} has {} entries (needs version 1 with memmap)",
            boot.version,
            boot.memmap().len()
        );
    }
    if boot.memmap_truncated {
        crate::fail!("memory map has more than {} entries", crate::pvh::MAX_MEMMAP);
    }
    let img_start = &raw const __image_start as u64;
    let img_end = &raw const __image_end as u64;
    println!("keel-test: memory: excluding the guest image {img_start:#x}-{img_end:#x}");

    let (mut tested, mut ranges, mut unmapped) = (0u64, 0u32, 0u64);
    let t0 = rdtsc();
    for e in boot.memmap() {
        if e.kind != 1 || e.size == 0 {
            continue;
        }
        let end = e.addr.saturating_add(e.size);
        println!("keel-test: memory: RAM {:#x}-{:#x} ({} KiB)", e.addr, end, e.size >> 10);
        if end > MAPPED_END {
            unmapped += end - e.addr.max(MAPPED_END);
        }
        let (start, end) = ((e.addr + 7) & !7, end.min(MAPPED_END) & !7);
        // The part below the image and the part above it.
        for (s, t) in [(start, end.min(img_start)), (start.max(img_end), end)] {
            if s >= t {
                continue;
            }
            if let Err((at, want, got)) = test_range(s, t) {
                crate::fail!("mismatch at {at:#x}: wrote {want:#018x}, read {got:#018x}");
            }
            tested += t - s;
            ranges += 1;
        }
    }
    let cycles = rdtsc() - t0;
    if tested == 0 {
        crate::fail!("the memory map has no RAM outside the guest image");
    }
    if unmapped != 0 {
        crate::fail!("{} MiB of RAM above 4 GiB: not mapped by this guest, not tested", unmapped >> 20);
    }
    println!(
        "keel-test: memory: {} KiB in {ranges} ranges written and verified twice, {} M TSC cycles",
        tested >> 10,
        cycles / 1_000_000
    );
    Ok(())
}

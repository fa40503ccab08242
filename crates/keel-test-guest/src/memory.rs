//! Scenario `memory`: write and read back a pattern across all RAM (type 1)
//! in the PVH memory map, except the guest's own image (code, data, stacks,
//! boot page tables) and the page directories it adds to map RAM above
//! 4 GiB. Runs at CPL3 natively.

use crate::arch::rdtsc;
use crate::pvh::BootInfo;
use crate::Outcome;

const GIB: u64 = 1 << 30;
/// boot.s identity-maps 0-4 GiB; RAM above is mapped here, up to 512 GiB
/// (one PDPT).
const BOOT_MAPPED_END: u64 = 4 * GIB;
const MAX_MAPPED_END: u64 = 512 * GIB;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    /// The boot PDPT (boot.s): entries 0-3 map 0-4 GiB, the rest are empty.
    static mut pdpt: [u64; 512];
}

fn pattern(addr: u64, pass: u32) -> u64 {
    let v = addr ^ 0x5a5a_a5a5_c3c3_3c3c ^ (addr << 32);
    if pass == 0 {
        v
    } else {
        !v
    }
}

/// Write pass `pass` over `[start, end)` (8-byte aligned, mapped, unused).
fn fill(start: u64, end: u64, pass: u32) {
    let mut a = start;
    while a < end {
        // SAFETY: the range is RAM from the boot map, mapped, and outside
        // everything this guest uses (see `scenario`).
        unsafe { core::ptr::write_volatile(a as *mut u64, pattern(a, pass)) };
        a += 8;
    }
}

/// Verify pass `pass`: the first mismatch as (address, wanted, read).
fn verify(start: u64, end: u64, pass: u32) -> Result<(), (u64, u64, u64)> {
    let mut a = start;
    while a < end {
        // SAFETY: as in `fill`.
        let got = unsafe { core::ptr::read_volatile(a as *const u64) };
        let want = pattern(a, pass);
        if got != want {
            return Err((a, want, got));
        }
        a += 8;
    }
    Ok(())
}

/// `[start, end)` minus the sorted, disjoint `holes`, as up to 3 pieces.
fn pieces(start: u64, end: u64, holes: &[(u64, u64)]) -> [(u64, u64); 3] {
    let mut out = [(0, 0); 3];
    let mut cur = start;
    for (i, &(hs, he)) in holes.iter().enumerate() {
        out[i] = (cur, end.min(hs));
        cur = cur.max(he);
    }
    out[holes.len()] = (cur, end);
    out
}

/// Map RAM above 4 GiB with 2 MiB pages: one new page directory per GiB,
/// taken from the top of the highest RAM range below 4 GiB. Returns the
/// page directories' range (to exclude from the test).
fn map_high(
    boot: &BootInfo,
    ram_end: u64,
    image: (u64, u64),
) -> Result<(u64, u64), crate::text::Text<160>> {
    if ram_end <= BOOT_MAPPED_END {
        return Ok((0, 0));
    }
    if ram_end > MAX_MAPPED_END {
        crate::fail!("RAM ends at {ram_end:#x}; this guest maps at most 512 GiB");
    }
    let first = BOOT_MAPPED_END / GIB;
    let count = ram_end.div_ceil(GIB) - first;
    let bytes = count * 4096;
    // Highest RAM range below 4 GiB, above the image, with room.
    let Some(base) = boot
        .memmap()
        .iter()
        .filter(|e| e.kind == 1)
        .map(|e| {
            (
                e.addr.max(image.1),
                e.addr.saturating_add(e.size).min(BOOT_MAPPED_END) & !0xfff,
            )
        })
        .filter(|&(s, t)| t >= s + bytes)
        .map(|(_, t)| t - bytes)
        .max()
    else {
        crate::fail!(
            "no room below 4 GiB for {count} page directories to map RAM up to {ram_end:#x}"
        );
    };
    for k in 0..count {
        let pd = base + k * 4096;
        for i in 0..512 {
            let phys = (first + k) * GIB + i * (2 << 20);
            // SAFETY: `pd` is RAM below 4 GiB that nothing uses; it is
            // excluded from the test below.
            unsafe { core::ptr::write_volatile((pd + 8 * i) as *mut u64, phys | 0x87) };
        }
        // SAFETY: PDPT entries 4.. were not present, so no TLB or
        // paging-structure cache holds them: no flush is needed. Only the
        // BSP runs, and only it touches the page tables.
        unsafe {
            (&raw mut pdpt)
                .cast::<u64>()
                .add((first + k) as usize)
                .write_volatile(pd | 0x7)
        };
    }
    println!(
        "keel-test: memory: mapped {:#x}-{:#x} with {count} page directories at {base:#x}",
        BOOT_MAPPED_END,
        (first + count) * GIB
    );
    Ok((base, base + bytes))
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
        crate::fail!(
            "memory map has more than {} entries",
            crate::pvh::MAX_MEMMAP
        );
    }
    let image = (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    );
    let ram = || boot.memmap().iter().filter(|e| e.kind == 1 && e.size != 0);
    let ram_end = ram()
        .map(|e| e.addr.saturating_add(e.size))
        .max()
        .unwrap_or(0);
    let tables = map_high(boot, ram_end, image)?;
    let mut holes = [image, tables];
    holes.sort_unstable();
    println!(
        "keel-test: memory: excluding the guest image {:#x}-{:#x}",
        image.0, image.1
    );

    let mut ranges = [(0u64, 0u64); 3 * crate::pvh::MAX_MEMMAP];
    let mut n = 0;
    let mut total = 0u64;
    for e in ram() {
        let end = e.addr.saturating_add(e.size);
        println!(
            "keel-test: memory: RAM {:#x}-{:#x} ({} KiB)",
            e.addr,
            end,
            e.size >> 10
        );
        for (s, t) in pieces((e.addr + 7) & !7, end & !7, &holes) {
            if s < t {
                ranges[n] = (s, t);
                n += 1;
                total += t - s;
            }
        }
    }
    if total == 0 {
        crate::fail!("the memory map has no RAM outside the guest image");
    }
    // All ranges are written before any is read back, so aliasing between
    // ranges (two addresses hitting the same RAM) is caught too.
    let mut cycles = [0u64; 2];
    for pass in 0..2 {
        let t0 = rdtsc();
        for &(s, t) in &ranges[..n] {
            fill(s, t, pass);
        }
        for &(s, t) in &ranges[..n] {
            if let Err((at, want, got)) = verify(s, t, pass) {
                crate::fail!(
                    "pass {pass}: mismatch at {at:#x}: wrote {want:#018x}, read {got:#018x}"
                );
            }
        }
        cycles[pass as usize] = rdtsc() - t0;
    }
    println!(
        "keel-test: memory: {} KiB in {n} ranges written and verified twice \
         ({} M TSC cycles for the first pass, {} M for the second)",
        total >> 10,
        cycles[0] / 1_000_000,
        cycles[1] / 1_000_000
    );
    Ok(())
}

//! keel-memory: print the guest physical map and the e820 table for a RAM size.
//!
//! `cargo run -p keel-examples --example memory_layout -- 6144` (MiB; default 512)

use keel_memory::{MemoryLayout, SystemAllocator, MIB};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(512);
    let layout = MemoryLayout::new(mib * MIB)?;
    println!("regions:");
    for r in layout.regions() {
        println!("  {:#014x}-{:#014x} {:?}", r.base, r.end() - 1, r.kind);
    }
    println!("e820:");
    for e in layout.e820() {
        println!("  {e}");
    }
    let mut alloc = SystemAllocator::new(&layout, 5)?;
    let (bar, size) = alloc.allocate_mmio32(0x4000, 0x4000)?;
    println!("a 16 KiB BAR would go at {bar:#x} ({size:#x} bytes)");
    println!("first MSI GSI: {}", alloc.allocate_msi_gsi()?);
    Ok(())
}

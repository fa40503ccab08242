//! keel-pci: a PCI segment with one device, found the way firmware or a guest kernel finds
//! it: enumeration through CF8/CFC, the same configuration space through ECAM, BAR 0 sized
//! with the all-ones protocol, then moved, with its registers following it.
//!
//! `cargo run -p keel-examples --example pci_segment`

use std::sync::Arc;

use keel_bus::{MmioBus, PioBus};
use keel_memory::{MemoryLayout, SystemAllocator, GIB};
use keel_pci::config::{command, reg};
use keel_pci::segment::{CONFIG_IO_PORT, DEVICES_PER_BUS};
use keel_pci::{BarSpec, ConfigSpace, PciDevice, PciFunction, PciSegment};

/// Where the segment's ECAM window goes on the MMIO bus.
const ECAM_BASE: u64 = 0xe000_0000;

/// A device whose BAR 0 starts with 16 bytes of registers; the rest reads as zero.
struct Registers([u8; 16]);

impl PciDevice for Registers {
    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.0.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            if let Some(r) = self.0.get_mut(offset as usize + i) {
                *r = d;
            }
        }
    }
}

/// CONFIG_ADDRESS selecting dword register `reg` of bus 0, device `device`, function 0.
fn config_address(device: u8, reg: usize) -> u32 {
    0x8000_0000 | (u32::from(device) << 11) | (reg as u32 & 0xfc)
}

/// Where register `reg` of bus 0, device `device`, function 0 sits in the ECAM window:
/// 4 KiB per function, 32 KiB per device, 1 MiB per bus.
fn ecam(device: u8, reg: usize) -> u64 {
    ECAM_BASE + (u64::from(device) << 15) + reg as u64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The VMM's side: buses, an address allocator, the segment and one device on it.
    let layout = MemoryLayout::new(GIB)?;
    let mut alloc = SystemAllocator::new(&layout, 5)?;
    let (mmio, pio) = (Arc::new(MmioBus::new()), Arc::new(PioBus::new()));
    let segment = Arc::new(PciSegment::new(mmio.clone(), pio.clone(), ECAM_BASE));
    PciSegment::attach_config_access(&segment)?;
    let function = PciFunction::new(
        ConfigSpace::new(0x1234, 0x5678, 0xff, 0x00, 0x00),
        Box::new(Registers([0; 16])),
    )
    .with_bar(0, BarSpec::mem32(0x1000, false)?)?;
    let slot = segment.add_device(function, &mut alloc)?;

    // The guest's side, first through configuration mechanism #1: CONFIG_ADDRESS at
    // 0xcf8, CONFIG_DATA at 0xcfc. An empty slot reads all ones.
    let cf8_read = |device: u8, reg: usize| -> Result<u32, keel_bus::Error> {
        pio.write(CONFIG_IO_PORT, &config_address(device, reg).to_le_bytes())?;
        let mut b = [0u8; 4];
        pio.read(CONFIG_IO_PORT + 4, &mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    println!("bus 0 through CF8/CFC:");
    for device in 0..DEVICES_PER_BUS as u8 {
        let id = cf8_read(device, reg::VENDOR_ID)?;
        if id != 0xffff_ffff {
            let class = cf8_read(device, reg::REVISION)? >> 8;
            println!(
                "  00:{device:02x}.0 {:04x}:{:04x} class {class:06x}",
                id & 0xffff,
                id >> 16
            );
        }
    }

    // Then through ECAM, plain memory accesses: the same registers.
    let read32 = |at: u64| -> Result<u32, keel_bus::Error> {
        let mut b = [0u8; 4];
        mmio.read(at, &mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    let write32 = |at: u64, v: u32| mmio.write(at, &v.to_le_bytes());
    let write16 = |at: u64, v: u16| mmio.write(at, &v.to_le_bytes());
    assert_eq!(
        read32(ecam(slot, reg::VENDOR_ID))?,
        cf8_read(slot, reg::VENDOR_ID)?
    );

    // Size BAR 0 as firmware does: memory decoding off (so the all-ones address never
    // decodes), all ones written, the size mask read back, the address restored.
    let cmd = read32(ecam(slot, reg::COMMAND))? as u16;
    write16(ecam(slot, reg::COMMAND), cmd & !command::MEMORY)?;
    let bar0 = ecam(slot, reg::BAR0);
    let original = read32(bar0)?;
    write32(bar0, !0)?;
    let mask = read32(bar0)?;
    write32(bar0, original)?;
    write16(ecam(slot, reg::COMMAND), cmd)?;
    let size = u64::from(!(mask & !0xf)) + 1;
    let old = u64::from(original & !0xf);
    println!(
        "BAR 0: 32-bit memory, {size:#x} bytes at {old:#x} (size mask {mask:#010x}, type bits {:#x})",
        mask & 0xf
    );
    assert_eq!(size, 0x1000);

    // Use the device's registers where the BAR is, then move the BAR the way a guest
    // reassigns resources: the registers follow and the old address decodes no more.
    mmio.write(old + 4, &[42])?;
    let new = old + 0x10_0000;
    write32(bar0, new as u32)?;
    let mut b = [0u8; 1];
    mmio.read(new + 4, &mut b)?;
    assert_eq!(b, [42]);
    let old_decodes = mmio.read(old + 4, &mut [0u8; 1]).is_ok();
    println!(
        "BAR 0 moved to {new:#x}: register 4 reads {} there; {old:#x} {}",
        b[0],
        if old_decodes {
            "still decodes"
        } else {
            "is unclaimed"
        }
    );
    assert!(!old_decodes);

    // The VMM takes the device out: its BAR is unmapped and its space returns to the
    // allocator.
    segment.remove_device(slot, &mut alloc)?;
    assert_eq!(cf8_read(slot, reg::VENDOR_ID)?, 0xffff_ffff);
    println!("device removed: slot {slot} reads all ones");
    Ok(())
}

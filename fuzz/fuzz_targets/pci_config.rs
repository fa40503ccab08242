//! Arbitrary configuration (CF8/CFC and ECAM), BAR and MSI-X accesses against a PCI
//! segment holding the host bridge and a device with memory, 64-bit and I/O BARs, MSI-X
//! and MSI. Checks: nothing panics; read-only IDs never change; every BAR the function
//! says it decodes is on the bus at exactly that address; no two decoded BARs overlap.
#![no_main]

use std::sync::Arc;

use keel_bus::{MmioBus, PioBus};
use keel_fuzz::irq::Group;
use keel_memory::{MemoryLayout, SystemAllocator, GIB};
use keel_pci::{BarSpec, ConfigSpace, MsixLayout, PciDevice, PciFunction, PciSegment};
use libfuzzer_sys::fuzz_target;

const ECAM: u64 = 0xe000_0000;

struct Dev;
impl PciDevice for Dev {
    fn bar_read(&mut self, _: u8, off: u64, data: &mut [u8]) {
        data.fill(off as u8)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

fuzz_target!(|data: &[u8]| {
    let layout = MemoryLayout::new(GIB).unwrap();
    let mut alloc = SystemAllocator::new(&layout, 5).unwrap();
    let mmio = Arc::new(MmioBus::new());
    let pio = Arc::new(PioBus::new());
    let seg = Arc::new(PciSegment::new(mmio.clone(), pio.clone(), ECAM));
    PciSegment::attach_config_access(&seg).unwrap();
    let f = PciFunction::new(ConfigSpace::new(0x1234, 0x5678, 0xff, 0, 0), Box::new(Dev))
        .with_bar(0, BarSpec::mem32(0x1000, false).unwrap())
        .unwrap()
        .with_bar(1, BarSpec::mem64(0x4000, true).unwrap())
        .unwrap()
        .with_bar(3, BarSpec::io(0x20).unwrap())
        .unwrap()
        .with_msix(
            MsixLayout {
                vectors: 5,
                table_bar: 1,
                table_offset: 0x1000,
                pba_bar: 1,
                pba_offset: 0x2000,
            },
            Arc::new(Group::strict(5)),
        )
        .unwrap()
        .with_msi(4, Arc::new(Group::strict(4)))
        .unwrap();
    let slot = seg.add_device(f, &mut alloc).unwrap();

    for op in data.chunks(12) {
        if op.len() < 12 {
            break;
        }
        let size = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let off = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let val = u64::from_le_bytes(op[4..12].try_into().unwrap());
        let dev = op[1] >> 3 & 0x3;
        let mut buf = [0u8; 8];
        let bytes = val.to_le_bytes();
        match op[0] % 6 {
            0 => {
                let _ = pio.write(
                    0xcf8,
                    &((1u32 << 31) | (u32::from(dev) << 11) | (off as u32 & 0xfc)).to_le_bytes(),
                );
                let _ = pio.write(0xcfc + (off & 3), &bytes[..size.min(4)]);
            }
            1 => {
                let _ = pio.read(0xcfc + (off & 3), &mut buf[..size.min(4)]);
            }
            2 => {
                let _ = mmio.write(
                    ECAM + (u64::from(dev) << 15) + (off & 0xfff),
                    &bytes[..size],
                );
            }
            3 => {
                let _ = mmio.read(
                    ECAM + (u64::from(dev) << 15) + (off & 0xfff),
                    &mut buf[..size],
                );
            }
            4 => {
                // A BAR access wherever BAR n decodes now (or near it).
                let decoded = seg.with_function(slot, |f| f.decoded()).unwrap();
                if let Some(base) = decoded[usize::from(op[1] >> 5) % 6] {
                    let a = base + (off & 0x3fff);
                    if op[0] & 0x80 != 0 {
                        let _ = mmio.write(a, &bytes[..size]);
                        let _ = pio.write(a, &bytes[..size]);
                    } else {
                        let _ = mmio.read(a, &mut buf[..size]);
                        let _ = pio.read(a, &mut buf[..size]);
                    }
                }
            }
            _ => {
                seg.with_function(slot, |f| f.trigger_msi(usize::from(op[1])));
            }
        }
        // Invariants.
        let mut id = [0u8; 4];
        mmio.read(ECAM, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        mmio.read(ECAM + (u64::from(slot) << 15), &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x5678_1234);
        let (decoded, bars) = seg
            .with_function(slot, |f| (f.decoded(), *f.bars()))
            .unwrap();
        let mut spans = Vec::new();
        for (i, d) in decoded.iter().enumerate() {
            if let (Some(base), Some(spec)) = (d, bars[i]) {
                let ranges = if spec.kind.is_io() {
                    pio.ranges()
                } else {
                    mmio.ranges()
                };
                assert!(
                    ranges
                        .iter()
                        .any(|r| r.base() == *base && r.len() == spec.size),
                    "BAR {i} decodes at {base:#x} but the bus disagrees"
                );
                spans.push((spec.kind.is_io(), *base, base + spec.size));
            }
        }
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(
                    a.0 != b.0 || a.2 <= b.1 || b.2 <= a.1,
                    "BARs overlap: {a:?} {b:?}"
                );
            }
        }
    }
});

//! PCI configuration-space dispatch in keel-pci, through CF8/CFC and through ECAM.
//!
//! `cargo bench -p keel-benches --bench pci`
//!
//! What it measures: a guest's configuration accesses from the bus to a function's
//! config space, as the vCPU loop dispatches them: through the PIO bus to the CF8/CFC
//! ports (an address write, then a data access: two exits per access) or through the
//! MMIO bus to the ECAM window (one exit), then the segment's slot lookup, the function's
//! lock and its config space. Firmware and the guest's PCI driver enumerate with these
//! (Linux sizes every BAR at boot), and some drivers touch config space at run time (MSI
//! masking, INTx disable), so they weigh on boot time more than on steady state.
//!
//! Ids (`pci_config/...`):
//! * `{cf8,ecam}/vendor_read`: read the 32-bit vendor/device ID dword;
//! * `{cf8,ecam}/bar_rewrite`: write BAR0 with the address it already holds, read it back
//!   (no relocation);
//! * `ecam/bar_sizing`: what Linux does per BAR at enumeration: read COMMAND, clear memory
//!   and I/O decoding (the segment takes the BARs off the bus), write all ones to BAR0,
//!   read the size mask, restore BAR0, restore COMMAND (the BARs go back on the bus).
//!
//! The segment holds the host bridge and four functions, each with a 32-bit memory BAR, a
//! 64-bit memory BAR and an I/O BAR placed by the system allocator; the target is slot 2.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use keel_bus::{MmioBus, PioBus};
use keel_memory::{MemoryLayout, SystemAllocator, GIB};
use keel_pci::config::{command, reg};
use keel_pci::segment::CONFIG_IO_PORT;
use keel_pci::{BarSpec, ConfigSpace, PciDevice, PciFunction, PciSegment};

const ECAM: u64 = 0xe000_0000;
const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x5678;
const SLOT: u8 = 2;

/// A device model with nothing behind its BARs.
struct Dev;

impl PciDevice for Dev {
    fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

struct Setup {
    mmio: Arc<MmioBus>,
    pio: Arc<PioBus>,
    _segment: Arc<PciSegment>,
    _alloc: SystemAllocator,
}

fn setup() -> Setup {
    let layout = MemoryLayout::new(GIB).unwrap();
    let mut alloc = SystemAllocator::new(&layout, 5).unwrap();
    let mmio = Arc::new(MmioBus::new());
    let pio = Arc::new(PioBus::new());
    let segment = Arc::new(PciSegment::new(mmio.clone(), pio.clone(), ECAM));
    PciSegment::attach_config_access(&segment).unwrap();
    for _ in 0..4 {
        let f = PciFunction::new(ConfigSpace::new(VENDOR, DEVICE, 0xff, 0, 0), Box::new(Dev))
            .with_bar(0, BarSpec::mem32(0x1000, false).unwrap())
            .unwrap()
            .with_bar(1, BarSpec::mem64(0x4000, true).unwrap())
            .unwrap()
            .with_bar(3, BarSpec::io(0x20).unwrap())
            .unwrap();
        segment.add_device(f, &mut alloc).unwrap();
    }
    Setup {
        mmio,
        pio,
        _segment: segment,
        _alloc: alloc,
    }
}

fn ecam(offset: usize) -> u64 {
    ECAM + (u64::from(SLOT) << 15) + offset as u64
}

fn cf8_read(pio: &PioBus, offset: usize) -> u32 {
    let address = (1u32 << 31) | (u32::from(SLOT) << 11) | (offset as u32 & 0xfc);
    pio.write(CONFIG_IO_PORT, &address.to_le_bytes()).unwrap();
    let mut b = [0u8; 4];
    pio.read(CONFIG_IO_PORT + 4, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn cf8_write(pio: &PioBus, offset: usize, value: u32) {
    let address = (1u32 << 31) | (u32::from(SLOT) << 11) | (offset as u32 & 0xfc);
    pio.write(CONFIG_IO_PORT, &address.to_le_bytes()).unwrap();
    pio.write(CONFIG_IO_PORT + 4, &value.to_le_bytes()).unwrap();
}

fn ecam_read32(mmio: &MmioBus, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    mmio.read(ecam(offset), &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn ecam_write32(mmio: &MmioBus, offset: usize, value: u32) {
    mmio.write(ecam(offset), &value.to_le_bytes()).unwrap();
}

fn ecam_read16(mmio: &MmioBus, offset: usize) -> u16 {
    let mut b = [0u8; 2];
    mmio.read(ecam(offset), &mut b).unwrap();
    u16::from_le_bytes(b)
}

fn ecam_write16(mmio: &MmioBus, offset: usize, value: u16) {
    mmio.write(ecam(offset), &value.to_le_bytes()).unwrap();
}

/// Linux's sizing of BAR0; returns the size mask read back.
fn size_bar0(mmio: &MmioBus) -> u32 {
    let cmd = ecam_read16(mmio, reg::COMMAND);
    ecam_write16(mmio, reg::COMMAND, cmd & !(command::MEMORY | command::IO));
    let orig = ecam_read32(mmio, reg::BAR0);
    ecam_write32(mmio, reg::BAR0, !0);
    let mask = ecam_read32(mmio, reg::BAR0);
    ecam_write32(mmio, reg::BAR0, orig);
    ecam_write16(mmio, reg::COMMAND, cmd);
    mask
}

fn pci_config(c: &mut Criterion) {
    let s = setup();
    let id = u32::from(VENDOR) | u32::from(DEVICE) << 16;
    // What the benches rely on, checked from the guest's side.
    assert_eq!(cf8_read(&s.pio, reg::VENDOR_ID), id);
    assert_eq!(ecam_read32(&s.mmio, reg::VENDOR_ID), id);
    let bar0 = ecam_read32(&s.mmio, reg::BAR0);
    assert_ne!(bar0, 0, "BAR0 placed");
    let window = u64::from(bar0 & !0xf);
    let on_bus = |mmio: &MmioBus| mmio.ranges().iter().any(|r| r.base() == window);
    assert!(on_bus(&s.mmio), "BAR0 decodes");
    assert_eq!(size_bar0(&s.mmio), !(0x1000 - 1), "BAR0's size mask");
    assert_eq!(ecam_read32(&s.mmio, reg::BAR0), bar0, "BAR0 restored");
    assert!(on_bus(&s.mmio), "BAR0 decodes again");
    cf8_write(&s.pio, reg::BAR0, bar0);
    assert_eq!(cf8_read(&s.pio, reg::BAR0), bar0);

    let mut g = c.benchmark_group("pci_config");
    g.bench_function("cf8/vendor_read", |b| {
        b.iter(|| cf8_read(&s.pio, reg::VENDOR_ID))
    });
    g.bench_function("ecam/vendor_read", |b| {
        b.iter(|| ecam_read32(&s.mmio, reg::VENDOR_ID))
    });
    g.bench_function("cf8/bar_rewrite", |b| {
        b.iter(|| {
            cf8_write(&s.pio, reg::BAR0, bar0);
            cf8_read(&s.pio, reg::BAR0)
        })
    });
    g.bench_function("ecam/bar_rewrite", |b| {
        b.iter(|| {
            ecam_write32(&s.mmio, reg::BAR0, bar0);
            ecam_read32(&s.mmio, reg::BAR0)
        })
    });
    g.bench_function("ecam/bar_sizing", |b| b.iter(|| size_bar0(&s.mmio)));
    g.finish();
}

criterion_group!(benches, pci_config);
criterion_main!(benches);

//! A segment driven the way a guest drives it: enumeration through CF8/CFC and ECAM, BAR
//! sizing and reassignment followed on the bus, MSI-X and MSI masking and pending bits,
//! INTx, and relocation under concurrent access.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel_bus::interrupt::{
    DataMatch, InterruptLine, IoEventAddress, IoEventRegistrar, MsiGroup, MsiMessage,
};
use keel_bus::{MmioBus, PioBus};
use keel_memory::{MemoryLayout, SystemAllocator, GIB};
use keel_pci::config::{command, reg, ConfigError};
use keel_pci::function::FunctionError;
use keel_pci::segment::SegmentError;
use keel_pci::{BarSpec, ConfigSpace, MsixLayout, PciDevice, PciFunction, PciSegment};
use vmm_sys_util::eventfd::EventFd;

const ECAM: u64 = 0xe000_0000;

/// Records what the PCI model asks of its interrupt group, with real pending semantics.
#[derive(Default)]
struct Group {
    state: Mutex<Vec<(MsiMessage, bool, bool)>>, // (message, masked, pending)
    delivered: Mutex<Vec<(usize, MsiMessage)>>,
}

impl Group {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Group {
            state: Mutex::new(vec![(MsiMessage::default(), true, false); n]),
            delivered: Mutex::new(Vec::new()),
        })
    }
    fn delivered(&self) -> Vec<(usize, MsiMessage)> {
        std::mem::take(&mut self.delivered.lock().unwrap())
    }
}

impl MsiGroup for Group {
    fn len(&self) -> usize {
        self.state.lock().unwrap().len()
    }
    fn configure(
        &self,
        i: usize,
        msg: MsiMessage,
        masked: bool,
    ) -> keel_bus::interrupt::Result<()> {
        let mut st = self.state.lock().unwrap();
        let was_pending = st[i].2;
        st[i] = (msg, masked, was_pending && masked);
        if was_pending && !masked {
            self.delivered.lock().unwrap().push((i, msg));
        }
        Ok(())
    }
    fn trigger(&self, i: usize) -> keel_bus::interrupt::Result<()> {
        let mut st = self.state.lock().unwrap();
        if st[i].1 {
            st[i].2 = true;
        } else {
            self.delivered.lock().unwrap().push((i, st[i].0));
        }
        Ok(())
    }
    fn is_pending(&self, i: usize) -> keel_bus::interrupt::Result<bool> {
        Ok(self.state.lock().unwrap()[i].2)
    }
    fn notifier(&self, _: usize) -> Option<&EventFd> {
        None
    }
}

/// A device with a signature in its BAR and a doorbell at offset 0x100 backed by an
/// ioeventfd that follows the BAR.
struct TestDevice {
    signature: u32,
    writes: Arc<AtomicU64>,
    doorbell: EventFd,
    registrar: Arc<Registrar>,
}

impl PciDevice for TestDevice {
    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        let b = self.signature.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b[(offset as usize + i) % 4];
        }
    }
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
    fn bar_moved(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
        if bar != 0 {
            return;
        }
        if let Some(n) = new {
            self.registrar
                .register(
                    &self.doorbell,
                    IoEventAddress::Mmio(n + 0x100),
                    DataMatch::Any,
                )
                .unwrap();
        }
        if let Some(o) = old {
            self.registrar
                .unregister(
                    &self.doorbell,
                    IoEventAddress::Mmio(o + 0x100),
                    DataMatch::Any,
                )
                .unwrap();
        }
    }
}

/// A registrar that logs and keeps the set of registered addresses, and checks after every
/// change that a doorbell stays reachable through relocation: never zero registrations
/// between the first and the last.
#[derive(Default)]
struct Registrar {
    live: Mutex<HashSet<u64>>,
    log: Mutex<Vec<(bool, u64)>>,
    gap_seen: AtomicBool,
}

impl IoEventRegistrar for Registrar {
    fn register(
        &self,
        _: &EventFd,
        a: IoEventAddress,
        _: DataMatch,
    ) -> keel_bus::interrupt::Result<()> {
        let IoEventAddress::Mmio(a) = a else {
            unreachable!()
        };
        self.live.lock().unwrap().insert(a);
        self.log.lock().unwrap().push((true, a));
        Ok(())
    }
    fn unregister(
        &self,
        _: &EventFd,
        a: IoEventAddress,
        _: DataMatch,
    ) -> keel_bus::interrupt::Result<()> {
        let IoEventAddress::Mmio(a) = a else {
            unreachable!()
        };
        let mut live = self.live.lock().unwrap();
        live.remove(&a);
        if live.is_empty() {
            self.gap_seen.store(true, Ordering::Relaxed);
        }
        self.log.lock().unwrap().push((false, a));
        Ok(())
    }
}

struct Rig {
    segment: Arc<PciSegment>,
    mmio: Arc<MmioBus>,
    pio: Arc<PioBus>,
    alloc: SystemAllocator,
    registrar: Arc<Registrar>,
}

fn rig() -> Rig {
    let layout = MemoryLayout::new(GIB).unwrap();
    let mmio = Arc::new(MmioBus::new());
    let pio = Arc::new(PioBus::new());
    let segment = Arc::new(PciSegment::new(mmio.clone(), pio.clone(), ECAM));
    PciSegment::attach_config_access(&segment).unwrap();
    Rig {
        segment,
        mmio,
        pio,
        alloc: SystemAllocator::new(&layout, 5).unwrap(),
        registrar: Arc::new(Registrar::default()),
    }
}

impl Rig {
    fn device(&self, signature: u32) -> (PciFunction, Arc<AtomicU64>) {
        self.device_with(signature, self.registrar.clone())
    }

    fn device_with(
        &self,
        signature: u32,
        registrar: Arc<Registrar>,
    ) -> (PciFunction, Arc<AtomicU64>) {
        let writes = Arc::new(AtomicU64::new(0));
        let dev = TestDevice {
            signature,
            writes: writes.clone(),
            doorbell: EventFd::new(libc_efd_nonblock()).unwrap(),
            registrar,
        };
        let f = PciFunction::new(ConfigSpace::new(0x1234, 0x11, 0xff, 0, 0), Box::new(dev))
            .with_bar(0, BarSpec::mem32(0x1000, false).unwrap())
            .unwrap();
        (f, writes)
    }

    // Configuration mechanism #1.
    fn cf8_read(&self, dev: u8, off: u32, len: usize) -> u32 {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | (off & 0xfc);
        self.pio.write(0xcf8, &addr.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        self.pio
            .read(0xcfc + u64::from(off & 3), &mut b[..len])
            .unwrap();
        u32::from_le_bytes(b)
    }
    fn cf8_write(&self, dev: u8, off: u32, v: u32, len: usize) {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | (off & 0xfc);
        self.pio.write(0xcf8, &addr.to_le_bytes()).unwrap();
        self.pio
            .write(0xcfc + u64::from(off & 3), &v.to_le_bytes()[..len])
            .unwrap();
    }
    // ECAM.
    fn ecam_read(&self, dev: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio
            .read(ECAM + (u64::from(dev) << 15) + off, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }
    fn ecam_write(&self, dev: u8, off: u64, v: u32) {
        self.mmio
            .write(ECAM + (u64::from(dev) << 15) + off, &v.to_le_bytes())
            .unwrap();
    }
    fn mmio_u32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.mmio
            .read(addr, &mut b)
            .ok()
            .map(|_| u32::from_le_bytes(b))
    }
}

fn libc_efd_nonblock() -> i32 {
    0o4000 // EFD_NONBLOCK
}

#[test]
fn enumeration_through_cf8_and_ecam() {
    let mut r = rig();
    let (f, _) = r.device(0xfeed_f00d);
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    assert_eq!(slot, 1);
    for (name, read) in [
        (
            "cf8",
            Box::new(|d, o| r.cf8_read(d, o, 4)) as Box<dyn Fn(u8, u32) -> u32>,
        ),
        ("ecam", Box::new(|d, o| r.ecam_read(d, u64::from(o)))),
    ] {
        let found: Vec<(u8, u32)> = (0..32)
            .map(|d| (d, read(d, 0)))
            .filter(|(_, id)| *id != 0xffff_ffff)
            .collect();
        assert_eq!(found, vec![(0, 0x0008_1b36), (1, 0x0011_1234)], "{name}");
        // Class code of the host bridge.
        assert_eq!(read(0, 8) >> 8, 0x06_00_00, "{name}");
    }
    // Sub-dword data-port accesses.
    assert_eq!(r.cf8_read(1, 2, 2), 0x11);
    r.cf8_write(1, 0x3c, 9, 1);
    assert_eq!(
        r.ecam_read(1, 0x3c) & 0xff,
        9,
        "interrupt line written through CFC"
    );
    // CONFIG_ADDRESS reads back (reserved low bits cleared); byte accesses do not hit it.
    r.pio.write(0xcf8, &0x8000_0803u32.to_le_bytes()).unwrap();
    let mut b = [0u8; 4];
    r.pio.read(0xcf8, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x8000_0800);
    // Functions other than 0, and other buses, are absent.
    let addr = 0x8000_0000u32 | (1 << 11) | (1 << 8);
    r.pio.write(0xcf8, &addr.to_le_bytes()).unwrap();
    r.pio.read(0xcfc, &mut b).unwrap();
    assert_eq!(b, [0xff; 4]);
    assert_eq!(r.segment.mcfg().base, ECAM);
}

#[test]
fn guest_sizes_and_reassigns_a_bar_and_the_bus_follows() {
    let mut r = rig();
    let (f, writes) = r.device(0xabcd_0123);
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    let initial = u64::from(r.ecam_read(slot, 0x10) & !0xf);
    assert_eq!(
        r.mmio_u32(initial),
        Some(0xabcd_0123),
        "placed and decoding"
    );

    // What a guest does: decoding off, size, assign, decoding on.
    r.ecam_write(slot, reg::COMMAND as u64, 0);
    assert_eq!(r.mmio_u32(initial), None, "no decoding, no range");
    r.ecam_write(slot, 0x10, 0xffff_ffff);
    assert_eq!(r.ecam_read(slot, 0x10), 0xffff_f000);
    r.ecam_write(slot, 0x10, 0xc800_0000);
    r.ecam_write(slot, reg::COMMAND as u64, u32::from(command::MEMORY));
    assert_eq!(r.mmio_u32(0xc800_0000), Some(0xabcd_0123));
    assert_eq!(r.mmio_u32(initial), None);
    r.mmio.write(0xc800_0010, &[1]).unwrap();
    assert_eq!(writes.load(Ordering::Relaxed), 1);

    // Moving onto another device's BAR: the BAR stops decoding instead of shadowing it;
    // moving it somewhere free brings it back.
    let (g, _) = r.device(0x5555_5555);
    let other = r.segment.add_device(g, &mut r.alloc).unwrap();
    let other_bar = u64::from(r.ecam_read(other, 0x10) & !0xf);
    r.ecam_write(slot, 0x10, other_bar as u32);
    assert_eq!(r.mmio_u32(other_bar), Some(0x5555_5555));
    assert_eq!(r.mmio_u32(0xc800_0000), None);
    r.ecam_write(slot, 0x10, 0xc900_0000);
    assert_eq!(r.mmio_u32(0xc900_0000), Some(0xabcd_0123));

    // Sizing with decoding left on does not leave the BAR at the all-ones address.
    r.ecam_write(slot, 0x10, 0xffff_ffff);
    assert_eq!(r.mmio_u32(0xffff_f000), None);
    r.ecam_write(slot, 0x10, 0xc900_0000);
    assert_eq!(r.mmio_u32(0xc900_0000), Some(0xabcd_0123));

    // Removal unmaps.
    r.segment.remove_device(slot, &mut r.alloc).unwrap();
    assert_eq!(r.mmio_u32(0xc900_0000), None);
    assert_eq!(r.ecam_read(slot, 0), 0xffff_ffff);
    assert!(
        r.segment.remove_device(0, &mut r.alloc).is_err(),
        "the host bridge stays"
    );
    // The space the allocator gave the BAR is back, though the guest had moved the BAR.
    let (h, _) = r.device(0x7777_7777);
    assert_eq!(r.segment.add_device(h, &mut r.alloc).unwrap(), slot);
    assert_eq!(u64::from(r.ecam_read(slot, 0x10) & !0xf), initial);
}

#[test]
fn bar64_and_io_bars_through_config_space() {
    let mut r = rig();
    let dev = TestDevice {
        signature: 0x6464_6464,
        writes: Arc::new(AtomicU64::new(0)),
        doorbell: EventFd::new(libc_efd_nonblock()).unwrap(),
        registrar: r.registrar.clone(),
    };
    let f = PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(dev))
        .with_bar(0, BarSpec::mem64(0x10_0000, true).unwrap())
        .unwrap()
        .with_bar(2, BarSpec::io(0x20).unwrap())
        .unwrap();
    assert!(
        PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
            .with_bar(5, BarSpec::mem64(0x1000, false).unwrap())
            .is_err(),
        "a 64-bit BAR needs two registers"
    );
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    let lo = r.ecam_read(slot, 0x10);
    let hi = r.ecam_read(slot, 0x14);
    assert_eq!(lo & 0xf, 0xc, "64-bit prefetchable");
    let addr = (u64::from(hi) << 32) | u64::from(lo & !0xf);
    assert!(addr >= 4 * GIB, "placed in the 64-bit window: {addr:#x}");
    assert_eq!(r.mmio_u32(addr), Some(0x6464_6464));
    // Move it within the 64-bit window.
    r.ecam_write(slot, 0x14, 0x20);
    assert_eq!(r.mmio_u32(0x20_0000_0000), Some(0x6464_6464));
    let io = u64::from(r.cf8_read(slot, 0x18, 4) & !0x3);
    assert!((0x1000..0x10000).contains(&io));
    let mut b = [0u8; 4];
    r.pio.read(io, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x6464_6464);
}

struct HostlessDevice;
impl PciDevice for HostlessDevice {
    fn bar_read(&mut self, _: u8, _: u64, d: &mut [u8]) {
        d.fill(0)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

fn msix_rig(vectors: u16) -> (Rig, u8, u64, usize, Arc<Group>) {
    let mut r = rig();
    let group = Group::new(usize::from(vectors));
    let f = PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
        .with_bar(1, BarSpec::mem32(0x4000, false).unwrap())
        .unwrap()
        .with_msix(
            MsixLayout {
                vectors,
                table_bar: 1,
                table_offset: 0x2000,
                pba_bar: 1,
                pba_offset: 0x3000,
            },
            group.clone(),
        )
        .unwrap();
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    let bar = u64::from(r.ecam_read(slot, 0x14) & !0xf);
    let cap = r
        .segment
        .with_function(slot, |f| f.config().capabilities())
        .unwrap()
        .iter()
        .find(|(_, id)| *id == 0x11)
        .unwrap()
        .0;
    (r, slot, bar, cap, group)
}

#[test]
fn msix_masking_and_pending() {
    let (r, slot, bar, cap, group) = msix_rig(3);
    let table = bar + 0x2000;
    let pba = bar + 0x3000;
    // The capability describes the table and PBA.
    let hdr = r.ecam_read(slot, cap as u64);
    assert_eq!(
        (hdr & 0xff, (hdr >> 16) & 0x7ff),
        (0x11, 2),
        "ID and table size - 1"
    );
    assert_eq!(r.ecam_read(slot, cap as u64 + 4), 0x2000 | 1);
    assert_eq!(r.ecam_read(slot, cap as u64 + 8), 0x3000 | 1);
    // Every vector starts masked.
    for v in 0..3 {
        assert_eq!(r.mmio_u32(table + 16 * v + 12), Some(1));
    }
    // Program vector 1, enable MSI-X with the function masked.
    r.mmio
        .write(table + 16, &0xfee0_0000u32.to_le_bytes())
        .unwrap();
    r.mmio
        .write(table + 16 + 8, &0x41u32.to_le_bytes())
        .unwrap();
    r.mmio.write(table + 16 + 12, &0u32.to_le_bytes()).unwrap();
    r.ecam_write(slot, cap as u64, (1 << 31) | (1 << 30));
    // Raised while the function is masked: pending, not delivered.
    r.segment.with_function(slot, |f| f.trigger_msi(1));
    assert!(group.delivered().is_empty());
    assert_eq!(r.mmio_u32(pba), Some(0b010));
    // Unmasking the function delivers it exactly once and clears the pending bit.
    r.ecam_write(slot, cap as u64, 1 << 31);
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert_eq!(group.delivered(), vec![(1, msg)]);
    assert_eq!(r.mmio_u32(pba), Some(0));
    // Unmasked: delivered at once.
    r.segment.with_function(slot, |f| f.trigger_msi(1));
    assert_eq!(group.delivered(), vec![(1, msg)]);
    // Per-vector mask.
    r.mmio.write(table + 16 + 12, &1u32.to_le_bytes()).unwrap();
    r.segment.with_function(slot, |f| f.trigger_msi(1));
    assert!(group.delivered().is_empty());
    assert_eq!(r.mmio_u32(pba), Some(0b010));
    r.mmio.write(table + 16 + 12, &0u32.to_le_bytes()).unwrap();
    assert_eq!(group.delivered(), vec![(1, msg)]);
    // Reserved vector-control bits do not stick; the PBA ignores writes; out-of-range
    // vectors are ignored.
    r.mmio
        .write(table + 12, &0xffff_fffeu32.to_le_bytes())
        .unwrap();
    assert_eq!(r.mmio_u32(table + 12), Some(0));
    r.mmio.write(pba, &0xffu32.to_le_bytes()).unwrap();
    assert_eq!(r.mmio_u32(pba), Some(0));
    r.segment.with_function(slot, |f| f.trigger_msi(7));
    assert!(group.delivered().is_empty());
}

/// A vector count the capability cannot describe, or larger than the interrupt group, is
/// an error from `with_msix`, not a panic.
#[test]
fn msix_vector_counts_are_checked() {
    for (vectors, group) in [(0u16, 4usize), (4, 2)] {
        let built = PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
            .with_bar(1, BarSpec::mem32(0x4000, false).unwrap())
            .unwrap()
            .with_msix(
                MsixLayout {
                    vectors,
                    table_bar: 1,
                    table_offset: 0x2000,
                    pba_bar: 1,
                    pba_offset: 0x3000,
                },
                Group::new(group),
            );
        assert!(
            matches!(
                built,
                Err(FunctionError::Config(ConfigError::InvalidVectors { count, group: g }))
                    if count == u32::from(vectors) && g == group
            ),
            "{vectors} vectors, group of {group}"
        );
    }
}

#[test]
fn msi_capability_vectors_and_masks() {
    let mut r = rig();
    let group = Group::new(4);
    let f = PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
        .with_msi(4, group.clone())
        .unwrap();
    assert!(
        PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
            .with_msi(3, Group::new(4))
            .is_err(),
        "MSI vector counts are powers of two"
    );
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    let cap = 0x40u64;
    assert_eq!(r.ecam_read(slot, cap) & 0xff, 0x05);
    let ctrl = r.ecam_read(slot, cap) >> 16;
    assert_eq!((ctrl >> 1) & 7, 2, "4 vectors capable");
    r.ecam_write(slot, cap + 4, 0xfee0_0000);
    r.ecam_write(slot, cap + 8, 0);
    r.ecam_write(slot, cap + 12, 0x50);
    r.ecam_write(slot, cap + 16, 0b0100); // mask vector 2
    r.ecam_write(slot, cap, ((1 | (2 << 4)) << 16) | 0x05); // enable, 4 vectors
    r.segment.with_function(slot, |f| f.trigger_msi(1));
    assert_eq!(
        group.delivered(),
        vec![(
            1,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x51
            }
        )]
    );
    r.segment.with_function(slot, |f| f.trigger_msi(2));
    assert!(group.delivered().is_empty());
    assert_eq!(r.ecam_read(slot, cap + 20), 0b0100, "pending bits");
    r.ecam_write(slot, cap + 16, 0);
    assert_eq!(
        group.delivered(),
        vec![(
            2,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x52
            }
        )]
    );
    assert_eq!(r.ecam_read(slot, cap + 20), 0);
}

#[derive(Default)]
struct Line(Mutex<Vec<bool>>);
impl InterruptLine for Line {
    fn trigger(&self) -> keel_bus::interrupt::Result<()> {
        Ok(())
    }
    fn set_level(&self, high: bool) -> keel_bus::interrupt::Result<()> {
        self.0.lock().unwrap().push(high);
        Ok(())
    }
}

#[test]
fn intx_follows_the_disable_bit() {
    let mut r = rig();
    let line = Arc::new(Line::default());
    let f = PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice)).with_intx(
        1,
        11,
        line.clone(),
    );
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    assert_eq!(
        r.ecam_read(slot, 0x3c) & 0xffff,
        0x010b,
        "pin INTA#, line 11"
    );
    r.segment.with_function(slot, |f| f.set_intx(true));
    assert_eq!(
        r.ecam_read(slot, 4) >> 16 & 0x8,
        0x8,
        "status shows the interrupt"
    );
    let cmd = r.ecam_read(slot, 4) & 0xffff;
    r.ecam_write(slot, 4, cmd | u32::from(command::INTX_DISABLE));
    r.ecam_write(slot, 4, cmd);
    r.segment.with_function(slot, |f| f.set_intx(false));
    assert_eq!(*line.0.lock().unwrap(), vec![true, false, true, false]);
    assert_eq!(r.ecam_read(slot, 4) >> 16 & 0x8, 0);
}

/// The guest moves a BAR back and forth while other threads read through the bus. Every
/// read either reaches this device (its signature) or finds nothing, never another device;
/// and through every move the doorbell's ioeventfd is registered somewhere (new place
/// first, then the old one removed), so no notification can fall in a gap.
#[test]
fn relocation_under_concurrent_access() {
    let mut r = rig();
    let doorbells = Arc::new(Registrar::default());
    let (f, _) = r.device_with(0x1357_9bdf, doorbells.clone());
    let slot = r.segment.add_device(f, &mut r.alloc).unwrap();
    let (g, _) = r.device(0x2468_ace0);
    let neighbour = r.segment.add_device(g, &mut r.alloc).unwrap();
    let neighbour_bar = u64::from(r.ecam_read(neighbour, 0x10) & !0xf);
    let a = 0xca00_0000u64;
    let b = 0xcb00_0000u64;
    r.ecam_write(slot, 0x10, a as u32);
    let r = Arc::new(r);
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (r, stop, hits) = (r.clone(), stop.clone(), hits.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for addr in [a, b, a + 0xffc, b + 0x800] {
                        if let Some(v) = r.mmio_u32(addr) {
                            assert_eq!(v, 0x1357_9bdf, "wrong device at {addr:#x}");
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    assert_eq!(r.mmio_u32(neighbour_bar), Some(0x2468_ace0));
                }
            })
        })
        .collect();
    // The readers are running before the moves start (on two cores the spawn can lag).
    let started = std::time::Instant::now();
    while hits.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the readers never read the BAR"
        );
        std::thread::yield_now();
    }
    // Moves only: the doorbell must never be unregistered everywhere.
    for i in 0..2000 {
        r.ecam_write(slot, 0x10, if i % 2 == 0 { b } else { a } as u32);
    }
    assert!(
        !doorbells.gap_seen.load(Ordering::Relaxed),
        "a BAR move left the doorbell unregistered"
    );
    // Decoding off and on again, as a guest reassigning BARs does: here the doorbell goes
    // away with the BAR and comes back with it.
    for _ in 0..200 {
        r.ecam_write(slot, 4, 0);
        assert!(doorbells.live.lock().unwrap().is_empty());
        r.ecam_write(slot, 4, u32::from(command::MEMORY));
    }
    stop.store(true, Ordering::Relaxed);
    for t in readers {
        t.join().expect("a reader saw a wrong device");
    }
    assert!(hits.load(Ordering::Relaxed) > 0);
    assert_eq!(r.mmio_u32(a), Some(0x1357_9bdf));
    let live: Vec<u64> = doorbells.live.lock().unwrap().iter().copied().collect();
    assert_eq!(
        live,
        vec![a + 0x100],
        "exactly one doorbell, at the final place"
    );
    // Placement (1), the move to `a` (2), the moves, the decode toggles.
    assert_eq!(
        doorbells.log.lock().unwrap().len(),
        1 + 2 + 2 * 2000 + 2 * 200
    );
}

/// A device is added and removed again and again while other threads hammer its
/// configuration space (CF8/CFC, ECAM, `with_function`) and its BAR. Removal never panics
/// and waits for accesses in flight: once it returns, the slot reads as empty, nothing
/// decodes at the BAR and the doorbell is unregistered. The BAR's space goes back to the
/// allocator, so every new device in the slot is placed at the same address.
#[test]
fn removal_under_concurrent_access() {
    const SIG: u32 = 0x0bad_cafe;
    let mut r = rig();
    let mut alloc = std::mem::replace(
        &mut r.alloc,
        SystemAllocator::new(&MemoryLayout::new(GIB).unwrap(), 5).unwrap(),
    );
    let (f, _) = r.device(SIG);
    let slot = r.segment.add_device(f, &mut alloc).unwrap();
    let bar = u64::from(r.ecam_read(slot, 0x10) & !0xf);
    let r = Arc::new(r);
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let spawn = |body: Box<dyn Fn(&Rig) + Send>| {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                body(&r)
            }
        })
    };
    let present_or_absent = |v: u32, what: &str| {
        assert!(
            v == 0x0011_1234 || v == 0xffff_ffff,
            "{what} read {v:#x}: neither the device nor an empty slot"
        )
    };
    let hammers = [
        spawn(Box::new(move |r| {
            present_or_absent(r.cf8_read(slot, 0, 4), "CF8/CFC");
            r.cf8_write(slot, 0x3c, 7, 1);
        })),
        spawn(Box::new(move |r| {
            present_or_absent(r.ecam_read(slot, 0), "ECAM");
            r.ecam_write(slot, reg::COMMAND as u64, u32::from(command::MEMORY));
            if let Some(id) = r.segment.with_function(slot, |f| f.config().read_u32(0)) {
                present_or_absent(id, "with_function");
            }
        })),
        spawn(Box::new({
            let hits = hits.clone();
            move |r| {
                match r.mmio_u32(bar) {
                    Some(SIG) => drop(hits.fetch_add(1, Ordering::Relaxed)),
                    // Dispatched just before the range went away, served after removal.
                    Some(0xffff_ffff) | None => {}
                    Some(v) => panic!("BAR read {v:#x}"),
                }
                let _ = r.mmio.write(bar + 0x10, &[1]);
            }
        })),
    ];
    for _ in 0..200 {
        // Let the hammers reach the device before taking it away.
        let seen = hits.load(Ordering::Relaxed);
        while hits.load(Ordering::Relaxed) < seen + 3 {
            assert!(
                hammers.iter().all(|t| !t.is_finished()),
                "a hammer thread failed"
            );
            std::thread::yield_now();
        }
        let removed = r.segment.remove_device(slot, &mut alloc).unwrap();
        assert_eq!(removed.config().read_u32(0), 0x0011_1234);
        assert_eq!(r.ecam_read(slot, 0), 0xffff_ffff);
        assert_eq!(r.mmio_u32(bar), None);
        assert!(r.registrar.live.lock().unwrap().is_empty());
        let (f, _) = r.device(SIG);
        assert_eq!(r.segment.add_device(f, &mut alloc).unwrap(), slot);
        assert_eq!(
            u64::from(r.ecam_read(slot, 0x10) & !0xf),
            bar,
            "BAR space reused"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in hammers {
        t.join().expect("a hammer thread failed");
    }
}

/// Every kind of BAR goes back to its pool on removal; a device that cannot be placed
/// keeps nothing; the wrong allocator is reported, with the device removed all the same.
#[test]
fn bar_space_returns_to_the_allocator() {
    let mut r = rig();
    let function = || {
        PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
            .with_bar(0, BarSpec::mem32(0x2000, false).unwrap())
            .unwrap()
            .with_bar(1, BarSpec::mem64(0x10_0000, true).unwrap())
            .unwrap()
            .with_bar(3, BarSpec::io(0x40).unwrap())
            .unwrap()
    };
    let bars = |r: &Rig, slot: u8| {
        (
            r.ecam_read(slot, 0x10) & !0xf,
            r.ecam_read(slot, 0x14) & !0xf,
            r.ecam_read(slot, 0x18),
            r.ecam_read(slot, 0x1c) & !0x3,
        )
    };
    let slot = r.segment.add_device(function(), &mut r.alloc).unwrap();
    let first = bars(&r, slot);
    r.segment.remove_device(slot, &mut r.alloc).unwrap();
    let slot = r.segment.add_device(function(), &mut r.alloc).unwrap();
    assert_eq!(
        bars(&r, slot),
        first,
        "every BAR placed where the first device was"
    );
    r.segment.remove_device(slot, &mut r.alloc).unwrap();

    // The second BAR cannot fit after the first: the first one's space is given back.
    let too_big = PciFunction::new(ConfigSpace::new(1, 2, 3, 4, 5), Box::new(HostlessDevice))
        .with_bar(0, BarSpec::mem32(0x1000, false).unwrap())
        .unwrap()
        .with_bar(1, BarSpec::mem32(1 << 31, false).unwrap())
        .unwrap();
    assert!(matches!(
        r.segment.add_device(too_big, &mut r.alloc),
        Err(SegmentError::Placement { bar: 1, .. })
    ));
    let slot = r.segment.add_device(function(), &mut r.alloc).unwrap();
    assert_eq!(
        bars(&r, slot),
        first,
        "nothing leaked by the failed placement"
    );

    // Removal with an allocator that never gave out these ranges.
    let mut other = SystemAllocator::new(&MemoryLayout::new(GIB).unwrap(), 5).unwrap();
    assert!(matches!(
        r.segment.remove_device(slot, &mut other),
        Err(SegmentError::Release { bar: 0, .. })
    ));
    assert_eq!(r.ecam_read(slot, 0), 0xffff_ffff, "removed all the same");
    assert_eq!(r.mmio_u32(u64::from(first.0)), None);
}

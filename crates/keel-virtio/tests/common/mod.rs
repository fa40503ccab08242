//! A driver-side harness for the transport tests: guest memory, rings laid out by
//! virtio-queue's `MockSplitQueue`, mock interrupt sinks, and one `Driver` trait that both
//! transports implement so every behaviour is checked over both.
#![allow(dead_code)]

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_bus::interrupt::{
    DataMatch, InterruptLine, IoEventAddress, IoEventRegistrar, MsiGroup, MsiMessage, Result,
};
use keel_bus::MmioDevice;
use keel_memory::GuestMemoryMmap;
use keel_pci::PciFunction;
use keel_virtio::echo::Echo;
use keel_virtio::mmio::VirtioMmio;
use keel_virtio::virtio_pci_function;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 0x20_0000;
pub const RING_BASE: u64 = 0x1000;
pub const DATA_BASE: u64 = 0x10_0000;
pub const QUEUE_SIZE: u16 = 16;

pub const ACKNOWLEDGE: u8 = 1;
pub const DRIVER: u8 = 2;
pub const DRIVER_OK: u8 = 4;
pub const FEATURES_OK: u8 = 8;
pub const NEEDS_RESET: u8 = 64;

pub const VERSION_1: u64 = 1 << 32;
pub const INDIRECT: u64 = 1 << 28;
pub const EVENT_IDX: u64 = 1 << 29;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// Polls `f` for up to five seconds (the device works on its own thread).
pub fn eventually(what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Gives the device time in which something that must not happen would have happened.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

/// An interrupt line that counts edges.
#[derive(Default)]
pub struct CountingLine(pub AtomicUsize);

impl InterruptLine for CountingLine {
    fn trigger(&self) -> Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_level(&self, _asserted: bool) -> Result<()> {
        Ok(())
    }
}

/// An MSI-X group that counts triggers per vector.
pub struct CountingMsi {
    pub counts: Vec<AtomicUsize>,
}

impl CountingMsi {
    pub fn new(n: usize) -> Self {
        CountingMsi {
            counts: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        }
    }
    pub fn count(&self, v: usize) -> usize {
        self.counts[v].load(Ordering::SeqCst)
    }
}

impl MsiGroup for CountingMsi {
    fn len(&self) -> usize {
        self.counts.len()
    }
    fn configure(&self, _index: usize, _msg: MsiMessage, _masked: bool) -> Result<()> {
        Ok(())
    }
    fn trigger(&self, index: usize) -> Result<()> {
        self.counts[index].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn is_pending(&self, _index: usize) -> Result<bool> {
        Ok(false)
    }
    fn notifier(&self, _index: usize) -> Option<&EventFd> {
        None
    }
}

/// Records ioeventfd registrations in order.
#[derive(Default)]
pub struct RecordingRegistrar {
    pub log: Mutex<Vec<(bool, IoEventAddress, DataMatch)>>,
}

impl IoEventRegistrar for RecordingRegistrar {
    fn register(&self, _evt: &EventFd, addr: IoEventAddress, dm: DataMatch) -> Result<()> {
        self.log.lock().unwrap().push((true, addr, dm));
        Ok(())
    }
    fn unregister(&self, _evt: &EventFd, addr: IoEventAddress, dm: DataMatch) -> Result<()> {
        self.log.lock().unwrap().push((false, addr, dm));
        Ok(())
    }
}

/// What the tests need from a transport, at the level a guest driver sees it.
pub trait Driver {
    fn mem(&self) -> &GuestMemoryMmap;
    fn status(&self) -> u8;
    fn set_status(&self, s: u8);
    fn device_features(&self) -> u64;
    fn set_driver_features(&self, f: u64);
    fn queue_max(&self, q: u16) -> u16;
    /// Sets size and ring addresses of queue `q` (without enabling it).
    fn configure_queue(&self, q: u16, size: u16, desc: u64, avail: u64, used: u64);
    fn enable_queue(&self, q: u16);
    fn queue_enabled(&self, q: u16) -> bool;
    fn notify(&self, q: u16);
    fn read_config(&self, off: u64, data: &mut [u8]);
    fn write_config(&self, off: u64, data: &[u8]);
    fn config_generation(&self) -> u8;
    /// Interrupts delivered so far (any cause).
    fn irqs(&self) -> usize;
    /// Reads and acknowledges the interrupt causes: bit 0 used buffers, bit 1 config.
    fn ack(&self) -> u32;

    /// The usual initialisation up to FEATURES_OK; returns the status read back.
    fn negotiate(&self, features: u64) -> u8 {
        self.set_status(0);
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        self.set_driver_features(features);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.status()
    }

    /// Negotiates `features`, sets up queue 0 on `ring` and sets DRIVER_OK.
    fn start(&self, features: u64, ring: &Ring) {
        assert_ne!(
            self.negotiate(features) & FEATURES_OK,
            0,
            "FEATURES_OK refused"
        );
        self.configure_queue(0, ring.size, ring.desc, ring.avail, ring.used);
        self.enable_queue(0);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            self.status(),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            "the device did not start"
        );
    }
}

/// The echo device over virtio-mmio.
pub struct MmioDriver {
    pub mem: GuestMemoryMmap,
    pub dev: VirtioMmio,
    pub line: Arc<CountingLine>,
}

pub mod mmio_reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

impl MmioDriver {
    pub const BASE: u64 = 0xd000_0000;

    pub fn new() -> Self {
        let mem = memory();
        let line = Arc::new(CountingLine::default());
        let dev = VirtioMmio::new(
            Box::new(Echo::new()),
            mem.clone(),
            Self::BASE,
            5,
            line.clone(),
        )
        .expect("transport");
        MmioDriver { mem, dev, line }
    }
    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn w(&self, off: u64, v: u32) {
        self.dev.mmio_write(off, &v.to_le_bytes());
    }
}

impl Driver for MmioDriver {
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn status(&self) -> u8 {
        self.r(mmio_reg::STATUS) as u8
    }
    fn set_status(&self, s: u8) {
        self.w(mmio_reg::STATUS, u32::from(s))
    }
    fn device_features(&self) -> u64 {
        self.w(mmio_reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(mmio_reg::DEVICE_FEATURES);
        self.w(mmio_reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r(mmio_reg::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }
    fn set_driver_features(&self, f: u64) {
        self.w(mmio_reg::DRIVER_FEATURES_SEL, 0);
        self.w(mmio_reg::DRIVER_FEATURES, f as u32);
        self.w(mmio_reg::DRIVER_FEATURES_SEL, 1);
        self.w(mmio_reg::DRIVER_FEATURES, (f >> 32) as u32);
    }
    fn queue_max(&self, q: u16) -> u16 {
        self.w(mmio_reg::QUEUE_SEL, u32::from(q));
        self.r(mmio_reg::QUEUE_NUM_MAX) as u16
    }
    fn configure_queue(&self, q: u16, size: u16, desc: u64, avail: u64, used: u64) {
        self.w(mmio_reg::QUEUE_SEL, u32::from(q));
        self.w(mmio_reg::QUEUE_NUM, u32::from(size));
        self.w(mmio_reg::QUEUE_DESC_LOW, desc as u32);
        self.w(mmio_reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(mmio_reg::QUEUE_DRIVER_LOW, avail as u32);
        self.w(mmio_reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(mmio_reg::QUEUE_DEVICE_LOW, used as u32);
        self.w(mmio_reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    }
    fn enable_queue(&self, q: u16) {
        self.w(mmio_reg::QUEUE_SEL, u32::from(q));
        self.w(mmio_reg::QUEUE_READY, 1);
    }
    fn queue_enabled(&self, q: u16) -> bool {
        self.w(mmio_reg::QUEUE_SEL, u32::from(q));
        self.r(mmio_reg::QUEUE_READY) == 1
    }
    fn notify(&self, q: u16) {
        self.w(mmio_reg::QUEUE_NOTIFY, u32::from(q))
    }
    fn read_config(&self, off: u64, data: &mut [u8]) {
        self.dev.mmio_read(mmio_reg::CONFIG + off, data)
    }
    fn write_config(&self, off: u64, data: &[u8]) {
        self.dev.mmio_write(mmio_reg::CONFIG + off, data)
    }
    fn config_generation(&self) -> u8 {
        self.r(mmio_reg::CONFIG_GENERATION) as u8
    }
    fn irqs(&self) -> usize {
        self.line.0.load(Ordering::SeqCst)
    }
    fn ack(&self) -> u32 {
        let s = self.r(mmio_reg::INTERRUPT_STATUS);
        self.w(mmio_reg::INTERRUPT_ACK, s);
        s
    }
}

/// The echo device over virtio-pci (BAR 0 accessed directly, as the bus would).
pub struct PciDriver {
    pub mem: GuestMemoryMmap,
    pub f: Mutex<PciFunction>,
    pub msi: Arc<CountingMsi>,
    pub registrar: Arc<RecordingRegistrar>,
    /// (BAR offset) of the common, notify, ISR and device structures, and the notify
    /// multiplier, found by walking the capability list.
    pub common: u64,
    pub notify: u64,
    pub multiplier: u64,
    pub isr: u64,
    pub device: u64,
}

pub mod common_cfg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Every vendor capability: (cfg_type, bar, offset, length, extra dword).
pub fn virtio_caps(f: &PciFunction) -> Vec<(u8, u8, u32, u32, u32)> {
    let rd = |off: usize, n: usize| {
        let mut b = [0u8; 4];
        f.config_read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    };
    let mut caps = Vec::new();
    let mut ptr = rd(0x34, 1) as usize & 0xfc;
    let mut hops = 0;
    while ptr >= 0x40 {
        hops += 1;
        assert!(hops < 48, "capability list loops");
        if rd(ptr, 1) == 0x09 {
            caps.push((
                rd(ptr + 3, 1) as u8,
                rd(ptr + 4, 1) as u8,
                rd(ptr + 8, 4),
                rd(ptr + 12, 4),
                if rd(ptr + 2, 1) >= 20 {
                    rd(ptr + 16, 4)
                } else {
                    0
                },
            ));
        }
        ptr = rd(ptr + 1, 1) as usize & 0xfc;
    }
    caps
}

impl PciDriver {
    pub fn new() -> Self {
        let mem = memory();
        let msi = Arc::new(CountingMsi::new(2));
        let registrar = Arc::new(RecordingRegistrar::default());
        let f = virtio_pci_function(
            Box::new(Echo::new()),
            mem.clone(),
            msi.clone(),
            Some(registrar.clone()),
        )
        .expect("function");
        let caps = virtio_caps(&f);
        let find = |t: u8| {
            let c = caps
                .iter()
                .find(|c| c.0 == t)
                .unwrap_or_else(|| panic!("no virtio capability of type {t}"));
            assert_eq!(c.1, 0, "structure {t} is not in BAR 0");
            *c
        };
        let (common, notify, isr, device) = (find(1), find(2), find(3), find(4));
        let d = PciDriver {
            mem,
            f: Mutex::new(f),
            msi,
            registrar,
            common: u64::from(common.2),
            notify: u64::from(notify.2),
            multiplier: u64::from(notify.4),
            isr: u64::from(isr.2),
            device: u64::from(device.2),
        };
        // Vectors: config on 0, queue 0 on 1.
        d.w16(common_cfg::CONFIG_MSIX_VECTOR, 0);
        d
    }

    pub fn read(&self, off: u64, data: &mut [u8]) {
        self.f.lock().unwrap().bar_read(0, off, data)
    }
    pub fn write(&self, off: u64, data: &[u8]) {
        self.f.lock().unwrap().bar_write(0, off, data)
    }
    pub fn r8(&self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.read(self.common + off, &mut b);
        b[0]
    }
    pub fn r16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(self.common + off, &mut b);
        u16::from_le_bytes(b)
    }
    pub fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(self.common + off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn w8(&self, off: u64, v: u8) {
        self.write(self.common + off, &[v])
    }
    pub fn w16(&self, off: u64, v: u16) {
        self.write(self.common + off, &v.to_le_bytes())
    }
    pub fn w32(&self, off: u64, v: u32) {
        self.write(self.common + off, &v.to_le_bytes())
    }
    pub fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
}

impl Driver for PciDriver {
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn status(&self) -> u8 {
        self.r8(common_cfg::DEVICE_STATUS)
    }
    fn set_status(&self, s: u8) {
        self.w8(common_cfg::DEVICE_STATUS, s);
        if s == 0 {
            // Reset clears the vector assignments; a driver sets them again.
            self.w16(common_cfg::CONFIG_MSIX_VECTOR, 0);
        }
    }
    fn device_features(&self) -> u64 {
        self.w32(common_cfg::DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(common_cfg::DEVICE_FEATURE);
        self.w32(common_cfg::DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(common_cfg::DEVICE_FEATURE);
        u64::from(lo) | (u64::from(hi) << 32)
    }
    fn set_driver_features(&self, f: u64) {
        self.w32(common_cfg::DRIVER_FEATURE_SELECT, 0);
        self.w32(common_cfg::DRIVER_FEATURE, f as u32);
        self.w32(common_cfg::DRIVER_FEATURE_SELECT, 1);
        self.w32(common_cfg::DRIVER_FEATURE, (f >> 32) as u32);
    }
    fn queue_max(&self, q: u16) -> u16 {
        self.w16(common_cfg::QUEUE_SELECT, q);
        self.r16(common_cfg::QUEUE_SIZE)
    }
    fn configure_queue(&self, q: u16, size: u16, desc: u64, avail: u64, used: u64) {
        self.w16(common_cfg::QUEUE_SELECT, q);
        self.w16(common_cfg::QUEUE_SIZE, size);
        self.w64(common_cfg::QUEUE_DESC, desc);
        self.w64(common_cfg::QUEUE_DRIVER, avail);
        self.w64(common_cfg::QUEUE_DEVICE, used);
        self.w16(common_cfg::QUEUE_MSIX_VECTOR, 1);
    }
    fn enable_queue(&self, q: u16) {
        self.w16(common_cfg::QUEUE_SELECT, q);
        self.w16(common_cfg::QUEUE_ENABLE, 1);
    }
    fn queue_enabled(&self, q: u16) -> bool {
        self.w16(common_cfg::QUEUE_SELECT, q);
        self.r16(common_cfg::QUEUE_ENABLE) == 1
    }
    fn notify(&self, q: u16) {
        self.w16(common_cfg::QUEUE_SELECT, q);
        let off = u64::from(self.r16(common_cfg::QUEUE_NOTIFY_OFF));
        self.write(self.notify + off * self.multiplier, &q.to_le_bytes());
    }
    fn read_config(&self, off: u64, data: &mut [u8]) {
        self.read(self.device + off, data)
    }
    fn write_config(&self, off: u64, data: &[u8]) {
        self.write(self.device + off, data)
    }
    fn config_generation(&self) -> u8 {
        self.r8(common_cfg::CONFIG_GENERATION)
    }
    fn irqs(&self) -> usize {
        self.msi.count(0) + self.msi.count(1)
    }
    fn ack(&self) -> u32 {
        let mut b = [0u8; 1];
        self.read(self.isr, &mut b);
        u32::from(b[0])
    }
}

/// A split virtqueue in guest memory, laid out by `MockSplitQueue`, driven from the driver
/// side: descriptors are handed out in order and the avail ring is published with a fence.
pub struct Ring<'a> {
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    pub mem: &'a GuestMemoryMmap,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(RING_BASE), size);
        let (desc, avail, used) = (
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        );
        Ring {
            mock,
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Writes descriptors `(addr, len, flags)` chained with NEXT at the next free indices;
    /// returns the head index.
    pub fn add_descriptors(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | VRING_DESC_F_NEXT, (idx + 1) % self.size)
            } else {
                (flags, 0)
            };
            self.mock
                .desc_table()
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                )
                .expect("descriptor");
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        head
    }

    /// Puts `head` in the avail ring and publishes it.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the avail index directly (tests of broken rings use it).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// A request: `payload` split into `pieces` readable buffers, and `out_len` writable
    /// bytes in two buffers. Returns the head and where the output lands.
    pub fn request(&mut self, payload: &[u8], pieces: usize, out_len: u32, at: u64) -> (u16, u64) {
        self.mem.write_slice(payload, GuestAddress(at)).unwrap();
        let mut descs = Vec::new();
        let n = pieces.max(1);
        let step = payload.len().div_ceil(n).max(1);
        for chunk_start in (0..payload.len()).step_by(step) {
            let len = step.min(payload.len() - chunk_start);
            descs.push((at + chunk_start as u64, len as u32, 0));
        }
        let out = at + payload.len() as u64 + 64;
        let first = out_len / 2;
        descs.push((out, first, VRING_DESC_F_WRITE));
        descs.push((out + u64::from(first), out_len - first, VRING_DESC_F_WRITE));
        let head = self.add_descriptors(&descs);
        self.publish(head);
        (head, out)
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used)).unwrap()
    }
    /// Used element `i`: (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
    /// The device's avail_event (EVENT_IDX): after the used ring.
    pub fn avail_event(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size)))
            .unwrap()
    }
    /// The driver's used_event (EVENT_IDX): after the avail ring.
    pub fn set_used_event(&self, v: u16) {
        self.mem
            .write_obj(v, GuestAddress(self.avail + 4 + 2 * u64::from(self.size)))
            .unwrap();
    }
    pub fn set_avail_flags(&self, v: u16) {
        self.mem.write_obj(v, GuestAddress(self.avail)).unwrap();
    }
    pub fn wait_used(&self, n: u16) {
        eventually(&format!("used index {n}"), || self.used_idx() == n);
    }
}

pub fn read_bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

pub fn xored(payload: &[u8], x: u8) -> Vec<u8> {
    payload.iter().map(|b| b ^ x).collect()
}

//! A driver-side harness for testing virtio devices and transports without a VM (feature
//! `test-utils`): guest memory, split rings laid out by virtio-queue's `MockSplitQueue`,
//! interrupt sinks that count, and one [`Driver`] trait that both transports implement,
//! so a device's tests can run over virtio-mmio and virtio-pci alike.
//!
//! ```
//! use keel_virtio::echo::Echo;
//! use keel_virtio::testing::*;
//!
//! let d = MmioDriver::new(Box::new(Echo::new()));
//! let mem = d.mem().clone();
//! let mut ring = Ring::new(&mem, QUEUE_SIZE);
//! d.start(VERSION_1, &ring);
//! let (_, out) = ring.request(b"hi", 1, 16, DATA_BASE);
//! d.notify(0);
//! ring.wait_used(1);
//! assert_eq!(read_bytes(&mem, out, 2), b"hi");
//! ```

use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::device::VirtioDevice;
use crate::mmio::VirtioMmio;
use crate::pci::{cap_field, cap_type, virtio_pci_function};
use keel_bus::interrupt::{
    DataMatch, InterruptLine, IoEventAddress, IoEventRegistrar, MsiGroup, MsiMessage, Result,
};
use keel_bus::MmioDevice;
use keel_memory::GuestMemoryMmap;
use keel_pci::config::{cap_id, reg as pci_reg};
use keel_pci::PciFunction;
use virtio_bindings::virtio_ring;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// Size of the test guest memory (2 MiB from address 0).
pub const MEM_SIZE: usize = 0x20_0000;
/// Where [`Ring`] lays out its descriptor table.
pub const RING_BASE: u64 = 0x1000;
/// A convenient place for request buffers, clear of the rings.
pub const DATA_BASE: u64 = 0x10_0000;
/// The queue size tests use.
pub const QUEUE_SIZE: u16 = 16;

pub use crate::state::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET as NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK,
};

/// Feature: VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = crate::device::VIRTIO_F_VERSION_1;
/// Feature: VIRTIO_RING_F_INDIRECT_DESC.
pub const INDIRECT: u64 = crate::device::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature: VIRTIO_RING_F_EVENT_IDX.
pub const EVENT_IDX: u64 = crate::device::VIRTIO_RING_F_EVENT_IDX;

/// Descriptor flag: NEXT.
pub const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: WRITE (device-writable).
pub const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: INDIRECT.
pub const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// Guest memory of [`MEM_SIZE`] bytes.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

/// A ready split queue of `size` entries over the descriptor table, available ring and
/// used ring at `rings`, as a transport hands it to a device at DRIVER_OK: for device
/// tests and fuzz targets that drive a device without a transport.
pub fn ready_queue(size: u16, rings: (u64, u64, u64), event_idx: bool) -> virtio_queue::Queue {
    use virtio_queue::QueueT;
    let mut q = virtio_queue::Queue::new(size).expect("a power-of-two queue size");
    q.set_size(size);
    let (desc, avail, used) = rings;
    q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q
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
    /// Triggers per vector.
    pub counts: Vec<AtomicUsize>,
}

impl CountingMsi {
    /// A group of `n` vectors.
    pub fn new(n: usize) -> Self {
        CountingMsi {
            counts: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        }
    }
    /// Triggers of vector `v` so far.
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
    /// (register?, address, datamatch) in call order.
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
    /// Guest memory.
    fn mem(&self) -> &GuestMemoryMmap;
    /// Reads the device status.
    fn status(&self) -> u8;
    /// Writes the device status.
    fn set_status(&self, s: u8);
    /// Reads all 64 device feature bits.
    fn device_features(&self) -> u64;
    /// Writes all 64 driver feature bits.
    fn set_driver_features(&self, f: u64);
    /// Maximum size of queue `q` (0 if it does not exist).
    fn queue_max(&self, q: u16) -> u16;
    /// Sets size and ring addresses of queue `q` (without enabling it).
    fn configure_queue(&self, q: u16, size: u16, desc: u64, avail: u64, used: u64);
    /// Enables queue `q`.
    fn enable_queue(&self, q: u16);
    /// Whether queue `q` reads as enabled.
    fn queue_enabled(&self, q: u16) -> bool;
    /// Notifies queue `q`.
    fn notify(&self, q: u16);
    /// Reads device configuration.
    fn read_config(&self, off: u64, data: &mut [u8]);
    /// Writes device configuration.
    fn write_config(&self, off: u64, data: &[u8]);
    /// Reads the configuration generation.
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
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The transport under test.
    pub dev: VirtioMmio,
    /// Its interrupt line.
    pub line: Arc<CountingLine>,
}

/// virtio-mmio register offsets.
pub use crate::mmio::reg as mmio_reg;

impl MmioDriver {
    /// Where the device sits.
    pub const BASE: u64 = 0xd000_0000;

    /// `device` over virtio-mmio at [`MmioDriver::BASE`], IRQ 5.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = memory();
        let line = Arc::new(CountingLine::default());
        let dev =
            VirtioMmio::new(device, mem.clone(), Self::BASE, 5, line.clone()).expect("transport");
        MmioDriver { mem, dev, line }
    }
    /// Reads a 32-bit register.
    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    /// Writes a 32-bit register.
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
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The PCI function.
    pub f: Mutex<PciFunction>,
    /// Its MSI-X vectors.
    pub msi: Arc<CountingMsi>,
    /// Its doorbell registrations.
    pub registrar: Arc<RecordingRegistrar>,
    /// (BAR offset) of the common, notify, ISR and device structures, and the notify
    /// multiplier, found by walking the capability list.
    pub common: u64,
    /// BAR offset of the notification area.
    pub notify: u64,
    /// The notify offset multiplier.
    pub multiplier: u64,
    /// BAR offset of the ISR.
    pub isr: u64,
    /// BAR offset of the device configuration.
    pub device: u64,
}

/// virtio-pci common configuration offsets.
pub use crate::pci::common_cfg;

/// Every vendor capability: (cfg_type, bar, offset, length, extra dword).
pub fn virtio_caps(f: &mut PciFunction) -> Vec<(u8, u8, u32, u32, u32)> {
    let mut rd = |off: usize, n: usize| {
        let mut b = [0u8; 4];
        f.config_read(off, &mut b[..n]);
        u32::from_le_bytes(b)
    };
    let mut caps = Vec::new();
    let mut ptr = rd(pci_reg::CAPABILITIES, 1) as usize & 0xfc;
    let mut hops = 0;
    while ptr >= 0x40 {
        hops += 1;
        assert!(hops < 48, "capability list loops");
        if rd(ptr, 1) == u32::from(cap_id::VENDOR) {
            caps.push((
                rd(ptr + cap_field::CFG_TYPE, 1) as u8,
                rd(ptr + cap_field::BAR, 1) as u8,
                rd(ptr + cap_field::OFFSET, 4),
                rd(ptr + cap_field::LENGTH, 4),
                if rd(ptr + cap_field::CAP_LEN, 1) >= 20 {
                    rd(ptr + cap_field::NOTIFY_OFF_MULTIPLIER, 4)
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
    /// `device` over virtio-pci, its structures found through the capability list;
    /// one vector per queue plus one for configuration.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let mem = memory();
        let msi = Arc::new(CountingMsi::new(device.queue_max_sizes().len() + 1));
        let registrar = Arc::new(RecordingRegistrar::default());
        let f = virtio_pci_function(device, mem.clone(), msi.clone(), Some(registrar.clone()))
            .expect("function");
        let mut f = f;
        let caps = virtio_caps(&mut f);
        let find = |t: u8| {
            let c = caps
                .iter()
                .find(|c| c.0 == t)
                .unwrap_or_else(|| panic!("no virtio capability of type {t}"));
            assert_eq!(c.1, 0, "structure {t} is not in BAR 0");
            *c
        };
        let (common, notify, isr, device) = (
            find(cap_type::COMMON_CFG),
            find(cap_type::NOTIFY_CFG),
            find(cap_type::ISR_CFG),
            find(cap_type::DEVICE_CFG),
        );
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
        // Vectors: config on 0, queue n on n + 1.
        d.w16(common_cfg::CONFIG_MSIX_VECTOR, 0);
        d
    }

    /// Reads BAR 0.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        self.f.lock().unwrap().bar_read(0, off, data)
    }
    /// Writes BAR 0.
    pub fn write(&self, off: u64, data: &[u8]) {
        self.f.lock().unwrap().bar_write(0, off, data)
    }
    /// Reads 8 bits of common configuration.
    pub fn r8(&self, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.read(self.common + off, &mut b);
        b[0]
    }
    /// Reads 16 bits of common configuration.
    pub fn r16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(self.common + off, &mut b);
        u16::from_le_bytes(b)
    }
    /// Reads 32 bits of common configuration.
    pub fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(self.common + off, &mut b);
        u32::from_le_bytes(b)
    }
    /// Writes 8 bits of common configuration.
    pub fn w8(&self, off: u64, v: u8) {
        self.write(self.common + off, &[v])
    }
    /// Writes 16 bits of common configuration.
    pub fn w16(&self, off: u64, v: u16) {
        self.write(self.common + off, &v.to_le_bytes())
    }
    /// Writes 32 bits of common configuration.
    pub fn w32(&self, off: u64, v: u32) {
        self.write(self.common + off, &v.to_le_bytes())
    }
    /// Writes 64 bits of common configuration, low half first.
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
        self.w16(common_cfg::QUEUE_MSIX_VECTOR, q + 1);
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
        (0..self.msi.counts.len()).map(|v| self.msi.count(v)).sum()
    }
    fn ack(&self) -> u32 {
        let mut b = [0u8; 1];
        self.read(self.isr, &mut b);
        u32::from(b[0])
    }
}

/// A split virtqueue in guest memory (descriptor table and available ring where
/// `MockSplitQueue` lays them out, the used ring after the available ring), driven from the driver
/// side: descriptors are handed out in order and the avail ring is published with a fence.
pub struct Ring<'a> {
    /// The mock that laid the ring out.
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Queue size.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> Ring<'a> {
    /// A ring of `size` entries at [`RING_BASE`].
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, RING_BASE, size)
    }

    /// A ring of `size` entries laid out from `base` (for a second queue).
    pub fn at(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        let (desc, avail) = (mock.desc_table_addr().0, mock.avail_addr().0);
        // The used ring follows the available ring (flags, idx, `size` entries and
        // used_event: 6 + 2 * size bytes), 4-aligned. virtio-queue 0.18's mock places it
        // `size` bytes after the available ring, inside it (rust-vmm/vm-virtio#400), so the
        // driver's used_event would share memory with a used entry.
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        // A fresh ring: flags, idx, entries and avail_event of the used ring all zero.
        let used_len = 6 + 8 * usize::from(size);
        mem.write_slice(&vec![0u8; used_len], GuestAddress(used))
            .expect("used ring");
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

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
    /// The used ring's flags.
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
    /// Writes the available ring's flags.
    pub fn set_avail_flags(&self, v: u16) {
        self.mem.write_obj(v, GuestAddress(self.avail)).unwrap();
    }
    /// Waits until the used index reaches `n`.
    pub fn wait_used(&self, n: u16) {
        eventually(&format!("used index {n}"), || self.used_idx() == n);
    }
}

/// A driver that keeps a ring full of one chain, as fast as it can, to show that a device
/// does not let that hold its thread: every entry of the available ring names the chain,
/// and the available index is kept `outstanding` ahead of the used index. Run it on a
/// thread of its own ([`Flood::run`]) while the test asks the device for something (a
/// reset), then [`Flood::stop`] says whether it was still flooding.
pub struct Flood<'a> {
    mem: &'a GuestMemoryMmap,
    avail: u64,
    used: u64,
    outstanding: u16,
    flooding: std::sync::atomic::AtomicBool,
    served: AtomicUsize,
}

impl<'a> Flood<'a> {
    /// A flood of chain `head` on `ring` (whose queue is `outstanding` entries or more:
    /// one less for a device that holds a buffer).
    pub fn new(ring: &Ring<'a>, head: u16, outstanding: u16) -> Self {
        for i in 0..u64::from(ring.size) {
            ring.mem
                .write_obj(head, GuestAddress(ring.avail + 4 + 2 * i))
                .expect("available ring");
        }
        Flood {
            mem: ring.mem,
            avail: ring.avail,
            used: ring.used,
            outstanding,
            flooding: std::sync::atomic::AtomicBool::new(true),
            served: AtomicUsize::new(0),
        }
    }

    /// Floods until [`Flood::stop`], or for 10 s at most.
    pub fn run(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.flooding.load(Ordering::SeqCst) && Instant::now() < end {
            let used: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            fence(Ordering::SeqCst);
            self.mem
                .write_obj(
                    used.wrapping_add(self.outstanding),
                    GuestAddress(self.avail + 2),
                )
                .unwrap();
            self.served.store(usize::from(used), Ordering::SeqCst);
        }
        self.flooding.store(false, Ordering::SeqCst);
    }

    /// The used index last seen (the device's progress).
    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }

    /// Stops the flood; returns whether it was still going (not ended by its 10 s).
    pub fn stop(&self) -> bool {
        self.flooding.swap(false, Ordering::SeqCst)
    }
}

/// Reads `len` bytes of guest memory at `at`.
pub fn read_bytes(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

/// `payload` with every byte XORed with `x` (what the echo device returns).
pub fn xored(payload: &[u8], x: u8) -> Vec<u8> {
    payload.iter().map(|b| b ^ x).collect()
}

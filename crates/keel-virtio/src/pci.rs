//! The virtio-pci modern transport (virtio 1.2 section 4.1) on keel-pci.
//!
//! BAR 0 (32 KiB, 32-bit memory) holds every structure:
//!
//! | offset | structure |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status (1 byte, read clears) |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications: queue `n` at `0x3000 + 4 * n` (multiplier 4) |
//! | 0x4000 | MSI-X table (one vector per queue plus one for configuration changes) |
//! | 0x5000 | MSI-X PBA |
//!
//! A PCI configuration access capability (VIRTIO_PCI_CAP_PCI_CFG) gives firmware-style
//! access to the common, ISR, device and notification structures through configuration
//! space (the MSI-X table and PBA are not reachable through it).
//!
//! Notifications go through one ioeventfd per queue, re-registered (new address first)
//! whenever the guest moves the BAR; a notification that reaches the transport through an
//! exit instead (no ioeventfd registered) signals the same eventfd.

use std::sync::atomic::{AtomicU16, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use keel_bus::interrupt::{DataMatch, IoEventAddress, IoEventRegistrar, MsiGroup};
use keel_memory::GuestMemoryMmap;
use keel_pci::bar::BarSpec;
use keel_pci::config::{cap_id, ConfigSpace};
use keel_pci::function::FunctionError;
use keel_pci::{MsixLayout, PciDevice, PciFunction};

use virtio_bindings::virtio_ids;

use crate::device::{InterruptError, InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::state::{set_high, set_low, StateError, VirtioState};
use keel_bus::ErrorChain;

// virtio-bindings 0.2 has no virtio_pci module: the PCI transport's constants are written
// here, each citing the virtio 1.2 section that defines it.

/// PCI vendor ID of virtio devices (virtio 1.2 section 4.1.2).
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern virtio-pci device IDs are this plus the virtio device type (virtio 1.2 section
/// 4.1.2).
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// The PCI subsystem ID of non-transitional devices: 0x40 or higher (virtio 1.2 section
/// 4.1.2.1).
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
/// "No MSI-X vector" in the vector registers (`VIRTIO_MSI_NO_VECTOR`, virtio 1.2 section
/// 4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;

/// `cfg_type` of the virtio vendor capabilities (`VIRTIO_PCI_CAP_*`, virtio 1.2 section
/// 4.1.4).
pub mod cap_type {
    /// Common configuration.
    pub const COMMON_CFG: u8 = 1;
    /// Notifications.
    pub const NOTIFY_CFG: u8 = 2;
    /// ISR status.
    pub const ISR_CFG: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE_CFG: u8 = 4;
    /// PCI configuration access.
    pub const PCI_CFG: u8 = 5;
}

/// Byte offsets of the fields of a virtio vendor capability from its start (`struct
/// virtio_pci_cap` and its extensions, virtio 1.2 sections 4.1.4, 4.1.4.4 and 4.1.4.9).
pub mod cap_field {
    /// `cap_len` (u8).
    pub const CAP_LEN: usize = 2;
    /// `cfg_type` (u8), one of [`super::cap_type`].
    pub const CFG_TYPE: usize = 3;
    /// `bar` (u8).
    pub const BAR: usize = 4;
    /// `offset` within the BAR (le32).
    pub const OFFSET: usize = 8;
    /// `length` of the structure (le32).
    pub const LENGTH: usize = 12;
    /// `notify_off_multiplier` (le32) of the notification capability.
    pub const NOTIFY_OFF_MULTIPLIER: usize = 16;
    /// `pci_cfg_data` (4 bytes) of the PCI configuration access capability.
    pub const PCI_CFG_DATA: usize = 16;
}

/// Offsets of the fields of the common configuration structure (`struct
/// virtio_pci_common_cfg`, virtio 1.2 section 4.1.4.3).
pub mod common_cfg {
    /// `device_feature_select` (le32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// `device_feature` (le32).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// `driver_feature_select` (le32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// `driver_feature` (le32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// `config_msix_vector` (le16).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// `num_queues` (le16).
    pub const NUM_QUEUES: u64 = 0x12;
    /// `device_status` (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// `config_generation` (u8).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// `queue_select` (le16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// `queue_size` (le16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// `queue_msix_vector` (le16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// `queue_enable` (le16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// `queue_notify_off` (le16).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// `queue_desc` (le64, written as two le32 halves, low first).
    pub const QUEUE_DESC: u64 = 0x20;
    /// `queue_driver` (le64): the available ring.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// `queue_device` (le64): the used ring.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// `queue_notify_data` (le16).
    pub const QUEUE_NOTIFY_DATA: u64 = 0x38;
    /// `queue_reset` (le16).
    pub const QUEUE_RESET: u64 = 0x3a;
}

/// Bits of the ISR status byte (virtio 1.2 section 4.1.4.5).
pub mod isr {
    /// Buffers were used on a queue.
    pub const QUEUE: u8 = 1;
    /// The device configuration changed.
    pub const CONFIG: u8 = 2;
}

const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
/// The window given to the common configuration structure (0x3c bytes), rounded up.
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u32 = 0x4000;
const MSIX_PBA: u32 = 0x5000;

/// Errors from building a virtio-pci function.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PciTransportError {
    /// The virtio core could not be set up.
    #[error("cannot set up the virtio device")]
    State(#[from] StateError),
    /// BAR 0, which holds every structure, could not be defined.
    #[error("cannot define BAR 0")]
    Bar(#[source] FunctionError),
    /// The MSI-X capability could not be added.
    #[error("cannot add the MSI-X capability")]
    Msix(#[source] FunctionError),
    /// A virtio vendor capability could not be added.
    #[error("cannot add the virtio capability of type {cfg_type}")]
    Capability {
        /// Its `cfg_type` (see [`cap_type`]).
        cfg_type: u8,
        /// Why.
        #[source]
        source: FunctionError,
    },
    /// The interrupt group has fewer vectors than queues plus one.
    #[error("the MSI-X group has {have} vectors, {need} are needed")]
    Vectors {
        /// Vectors needed.
        need: usize,
        /// Vectors in the group.
        have: usize,
    },
}

/// Routes virtio interrupts to the MSI-X vectors the driver chose.
struct PciInterrupt {
    msix: Arc<dyn MsiGroup>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
}

impl PciInterrupt {
    fn vector_or_none(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.len() {
            v
        } else {
            NO_VECTOR
        }
    }
    fn reset(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for q in &self.queue_vectors {
            q.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.isr.store(0, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        let (bit, vector) = match kind {
            InterruptKind::Queue(i) => (
                isr::QUEUE,
                self.queue_vectors
                    .get(usize::from(i))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst)),
            ),
            InterruptKind::Config => (isr::CONFIG, self.config_vector.load(Ordering::SeqCst)),
        };
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if vector == NO_VECTOR {
            // The driver asked for no interrupt on this source (or MSI-X is unused): the
            // ISR bit records it for a polling driver.
            return Ok(());
        }
        self.msix.trigger(usize::from(vector))
    }
}

/// The virtio device model behind a PCI function.
struct VirtioPci {
    state: VirtioState,
    interrupt: Arc<PciInterrupt>,
    registrar: Option<Arc<dyn IoEventRegistrar>>,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// Where the PCI configuration access capability sits in configuration space (set
    /// once the function is built; 0 before).
    pci_cfg: Arc<AtomicUsize>,
}

/// One field of the common configuration structure.
#[derive(Clone, Copy)]
enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDescLo,
    QueueDescHi,
    QueueDriverLo,
    QueueDriverHi,
    QueueDeviceLo,
    QueueDeviceHi,
    QueueNotifyData,
    QueueReset,
}

/// (offset, size, field) of every common configuration field.
const FIELDS: &[(usize, usize, Field)] = {
    use common_cfg as c;
    &[
        (
            c::DEVICE_FEATURE_SELECT as usize,
            4,
            Field::DeviceFeatureSelect,
        ),
        (c::DEVICE_FEATURE as usize, 4, Field::DeviceFeature),
        (
            c::DRIVER_FEATURE_SELECT as usize,
            4,
            Field::DriverFeatureSelect,
        ),
        (c::DRIVER_FEATURE as usize, 4, Field::DriverFeature),
        (c::CONFIG_MSIX_VECTOR as usize, 2, Field::ConfigMsixVector),
        (c::NUM_QUEUES as usize, 2, Field::NumQueues),
        (c::DEVICE_STATUS as usize, 1, Field::DeviceStatus),
        (c::CONFIG_GENERATION as usize, 1, Field::ConfigGeneration),
        (c::QUEUE_SELECT as usize, 2, Field::QueueSelect),
        (c::QUEUE_SIZE as usize, 2, Field::QueueSize),
        (c::QUEUE_MSIX_VECTOR as usize, 2, Field::QueueMsixVector),
        (c::QUEUE_ENABLE as usize, 2, Field::QueueEnable),
        (c::QUEUE_NOTIFY_OFF as usize, 2, Field::QueueNotifyOff),
        (c::QUEUE_DESC as usize, 4, Field::QueueDescLo),
        (c::QUEUE_DESC as usize + 4, 4, Field::QueueDescHi),
        (c::QUEUE_DRIVER as usize, 4, Field::QueueDriverLo),
        (c::QUEUE_DRIVER as usize + 4, 4, Field::QueueDriverHi),
        (c::QUEUE_DEVICE as usize, 4, Field::QueueDeviceLo),
        (c::QUEUE_DEVICE as usize + 4, 4, Field::QueueDeviceHi),
        (c::QUEUE_NOTIFY_DATA as usize, 2, Field::QueueNotifyData),
        (c::QUEUE_RESET as usize, 2, Field::QueueReset),
    ]
};

impl VirtioPci {
    fn field(&self, f: Field) -> u32 {
        let q = self.state.selected();
        let sel = usize::from(self.state.queue_select);
        match f {
            Field::DeviceFeatureSelect => self.device_feature_select,
            Field::DeviceFeature => self.state.device_features(self.device_feature_select),
            Field::DriverFeatureSelect => self.driver_feature_select,
            Field::DriverFeature => match self.driver_feature_select {
                0 => self.state.driver_features as u32,
                1 => (self.state.driver_features >> 32) as u32,
                _ => 0,
            },
            Field::ConfigMsixVector => {
                u32::from(self.interrupt.config_vector.load(Ordering::SeqCst))
            }
            Field::NumQueues => u32::from(self.state.num_queues()),
            Field::DeviceStatus => u32::from(self.state.status()),
            Field::ConfigGeneration => u32::from(self.state.config_generation),
            Field::QueueSelect => u32::from(self.state.queue_select),
            Field::QueueSize => q.map_or(0, |q| u32::from(q.size)),
            Field::QueueMsixVector => self
                .interrupt
                .queue_vectors
                .get(sel)
                .map_or(u32::from(NO_VECTOR), |v| {
                    u32::from(v.load(Ordering::SeqCst))
                }),
            Field::QueueEnable => q.map_or(0, |q| u32::from(q.ready)),
            Field::QueueNotifyOff | Field::QueueNotifyData => {
                if q.is_some() {
                    u32::from(self.state.queue_select)
                } else {
                    0
                }
            }
            Field::QueueDescLo => q.map_or(0, |q| q.desc as u32),
            Field::QueueDescHi => q.map_or(0, |q| (q.desc >> 32) as u32),
            Field::QueueDriverLo => q.map_or(0, |q| q.avail as u32),
            Field::QueueDriverHi => q.map_or(0, |q| (q.avail >> 32) as u32),
            Field::QueueDeviceLo => q.map_or(0, |q| q.used as u32),
            Field::QueueDeviceHi => q.map_or(0, |q| (q.used >> 32) as u32),
            Field::QueueReset => 0,
        }
    }

    fn set_field(&mut self, f: Field, v: u32) {
        let sel = usize::from(self.state.queue_select);
        match f {
            Field::DeviceFeatureSelect => self.device_feature_select = v,
            Field::DriverFeatureSelect => self.driver_feature_select = v,
            Field::DriverFeature => self
                .state
                .set_driver_features(self.driver_feature_select, v),
            Field::ConfigMsixVector => {
                let vec = self.interrupt.vector_or_none(v as u16);
                self.interrupt.config_vector.store(vec, Ordering::SeqCst);
            }
            Field::DeviceStatus => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                self.state.write_status(v as u8, &interrupt);
                if v == 0 {
                    self.interrupt.reset();
                }
            }
            Field::QueueSelect => self.state.queue_select = v as u16,
            Field::QueueMsixVector => {
                let vec = self.interrupt.vector_or_none(v as u16);
                if let Some(slot) = self.interrupt.queue_vectors.get(sel) {
                    slot.store(vec, Ordering::SeqCst);
                }
            }
            _ => {
                let Some(q) = self.state.selected_mut() else {
                    return;
                };
                match f {
                    Field::QueueSize => q.size = v as u16,
                    // The driver enables a queue; it cannot disable one (that is a reset).
                    Field::QueueEnable => q.ready |= v == 1,
                    Field::QueueDescLo => set_low(&mut q.desc, v),
                    Field::QueueDescHi => set_high(&mut q.desc, v),
                    Field::QueueDriverLo => set_low(&mut q.avail, v),
                    Field::QueueDriverHi => set_high(&mut q.avail, v),
                    Field::QueueDeviceLo => set_low(&mut q.used, v),
                    Field::QueueDeviceHi => set_high(&mut q.used, v),
                    // Read-only fields, and queue_reset (VIRTIO_F_RING_RESET is not offered).
                    _ => {}
                }
            }
        }
    }

    /// The common configuration structure as the driver would read it now.
    fn snapshot(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        for &(off, size, f) in FIELDS {
            b[off..off + size].copy_from_slice(&self.field(f).to_le_bytes()[..size]);
        }
        b
    }

    fn read_common(&self, offset: usize, data: &mut [u8]) {
        let snap = self.snapshot();
        for (i, d) in data.iter_mut().enumerate() {
            *d = snap.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A write of any width: overlay it on the current values, then apply each field it
    /// touched, in address order (status last among them as it comes last).
    fn write_common(&mut self, offset: usize, data: &[u8]) {
        let mut snap = self.snapshot();
        let end = offset + data.len();
        for (i, d) in data.iter().enumerate() {
            if let Some(slot) = snap.get_mut(offset + i) {
                *slot = *d;
            }
        }
        for &(off, size, f) in FIELDS {
            if off < end && off + size > offset {
                let mut v = [0u8; 4];
                v[..size].copy_from_slice(&snap[off..off + size]);
                self.set_field(f, u32::from_le_bytes(v));
            }
        }
    }

    /// The BAR window the PCI configuration access capability selects: (offset, length)
    /// when `cap.bar` is 0 and `cap.length` is 1, 2 or 4 with `cap.offset` aligned to it
    /// and inside the BAR (virtio 1.2 section 4.1.4.9); other selections are ignored.
    fn pci_cfg_window(cfg: &ConfigSpace, cap: usize) -> Option<(u64, usize)> {
        let mut bar = [0u8; 1];
        cfg.read(cap + cap_field::BAR, &mut bar);
        let off = u64::from(cfg.read_u32(cap + cap_field::OFFSET));
        let len = cfg.read_u32(cap + cap_field::LENGTH) as usize;
        (bar[0] == 0 && matches!(len, 1 | 2 | 4) && off % len as u64 == 0)
            .then_some((off, len))
            .filter(|&(o, l)| o + l as u64 <= BAR_SIZE)
    }

    /// The BAR window a configuration access of `len` bytes at `offset` reaches: only an
    /// access to `pci_cfg_data` that starts at the field and covers the window's length
    /// (and stays inside the field) performs the BAR access; one that only partly overlaps
    /// the field is an access to configuration space alone, so it cannot write part of a
    /// window or read (and clear) the ISR as a side effect.
    fn pci_cfg_access(
        cfg: &ConfigSpace,
        cap: usize,
        offset: usize,
        len: usize,
    ) -> Option<(u64, usize)> {
        let field = cap + cap_field::PCI_CFG_DATA;
        if cap == 0 || offset != field || len > 4 {
            return None;
        }
        Self::pci_cfg_window(cfg, cap).filter(|&(_, n)| len >= n)
    }

    fn notify_addr(base: u64, queue: u16) -> IoEventAddress {
        IoEventAddress::Mmio(base + NOTIFY + u64::from(NOTIFY_MULTIPLIER) * u64::from(queue))
    }
}

impl PciDevice for VirtioPci {
    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON + COMMON_LEN => self.read_common(o as usize, data),
            ISR => {
                // Reading the ISR acknowledges it.
                if let Some(d) = data.first_mut() {
                    *d = self.interrupt.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.state.device().read_config(o - DEVICE_CFG, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.write_common(o as usize, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o)
                && self.state.write_config(o - DEVICE_CFG, data) =>
            {
                if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                    log::warn!("virtio-pci: {}", ErrorChain(&e));
                }
            }
            o if o >= NOTIFY
                && o < NOTIFY
                    + u64::from(NOTIFY_MULTIPLIER) * u64::from(self.state.num_queues()) =>
            {
                // A notification that exited instead of hitting an ioeventfd.
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as u16;
                if let Some(n) = self.state.notifier(q) {
                    let _ = n.write(1);
                }
            }
            _ => {}
        }
    }

    fn config_read(&mut self, cfg: &ConfigSpace, offset: usize, data: &mut [u8]) {
        let cap = self.pci_cfg.load(Ordering::Relaxed);
        let field = cap + cap_field::PCI_CFG_DATA;
        let Some((off, len)) = Self::pci_cfg_access(cfg, cap, offset, data.len()) else {
            return;
        };
        let mut buf = [0u8; 4];
        self.bar_read(0, off, &mut buf[..len]);
        for (i, d) in data.iter_mut().enumerate() {
            if let Some(k) = (offset + i).checked_sub(field).filter(|&k| k < len) {
                *d = buf[k];
            }
        }
    }

    fn config_written(&mut self, cfg: &ConfigSpace, offset: usize, len: usize) {
        let cap = self.pci_cfg.load(Ordering::Relaxed);
        let field = cap + cap_field::PCI_CFG_DATA;
        let Some((off, n)) = Self::pci_cfg_access(cfg, cap, offset, len) else {
            return;
        };
        let mut buf = [0u8; 4];
        cfg.read(field, &mut buf);
        self.bar_write(0, off, &buf[..n]);
    }

    fn bar_moved(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
        let Some(reg) = &self.registrar else { return };
        if bar != 0 {
            return;
        }
        // New doorbells first, then the old ones go: no notification falls in a gap.
        for q in 0..self.state.num_queues() {
            let evt = self.state.notifier(q).expect("one per queue");
            if let Some(n) = new {
                if let Err(e) = reg.register(evt, Self::notify_addr(n, q), DataMatch::Any) {
                    log::warn!("virtio-pci: queue {q} doorbell: {}", ErrorChain(&e));
                }
            }
            if let Some(o) = old {
                if let Err(e) = reg.unregister(evt, Self::notify_addr(o, q), DataMatch::Any) {
                    log::warn!("virtio-pci: queue {q} doorbell: {}", ErrorChain(&e));
                }
            }
        }
    }
}

fn vendor_cap(cfg_type: u8, offset: u32, length: u32, multiplier: Option<u32>) -> Vec<u8> {
    // virtio_pci_cap after cap_vndr and cap_next: cap_len, cfg_type, bar, id, padding[2],
    // offset, length (and notify_off_multiplier for the notify capability).
    let len = if multiplier.is_some() { 20u8 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(m) = multiplier {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

/// PCI class code for a virtio device type: block and network get their own, the rest
/// "other".
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        virtio_ids::VIRTIO_ID_NET => (0x02, 0x00),
        virtio_ids::VIRTIO_ID_BLOCK => (0x01, 0x00),
        _ => (0xff, 0x00),
    }
}

/// Builds a PCI function carrying `device` over virtio-pci. `msix` needs at least one
/// vector per queue plus one; `registrar` places notification ioeventfds (`None`: every
/// notification exits to the transport, which still works, more slowly).
///
/// # Examples
///
/// The echo device with a stand-in MSI-X group (both from the `test-utils` feature; a VMM
/// passes its own device and keel-kvm's MSI routes), then placed on a PCI segment:
///
/// ```
/// use std::sync::Arc;
/// use keel_bus::{MmioBus, PioBus};
/// use keel_memory::{GuestMemoryMmap, MemoryLayout, SystemAllocator, GIB};
/// use keel_pci::PciSegment;
/// use keel_virtio::echo::{Echo, ECHO_DEVICE_TYPE};
/// use keel_virtio::pci::{virtio_pci_function, VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_VENDOR};
/// use keel_virtio::testing::CountingMsi;
/// use vm_memory::GuestAddress;
///
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
/// // One queue: two vectors, one for it and one for configuration changes.
/// let msix = Arc::new(CountingMsi::new(2));
/// let function = virtio_pci_function(Box::new(Echo::new()), mem, msix, None)?;
/// let mut id = [0u8; 4];
/// function.config().read(0, &mut id);
/// assert_eq!(u16::from_le_bytes([id[0], id[1]]), VIRTIO_PCI_VENDOR);
/// let device_id = VIRTIO_PCI_DEVICE_BASE + ECHO_DEVICE_TYPE as u16;
/// assert_eq!(u16::from_le_bytes([id[2], id[3]]), device_id);
///
/// let mut alloc = SystemAllocator::new(&MemoryLayout::new(GIB)?, 5)?;
/// let (mmio, pio) = (Arc::new(MmioBus::new()), Arc::new(PioBus::new()));
/// let segment = PciSegment::new(mmio, pio, 0xe000_0000);
/// let slot = segment.add_device(function, &mut alloc)?;
/// assert_eq!(slot, 1, "slot 0 holds the host bridge");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn virtio_pci_function(
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    msix: Arc<dyn MsiGroup>,
    registrar: Option<Arc<dyn IoEventRegistrar>>,
) -> Result<PciFunction, PciTransportError> {
    let state = VirtioState::new(device, mem)?;
    let nq = state.num_queues();
    let need = usize::from(nq) + 1;
    if msix.len() < need {
        return Err(PciTransportError::Vectors {
            need,
            have: msix.len(),
        });
    }
    let ty = state.device_type();
    let (class, subclass) = class_of(ty);
    let mut cfg = ConfigSpace::new(
        VIRTIO_PCI_VENDOR,
        VIRTIO_PCI_DEVICE_BASE + ty as u16,
        class,
        subclass,
        0,
    );
    cfg.set_u8(keel_pci::config::reg::REVISION, 1); // modern only
    cfg.set_u16(
        keel_pci::config::reg::SUBSYSTEM_VENDOR_ID,
        VIRTIO_PCI_VENDOR,
    );
    cfg.set_u16(keel_pci::config::reg::SUBSYSTEM_ID, VIRTIO_PCI_SUBSYSTEM_ID);
    let interrupt = Arc::new(PciInterrupt {
        msix: msix.clone(),
        config_vector: AtomicU16::new(NO_VECTOR),
        queue_vectors: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
        isr: AtomicU8::new(0),
    });
    let pci_cfg = Arc::new(AtomicUsize::new(0));
    let dev = VirtioPci {
        state,
        interrupt,
        registrar,
        device_feature_select: 0,
        driver_feature_select: 0,
        pci_cfg: pci_cfg.clone(),
    };
    let bar = BarSpec::mem32(BAR_SIZE, false).map_err(|e| PciTransportError::Bar(e.into()))?;
    let mut f = PciFunction::new(cfg, Box::new(dev))
        .with_bar(0, bar)
        .map_err(PciTransportError::Bar)?
        .with_msix(
            MsixLayout {
                vectors: need as u16,
                table_bar: 0,
                table_offset: MSIX_TABLE,
                pba_bar: 0,
                pba_offset: MSIX_PBA,
            },
            msix,
        )
        .map_err(PciTransportError::Msix)?;
    let caps = [
        (cap_type::COMMON_CFG, COMMON, COMMON_LEN as u32, None),
        (
            cap_type::NOTIFY_CFG,
            NOTIFY,
            NOTIFY_MULTIPLIER * u32::from(nq.max(1)),
            Some(NOTIFY_MULTIPLIER),
        ),
        (cap_type::ISR_CFG, ISR, 1, None),
        (
            cap_type::DEVICE_CFG,
            DEVICE_CFG,
            DEVICE_CFG_LEN as u32,
            None,
        ),
    ];
    for (cfg_type, offset, length, multiplier) in caps {
        let body = vendor_cap(cfg_type, offset as u32, length, multiplier);
        let zeros = vec![0u8; body.len()];
        f.add_capability(cap_id::VENDOR, &body, &zeros)
            .map_err(|source| PciTransportError::Capability { cfg_type, source })?;
    }
    // The PCI configuration access capability: cap.bar, cap.offset, cap.length and
    // pci_cfg_data are the driver's to write.
    let mut body = vendor_cap(cap_type::PCI_CFG, 0, 0, Some(0));
    body[0] = (cap_field::PCI_CFG_DATA + 4) as u8;
    // The body starts after cap_vndr and cap_next.
    let field = |f: usize| f - 2;
    let mut writable = vec![0u8; body.len()];
    writable[field(cap_field::BAR)] = 0xff;
    writable[field(cap_field::OFFSET)..field(cap_field::PCI_CFG_DATA + 4)].fill(0xff);
    let at = f
        .add_capability(cap_id::VENDOR, &body, &writable)
        .map_err(|source| PciTransportError::Capability {
            cfg_type: cap_type::PCI_CFG,
            source,
        })?;
    pci_cfg.store(at, Ordering::Relaxed);
    Ok(f)
}

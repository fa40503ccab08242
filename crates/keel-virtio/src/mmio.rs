//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2).
//!
//! The device sits at a fixed address; the guest learns it from the kernel command line
//! ([`VirtioMmio::cmdline_fragment`], Linux's `virtio_mmio.device=` syntax) or from
//! firmware tables. Its interrupt is an edge on a wired line; InterruptStatus says why.
//! QueueNotify writes go through one ioeventfd per queue (with the queue index as data).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_bus::interrupt::{DataMatch, InterruptLine, IoEventAddress, IoEventRegistrar};
use keel_bus::MmioDevice;
use keel_memory::GuestMemoryMmap;
use virtio_bindings::virtio_mmio;

use crate::device::{InterruptError, InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::state::{set_high, set_low, StateError, VirtioState};
use keel_bus::ErrorChain;

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// The `MagicValue` register's contents, "virt" in little-endian (virtio 1.2 section
/// 4.2.2; virtio-bindings has the register's offset but not its value).
const MAGIC: u32 = 0x7472_6976;
/// The `Version` register's contents: 2, the non-legacy interface (virtio 1.2 section
/// 4.2.2; not in virtio-bindings either).
const VERSION: u32 = 2;
/// Vendor ID reported in the VendorID register ("KEEL").
pub const VENDOR_ID: u32 = 0x4c45_454b;

const INT_USED: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Register offsets of the virtio-mmio version 2 register file (virtio 1.2 section 4.2.2):
/// the `VIRTIO_MMIO_*` offsets of [`virtio_bindings::virtio_mmio`] as bus offsets, named as
/// the specification names the registers (`QueueDriver` is Linux's `QUEUE_AVAIL`,
/// `QueueDevice` its `QUEUE_USED`).
pub mod reg {
    use virtio_bindings::virtio_mmio as m;

    /// `MagicValue`.
    pub const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    /// `Version`.
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    /// `DeviceID`.
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    /// `VendorID`.
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    /// `DeviceFeatures`.
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    /// `DeviceFeaturesSel`.
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    /// `DriverFeatures`.
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    /// `DriverFeaturesSel`.
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    /// `QueueSel`.
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    /// `QueueNumMax`.
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    /// `QueueNum`.
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    /// `QueueReady`.
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    /// `QueueNotify`.
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    /// `InterruptStatus`.
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    /// `InterruptACK`.
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    /// `Status`.
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    /// `QueueDescLow`.
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    /// `QueueDescHigh`.
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    /// `QueueDriverLow` (`VIRTIO_MMIO_QUEUE_AVAIL_LOW`).
    pub const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    /// `QueueDriverHigh` (`VIRTIO_MMIO_QUEUE_AVAIL_HIGH`).
    pub const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    /// `QueueDeviceLow` (`VIRTIO_MMIO_QUEUE_USED_LOW`).
    pub const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    /// `QueueDeviceHigh` (`VIRTIO_MMIO_QUEUE_USED_HIGH`).
    pub const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    /// `ConfigGeneration`.
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    /// `Config`: device configuration space starts here.
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

struct MmioInterrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        let bit = match kind {
            InterruptKind::Queue(_) => INT_USED,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.line.trigger()
    }
}

struct Inner {
    state: VirtioState,
    device_features_sel: u32,
    driver_features_sel: u32,
}

/// A virtio-mmio device: insert it on the MMIO bus at its base, [`MMIO_SIZE`] long.
pub struct VirtioMmio {
    inner: Mutex<Inner>,
    interrupt: Arc<MmioInterrupt>,
    base: u64,
    irq: u32,
}

impl VirtioMmio {
    /// A transport for `device` at guest address `base`, interrupting on `line`, which
    /// the guest knows as interrupt `irq` (an IOAPIC pin on x86).
    ///
    /// # Examples
    ///
    /// The echo device and an interrupt line that counts (both from the `test-utils`
    /// feature; a VMM passes its own device and an irqfd-backed line from keel-kvm), on an
    /// MMIO bus as the VMM places it:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keel_bus::{BusRange, MmioBus};
    /// use keel_memory::GuestMemoryMmap;
    /// use keel_virtio::echo::{Echo, ECHO_DEVICE_TYPE};
    /// use keel_virtio::mmio::{reg, VirtioMmio, MMIO_SIZE};
    /// use keel_virtio::testing::CountingLine;
    /// use vm_memory::GuestAddress;
    ///
    /// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    /// let base = 0xd000_0000;
    /// let dev = Arc::new(VirtioMmio::new(
    ///     Box::new(Echo::new()),
    ///     mem,
    ///     base,
    ///     5,
    ///     Arc::new(CountingLine::default()),
    /// )?);
    /// let bus = MmioBus::new();
    /// bus.insert(BusRange::new(base, MMIO_SIZE)?, dev.clone())?;
    /// let mut r = [0u8; 4];
    /// bus.read(base + reg::MAGIC, &mut r)?;
    /// assert_eq!(&r, b"virt");
    /// bus.read(base + reg::DEVICE_ID, &mut r)?;
    /// assert_eq!(u32::from_le_bytes(r), ECHO_DEVICE_TYPE);
    /// // What the guest kernel is told.
    /// assert_eq!(dev.cmdline_fragment(), "virtio_mmio.device=4K@0xd0000000:5");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        base: u64,
        irq: u32,
        line: Arc<dyn InterruptLine>,
    ) -> Result<Self, StateError> {
        Ok(VirtioMmio {
            inner: Mutex::new(Inner {
                state: VirtioState::new(device, mem)?,
                device_features_sel: 0,
                driver_features_sel: 0,
            }),
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                line,
            }),
            base,
            irq,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers one ioeventfd per queue on the QueueNotify register, matching the queue
    /// index, so notifications do not exit to the VMM.
    pub fn register_ioeventfds(
        &self,
        registrar: &dyn IoEventRegistrar,
    ) -> Result<(), InterruptError> {
        let inner = self.inner();
        for q in 0..inner.state.num_queues() {
            let evt = inner.state.notifier(q).expect("one per queue");
            registrar.register(
                evt,
                IoEventAddress::Mmio(self.base + reg::QUEUE_NOTIFY),
                DataMatch::U32(u32::from(q)),
            )?;
        }
        Ok(())
    }

    /// The kernel command-line fragment that tells Linux (and keel's test guest) about
    /// the device: `virtio_mmio.device=4K@0x<base>:<irq>`.
    pub fn cmdline_fragment(&self) -> String {
        format!("virtio_mmio.device=4K@{:#x}:{}", self.base, self.irq)
    }

    fn read_reg(&self, inner: &Inner, offset: u64) -> u32 {
        let st = &inner.state;
        let q = st.selected();
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => st.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => st.device_features(inner.device_features_sel),
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            reg::STATUS => u32::from(st.status()),
            reg::CONFIG_GENERATION => u32::from(st.config_generation),
            _ => 0,
        }
    }

    fn write_reg(&self, inner: &mut Inner, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => inner.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                let sel = inner.driver_features_sel;
                inner.state.set_driver_features(sel, v)
            }
            reg::DRIVER_FEATURES_SEL => inner.driver_features_sel = v,
            reg::QUEUE_SEL => inner.state.queue_select = v as u16,
            reg::QUEUE_NOTIFY => {
                // A notification that exited instead of hitting an ioeventfd.
                if let Some(n) = inner.state.notifier(v as u16) {
                    let _ = n.write(1);
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            reg::STATUS => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                inner.state.write_status(v as u8, &interrupt);
                if v == 0 {
                    self.interrupt.status.store(0, Ordering::SeqCst);
                }
            }
            _ => {
                let Some(q) = inner.state.selected_mut() else {
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => q.size = v as u16,
                    // Writing 0 to QueueReady before DRIVER_OK un-readies the queue.
                    reg::QUEUE_READY => q.ready = v == 1,
                    reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                    reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                    reg::QUEUE_DRIVER_LOW => set_low(&mut q.avail, v),
                    reg::QUEUE_DRIVER_HIGH => set_high(&mut q.avail, v),
                    reg::QUEUE_DEVICE_LOW => set_low(&mut q.used, v),
                    reg::QUEUE_DEVICE_HIGH => set_high(&mut q.used, v),
                    _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
                }
            }
        }
    }
}

impl MmioDevice for VirtioMmio {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let inner = self.inner();
        if offset >= reg::CONFIG {
            inner.state.device().read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32-bit and must be accessed as such (virtio 1.2 4.2.2.2).
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        data.copy_from_slice(&self.read_reg(&inner, offset).to_le_bytes());
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.inner();
        if offset >= reg::CONFIG {
            if inner.state.write_config(offset - reg::CONFIG, data) {
                drop(inner);
                if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                    log::warn!("virtio-mmio: {}", ErrorChain(&e));
                }
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        self.write_reg(&mut inner, offset, v);
    }
}

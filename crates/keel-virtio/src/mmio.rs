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

use crate::device::{InterruptError, InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::state::{set_high, set_low, StateError, VirtioState};

/// Size of the register window.
pub const MMIO_SIZE: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID reported in the VendorID register ("KEEL").
pub const VENDOR_ID: u32 = 0x4c45_454b;

const INT_USED: u32 = 1;
const INT_CONFIG: u32 = 2;

/// Register offsets of the virtio-mmio version 2 register file (virtio 1.2 section 4.2.2).
pub mod reg {
    /// `MAGIC` (offset 0x000).
    pub const MAGIC: u64 = 0x000;
    /// `VERSION` (offset 0x004).
    pub const VERSION: u64 = 0x004;
    /// `DEVICE_ID` (offset 0x008).
    pub const DEVICE_ID: u64 = 0x008;
    /// `VENDOR_ID` (offset 0x00c).
    pub const VENDOR_ID: u64 = 0x00c;
    /// `DEVICE_FEATURES` (offset 0x010).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// `DEVICE_FEATURES_SEL` (offset 0x014).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// `DRIVER_FEATURES` (offset 0x020).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// `DRIVER_FEATURES_SEL` (offset 0x024).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// `QUEUE_SEL` (offset 0x030).
    pub const QUEUE_SEL: u64 = 0x030;
    /// `QUEUE_NUM_MAX` (offset 0x034).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// `QUEUE_NUM` (offset 0x038).
    pub const QUEUE_NUM: u64 = 0x038;
    /// `QUEUE_READY` (offset 0x044).
    pub const QUEUE_READY: u64 = 0x044;
    /// `QUEUE_NOTIFY` (offset 0x050).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// `INTERRUPT_STATUS` (offset 0x060).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// `INTERRUPT_ACK` (offset 0x064).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// `STATUS` (offset 0x070).
    pub const STATUS: u64 = 0x070;
    /// `QUEUE_DESC_LOW` (offset 0x080).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// `QUEUE_DESC_HIGH` (offset 0x084).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// `QUEUE_DRIVER_LOW` (offset 0x090).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// `QUEUE_DRIVER_HIGH` (offset 0x094).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// `QUEUE_DEVICE_LOW` (offset 0x0a0).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// `QUEUE_DEVICE_HIGH` (offset 0x0a4).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// `CONFIG_GENERATION` (offset 0x0fc).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// `CONFIG` (offset 0x100).
    pub const CONFIG: u64 = 0x100;
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
                    log::warn!("virtio-mmio: {e}");
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

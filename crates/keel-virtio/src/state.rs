//! The transport-independent core: device status, feature negotiation, queue
//! configuration, and activation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use keel_memory::GuestMemoryMmap;

use crate::device::{
    ActivateContext, ActiveQueue, NeedsReset, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Device status bits (virtio 1.2 section 2.1), as the 8-bit register holds them: the
/// `VIRTIO_CONFIG_S_*` values of [`virtio_bindings::virtio_config`].
pub mod status {
    use virtio_bindings::virtio_config as c;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The guest gave up on the device.
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// One queue as the driver configured it through the transport. Registers read back what
/// was written; nothing is checked until DRIVER_OK, when [`QueueConfig::build`] turns it
/// into a virtio-queue [`Queue`] or says precisely what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The device's maximum size.
    pub max_size: u16,
    /// The size the driver chose (initially the maximum).
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Builds the queue and checks it against `mem`.
    pub fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|_| {
            format!(
                "size {} is not a power of two up to {}",
                self.size, self.max_size
            )
        })?;
        let addr = |what: &str, a: u64, align: u64| {
            format!("the {what} at {a:#x} is not {align}-byte aligned")
        };
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| addr("descriptor table", self.desc, 16))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|_| addr("available ring", self.avail, 2))?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|_| addr("used ring", self.used, 4))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(format!(
                "the rings (descriptors {:#x}, available {:#x}, used {:#x}, size {}) do not lie in guest memory",
                self.desc, self.avail, self.used, self.size
            ));
        }
        Ok(q)
    }
}

/// Replaces the low 32 bits of `v` (for 64-bit registers written in two halves).
pub fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

/// Replaces the high 32 bits of `v`.
pub fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The virtio state every transport shares.
pub struct VirtioState {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    offered: u64,
    /// Driver-acknowledged features.
    pub driver_features: u64,
    status: u8,
    broken: Arc<AtomicBool>,
    /// Bumped whenever device configuration changes.
    pub config_generation: u8,
    /// Selected queue.
    pub queue_select: u16,
    queues: Vec<QueueConfig>,
    notifiers: Vec<Arc<EventFd>>,
    activated: bool,
}

/// Errors a transport reports while setting up.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An eventfd could not be created.
    #[error("cannot create a queue notifier")]
    EventFd(#[source] std::io::Error),
    /// A queue's maximum size is not a power of two up to 32768.
    #[error("invalid maximum queue size {0}")]
    QueueSize(u16),
}

impl VirtioState {
    /// Wraps `device`, whose queues will live in `mem`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, StateError> {
        let offered = device.features() | VIRTIO_F_VERSION_1;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                // Queue::new validates the maximum (a power of two up to 32768).
                Queue::new(max)
                    .map(|_| QueueConfig::new(max))
                    .map_err(|_| StateError::QueueSize(max))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let notifiers = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StateError::EventFd)?;
        Ok(VirtioState {
            device,
            mem,
            offered,
            driver_features: 0,
            status: 0,
            broken: Arc::new(AtomicBool::new(false)),
            config_generation: 0,
            queue_select: 0,
            queues,
            notifiers,
            activated: false,
        })
    }

    /// The device status register as the driver reads it.
    pub fn status(&self) -> u8 {
        if self.broken.load(Ordering::SeqCst) {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Features the device offers, 32 bits at a time (`select` 0 or 1; others read 0).
    pub fn device_features(&self, select: u32) -> u32 {
        match select {
            0 => self.offered as u32,
            1 => (self.offered >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes 32 bits of its features. Ignored once FEATURES_OK is set.
    pub fn set_driver_features(&mut self, select: u32, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            log::debug!("virtio: driver features written after FEATURES_OK; ignored");
            return;
        }
        match select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => {}
        }
    }

    /// The queue-notification eventfd of queue `index` (for ioeventfd registration).
    pub fn notifier(&self, index: u16) -> Option<&Arc<EventFd>> {
        self.notifiers.get(usize::from(index))
    }

    /// The selected queue's configuration, if the selector is in range.
    pub fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue's configuration, to change it. `None` when the selector is out
    /// of range or the driver is past DRIVER_OK (queue configuration is then read-only).
    pub fn selected_mut(&mut self) -> Option<&mut QueueConfig> {
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// A driver write to the status register. Implements the state machine of virtio
    /// 1.2 section 2.1: 0 resets; FEATURES_OK is refused (left clear) when the driver
    /// chose features the device did not offer or left out VERSION_1; DRIVER_OK checks the
    /// queues against guest memory and starts the device, or sets DEVICE_NEEDS_RESET.
    pub fn write_status(&mut self, value: u8, interrupt: &Arc<dyn VirtioInterrupt>) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Bits other than FAILED may only be added, in order; the driver cannot clear them
        // (only a reset does) nor set DEVICE_NEEDS_RESET.
        let mut new =
            (old | value) & !status::DEVICE_NEEDS_RESET | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                log::debug!(
                    "virtio: FEATURES_OK refused (unoffered {unknown:#x}, features {:#x})",
                    self.driver_features
                );
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                log::debug!("virtio: DRIVER_OK without FEATURES_OK; device not started");
                new |= status::DEVICE_NEEDS_RESET;
            } else if let Err(why) = self.activate(interrupt) {
                log::warn!("virtio: cannot start the device: {why}");
                new |= status::DEVICE_NEEDS_RESET;
            }
        }
        self.status = new;
    }

    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            active.push(ActiveQueue {
                index: i as u16,
                queue: q
                    .build(&self.mem, event_idx)
                    .map_err(|e| format!("queue {i}: {e}"))?,
                notifier: self.notifiers[i].clone(),
            });
        }
        self.device
            .activate(ActivateContext {
                mem: self.mem.clone(),
                features: self.driver_features,
                queues: active,
                interrupt: interrupt.clone(),
                needs_reset: NeedsReset {
                    flag: self.broken.clone(),
                    interrupt: interrupt.clone(),
                },
            })
            .map_err(|e| e.to_string())?;
        self.activated = true;
        Ok(())
    }

    /// Device reset: the device stops, every queue and feature returns to its initial
    /// state.
    pub fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for n in &self.notifiers {
            // Drop stale kicks so a fresh driver starts clean.
            let _ = n.read();
        }
        self.driver_features = 0;
        self.status = 0;
        self.broken.store(false, Ordering::SeqCst);
        self.queue_select = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// A driver write to device configuration. Returns whether to raise a
    /// configuration-change interrupt.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let changed = self.device.write_config(offset, data);
        if changed {
            self.config_generation = self.config_generation.wrapping_add(1);
        }
        changed
    }
}

impl Drop for VirtioState {
    fn drop(&mut self) {
        if self.activated {
            self.device.reset();
        }
    }
}

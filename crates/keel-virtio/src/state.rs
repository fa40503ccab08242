//! The transport-independent core: device status, feature negotiation, queue
//! configuration, and activation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use keel_memory::GuestMemoryMmap;

use crate::device::{
    ActivateContext, ActivateError, ActiveQueue, NeedsReset, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use keel_bus::ErrorChain;

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
    /// A queue of at most `max_size` entries as it is after reset: that size, not ready,
    /// every address 0.
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Builds the queue and checks it against `mem`: the size, then each part's alignment,
    /// then that each part lies in guest memory.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_memory::GuestMemoryMmap;
    /// use keel_virtio::state::{QueueConfig, QueueConfigError, QueuePart};
    /// use vm_memory::GuestAddress;
    ///
    /// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    /// let mut q = QueueConfig::new(256);
    /// q.size = 16;
    /// (q.desc, q.avail, q.used) = (0x1000, 0x2000, 0x3000);
    /// assert!(q.build(&mem, false).is_ok());
    ///
    /// q.used = 0xfff0;
    /// assert!(matches!(
    ///     q.build(&mem, false),
    ///     Err(QueueConfigError::OutsideMemory { part: QueuePart::UsedRing, addr: 0xfff0, .. })
    /// ));
    /// ```
    pub fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, QueueConfigError> {
        let mut q =
            Queue::new(self.max_size).map_err(|_| QueueConfigError::MaxSize(self.max_size))?;
        q.try_set_size(self.size)
            .map_err(|_| QueueConfigError::Size {
                size: self.size,
                max: self.max_size,
            })?;
        let misaligned = |part: QueuePart, addr: u64| QueueConfigError::Misaligned {
            part,
            addr,
            align: part.align(),
        };
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| misaligned(QueuePart::DescriptorTable, self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|_| misaligned(QueuePart::AvailableRing, self.avail))?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|_| misaligned(QueuePart::UsedRing, self.used))?;
        for (part, addr) in [
            (QueuePart::DescriptorTable, self.desc),
            (QueuePart::AvailableRing, self.avail),
            (QueuePart::UsedRing, self.used),
        ] {
            let len = part.len(self.size);
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(QueueConfigError::OutsideMemory { part, addr, len });
            }
        }
        q.set_event_idx(event_idx);
        q.set_ready(true);
        // The checks above are virtio-queue's own; this one must agree.
        debug_assert!(q.is_valid(mem));
        Ok(q)
    }
}

/// One of the three parts of a split virtqueue (virtio 1.2 section 2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueuePart {
    /// The descriptor table.
    DescriptorTable,
    /// The available (driver) ring.
    AvailableRing,
    /// The used (device) ring.
    UsedRing,
}

impl QueuePart {
    /// The alignment the part's address must have (virtio 1.2 section 2.7, table "Queue
    /// Part / Alignment / Size").
    pub fn align(self) -> u64 {
        u64::from(match self {
            QueuePart::DescriptorTable => virtio_ring::VRING_DESC_ALIGN_SIZE,
            QueuePart::AvailableRing => virtio_ring::VRING_AVAIL_ALIGN_SIZE,
            QueuePart::UsedRing => virtio_ring::VRING_USED_ALIGN_SIZE,
        })
    }

    /// The part's size in bytes for a queue of `size` entries (virtio 1.2 section 2.7: a
    /// descriptor per entry; the rings' flags, index and event field, 2 bytes each, and an
    /// index or a used element per entry).
    pub fn len(self, size: u16) -> u64 {
        use std::mem::size_of;
        use virtio_ring::{vring_desc, vring_used_elem};
        let size = u64::from(size);
        match self {
            QueuePart::DescriptorTable => size_of::<vring_desc>() as u64 * size,
            QueuePart::AvailableRing => 6 + 2 * size,
            QueuePart::UsedRing => 6 + size_of::<vring_used_elem>() as u64 * size,
        }
    }
}

impl std::fmt::Display for QueuePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QueuePart::DescriptorTable => "descriptor table",
            QueuePart::AvailableRing => "available ring",
            QueuePart::UsedRing => "used ring",
        })
    }
}

/// What is wrong with a queue the driver configured, found at DRIVER_OK.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueConfigError {
    /// The device's maximum size is not a power of two from 1 to 32768.
    #[error("maximum size {0} is not a power of two up to 32768")]
    MaxSize(u16),
    /// The size the driver chose is not a power of two up to the maximum.
    #[error("size {size} is not a power of two up to the maximum {max}")]
    Size {
        /// The size chosen.
        size: u16,
        /// The device's maximum.
        max: u16,
    },
    /// A part's address is not aligned as the part requires.
    #[error("the {part} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which part.
        part: QueuePart,
        /// Its address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A part does not lie (entirely) in guest memory.
    #[error("the {part} at {addr:#x} ({len} bytes) is not in guest memory")]
    OutsideMemory {
        /// Which part.
        part: QueuePart,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

/// Why DRIVER_OK could not start the device (it then shows DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("queue {index} is not usable")]
    Queue {
        index: u16,
        #[source]
        source: QueueConfigError,
    },
    #[error("the device did not activate")]
    Device(#[source] ActivateError),
}

/// Replaces the low 32 bits of `v` (for 64-bit registers written in two halves).
pub fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

/// Replaces the high 32 bits of `v`.
pub fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The virtio state every transport shares: device status, feature negotiation and queue
/// configuration, and the device started at DRIVER_OK. A transport maps its registers onto
/// these calls.
///
/// # Examples
///
/// A driver's initialisation (virtio 1.2 section 3.1.1) done directly, with the echo
/// device (feature `test-utils`):
///
/// ```
/// use std::sync::Arc;
/// use keel_memory::GuestMemoryMmap;
/// use keel_virtio::device::{InterruptError, InterruptKind, VirtioInterrupt};
/// use keel_virtio::echo::Echo;
/// use keel_virtio::state::status::*;
/// use keel_virtio::{VirtioState, VIRTIO_F_VERSION_1};
/// use vm_memory::GuestAddress;
///
/// struct NoInterrupts;
/// impl VirtioInterrupt for NoInterrupts {
///     fn trigger(&self, _: InterruptKind) -> Result<(), InterruptError> {
///         Ok(())
///     }
/// }
/// let irq: Arc<dyn VirtioInterrupt> = Arc::new(NoInterrupts);
///
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)])?;
/// let mut state = VirtioState::new(Box::new(Echo::new()), mem)?;
/// state.write_status(ACKNOWLEDGE | DRIVER, &irq);
/// assert_eq!(state.device_features(1), (VIRTIO_F_VERSION_1 >> 32) as u32);
/// state.set_driver_features(1, (VIRTIO_F_VERSION_1 >> 32) as u32);
/// state.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK, &irq);
/// assert_eq!(state.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
///
/// // Queue 0: 16 entries, its three parts in guest memory, enabled.
/// state.queue_select = 0;
/// let q = state.selected_mut().expect("queue 0 exists");
/// (q.size, q.desc, q.avail, q.used, q.ready) = (16, 0x1000, 0x2000, 0x3000, true);
/// state.write_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, &irq);
/// assert!(state.activated());
///
/// // A write of 0 resets the device: its worker stops.
/// state.write_status(0, &irq);
/// assert!(!state.activated());
/// assert_eq!(state.status(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
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
#[non_exhaustive]
pub enum StateError {
    /// An eventfd could not be created.
    #[error("cannot create a queue notifier")]
    EventFd(#[source] std::io::Error),
    /// The device gave a queue a maximum size that is not a power of two up to 32768.
    #[error("the device's queue {index} cannot be set up")]
    QueueSize {
        /// The queue.
        index: u16,
        /// What is wrong with its size.
        #[source]
        source: QueueConfigError,
    },
}

impl VirtioState {
    /// Wraps `device`, whose queues will live in `mem`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, StateError> {
        let offered = device.features() | VIRTIO_F_VERSION_1;
        let queues = device
            .queue_max_sizes()
            .iter()
            .zip(0u16..)
            .map(|(&max, index)| {
                // Queue::new validates the maximum (a power of two up to 32768).
                Queue::new(max)
                    .map(|_| QueueConfig::new(max))
                    .map_err(|_| StateError::QueueSize {
                        index,
                        source: QueueConfigError::MaxSize(max),
                    })
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
            } else {
                self.device.features_negotiated(self.driver_features);
            }
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                log::debug!("virtio: DRIVER_OK without FEATURES_OK; device not started");
                new |= status::DEVICE_NEEDS_RESET;
            } else if let Err(why) = self.activate(interrupt) {
                log::warn!("virtio: cannot start the device: {}", ErrorChain(&why));
                new |= status::DEVICE_NEEDS_RESET;
            }
        }
        self.status = new;
    }

    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> Result<(), StartError> {
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
                    .map_err(|source| StartError::Queue {
                        index: i as u16,
                        source,
                    })?,
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
            .map_err(StartError::Device)?;
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
        self.device.features_negotiated(0);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn queue() -> QueueConfig {
        QueueConfig {
            size: 16,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            ..QueueConfig::new(256)
        }
    }

    #[test]
    fn build_names_what_is_wrong_with_a_queue() {
        let mem = mem();
        assert!(queue().build(&mem, true).is_ok());
        let err = |q: QueueConfig| q.build(&mem, false).unwrap_err();
        assert_eq!(
            err(QueueConfig {
                size: 12,
                ..queue()
            }),
            QueueConfigError::Size { size: 12, max: 256 }
        );
        assert_eq!(
            err(QueueConfig {
                size: 512,
                ..queue()
            }),
            QueueConfigError::Size {
                size: 512,
                max: 256
            }
        );
        assert_eq!(
            err(QueueConfig {
                max_size: 3,
                ..queue()
            }),
            QueueConfigError::MaxSize(3)
        );
        for (q, part, addr, align) in [
            (
                QueueConfig {
                    desc: 0x1008,
                    ..queue()
                },
                QueuePart::DescriptorTable,
                0x1008,
                16,
            ),
            (
                QueueConfig {
                    avail: 0x2001,
                    ..queue()
                },
                QueuePart::AvailableRing,
                0x2001,
                2,
            ),
            (
                QueueConfig {
                    used: 0x3002,
                    ..queue()
                },
                QueuePart::UsedRing,
                0x3002,
                4,
            ),
        ] {
            assert_eq!(err(q), QueueConfigError::Misaligned { part, addr, align });
        }
        // Each part just fits at the end of memory, and one step further does not.
        for (part, len) in [
            (QueuePart::DescriptorTable, 256),
            (QueuePart::AvailableRing, 38),
            (QueuePart::UsedRing, 134),
        ] {
            assert_eq!(part.len(16), len);
            let at = |addr: u64| {
                let mut q = queue();
                match part {
                    QueuePart::DescriptorTable => q.desc = addr,
                    QueuePart::AvailableRing => q.avail = addr,
                    QueuePart::UsedRing => q.used = addr,
                }
                q
            };
            let fits = (0x10000 - len) & !(part.align() - 1);
            assert!(at(fits).build(&mem, false).is_ok(), "{part}");
            let past = fits + 0x10;
            assert_eq!(
                err(at(past)),
                QueueConfigError::OutsideMemory {
                    part,
                    addr: past,
                    len
                },
            );
        }
    }
}

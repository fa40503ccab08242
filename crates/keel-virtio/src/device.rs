//! The device side of virtio: what a device model implements, and what it is given.

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use keel_memory::GuestMemoryMmap;

use keel_bus::ErrorChain;
use virtio_bindings::{virtio_config, virtio_ring};

/// Feature mask of [`virtio_config::VIRTIO_F_VERSION_1`]: the device conforms to virtio 1.0
/// or later. Required of every driver here.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
/// Feature mask of [`virtio_ring::VIRTIO_RING_F_INDIRECT_DESC`]: descriptors may point at
/// indirect tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature mask of [`virtio_ring::VIRTIO_RING_F_EVENT_IDX`]: used/avail event indices
/// suppress notifications.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were used on this queue.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// Errors raised while delivering an interrupt.
pub type InterruptError = keel_bus::interrupt::Error;

/// How a device interrupts its driver; the transport provides it.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `kind`.
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError>;
}

/// Lets a device report that it cannot go on (a broken virtqueue, say): the transport then
/// shows DEVICE_NEEDS_RESET in the status register and raises a configuration interrupt,
/// and the driver resets the device.
#[derive(Clone)]
pub struct NeedsReset {
    pub(crate) flag: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
}

impl NeedsReset {
    /// A reporter that sets `flag` and raises a configuration interrupt through
    /// `interrupt` (transports make their own; this is for running a device's queues
    /// outside a transport, in tests and fuzzers).
    pub fn new(
        flag: Arc<std::sync::atomic::AtomicBool>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        NeedsReset { flag, interrupt }
    }

    /// Reports the failure.
    pub fn report(&self) {
        if !self.flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                log::warn!(
                    "virtio: cannot signal DEVICE_NEEDS_RESET: {}",
                    ErrorChain(&e)
                );
            }
        }
    }
}

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivateError {
    /// The device needs a queue the driver did not enable.
    #[error("queue {0} is required but was not enabled")]
    MissingQueue(u16),
    /// A worker thread could not be started.
    #[error("cannot start the device's worker")]
    Worker(#[source] std::io::Error),
    /// A step particular to the device failed (opening a backend, say).
    #[error("cannot {step}")]
    Device {
        /// What the device was doing, as a verb phrase ("open the disk image").
        step: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One queue handed to the device at activation.
pub struct ActiveQueue {
    /// Its index.
    pub index: u16,
    /// The queue, configured and validated by the transport.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue (an ioeventfd, or written by the
    /// transport when a notification reaches it through an exit).
    pub notifier: Arc<EventFd>,
}

/// Everything a device needs to start working, given when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The features both sides agreed on.
    pub features: u64,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActiveQueue>,
    /// How to interrupt the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// How to report that the device needs a reset.
    pub needs_reset: NeedsReset,
}

/// A virtio device model, independent of the transport that carries it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`virtio_bindings::virtio_ids`: 1 net, 2 block, 5 balloon, ...).
    fn device_type(&self) -> u32;
    /// Features offered; [`VIRTIO_F_VERSION_1`] is added by the transport if missing.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The features the driver and device agreed on: called when the transport accepts
    /// FEATURES_OK, and with 0 at every reset. Devices whose configuration fields only
    /// exist with a feature (virtio-blk's `writeback` with CONFIG_WCE) gate writes on it.
    fn features_negotiated(&mut self, _features: u64) {}
    /// Writes device configuration space. Returns true when the device wants a
    /// configuration-change interrupt raised (the transport also bumps its generation).
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool;
    /// Starts the device. On error the transport sets DEVICE_NEEDS_RESET.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device: workers stop and queues are dropped. The transport resets its
    /// own state afterwards.
    fn reset(&mut self);
    /// Parks the device for a VM stop: when it returns, the requests the device had taken
    /// are complete and, until [`VirtioDevice::resume`], its threads neither write guest
    /// memory nor interrupt the driver (notifications that arrive meanwhile are served
    /// after). A device that does all its work in the calling thread has nothing to do.
    fn pause(&mut self);
    /// Lets a paused device go on.
    fn resume(&mut self);
}

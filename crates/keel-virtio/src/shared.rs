//! A device shared between its transport and the VMM: the transport drives it as it would
//! the device itself, and the VMM keeps a clone to pause it while the VM is stopped and
//! resume it after (QMP `stop` and `cont`).
//!
//! Where the device starts is the VMM's choice, through [`Activate`]: on the vCPU thread
//! whose register write set DRIVER_OK ([`Inline`]), or on a thread of the VMM's own, so that
//! what the device starts (its queue workers) inherits that thread's seccomp filter rather
//! than the vCPU's.
//!
//! ```
//! use keel_virtio::echo::Echo;
//! use keel_virtio::shared::SharedDevice;
//! use keel_virtio::testing::*;
//!
//! let shared = SharedDevice::new(Box::new(Echo::new()));
//! let d = MmioDriver::new(Box::new(shared.clone()));
//! let mem = d.mem().clone();
//! let mut ring = Ring::new(&mem, QUEUE_SIZE);
//! d.start(VERSION_1, &ring);
//! shared.pause();
//! let (_, out) = ring.request(b"hi", 1, 16, DATA_BASE);
//! d.notify(0);
//! settle();
//! assert_eq!(ring.used_idx(), 0, "a paused device serves nothing");
//! shared.resume();
//! ring.wait_used(1);
//! assert_eq!(read_bytes(&mem, out, 2), b"hi");
//! ```

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::device::{ActivateContext, ActivateError, VirtioDevice};

/// A device behind its lock, as [`SharedDevice`] holds it.
pub type Locked = Arc<Mutex<Box<dyn VirtioDevice>>>;

/// Where a [`SharedDevice`] starts its device.
pub trait Activate: Send + Sync {
    /// Calls `device`'s [`VirtioDevice::activate`] with `ctx` (lock it with [`lock`]) and
    /// returns what it returned.
    fn activate(&self, device: Locked, ctx: ActivateContext) -> Result<(), ActivateError>;
}

/// Starts the device on the calling thread (the one whose register write set DRIVER_OK).
#[derive(Clone, Copy, Debug, Default)]
pub struct Inline;

impl Activate for Inline {
    fn activate(&self, device: Locked, ctx: ActivateContext) -> Result<(), ActivateError> {
        lock(&device).activate(ctx)
    }
}

/// Locks a shared device; a lock poisoned by a panic elsewhere is taken over (the device's
/// own state stays consistent: every method leaves it so or panics before changing it).
pub fn lock(device: &Mutex<Box<dyn VirtioDevice>>) -> MutexGuard<'_, Box<dyn VirtioDevice>> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A device the transport and the VMM share; clones are handles on the same device.
#[derive(Clone)]
pub struct SharedDevice {
    device: Locked,
    /// The queue sizes, which never change (the trait hands out a reference).
    sizes: Vec<u16>,
    activator: Arc<dyn Activate>,
}

impl SharedDevice {
    /// Shares `device`, started on the thread that sets DRIVER_OK.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        SharedDevice::with_activator(device, Arc::new(Inline))
    }

    /// Shares `device`, which `activator` starts.
    pub fn with_activator(device: Box<dyn VirtioDevice>, activator: Arc<dyn Activate>) -> Self {
        SharedDevice {
            sizes: device.queue_max_sizes().to_vec(),
            device: Arc::new(Mutex::new(device)),
            activator,
        }
    }

    /// [`VirtioDevice::pause`]: returns once the device has parked.
    pub fn pause(&self) {
        lock(&self.device).pause()
    }

    /// [`VirtioDevice::resume`].
    pub fn resume(&self) {
        lock(&self.device).resume()
    }
}

impl VirtioDevice for SharedDevice {
    fn device_type(&self) -> u32 {
        lock(&self.device).device_type()
    }
    fn features(&self) -> u64 {
        lock(&self.device).features()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_config(offset, data)
    }
    // Every method is forwarded, those with a default body too: a default here would
    // silently drop what the transport tells the device.
    fn features_negotiated(&mut self, features: u64) {
        lock(&self.device).features_negotiated(features)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        lock(&self.device).write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activator.activate(self.device.clone(), ctx)
    }
    fn reset(&mut self) {
        lock(&self.device).reset()
    }
    fn pause(&mut self) {
        SharedDevice::pause(self)
    }
    fn resume(&mut self) {
        SharedDevice::resume(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A device that remembers the features it was told were negotiated.
    struct Negotiated(Arc<AtomicU64>);

    impl VirtioDevice for Negotiated {
        fn device_type(&self) -> u32 {
            0
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[3, 5]
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn features_negotiated(&mut self, features: u64) {
            self.0.store(features, Ordering::SeqCst);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
            false
        }
        fn activate(&mut self, _ctx: ActivateContext) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn pause(&mut self) {}
        fn resume(&mut self) {}
    }

    #[test]
    fn forwards_what_has_a_default_body_too() {
        let seen = Arc::new(AtomicU64::new(0));
        let mut shared = SharedDevice::new(Box::new(Negotiated(seen.clone())));
        assert_eq!(shared.queue_max_sizes(), &[3, 5]);
        shared.features_negotiated(0x1_0000_0800);
        assert_eq!(seen.load(Ordering::SeqCst), 0x1_0000_0800);
    }
}

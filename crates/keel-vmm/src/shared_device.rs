//! A virtio device shared between its transport and the VMM, so the VMM can park it while
//! the VM is stopped (QMP `stop`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_virtio::device::{ActivateContext, ActivateError, VirtioDevice};

/// The transport drives the device through this handle as through the device itself; the
/// VMM keeps a clone to pause and resume it.
#[derive(Clone)]
pub struct SharedDevice {
    device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    /// The queue sizes, which never change (the trait hands out a reference).
    sizes: Vec<u16>,
}

impl SharedDevice {
    /// Shares `device`.
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        SharedDevice {
            sizes: device.queue_max_sizes().to_vec(),
            device: Arc::new(Mutex::new(device)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn VirtioDevice>> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl VirtioDevice for SharedDevice {
    fn device_type(&self) -> u32 {
        self.lock().device_type()
    }
    fn features(&self) -> u64 {
        self.lock().features()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.lock().read_config(offset, data)
    }
    fn features_negotiated(&mut self, features: u64) {
        self.lock().features_negotiated(features)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        self.lock().write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.lock().activate(ctx)
    }
    fn reset(&mut self) {
        self.lock().reset()
    }
    fn pause(&mut self) {
        self.lock().pause()
    }
    fn resume(&mut self) {
        self.lock().resume()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_virtio::echo::Echo;

    #[test]
    fn forwards_to_the_device() {
        let echo = Echo::new();
        let (ty, sizes) = (echo.device_type(), echo.queue_max_sizes().to_vec());
        let mut shared = SharedDevice::new(Box::new(echo));
        let mut handle = shared.clone();
        assert_eq!(shared.device_type(), ty);
        assert_eq!(shared.queue_max_sizes(), &sizes[..]);
        // Pausing a device that is not running returns at once.
        handle.pause();
        handle.resume();
        shared.reset();
    }
}

//! A virtio device shared between its transport and the VMM, so the VMM can park it while
//! the VM is stopped (QMP `stop`), and started on the device thread ([`Activator`]).

use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};

use keel_virtio::device::{ActivateContext, ActivateError, VirtioDevice};

use crate::seccomp::{self, Filters, ThreadKind};

type Job = Box<dyn FnOnce() + Send>;

/// Starts devices on a thread of its own (`keel-devices`, under the device threads'
/// seccomp filter) for the vCPU whose register write asked: the threads a device starts
/// (queue workers, I/O threads, timers) inherit the device filter, not the vCPU's.
pub struct Activator {
    jobs: mpsc::Sender<Job>,
}

impl Activator {
    /// Starts the thread; it ends when the last handle is dropped.
    pub fn start(filters: &Arc<Filters>) -> Result<Arc<Activator>, seccomp::Error> {
        let (jobs, rx) = mpsc::channel::<Job>();
        filters.spawn(ThreadKind::Device, "keel-devices".into(), move || {
            for job in rx {
                job();
            }
        })?;
        Ok(Arc::new(Activator { jobs }))
    }

    /// Runs `f` on the thread and returns its result, or `None` if the thread is gone.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .ok()?;
        rx.recv().ok()
    }
}

/// The transport drives the device through this handle as through the device itself; the
/// VMM keeps a clone to pause and resume it.
#[derive(Clone)]
pub struct SharedDevice {
    device: Arc<Mutex<Box<dyn VirtioDevice>>>,
    /// The queue sizes, which never change (the trait hands out a reference).
    sizes: Vec<u16>,
    activator: Arc<Activator>,
}

impl SharedDevice {
    /// Shares `device`, which `activator` starts.
    pub fn new(device: Box<dyn VirtioDevice>, activator: Arc<Activator>) -> Self {
        SharedDevice {
            sizes: device.queue_max_sizes().to_vec(),
            device: Arc::new(Mutex::new(device)),
            activator,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn VirtioDevice>> {
        lock(&self.device)
    }
}

fn lock(device: &Mutex<Box<dyn VirtioDevice>>) -> MutexGuard<'_, Box<dyn VirtioDevice>> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
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
    // Every method is forwarded, those with a default body too: a default here would
    // silently drop what the transport tells the device.
    fn features_negotiated(&mut self, features: u64) {
        self.lock().features_negotiated(features)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        self.lock().write_config(offset, data)
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let device = self.device.clone();
        self.activator
            .run(move || lock(&device).activate(ctx))
            .unwrap_or_else(|| {
                Err(ActivateError::Worker(std::io::Error::other(
                    "the device thread is gone",
                )))
            })
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
    use crate::seccomp::{SeccompMode, SeccompOptions};
    use keel_virtio::echo::Echo;

    /// An activator whose thread is not filtered (a filter would stay on the test's
    /// thread pool for good).
    fn activator() -> Arc<Activator> {
        let filters = Filters::new(SeccompOptions {
            mode: SeccompMode::Off,
            selftest: None,
        })
        .unwrap();
        Activator::start(&filters).unwrap()
    }

    #[test]
    fn forwards_to_the_device() {
        let echo = Echo::new();
        let (ty, sizes) = (echo.device_type(), echo.queue_max_sizes().to_vec());
        let mut shared = SharedDevice::new(Box::new(echo), activator());
        let mut handle = shared.clone();
        assert_eq!(shared.device_type(), ty);
        assert_eq!(shared.queue_max_sizes(), &sizes[..]);
        // Pausing a device that is not running returns at once.
        handle.pause();
        handle.resume();
        shared.reset();
    }

    /// A device that remembers the features it was told were negotiated.
    struct Negotiated(std::sync::Arc<std::sync::atomic::AtomicU64>);

    impl VirtioDevice for Negotiated {
        fn device_type(&self) -> u32 {
            0
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[]
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn features_negotiated(&mut self, features: u64) {
            self.0.store(features, std::sync::atomic::Ordering::SeqCst);
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
    fn forwards_the_negotiated_features() {
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut shared = SharedDevice::new(Box::new(Negotiated(seen.clone())), activator());
        shared.features_negotiated(0x1_0000_0800);
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            0x1_0000_0800
        );
    }
}

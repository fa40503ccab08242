//! Where keel starts its virtio devices ([`Activator`]): on a thread of its own under the
//! device threads' seccomp filter. The devices are keel-virtio's [`SharedDevice`]s, which
//! the VMM parks while the VM is stopped (QMP `stop`).

use std::sync::{mpsc, Arc};

use keel_virtio::device::{ActivateContext, ActivateError, VirtioDevice};
pub use keel_virtio::shared::SharedDevice;
use keel_virtio::shared::{lock, Activate, Locked};

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

impl Activate for Activator {
    fn activate(&self, device: Locked, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.run(move || lock(&device).activate(ctx))
            .unwrap_or_else(|| {
                Err(ActivateError::Worker(std::io::Error::other(
                    "the device thread is gone",
                )))
            })
    }
}

/// `device`, shared between its transport and the VMM (which keeps a clone to pause and
/// resume it), started on `activator`'s thread.
pub fn share(device: Box<dyn VirtioDevice>, activator: &Arc<Activator>) -> SharedDevice {
    SharedDevice::with_activator(device, activator.clone())
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
    fn pauses_and_resumes_through_a_clone() {
        let shared = share(Box::new(Echo::new()), &activator());
        let handle = shared.clone();
        assert_eq!(shared.queue_max_sizes(), Echo::new().queue_max_sizes());
        // Pausing a device that is not running returns at once.
        handle.pause();
        handle.resume();
    }

    /// A device that records the name of the thread that started it.
    struct WhereStarted(Arc<std::sync::Mutex<Option<String>>>);

    impl VirtioDevice for WhereStarted {
        fn device_type(&self) -> u32 {
            0x3f
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
            false
        }
        fn activate(&mut self, _ctx: ActivateContext) -> Result<(), ActivateError> {
            *self.0.lock().unwrap() = std::thread::current().name().map(str::to_owned);
            Ok(())
        }
        fn reset(&mut self) {}
        fn pause(&mut self) {}
        fn resume(&mut self) {}
    }

    /// DRIVER_OK, written on the test's thread (a vCPU's, in keel), starts the device on
    /// `keel-devices`, whose filter what the device starts inherits.
    #[test]
    fn the_device_starts_on_the_device_thread() {
        use keel_virtio::testing::{Driver, MmioDriver, Ring, VERSION_1};
        let started = Arc::new(std::sync::Mutex::new(None));
        let d = MmioDriver::new(Box::new(share(
            Box::new(WhereStarted(started.clone())),
            &activator(),
        )));
        let mem = d.mem().clone();
        let ring = Ring::new(&mem, 16);
        d.start(VERSION_1, &ring);
        assert_eq!(started.lock().unwrap().as_deref(), Some("keel-devices"));
    }
}

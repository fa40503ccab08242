//! Dataplane plumbing: a worker thread per device woken by queue notifications, and the
//! loop that drains a queue with notification suppression.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use keel_memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use vm_memory::{Bytes, GuestAddress};

/// A thread that calls `handle(queue_index)` whenever one of its queues is notified, once
/// for every queue at start (kicks may predate it), until stopped.
pub struct QueueWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

const STOP_TOKEN: u64 = u64::MAX;

impl QueueWorker {
    /// Starts the thread.
    pub fn spawn<F>(name: &str, queues: Vec<(u16, Arc<EventFd>)>, mut handle: F) -> io::Result<Self>
    where
        F: FnMut(u16) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, fd) in &queues {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, u64::from(*i)),
            )?;
        }
        let stop_fd = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for (i, _) in &queues {
                    handle(*i);
                }
                let mut events = vec![EpollEvent::default(); queues.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio worker: epoll failed: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        let token = ev.data();
                        if token == STOP_TOKEN {
                            let _ = stop_fd.read();
                            return;
                        }
                        let index = token as u16;
                        if let Some((_, fd)) = queues.iter().find(|(i, _)| *i == index) {
                            let _ = fd.read();
                        }
                        handle(index);
                    }
                }
            })?;
        Ok(QueueWorker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            if t.join().is_err() {
                log::error!("virtio worker panicked");
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why draining a queue stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The ring itself is broken (an available index beyond the queue size, rings
    /// outside guest memory): the device needs a reset.
    #[error("the virtqueue is broken")]
    Broken(#[source] virtio_queue::Error),
}

/// Handles every available chain with `f` (which returns the number of bytes it wrote to
/// the chain's writable part), adding each to the used ring. Driver notifications are
/// disabled while draining and re-enabled at the end, then the ring is checked once more,
/// as virtio 1.2 section 2.7.10 requires to avoid losing a kick. Returns whether the
/// driver should be interrupted: something was used and the driver asked for it (its
/// used_event with EVENT_IDX, else the absence of VRING_AVAIL_F_NO_INTERRUPT).
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut f: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    loop {
        queue
            .disable_notification(mem)
            .map_err(QueueError::Broken)?;
        loop {
            // `iter` validates the available index; a driver that claims more entries than
            // the queue holds has broken the ring.
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(QueueError::Broken(e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = f(chain);
            queue.add_used(mem, head, len).map_err(QueueError::Broken)?;
            used_any = true;
        }
        if !queue.enable_notification(mem).map_err(QueueError::Broken)? {
            break;
        }
    }
    if !used_any {
        return Ok(false);
    }
    should_interrupt(queue, mem)
}

/// After adding used buffers: whether the driver asked to be interrupted (its used_event
/// with EVENT_IDX, else the absence of VRING_AVAIL_F_NO_INTERRUPT). With EVENT_IDX, call
/// it once per batch: it also resets virtio-queue's count of buffers added since.
pub fn should_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).map_err(QueueError::Broken);
    }
    // virtio-queue leaves VRING_AVAIL_F_NO_INTERRUPT to the device (virtio 1.2 2.7.7.2):
    // read the driver's flags after the used entries are visible.
    fence(Ordering::SeqCst);
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_err(|e| QueueError::Broken(virtio_queue::Error::GuestMemory(e)))?;
    Ok(u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

//! Dataplane plumbing: a worker thread per device woken by queue notifications, and the
//! loop that drains a queue with notification suppression.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use keel_memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::device::VIRTIO_RING_F_INDIRECT_DESC;

/// Parks a device's worker threads while the VM is stopped: the controller closes the gate
/// (and wakes the workers), each worker finishes what it has in flight and parks, and the
/// controller's wait returns once every worker has parked or ended. Opening the gate lets
/// them go on.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use keel_virtio::worker::PauseGate;
///
/// let gate = Arc::new(PauseGate::default());
/// let g = gate.clone();
/// gate.close();
/// let worker = std::thread::spawn(move || {
///     let _leave = g.member(); // counts this worker as gone when it ends
///     if g.is_closed() {
///         g.park(); // returns once the gate opens
///     }
/// });
/// gate.wait_parked(1);
/// gate.open();
/// worker.join().unwrap();
/// ```
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    parked: usize,
    gone: usize,
}

/// Counts its worker as gone when dropped (the worker's thread ended).
pub struct GateMember<'a>(&'a PauseGate);

impl Drop for GateMember<'_> {
    fn drop(&mut self) {
        self.0.lock().gone += 1;
        self.0.changed.notify_all();
    }
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Worker side, at the start of the thread: the guard counts the worker as gone when
    /// the thread ends, so a controller never waits for a worker that is not there.
    pub fn member(&self) -> GateMember<'_> {
        GateMember(self)
    }

    /// Worker side: whether the worker should finish what it has in flight and park.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Worker side: parks until the gate opens (at once if it is open).
    pub fn park(&self) {
        let mut st = self.lock();
        if !st.closed {
            return;
        }
        st.parked += 1;
        self.changed.notify_all();
        while st.closed {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        st.parked -= 1;
    }

    /// Controller side: asks the workers to park (wake them afterwards).
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Controller side: waits until `workers` workers have parked or ended since they
    /// started.
    pub fn wait_parked(&self, workers: usize) {
        let mut st = self.lock();
        while st.closed && st.parked + st.gone < workers {
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Controller side, the whole pause: closes the gate, wakes each of `workers` with
    /// `wake` (so that one asleep in its poll set looks at the gate), and waits until all
    /// of them have parked or ended.
    pub fn pause<W>(&self, workers: &[W], wake: impl Fn(&W)) {
        self.close();
        workers.iter().for_each(wake);
        self.wait_parked(workers.len());
    }

    /// Controller side: lets parked workers go on.
    pub fn open(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }
}

/// A thread that calls `handle(queue_index)` whenever one of its queues is notified, once
/// for every queue at start (kicks may predate it), until stopped. `handle` returns
/// whether the queue has more to do right away (a [`Drained::more`]): the thread then
/// notifies the queue itself, so it comes back to it after looking at stop and pause
/// requests. It can be paused between calls ([`QueueWorker::pause`]).
pub struct QueueWorker {
    stop: EventFd,
    wake: EventFd,
    gate: Arc<PauseGate>,
    thread: Option<JoinHandle<()>>,
}

const STOP_TOKEN: u64 = u64::MAX;
const WAKE_TOKEN: u64 = u64::MAX - 1;

impl QueueWorker {
    /// Starts the thread.
    pub fn spawn<F>(name: &str, queues: Vec<(u16, Arc<EventFd>)>, mut handle: F) -> io::Result<Self>
    where
        F: FnMut(u16) -> bool + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        let gate = Arc::new(PauseGate::default());
        let (g, wake_fd) = (gate.clone(), wake.try_clone()?);
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
                let _member = g.member();
                // A queue with more to do is notified again: it comes back through the
                // poll set, after a stop or a pause that is pending.
                let again = |index: u16| {
                    if let Some((_, fd)) = queues.iter().find(|(i, _)| *i == index) {
                        if let Err(e) = fd.write(1) {
                            log::error!("virtio worker: notifying queue {index}: {e}");
                        }
                    }
                };
                for (i, _) in &queues {
                    if handle(*i) {
                        again(*i);
                    }
                }
                let mut events = vec![EpollEvent::default(); queues.len() + 2];
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
                        if token == WAKE_TOKEN {
                            // Between calls of `handle`: nothing is in flight.
                            let _ = wake_fd.read();
                            g.park();
                            continue;
                        }
                        let index = token as u16;
                        if let Some((_, fd)) = queues.iter().find(|(i, _)| *i == index) {
                            let _ = fd.read();
                        }
                        if handle(index) {
                            again(index);
                        }
                    }
                }
            })?;
        Ok(QueueWorker {
            stop,
            wake,
            gate,
            thread: Some(thread),
        })
    }

    /// Parks the thread between two calls of `handle` and waits until it has (kicks that
    /// arrive meanwhile are handled after [`QueueWorker::resume`]).
    pub fn pause(&self) {
        if self.thread.is_none() {
            return;
        }
        self.gate.close();
        let _ = self.wake.write(1);
        self.gate.wait_parked(1);
    }

    /// Lets a paused thread go on.
    pub fn resume(&self) {
        self.gate.open();
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.gate.open();
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
    /// The driver made a chain that goes through an indirect descriptor table without
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated (virtio 1.2 2.7.5.3.1): the chain was taken
    /// off the ring, not followed and not used; the device needs a reset.
    #[error("chain {head} uses an indirect table, and INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated {
        /// The chain's head descriptor.
        head: u16,
    },
}

/// Whether the driver may put chains in indirect descriptor tables: whether
/// [`VIRTIO_RING_F_INDIRECT_DESC`] was negotiated. virtio-queue follows indirect tables
/// whatever was negotiated; [`IndirectDesc::refuses`] tells a device's worker which chains
/// it must not follow.
///
/// # Examples
///
/// ```
/// use keel_virtio::worker::IndirectDesc;
/// use keel_virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC};
///
/// let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;
/// assert_eq!(IndirectDesc::from_features(features), IndirectDesc::Negotiated);
/// assert_eq!(IndirectDesc::from_features(VIRTIO_F_VERSION_1), IndirectDesc::NotNegotiated);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndirectDesc {
    /// Negotiated: chains may use indirect tables.
    Negotiated,
    /// Not negotiated: a chain that uses one is a driver error.
    NotNegotiated,
}

impl IndirectDesc {
    /// From the features both sides agreed on.
    pub fn from_features(features: u64) -> Self {
        if features & VIRTIO_RING_F_INDIRECT_DESC != 0 {
            IndirectDesc::Negotiated
        } else {
            IndirectDesc::NotNegotiated
        }
    }

    /// Whether the chain whose head is `head` must be refused: indirect tables are not
    /// negotiated and one of the chain's descriptors in `queue`'s descriptor table has
    /// VIRTQ_DESC_F_INDIRECT. (A descriptor that cannot be read is left to the chain's
    /// own iteration, which fails on it.)
    pub fn refuses<M: GuestMemory + ?Sized>(self, queue: &Queue, mem: &M, head: u16) -> bool {
        self == IndirectDesc::NotNegotiated && uses_indirect(queue, mem, head)
    }
}

/// Whether the chain at `head` of `queue` goes through an indirect table: walks its
/// descriptors in the queue's own table (at most the queue's size of them).
fn uses_indirect<M: GuestMemory + ?Sized>(queue: &Queue, mem: &M, head: u16) -> bool {
    let size = queue.size();
    let table = GuestAddress(queue.desc_table());
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let at = table.checked_add(u64::from(index) * std::mem::size_of::<Descriptor>() as u64);
        let Some(desc) = at.and_then(|at| mem.read_obj::<Descriptor>(at).ok()) else {
            return false;
        };
        if u32::from(desc.flags()) & VRING_DESC_F_INDIRECT != 0 {
            return true;
        }
        if !desc.has_next() {
            return false;
        }
        index = desc.next();
    }
    false
}

/// What one call of [`drain_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Something was used and the driver asked to be interrupted (its used_event with
    /// EVENT_IDX, else the absence of VRING_AVAIL_F_NO_INTERRUPT): interrupt it.
    pub interrupt: bool,
    /// The call stopped at its budget, the queue's size in chains, with chains still
    /// available: a driver that makes chains available as fast as the device uses them
    /// would otherwise keep one call going for ever, and the thread would never see a stop
    /// or pause request. Driver notifications are still off: call again soon (after
    /// looking at those requests) rather than waiting for a kick.
    pub more: bool,
}

/// Handles the available chains with `f` (which returns the number of bytes it wrote to
/// the chain's writable part), adding each to the used ring, at most the queue's size of
/// them per call (see [`Drained::more`]). A chain that uses an indirect table when
/// `indirect` says they were not negotiated is not handed to `f`: draining stops with
/// [`QueueError::IndirectNotNegotiated`]. Driver notifications are disabled while
/// draining and re-enabled at the end, then the ring is checked once more, as virtio 1.2
/// section 2.7.10 requires to avoid losing a kick.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    indirect: IndirectDesc,
    mut f: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Result<Drained, QueueError> {
    let budget = queue.size();
    let mut taken = 0u16;
    let mut used_any = false;
    let more = 'drain: loop {
        queue
            .disable_notification(mem)
            .map_err(QueueError::Broken)?;
        loop {
            if taken == budget {
                if has_more(queue, mem)? {
                    break 'drain true;
                }
                // Nothing more: the usual end, notifications back on and one more look.
                break;
            }
            // `iter` validates the available index; a driver that claims more entries than
            // the queue holds has broken the ring.
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(QueueError::Broken(e)),
            };
            let Some(chain) = chain else { break };
            taken += 1;
            let head = chain.head_index();
            if indirect.refuses(queue, mem, head) {
                return Err(QueueError::IndirectNotNegotiated { head });
            }
            let len = f(chain);
            queue.add_used(mem, head, len).map_err(QueueError::Broken)?;
            used_any = true;
        }
        if !queue.enable_notification(mem).map_err(QueueError::Broken)? {
            break false;
        }
    };
    let interrupt = used_any && should_interrupt(queue, mem)?;
    Ok(Drained { interrupt, more })
}

/// Whether the driver has made chains available that the device has not taken yet.
pub fn has_more(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueError::Broken)?;
    Ok(avail.0 != queue.next_avail())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_paused_worker_handles_nothing_until_resumed() {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let mut w = QueueWorker::spawn("test", vec![(0, kick.clone())], move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            false
        })
        .unwrap();
        wait_until("the first call", || calls.load(Ordering::SeqCst) == 1);
        w.pause();
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "handled while paused");
        w.resume();
        wait_until("the kick after resume", || {
            calls.load(Ordering::SeqCst) == 2
        });
        // Paused again, it still stops promptly.
        w.pause();
        w.stop();
    }
}

//! One worker thread per queue: takes chains off the available ring, parses them, runs
//! them on the queue's own asynchronous I/O engine, and completes them (status byte, used
//! ring, interrupt) in whatever order the engine finishes them.
//!
//! While requests are in flight the worker keeps driver notifications off and polls the
//! available ring after each completion; when idle it turns them on, re-checks the ring
//! (so no kick is lost) and sleeps on the queue's notifier. Data moves straight between
//! the disk and guest memory: a request's data ranges become engine requests of at most
//! [`PIECE_BYTES`] that own them, together with a handle on guest memory
//! ([`crate::DataBuf`]); write-zeroes ranges are cut the same way. A queue has at most
//! [`BUDGET_BYTES`] on the host at once; the rest waits in the worker. On stop (device
//! reset) the worker waits for what is in flight on the host before it exits, so nothing
//! lands in guest memory afterwards, and drops what had not started; on pause it waits
//! for the same and keeps the rest for when the VM runs again. Either way the wait is for
//! the budget's worth of I/O at most, whatever size of requests the driver chose.
//!
//! A throttled queue charges each request once it has passed validation, and only if the
//! throttle admits it; otherwise the worker holds it and arms a timer in its poll set (with
//! the queue's notifier and the stop event), never sleeping outside that poll: a stop or
//! reset ends the wait at once.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keel_block::aio::{AioQueue, AioRequest, Completion};
use keel_block::buf::GuestBuf;
use keel_block::iov::{GuestRange, Iov};
use keel_block::throttle::Throttle;
use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{InterruptKind, NeedsReset, VirtioInterrupt};
use keel_virtio::worker::{should_interrupt, IndirectDesc};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{DataBuf, EngineFactory, GuestMemoryAccess};
use crate::errors::{IoError, IoOp, Reporter};
use crate::request::{self, Limits, Op, Request, Status, ID_BYTES};
use crate::stats::{Kind, Stats};
use keel_virtio::affinity::CpuSet;
use keel_virtio::worker::PauseGate;

/// Everything a queue's worker needs.
pub(crate) struct QueueContext {
    pub index: u16,
    pub queue: Queue,
    pub kick: Arc<EventFd>,
    /// Shared with the requests in flight, which keep it alive until they complete.
    pub mem: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub needs_reset: NeedsReset,
    pub limits: Limits,
    pub id: [u8; ID_BYTES],
    pub engine: Arc<EngineFactory>,
    /// How the engine reaches guest memory.
    pub memory_access: GuestMemoryAccess,
    pub writeback: Arc<AtomicBool>,
    pub throttle: Option<Arc<Mutex<Throttle>>>,
    /// The device's I/O totals.
    pub stats: Arc<Stats>,
    /// The capacity in sectors when the host can change it (`limits.capacity` follows).
    pub capacity: Option<Arc<AtomicU64>>,
    /// Where the worker parks while the VM is stopped.
    pub gate: Option<Arc<PauseGate>>,
    /// How long to keep watching the ring after the last activity, in microseconds.
    pub poll_us: u32,
    /// The host CPUs the worker thread may run on.
    pub affinity: Option<CpuSet>,
    /// Where requests the host failed are reported.
    pub errors: Arc<Reporter>,
    /// Whether chains may use indirect tables (INDIRECT_DESC negotiated).
    pub indirect: IndirectDesc,
}

/// The most bytes one engine request of a read, write or write-zeroes covers: a
/// request's data goes to the host in pieces of this size.
pub const PIECE_BYTES: usize = 1 << 20;

/// The bytes a queue has on the host at once: pieces are handed out while less than
/// this is in flight (so at most this and one piece). What a reset or a pause waits for
/// is bounded by it, not by the requests the driver makes: without it, a queue's worth of
/// requests of up to `seg_max` segments of `size_max` each (the disk's size, segments
/// aliasing the same guest pages), or of write-zeroes ranges of 2 GiB, could keep a
/// reset waiting for hours.
pub const BUDGET_BYTES: u64 = 16 << 20;

/// Work of a request not yet handed to the engine, in order.
struct Backlog {
    slot: usize,
    /// Where the next piece goes on the disk.
    offset: u64,
    work: Work,
}

/// What a [`Backlog`] entry still has to do.
enum Work {
    /// A read or write: the guest ranges not yet handed out.
    Transfer { write: bool, data: Iov<GuestRange> },
    /// A write-zeroes range: the bytes left. A backend without a cheap way to zero (no
    /// `FALLOC_FL_ZERO_RANGE`) writes them, so they count against the budget too.
    Zeroes { len: u64, unmap: bool },
}

impl Backlog {
    /// The entry's next piece, of at most [`PIECE_BYTES`], and its bytes; the entry moves
    /// past it.
    fn next_piece(&mut self, mem: &Arc<GuestMemoryMmap>) -> (AioRequest<DataBuf>, u64) {
        let (req, bytes) = match &mut self.work {
            Work::Transfer { write, data } => {
                let (piece, rest) = std::mem::take(data).split_at(PIECE_BYTES);
                *data = rest;
                let bytes = piece.len() as u32;
                // The piece owns its ranges and a handle on guest memory until it
                // completes.
                let buf = GuestBuf::new(mem.clone(), piece);
                let tag = Tag {
                    slot: self.slot,
                    bytes,
                }
                .encode();
                let req = if *write {
                    AioRequest::write(self.offset, buf, tag)
                } else {
                    AioRequest::read(self.offset, buf, tag)
                };
                (req, u64::from(bytes))
            }
            Work::Zeroes { len, unmap } => {
                let bytes = (*len).min(PIECE_BYTES as u64);
                *len -= bytes;
                let tag = Tag {
                    slot: self.slot,
                    bytes: bytes as u32,
                }
                .encode();
                (
                    AioRequest::write_zeroes(self.offset, bytes, *unmap, tag),
                    bytes,
                )
            }
        };
        self.offset += bytes;
        (req, bytes)
    }

    /// Whether every piece has been handed out.
    fn is_done(&self) -> bool {
        match &self.work {
            Work::Transfer { data, .. } => data.is_empty(),
            Work::Zeroes { len, .. } => *len == 0,
        }
    }
}

/// An engine request's `user_data`: the request's slot, and the data bytes it moves
/// (counted against [`BUDGET_BYTES`] until it completes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    slot: usize,
    bytes: u32,
}

impl Tag {
    fn encode(self) -> u64 {
        (self.slot as u64 & 0xffff_ffff) | (u64::from(self.bytes) << 32)
    }

    fn decode(user_data: u64) -> Tag {
        Tag {
            slot: (user_data & 0xffff_ffff) as usize,
            bytes: (user_data >> 32) as u32,
        }
    }
}

/// A running queue worker.
pub(crate) struct Worker {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn spawn(ctx: QueueContext) -> std::io::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (s, w) = (stop.clone(), wake.try_clone()?);
        let thread = std::thread::Builder::new()
            .name(format!("keel-blk-q{}", ctx.index))
            .spawn(move || {
                let index = ctx.index;
                if let Some(Err(e)) = ctx.affinity.map(|a| a.apply()) {
                    log::warn!("virtio-blk queue {index}: {}", Chain(&e));
                }
                let gate = ctx.gate.clone();
                let _member = gate.as_deref().map(PauseGate::member);
                if let Err(e) = run(ctx, &s, &w) {
                    log::warn!("virtio-blk queue {index}: {}", Chain(&e));
                }
            })?;
        Ok(Worker {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Wakes the worker (to look at its gate).
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Stops the worker and waits for it (and its requests in flight).
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = self.wake.write(1);
            if t.join().is_err() {
                log::error!("virtio-blk: a queue worker panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a worker stopped early.
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("starting its I/O engine")]
    Engine(#[source] keel_block::Error),
    #[error("waiting on epoll")]
    Epoll(#[source] std::io::Error),
    #[error("creating the throttle timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error("waiting for the I/O engine")]
    Wait(#[source] keel_block::Error),
}

/// An error and its causes, for a log line: `step: cause: cause's cause`.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// A request in flight.
struct InFlight {
    head: u16,
    status_addr: GuestAddress,
    /// Bytes the device writes into the chain on success (data plus status).
    used_len: u32,
    /// Engine requests not yet completed.
    pending: usize,
    status: Status,
    /// A write that still needs a flush before it completes (write cache off).
    flush_after: bool,
    /// What the request counts as in the device's totals (None: not counted), its bytes,
    /// and when the device took it.
    account: Option<(Kind, u64, Instant)>,
    /// What the guest asked for, and the errno of the first engine request that failed
    /// on the host (reported to the device's owner).
    op: IoOp,
    host_errno: Option<i32>,
}

struct Slots {
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
}

impl Slots {
    fn live(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn insert(&mut self, f: InFlight) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(f);
                i
            }
            None => {
                self.slots.push(Some(f));
                self.slots.len() - 1
            }
        }
    }
    fn take(&mut self, i: usize) -> Option<InFlight> {
        let f = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        Some(f)
    }
}

struct State {
    ctx: QueueContext,
    aio: Box<dyn AioQueue<DataBuf>>,
    slots: Slots,
    /// Used buffers added since the last interrupt decision.
    used: bool,
    broken: bool,
    /// A valid request the throttle holds back (its head and itself).
    held: Option<(u16, Request)>,
    /// Fires when the held request may start; in the worker's poll set. `None` for
    /// [`SyncServer`], which serves unthrottled queues only.
    timer: Option<TimerFd>,
    /// Work not yet handed to the engine, served round robin.
    backlog: VecDeque<Backlog>,
    /// Data bytes of the engine requests in flight.
    bytes_in_flight: u64,
}

/// Serves one queue on the calling thread: for tests and fuzzers that want determinism
/// (with a synchronous [`crate::Disk`]). Devices use a worker thread per queue instead.
#[cfg(feature = "test-utils")]
pub struct SyncServer {
    state: State,
}

#[cfg(feature = "test-utils")]
impl SyncServer {
    /// A server for `queue` (already configured and validated) over `disk`, with the
    /// device limits `Block` would use for it.
    pub fn new(
        queue: Queue,
        mem: GuestMemoryMmap,
        disk: &crate::Disk,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: NeedsReset,
    ) -> keel_block::Result<SyncServer> {
        let limits = crate::device::limits_for(disk, queue.max_size());
        let mem = Arc::new(mem);
        Ok(SyncServer {
            state: State {
                aio: (disk.engine)(&mem, disk.memory)?,
                ctx: QueueContext {
                    index: 0,
                    queue,
                    kick: Arc::new(
                        EventFd::new(libc::EFD_NONBLOCK)
                            .map_err(|e| keel_block::Error::io("creating an eventfd", e))?,
                    ),
                    mem,
                    interrupt,
                    needs_reset,
                    limits,
                    id: disk.id,
                    engine: disk.engine.clone(),
                    memory_access: disk.memory,
                    writeback: Arc::new(AtomicBool::new(true)),
                    throttle: None,
                    stats: Arc::new(Stats::default()),
                    capacity: None,
                    gate: None,
                    poll_us: 0,
                    affinity: None,
                    errors: Arc::default(),
                    // Callers configure the queue as they please, indirect tables included.
                    indirect: IndirectDesc::Negotiated,
                },
                slots: Slots {
                    slots: Vec::new(),
                    free: Vec::new(),
                },
                used: false,
                broken: false,
                held: None,
                timer: None,
                backlog: VecDeque::new(),
                bytes_in_flight: 0,
            },
        })
    }

    /// Serves every available request and waits for all of them to complete.
    pub fn run_until_idle(&mut self) -> keel_block::Result<()> {
        let st = &mut self.state;
        let mut done = Vec::new();
        loop {
            let taken = if st.broken { 0 } else { st.take_requests(true) };
            st.signal();
            if st.aio.in_flight() == 0 {
                if taken == 0 {
                    return Ok(());
                }
                continue;
            }
            done.clear();
            st.aio.wait(1, &mut done)?;
            for c in done.drain(..) {
                st.complete(c);
            }
            st.feed();
        }
    }

    /// The queue (to inspect its indices).
    pub fn queue(&self) -> &Queue {
        &self.state.ctx.queue
    }
}

const KICK: u64 = 0;
const WAKE: u64 = 1;
const TIMER: u64 = 2;

fn run(ctx: QueueContext, stop: &AtomicBool, wake: &EventFd) -> Result<(), WorkerError> {
    let aio = match (ctx.engine)(&ctx.mem, ctx.memory_access) {
        Ok(a) => a,
        Err(e) => {
            ctx.needs_reset.report();
            return Err(WorkerError::Engine(e));
        }
    };
    let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
    for (fd, token) in [(ctx.kick.as_raw_fd(), KICK), (wake.as_raw_fd(), WAKE)] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(WorkerError::Epoll)?;
    }
    let timer = TimerFd::new().map_err(WorkerError::Timer)?;
    epoll
        .ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )
        .map_err(WorkerError::Epoll)?;
    let mut st = State {
        ctx,
        aio,
        slots: Slots {
            slots: Vec::new(),
            free: Vec::new(),
        },
        used: false,
        broken: false,
        held: None,
        timer: Some(timer),
        backlog: VecDeque::new(),
        bytes_in_flight: 0,
    };
    let mut events = [EpollEvent::default(); 3];
    let mut done = Vec::new();
    let poll = std::time::Duration::from_micros(u64::from(st.ctx.poll_us));
    let mut last_active = Instant::now();
    let result = 'serve: loop {
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        if let Some(gate) = st.ctx.gate.clone().filter(|g| g.is_closed()) {
            // The VM is stopping: finish what is in flight on the host (the backlog
            // waits), publish it, then park.
            while st.aio.in_flight() > 0 {
                done.clear();
                if let Err(e) = st.aio.wait(1, &mut done) {
                    break 'serve Err(WorkerError::Wait(e));
                }
                for c in done.drain(..) {
                    st.complete(c);
                }
            }
            st.signal();
            gate.park();
            last_active = Instant::now();
            continue;
        }
        if !st.broken {
            st.take_requests(false);
        }
        // After a pause, what was waiting goes on.
        st.feed();
        st.signal();
        if st.aio.in_flight() > 0 {
            // Within the polling window, reap completions without sleeping (a wait for
            // none submits what is queued and returns what is done); past it, sleep until
            // one arrives.
            // With many requests in flight completions come anyway: sleep, and leave the
            // CPU to the kernel's completion work.
            let min = usize::from(
                poll.is_zero() || st.aio.in_flight() > 4 || last_active.elapsed() >= poll,
            );
            done.clear();
            if let Err(e) = st.aio.wait(min, &mut done) {
                break Err(WorkerError::Wait(e));
            }
            if !done.is_empty() {
                for c in done.drain(..) {
                    st.complete(c);
                }
                st.feed();
                st.signal();
                last_active = Instant::now();
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        // Idle (or waiting for the throttle: then for its timer, a stop or a reset, with
        // driver notifications off). For a short while after the last activity, watch
        // the ring with notifications still off: a driver that submits its next request
        // at once does not have to kick (a VM exit) and the worker does not have to wake
        // up.
        if st.held.is_none() {
            if !st.broken && !poll.is_zero() && st.poll_avail(last_active + poll, stop) {
                continue;
            }
            // Notifications back on, one more look, then sleep.
            if !st.broken && st.take_requests(true) > 0 {
                st.signal();
                last_active = Instant::now();
                continue;
            }
        }
        match epoll.wait(-1, &mut events) {
            Ok(n) => {
                for ev in &events[..n] {
                    match ev.data() {
                        KICK => {
                            let _ = st.ctx.kick.read();
                        }
                        TIMER => {
                            if let Some(t) = st.timer.as_mut() {
                                // Readable: this read does not block.
                                let _ = t.wait();
                            }
                        }
                        _ => {
                            let _ = wake.read();
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(WorkerError::Epoll(e)),
        }
        last_active = Instant::now();
    };
    // Whatever is in flight finishes before the guest memory may be reused.
    let mut sink = Vec::new();
    while st.aio.in_flight() > 0 {
        sink.clear();
        if st.aio.wait(usize::MAX, &mut sink).is_err() {
            break;
        }
    }
    result
}

impl State {
    /// Starts the available requests, at most the queue's size of chains (a driver that
    /// makes requests available as fast as they fail validation, which takes no slot,
    /// would otherwise keep this call going and the worker from seeing a stop); returns
    /// how many chains it took. With `idle` the worker is about to sleep: driver
    /// notifications go back on, and the ring is checked once more afterwards.
    fn take_requests(&mut self, idle: bool) -> usize {
        let mem = self.ctx.mem.clone();
        let budget = usize::from(self.ctx.queue.size());
        let mut taken = 0;
        loop {
            if let Err(e) = self.ctx.queue.disable_notification(&*mem) {
                self.broken(&e);
                return taken;
            }
            loop {
                // The caller comes back for the rest (notifications stay off).
                if taken == budget {
                    return taken;
                }
                // A request held back by the throttle goes first; until it has started,
                // nothing else does.
                if let Some((head, req)) = self.held.take() {
                    if !self.admit(head, req) {
                        return taken;
                    }
                }
                // A driver never has more requests outstanding than the queue holds; one
                // that reuses descriptors to make more available is held to that, so it
                // cannot grow the worker's state or starve completions.
                if self.slots.live() >= usize::from(self.ctx.queue.size()) {
                    return taken;
                }
                let chain = match self.ctx.queue.iter(&*mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.broken(&e);
                        return taken;
                    }
                };
                let Some(chain) = chain else { break };
                taken += 1;
                let head = chain.head_index();
                if self.ctx.indirect.refuses(&self.ctx.queue, &*mem, head) {
                    // A driver error (virtio 1.2 2.7.5.3.1): the request fails unperformed.
                    log::debug!("virtio-blk: chain {head} uses an indirect table, and INDIRECT_DESC was not negotiated");
                    match request::status_address(chain) {
                        Some(at) => self.finish(head, at, Status::IoErr, 1),
                        None => {
                            log::warn!(
                                "virtio-blk queue {}: chain {head} uses an indirect table without INDIRECT_DESC and has no status byte",
                                self.ctx.index
                            );
                            self.broken = true;
                            self.ctx.needs_reset.report();
                            return taken;
                        }
                    }
                    continue;
                }
                if let Some(c) = &self.ctx.capacity {
                    self.ctx.limits.capacity = c.load(Ordering::Relaxed);
                }
                match request::parse(&*mem, chain.clone(), &self.ctx.limits) {
                    Ok(req) => {
                        if !self.admit(head, req) {
                            return taken;
                        }
                    }
                    Err(request::Error::NoStatus) => {
                        log::debug!("virtio-blk: chain {head} has no status byte");
                        self.add_used(head, 0);
                    }
                    Err(e) => {
                        log::debug!("virtio-blk: chain {head}: {}", Chain(&e));
                        match request::status_address(chain) {
                            Some(at) => self.finish(head, at, e.status(), 1),
                            None => self.add_used(head, 0),
                        }
                    }
                }
            }
            if !idle || self.aio.in_flight() > 0 {
                return taken;
            }
            match self.ctx.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => return taken,
                Err(e) => {
                    self.broken(&e);
                    return taken;
                }
            }
        }
    }

    /// Starts a parsed (valid) request if the throttle lets it (true); otherwise holds it,
    /// with the timer armed for when it may start, and returns false. Only requests that
    /// passed validation are charged.
    fn admit(&mut self, head: u16, req: Request) -> bool {
        let Some(t) = &self.ctx.throttle else {
            self.start(head, req);
            return true;
        };
        let wait = t
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_admit(req.data_len(), Instant::now());
        match wait {
            Ok(()) => {
                self.start(head, req);
                true
            }
            Err(wait) => {
                self.held = Some((head, req));
                if let Some(timer) = self.timer.as_mut() {
                    // A zero duration would disarm the timer.
                    let wait = wait.max(Duration::from_micros(1));
                    if let Err(e) = timer.reset(wait, None) {
                        log::warn!(
                            "virtio-blk queue {}: arming the throttle timer: {e}",
                            self.ctx.index
                        );
                    }
                }
                false
            }
        }
    }

    /// Spins until the driver makes a request available (true), `deadline` passes or the
    /// worker is told to stop (false).
    fn poll_avail(&mut self, deadline: Instant, stop: &AtomicBool) -> bool {
        let next = self.ctx.queue.next_avail();
        loop {
            match self.ctx.queue.avail_idx(&*self.ctx.mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != next => return true,
                Ok(_) => {}
                // Let take_requests see and report it.
                Err(_) => return true,
            }
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    fn broken(&mut self, e: &virtio_queue::Error) {
        log::warn!(
            "virtio-blk queue {}: the ring is broken: {}",
            self.ctx.index,
            Chain(e)
        );
        self.broken = true;
        self.ctx.needs_reset.report();
    }

    fn add_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.ctx.queue.add_used(&*self.ctx.mem, head, len) {
            self.broken(&e);
        } else {
            self.used = true;
        }
    }

    fn finish(&mut self, head: u16, status_addr: GuestAddress, status: Status, len: u32) {
        if self.ctx.mem.write_obj(status as u8, status_addr).is_err() {
            // The parser saw this byte in a device-writable descriptor of guest memory;
            // if it is gone, nothing can be reported there.
            log::debug!(
                "virtio-blk: status byte at {:#x} is not in guest memory",
                status_addr.0
            );
        }
        self.add_used(head, len);
    }

    /// Interrupts the driver if something was used and it wants to hear.
    fn signal(&mut self) {
        if !self.used {
            return;
        }
        self.used = false;
        match should_interrupt(&mut self.ctx.queue, &self.ctx.mem) {
            Ok(true) => {
                if let Err(e) = self
                    .ctx
                    .interrupt
                    .trigger(InterruptKind::Queue(self.ctx.index))
                {
                    log::warn!("virtio-blk queue {}: {}", self.ctx.index, Chain(&e));
                }
            }
            Ok(false) => {}
            Err(keel_virtio::worker::QueueError::Broken(e)) => self.broken(&e),
            Err(e) => {
                log::warn!("virtio-blk queue {}: {e}", self.ctx.index);
                self.broken = true;
                self.ctx.needs_reset.report();
            }
        }
    }

    fn start(&mut self, head: u16, req: Request) {
        let data_len = req.data_len();
        match req.op {
            Op::GetId => {
                let mut written = 0usize;
                for r in &req.data {
                    let id = &self.ctx.id[written..written + r.len];
                    if self.ctx.mem.write_slice(id, r.addr).is_err() {
                        return self.finish(head, req.status, Status::IoErr, 1);
                    }
                    written += r.len;
                }
                self.finish(head, req.status, Status::Ok, written as u32 + 1)
            }
            Op::Read { offset } | Op::Write { offset } => {
                let write = matches!(req.op, Op::Write { .. });
                let used_len = if write {
                    1
                } else {
                    u32::try_from(data_len + 1).unwrap_or(u32::MAX)
                };
                let flush_after = write && !self.ctx.writeback.load(Ordering::SeqCst);
                let op = if write { IoOp::Write } else { IoOp::Read };
                let slot = self.open(head, req.status, used_len, flush_after, op);
                let kind = if write { Kind::Write } else { Kind::Read };
                self.account(slot, kind, data_len);
                if !req.data.is_empty() {
                    self.queue_work(
                        slot,
                        offset,
                        Work::Transfer {
                            write,
                            data: req.data,
                        },
                    );
                }
                self.close(slot);
            }
            Op::Flush => {
                let slot = self.open(head, req.status, 1, false, IoOp::Flush);
                self.account(slot, Kind::Flush, 0);
                self.submit(slot, AioRequest::flush(Tag { slot, bytes: 0 }.encode()));
                self.close(slot);
            }
            Op::Discard(ref ranges) | Op::WriteZeroes(ref ranges) => {
                let zeroes = matches!(req.op, Op::WriteZeroes(_));
                let op = if zeroes {
                    IoOp::WriteZeroes
                } else {
                    IoOp::Discard
                };
                let slot = self.open(head, req.status, 1, false, op);
                for r in ranges.iter() {
                    if zeroes {
                        let work = Work::Zeroes {
                            len: r.len,
                            unmap: r.unmap,
                        };
                        self.queue_work(slot, r.offset, work);
                    } else {
                        // A discard moves no data (a hole punched, or nothing).
                        let tag = Tag { slot, bytes: 0 }.encode();
                        self.submit(slot, AioRequest::discard(r.offset, r.len, tag));
                    }
                }
                self.close(slot);
            }
        }
    }

    /// Opens a request slot; it holds one extra count until [`State::close`].
    fn open(
        &mut self,
        head: u16,
        status_addr: GuestAddress,
        used_len: u32,
        flush_after: bool,
        op: IoOp,
    ) -> usize {
        self.slots.insert(InFlight {
            head,
            status_addr,
            used_len,
            pending: 1,
            status: Status::Ok,
            flush_after,
            account: None,
            op,
            host_errno: None,
        })
    }

    /// Counts `slot`'s request in the device's totals when it completes.
    fn account(&mut self, slot: usize, kind: Kind, bytes: u64) {
        if let Some(Some(f)) = self.slots.slots.get_mut(slot) {
            f.account = Some((kind, bytes, Instant::now()));
        }
    }

    fn close(&mut self, slot: usize) {
        self.piece_done(slot);
    }

    /// Submits one engine request for `slot`; its completion (every request gets one,
    /// failures included) settles the slot's count.
    fn submit(&mut self, slot: usize, req: AioRequest<DataBuf>) {
        self.aio.submit(req);
        if let Some(Some(f)) = self.slots.slots.get_mut(slot) {
            f.pending += 1;
        }
    }

    /// Queues `work` of `slot`'s request, starting at disk offset `offset`, and hands out
    /// what the budget allows. The entry holds a count on the slot until its last piece
    /// is out.
    fn queue_work(&mut self, slot: usize, offset: u64, work: Work) {
        if let Some(Some(f)) = self.slots.slots.get_mut(slot) {
            f.pending += 1;
        }
        self.backlog.push_back(Backlog { slot, offset, work });
        self.feed();
    }

    /// Hands the backlog's work to the engine in pieces of at most [`PIECE_BYTES`], a piece
    /// of each request in turn, while the queue has less than [`BUDGET_BYTES`] in flight. A request
    /// that has already failed gets no more pieces: it ends with IOERR as soon as those
    /// in flight are done.
    fn feed(&mut self) {
        while let Some(b) = self.backlog.front_mut() {
            let slot = b.slot;
            let failed = matches!(
                self.slots.slots.get(slot),
                Some(Some(f)) if f.status != Status::Ok
            );
            if failed {
                self.backlog.pop_front();
                // The entry's count.
                self.piece_done(slot);
                continue;
            }
            if self.bytes_in_flight >= BUDGET_BYTES {
                return;
            }
            let (req, bytes) = b.next_piece(&self.ctx.mem);
            let done = b.is_done();
            self.bytes_in_flight += bytes;
            // Round robin, a piece each: a small request behind a huge one does not wait
            // for all of it.
            if let Some(b) = self.backlog.pop_front().filter(|_| !done) {
                self.backlog.push_back(b);
            }
            self.submit(slot, req);
            if done {
                // The entry's count.
                self.piece_done(slot);
            }
        }
    }

    fn complete(&mut self, c: Completion<DataBuf>) {
        let Tag { slot, bytes } = Tag::decode(c.user_data);
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(u64::from(bytes));
        if let Err(e) = &c.result {
            log::debug!("virtio-blk: request failed: {}", Chain(e));
            if let Some(Some(f)) = self.slots.slots.get_mut(slot) {
                f.status = Status::IoErr;
                // Guest memory the engine could not reach is the guest's doing.
                if !matches!(e, keel_block::Error::GuestMemory { .. }) {
                    f.host_errno.get_or_insert(e.errno());
                }
            }
        }
        self.piece_done(slot);
    }

    fn piece_done(&mut self, slot: usize) {
        let Some(Some(f)) = self.slots.slots.get_mut(slot) else {
            return;
        };
        f.pending -= 1;
        if f.pending > 0 {
            return;
        }
        if f.flush_after && f.status == Status::Ok {
            // Write cache off: the write completes once it is durable.
            f.flush_after = false;
            f.pending = 1;
            self.submit(slot, AioRequest::flush(Tag { slot, bytes: 0 }.encode()));
            self.piece_done(slot);
            return;
        }
        if let Some(f) = self.slots.take(slot) {
            if let Some((kind, bytes, since)) = f.account {
                self.ctx
                    .stats
                    .record(kind, bytes, f.status == Status::Ok, since.elapsed());
            }
            if let Some(errno) = f.host_errno {
                self.ctx.errors.report(IoError { op: f.op, errno });
            }
            let len = if f.status == Status::Ok {
                f.used_len
            } else {
                1
            };
            self.finish(f.head, f.status_addr, f.status, len);
        }
    }
}

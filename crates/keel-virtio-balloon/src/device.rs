//! The virtio-balloon device: configuration (target and actual), features, and one worker
//! thread serving the inflate, deflate, statistics and reporting queues.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use keel_bus::ErrorChain;
use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{
    ActivateContext, ActivateError, InterruptKind, NeedsReset, VirtioDevice, VirtioInterrupt,
};
use keel_virtio::worker::{
    drain_queue, has_more, should_interrupt, Drained, IndirectDesc, QueueError, QueueWorker,
};
use keel_virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::pages::{BalloonCounters, Counters, PageTracker};
use crate::release::{HostReleaser, MemoryReleaser};
use crate::spec::{config, feature, BALLOON_PAGE};
use crate::stats::{parse_stats, StatsReport, MAX_STATS_BYTES};

/// The virtio device type of memory balloons.
pub const BALLOON_DEVICE_TYPE: u32 = VIRTIO_ID_BALLOON;

/// Device options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonOptions {
    /// The initial target: how much memory the guest should give back, in bytes (rounded
    /// down to 4 KiB pages).
    pub target_bytes: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back from the
    /// balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_PAGE_REPORTING: the guest reports free pages, which are
    /// released like inflated ones.
    pub free_page_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_MUST_TELL_HOST: the guest waits for the device to take a
    /// deflate before reusing the pages.
    pub must_tell_host: bool,
    /// Offer VIRTIO_BALLOON_F_PAGE_POISON: the guest says what it poisons free pages
    /// with, and reported pages are kept when that is not zero.
    pub page_poison: bool,
    /// How often the device asks for statistics (it returns the statistics buffer to the
    /// driver, which refills it). `None`: only when asked through
    /// [`BalloonHandle::request_stats`].
    pub stats_period: Option<Duration>,
    /// Maximum size of each queue.
    pub queue_size: u16,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions {
            target_bytes: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            must_tell_host: false,
            page_poison: true,
            stats_period: None,
            queue_size: 256,
        }
    }
}

/// What the device and its handles share.
struct Shared {
    target: AtomicU32,
    actual: AtomicU32,
    poison: AtomicU32,
    counters: Arc<Counters>,
    link: Mutex<Option<Link>>,
    last_stats: Mutex<Option<StatsReport>>,
}

/// How to reach a running device: its interrupt and its statistics kick.
struct Link {
    interrupt: Arc<dyn VirtioInterrupt>,
    stats_kick: StatsKick,
}

/// Asks the worker for statistics: the flag says a request is pending (the worker is also
/// called once for the kick when it starts, with nothing requested), the eventfd wakes it.
#[derive(Clone)]
struct StatsKick {
    wanted: Arc<AtomicBool>,
    fd: Arc<EventFd>,
}

impl StatsKick {
    fn kick(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        let _ = self.fd.write(1);
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The host's side of a balloon: set the target, read what the guest gave and said. A
/// VMM's control channel (keel's QMP `balloon` and `query-balloon`) is built on it.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Sets the target in 4 KiB pages; a running device raises a configuration
    /// interrupt when it changes.
    pub fn set_target_pages(&self, pages: u32) {
        if self.0.target.swap(pages, Ordering::SeqCst) == pages {
            return;
        }
        if let Some(link) = locked(&self.0.link).as_ref() {
            if let Err(e) = link.interrupt.trigger(InterruptKind::Config) {
                log::warn!("virtio-balloon: target change: {}", ErrorChain(&e));
            }
        }
    }

    /// Sets the target in bytes (rounded down to 4 KiB pages, at most 16 TiB).
    pub fn set_target_bytes(&self, bytes: u64) {
        self.set_target_pages(u32::try_from(bytes / BALLOON_PAGE).unwrap_or(u32::MAX));
    }

    /// The target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.0.target.load(Ordering::SeqCst)
    }

    /// What the driver says the balloon holds (`actual`), in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.0.actual.load(Ordering::SeqCst)
    }

    /// The last statistics the driver sent.
    pub fn stats(&self) -> Option<StatsReport> {
        locked(&self.0.last_stats).clone()
    }

    /// Asks a running device to request statistics now (returns the statistics buffer).
    pub fn request_stats(&self) {
        if let Some(link) = locked(&self.0.link).as_ref() {
            link.stats_kick.kick();
        }
    }

    /// The device's counters (pages held, bytes released, ignored input).
    pub fn counters(&self) -> BalloonCounters {
        self.0.counters.snapshot()
    }

    /// The poison value the driver reported (VIRTIO_BALLOON_F_PAGE_POISON).
    pub fn poison_value(&self) -> u32 {
        self.0.poison.load(Ordering::SeqCst)
    }
}

/// The virtio-balloon device.
///
/// # Examples
///
/// ```
/// use keel_virtio::testing::*;
/// use keel_virtio_balloon::{Balloon, BalloonOptions};
///
/// let balloon = Balloon::new(BalloonOptions { target_bytes: 1 << 20, ..Default::default() });
/// let handle = balloon.handle();
/// let d = MmioDriver::new(Box::new(balloon));
/// let mut num_pages = [0u8; 4];
/// d.read_config(0, &mut num_pages);
/// assert_eq!(u32::from_le_bytes(num_pages), 256);
/// handle.set_target_bytes(0);
/// d.read_config(0, &mut num_pages);
/// assert_eq!(u32::from_le_bytes(num_pages), 0);
/// ```
pub struct Balloon {
    options: BalloonOptions,
    shared: Arc<Shared>,
    releaser: Arc<dyn MemoryReleaser>,
    queue_sizes: Vec<u16>,
    running: Option<Running>,
}

struct Running {
    worker: QueueWorker,
    timer: Option<StatsTimer>,
}

/// Kicks the statistics queue every period until dropped.
struct StatsTimer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StatsTimer {
    fn spawn(period: Duration, kick: StatsKick) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keel-balloon-stats".into())
            .spawn(move || loop {
                match rx.recv_timeout(period) {
                    Err(RecvTimeoutError::Timeout) => kick.kick(),
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            })?;
        Ok(StatsTimer {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for StatsTimer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Balloon {
    /// A balloon releasing memory with [`HostReleaser`].
    pub fn new(options: BalloonOptions) -> Self {
        Self::with_releaser(options, Arc::new(HostReleaser::new()))
    }

    /// A balloon releasing memory through `releaser`.
    pub fn with_releaser(options: BalloonOptions, releaser: Arc<dyn MemoryReleaser>) -> Self {
        let queues = 3 + usize::from(options.free_page_reporting);
        let target = u32::try_from(options.target_bytes / BALLOON_PAGE).unwrap_or(u32::MAX);
        Balloon {
            options,
            shared: Arc::new(Shared {
                target: AtomicU32::new(target),
                actual: AtomicU32::new(0),
                poison: AtomicU32::new(0),
                counters: Arc::new(Counters::default()),
                link: Mutex::new(None),
                last_stats: Mutex::new(None),
            }),
            releaser,
            queue_sizes: vec![options.queue_size; queues],
            running: None,
        }
    }

    /// A handle to the device, usable from any thread for as long as it lives.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    fn config_bytes(&self) -> [u8; config::SIZE] {
        let mut c = [0u8; config::SIZE];
        let mut put = |off: u64, v: u32| {
            let o = off as usize;
            c[o..o + 4].copy_from_slice(&v.to_le_bytes());
        };
        put(config::NUM_PAGES, self.shared.target.load(Ordering::SeqCst));
        put(config::ACTUAL, self.shared.actual.load(Ordering::SeqCst));
        put(config::FREE_PAGE_HINT_CMD_ID, 0);
        put(
            config::POISON_VAL,
            self.shared.poison.load(Ordering::SeqCst),
        );
        c
    }
}

/// What a queue carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Report,
}

/// The index the statistics kick has in the worker (no queue has it).
const STATS_KICK: u16 = u16::MAX;

struct Worker {
    mem: GuestMemoryMmap,
    features: u64,
    pages: PageTracker,
    queues: Vec<(u16, Role, Queue)>,
    shared: Arc<Shared>,
    interrupt: Arc<dyn VirtioInterrupt>,
    needs_reset: NeedsReset,
    /// The statistics buffer the device holds until it wants new statistics.
    stats_head: Option<u16>,
    stats_wanted: Arc<AtomicBool>,
}

/// Reads the device-readable bytes of `chain`, up to `max`; `None` when the chain is
/// malformed or longer.
fn readable_bytes(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    max: usize,
) -> Result<Vec<u8>, usize> {
    let Ok(mut reader) = chain.clone().reader(mem) else {
        return Err(0);
    };
    let n = reader.available_bytes();
    if n > max {
        return Err(n);
    }
    let mut buf = vec![0u8; n];
    reader.read_exact(&mut buf).map_err(|_| n)?;
    Ok(buf)
}

impl Worker {
    fn signal(&self, index: u16) {
        if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(index)) {
            log::warn!("virtio-balloon: queue {index}: {}", ErrorChain(&e));
        }
    }

    fn broken(&self, index: u16, e: QueueError) {
        log::warn!("virtio-balloon: queue {index}: {}", ErrorChain(&e));
        self.needs_reset.report();
    }

    /// Serves queue `index` (or the statistics timer); returns whether it has more to do
    /// at once ([`Drained::more`]).
    fn handle(&mut self, index: u16) -> bool {
        if index == STATS_KICK {
            self.return_stats_buffer();
            return false;
        }
        let Some(pos) = self.queues.iter().position(|q| q.0 == index) else {
            return false;
        };
        let role = self.queues[pos].1;
        let result = match role {
            Role::Stats => self.take_stats(pos),
            _ => {
                let (mem, pages, shared, features) =
                    (&self.mem, &mut self.pages, &self.shared, self.features);
                let queue = &mut self.queues[pos].2;
                drain_queue(queue, mem, IndirectDesc::from_features(features), |chain| {
                    serve_chain(role, chain, mem, pages, shared, features);
                    0
                })
            }
        };
        match result {
            Ok(d) => {
                if d.interrupt {
                    self.signal(index);
                }
                d.more
            }
            Err(e) => {
                self.broken(index, e);
                false
            }
        }
    }

    /// Takes new statistics buffers: each is parsed and held (an older one held is
    /// returned first).
    fn take_stats(&mut self, pos: usize) -> Result<Drained, QueueError> {
        let (mem, shared) = (&self.mem, &self.shared);
        let indirect = IndirectDesc::from_features(self.features);
        let queue = &mut self.queues[pos].2;
        let mut used_any = false;
        // As in drain_queue: at most the queue's size of chains a call.
        let budget = queue.size();
        let mut taken = 0u16;
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
                let chain = match queue.iter(mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => return Err(QueueError::Broken(e)),
                };
                let Some(chain) = chain else { break };
                taken += 1;
                if indirect.refuses(queue, mem, chain.head_index()) {
                    return Err(QueueError::IndirectNotNegotiated {
                        head: chain.head_index(),
                    });
                }
                if let Some(old) = self.stats_head.replace(chain.head_index()) {
                    queue.add_used(mem, old, 0).map_err(QueueError::Broken)?;
                    used_any = true;
                }
                let counters = &shared.counters;
                match readable_bytes(&chain, mem, MAX_STATS_BYTES).map(|b| parse_stats(&b)) {
                    Ok(Ok(report)) => {
                        Counters::add(&counters.stats_reports, 1);
                        Counters::add(&counters.unknown_stat_tags, u64::from(report.unknown_tags));
                        *locked(&shared.last_stats) = Some(report);
                    }
                    Ok(Err(_)) | Err(_) => Counters::add(&counters.ignored_stats_buffers, 1),
                }
            }
            if !queue.enable_notification(mem).map_err(QueueError::Broken)? {
                break false;
            }
        };
        let interrupt = used_any && should_interrupt(queue, mem)?;
        Ok(Drained { interrupt, more })
    }

    /// Gives the held statistics buffer back: the driver refills it.
    fn return_stats_buffer(&mut self) {
        if !self.stats_wanted.swap(false, Ordering::SeqCst) {
            return;
        }
        let Some(pos) = self.queues.iter().position(|q| q.1 == Role::Stats) else {
            return;
        };
        let Some(head) = self.stats_head.take() else {
            return;
        };
        let (index, mem) = (self.queues[pos].0, &self.mem);
        let queue = &mut self.queues[pos].2;
        let result = queue
            .add_used(mem, head, 0)
            .map_err(QueueError::Broken)
            .and_then(|()| should_interrupt(queue, mem));
        match result {
            Ok(true) => self.signal(index),
            Ok(false) => {}
            Err(e) => self.broken(index, e),
        }
    }
}

/// Serves one inflate, deflate or reporting buffer.
fn serve_chain(
    role: Role,
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    pages: &mut PageTracker,
    shared: &Shared,
    features: u64,
) {
    let counters = &shared.counters;
    match role {
        Role::Inflate | Role::Deflate => {
            let array = match readable_bytes(&chain, mem, crate::pages::MAX_PFN_ARRAY_BYTES) {
                Ok(a) => a,
                Err(_) => {
                    Counters::add(&counters.ignored_arrays, 1);
                    return;
                }
            };
            if role == Role::Inflate {
                let _ = pages.inflate(&array);
                return;
            }
            // Pages the host did not ask for: beyond held - target.
            let asked = pages
                .held_pages()
                .saturating_sub(u64::from(shared.target.load(Ordering::SeqCst)));
            if let Ok(n) = pages.deflate(&array) {
                let extra = n.saturating_sub(asked);
                if features & feature::DEFLATE_ON_OOM != 0 {
                    Counters::add(&counters.oom_deflated_pages, extra);
                } else {
                    Counters::add(&counters.unrequested_deflated_pages, extra);
                }
            }
        }
        Role::Report => {
            // Each descriptor is a range of free pages (Linux makes them device-writable;
            // either direction is accepted). A chain that cannot be walked is ignored.
            let ranges: Vec<(u64, u64)> = chain
                .clone()
                .map(|d| (d.addr().0, u64::from(d.len())))
                .collect();
            let poisoned =
                features & feature::PAGE_POISON != 0 && shared.poison.load(Ordering::SeqCst) != 0;
            pages.report(&ranges, poisoned);
        }
        Role::Stats => {}
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        BALLOON_DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let o = &self.options;
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | feature::STATS_VQ;
        for (on, bit) in [
            (o.deflate_on_oom, feature::DEFLATE_ON_OOM),
            (o.free_page_reporting, feature::PAGE_REPORTING),
            (o.must_tell_host, feature::MUST_TELL_HOST),
            (o.page_poison, feature::PAGE_POISON),
        ] {
            if on {
                f |= bit;
            }
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        // The driver writes `actual` and `poison_val`, byte by byte if it likes.
        for (field, value) in [
            (config::ACTUAL, &self.shared.actual),
            (config::POISON_VAL, &self.shared.poison),
        ] {
            let mut bytes = value.load(Ordering::SeqCst).to_le_bytes();
            let mut touched = false;
            for (i, &b) in data.iter().enumerate() {
                let Some(at) = offset.checked_add(i as u64) else {
                    break;
                };
                if (field..field + 4).contains(&at) {
                    bytes[(at - field) as usize] = b;
                    touched = true;
                }
            }
            if touched {
                value.store(u32::from_le_bytes(bytes), Ordering::SeqCst);
            }
        }
        false
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // Queue indices as Linux numbers them: inflate, deflate, then statistics and
        // reporting if negotiated, without gaps (free page hinting is not offered).
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if ctx.features & feature::STATS_VQ != 0 {
            roles.push(Role::Stats);
        }
        if ctx.features & feature::PAGE_REPORTING != 0 {
            roles.push(Role::Report);
        }
        let mut queues = Vec::new();
        let mut notifiers = Vec::new();
        for q in ctx.queues {
            if let Some(&role) = roles.get(usize::from(q.index)) {
                notifiers.push((q.index, q.notifier));
                queues.push((q.index, role, q.queue));
            }
        }
        for i in 0..2 {
            if !queues.iter().any(|q| q.0 == i) {
                return Err(ActivateError::MissingQueue(i));
            }
        }
        let kick = StatsKick {
            wanted: Arc::new(AtomicBool::new(false)),
            fd: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?),
        };
        notifiers.push((STATS_KICK, kick.fd.clone()));
        let mut worker = Worker {
            pages: PageTracker::new(
                &ctx.mem,
                self.releaser.clone(),
                self.shared.counters.clone(),
            ),
            mem: ctx.mem,
            features: ctx.features,
            queues,
            shared: self.shared.clone(),
            interrupt: ctx.interrupt.clone(),
            needs_reset: ctx.needs_reset,
            stats_head: None,
            stats_wanted: kick.wanted.clone(),
        };
        let thread =
            QueueWorker::spawn("keel-virtio-balloon", notifiers, move |i| worker.handle(i))
                .map_err(ActivateError::Worker)?;
        let timer = match self.options.stats_period {
            Some(p) if ctx.features & feature::STATS_VQ != 0 && !p.is_zero() => {
                Some(StatsTimer::spawn(p, kick.clone()).map_err(ActivateError::Worker)?)
            }
            _ => None,
        };
        *locked(&self.shared.link) = Some(Link {
            interrupt: ctx.interrupt,
            stats_kick: kick,
        });
        self.running = Some(Running {
            worker: thread,
            timer,
        });
        Ok(())
    }

    fn pause(&mut self) {
        // The statistics timer only kicks the worker, which is parked.
        if let Some(r) = &self.running {
            r.worker.pause();
        }
    }

    fn resume(&mut self) {
        if let Some(r) = &self.running {
            r.worker.resume();
        }
    }

    fn reset(&mut self) {
        *locked(&self.shared.link) = None;
        if let Some(mut r) = self.running.take() {
            drop(r.timer.take());
            r.worker.stop();
        }
        self.shared.actual.store(0, Ordering::SeqCst);
        self.shared.poison.store(0, Ordering::SeqCst);
        self.shared.counters.held_pages.store(0, Ordering::Relaxed);
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.reset();
    }
}

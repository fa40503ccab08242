//! The virtio-blk device: configuration space, features, and one worker thread per queue
//! that parses requests and runs them asynchronously on a keel-block I/O engine.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use keel_block::aio::{AioQueue, UringQueue, UringTarget};
use keel_block::buf::GuestBuf;
use keel_block::throttle::Throttle;
use keel_block::BlockBackend;
use keel_memory::GuestMemoryMmap;
use keel_virtio::affinity::CpuSet;
use keel_virtio::device::{
    ActivateContext, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use keel_virtio::worker::{IndirectDesc, PauseGate};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::errors::{IoErrorSink, Reporter};
use crate::request::{ID_BYTES, SECTOR_SIZE};
use crate::stats::{BlockStats, Stats};
use crate::worker::{QueueContext, Worker};

/// The virtio device type of block devices.
pub const BLOCK_DEVICE_TYPE: u32 = VIRTIO_ID_BLOCK;

/// The buffer of a request's data, as the I/O engines see it: the request's guest ranges
/// and the guest memory they are in, owned by the engine request until it completes.
pub type DataBuf = GuestBuf<Arc<GuestMemoryMmap>>;

/// Makes the I/O engine for one queue (called on that queue's worker thread), over the
/// guest memory the queue serves and reaching it as the disk says.
pub type EngineFactory = dyn Fn(&Arc<GuestMemoryMmap>, GuestMemoryAccess) -> keel_block::Result<Box<dyn AioQueue<DataBuf>>>
    + Send
    + Sync;

/// How a disk's I/O engines reach guest memory ([`Disk::with_memory_access`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestMemoryAccess {
    /// Request by request: for each transfer the kernel looks up and pins the pages of
    /// that request only. Guest memory stays pageable, and a balloon may reclaim it.
    #[default]
    PerRequest,
    /// Registered once (io_uring fixed buffers, [`Disk::uring`] only; other engines
    /// ignore it): each queue's engine registers all of guest memory when the driver
    /// starts the device, which saves the per-request page lookup and pinning. All of
    /// guest memory becomes resident and pinned while the device runs. Never with a
    /// balloon or free page reporting (or anything else that discards or remaps guest
    /// pages): transfers would keep reaching the discarded pages. If the kernel refuses
    /// the registration (for example `RLIMIT_MEMLOCK`), the queue logs it and works
    /// request by request.
    Registered,
}

/// A disk as the device sees it: the backend (for size, limits, read-only) and how each
/// queue gets its own asynchronous I/O engine over it.
#[derive(Clone)]
pub struct Disk {
    pub(crate) backend: Arc<dyn BlockBackend>,
    pub(crate) engine: Arc<EngineFactory>,
    pub(crate) id: [u8; ID_BYTES],
    pub(crate) memory: GuestMemoryAccess,
}

impl Disk {
    /// A disk served by io_uring (raw files, and qcow2 over a raw file).
    pub fn uring<T: UringTarget + 'static>(target: Arc<T>, depth: u32) -> Disk {
        let t = target.clone();
        Disk {
            backend: target,
            engine: Arc::new(move |mem, access| {
                let mut q = UringQueue::new(t.clone(), depth)?;
                if access == GuestMemoryAccess::Registered {
                    if let Err(e) = q.register_memory(mem.clone()) {
                        log::warn!(
                            "virtio-blk: guest memory not registered with io_uring, requests pin their own pages: {}",
                            crate::worker::Chain(&e)
                        );
                    }
                }
                Ok(Box::new(q) as Box<dyn AioQueue<DataBuf>>)
            }),
            id: [0; ID_BYTES],
            memory: GuestMemoryAccess::PerRequest,
        }
    }

    /// A disk over any backend, each queue served by `threads` worker threads (like
    /// QEMU's `aio=threads`).
    pub fn threads<B: BlockBackend + 'static>(backend: Arc<B>, threads: usize) -> Disk {
        let b = backend.clone();
        Disk {
            backend,
            engine: Arc::new(move |_, _| {
                Ok(
                    Box::new(keel_block::aio::ThreadQueue::new(b.clone(), threads)?)
                        as Box<dyn AioQueue<DataBuf>>,
                )
            }),
            id: [0; ID_BYTES],
            memory: GuestMemoryAccess::PerRequest,
        }
    }

    /// A disk over any backend, each request run inline on the queue's worker: the
    /// baseline, deterministic (tests, fuzzing).
    pub fn synchronous<B: BlockBackend + 'static>(backend: Arc<B>) -> Disk {
        let b = backend.clone();
        Disk {
            backend,
            engine: Arc::new(move |_, _| {
                Ok(Box::new(keel_block::aio::SyncQueue::new(b.clone()))
                    as Box<dyn AioQueue<DataBuf>>)
            }),
            id: [0; ID_BYTES],
            memory: GuestMemoryAccess::PerRequest,
        }
    }

    /// Sets how the disk's I/O engines reach guest memory (see [`GuestMemoryAccess`]).
    pub fn with_memory_access(mut self, access: GuestMemoryAccess) -> Disk {
        self.memory = access;
        self
    }

    /// Sets the ID GET_ID returns (up to 20 bytes; longer IDs are cut).
    pub fn with_id(mut self, id: &str) -> Disk {
        self.id = [0; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        self.id[..n].copy_from_slice(&id.as_bytes()[..n]);
        self
    }
}

/// Device options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOptions {
    /// Number of request queues (1-64).
    pub queues: u16,
    /// Maximum size of each queue (a power of two up to 32768).
    pub queue_size: u16,
    /// Initial state of the guest-visible write cache (CONFIG_WCE): with `false` every
    /// write is followed by a flush before it completes.
    pub writeback: bool,
    /// Requests per second (0: unlimited).
    pub iops: u64,
    /// Bytes per second (0: unlimited).
    pub bps: u64,
    /// After its last request completes, a queue's worker keeps watching the ring this
    /// many microseconds (spinning, with driver notifications off) before it goes back
    /// to sleep: a driver that submits again at once needs no kick, which saves a VM exit
    /// and a thread wake-up per request. 0 turns polling off.
    pub poll_us: u32,
    /// Host CPUs the queue workers may run on (every worker the same set); `None`: where
    /// the scheduler puts them. A worker kept off the vCPUs' CPUs, on the CPU that takes
    /// the host disk's interrupts, is not delayed by either (see the README's
    /// Performance section). A worker that cannot take the set logs it and runs on.
    pub affinity: Option<CpuSet>,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            queues: 1,
            queue_size: 256,
            writeback: true,
            iops: 0,
            bps: 0,
            poll_us: 64,
            affinity: None,
        }
    }
}

/// Errors from building a block device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue count is outside 1-64.
    #[error("{0} queues: a virtio-blk device has 1 to 64")]
    Queues(u16),
    /// The queue size is not a power of two from 2 to 32768.
    #[error("queue size {0} is not a power of two from 2 to 32768")]
    QueueSize(u16),
    /// The disk is not a whole number of sectors.
    #[error("the disk's size {0} is not a multiple of 512")]
    Size(u64),
}

/// The offset of a field of `virtio_blk_config`.
macro_rules! at {
    ($field:ident) => {
        offset_of!(virtio_blk_config, $field)
    };
}

/// Bytes of configuration space the device exposes: `virtio_blk_config` up to the
/// secure-erase fields (VIRTIO_BLK_F_SECURE_ERASE is not offered).
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
const _: () = assert!(CONFIG_LEN <= size_of::<virtio_blk_config>());

/// Sectors per discard / write-zeroes segment the device accepts (2 GiB - 512).
const MAX_RANGE_SECTORS: u32 = (u32::MAX >> 9) >> 1;
/// Segments per discard / write-zeroes request.
const MAX_RANGE_SEGS: u32 = 32;

/// Data segments per request (`seg_max`) for queues of `queue_size`: a chain of header,
/// data and status fits in the ring.
pub(crate) fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).max(1)
}

/// What the parser enforces for `disk` on queues of `queue_size`: what the configuration
/// space advertises.
pub(crate) fn limits_for(disk: &Disk, queue_size: u16) -> crate::request::Limits {
    let read_only = disk.backend.is_read_only();
    let (seg, sectors) = if read_only {
        (0, 0)
    } else {
        (MAX_RANGE_SEGS, MAX_RANGE_SECTORS)
    };
    crate::request::Limits {
        capacity: disk.backend.size() / SECTOR_SIZE,
        read_only,
        max_discard_seg: seg,
        max_discard_sectors: sectors,
        max_write_zeroes_seg: seg,
        max_write_zeroes_sectors: sectors,
        size_max: disk.backend.limits().max_transfer,
        seg_max: seg_max(queue_size),
    }
}

/// The virtio-blk device model.
pub struct Block {
    disk: Disk,
    opts: BlockOptions,
    sizes: Vec<u16>,
    writeback: Arc<AtomicBool>,
    /// Whether the driver negotiated CONFIG_WCE (only then is `writeback` writable).
    wce_negotiated: bool,
    /// Always present (0: unlimited), so limits can change while the workers run.
    throttle: Arc<Mutex<Throttle>>,
    limits: Arc<Mutex<(u64, u64)>>,
    stats: Arc<Stats>,
    errors: Arc<Reporter>,
    live: Arc<Live>,
    workers: Vec<Worker>,
    /// The running workers' gate (a fresh one each activation).
    gate: Arc<PauseGate>,
}

/// What the host changes under a running device: the capacity the workers check requests
/// against, and the interrupt that tells the driver (set while the device is active).
struct Live {
    capacity: Arc<AtomicU64>,
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
}

/// What the host can do with a device while the guest uses it: read its I/O totals,
/// change its limits, hear of requests the host failed. Cheap to clone.
#[derive(Clone)]
pub struct BlockHandle {
    throttle: Arc<Mutex<Throttle>>,
    limits: Arc<Mutex<(u64, u64)>>,
    stats: Arc<Stats>,
    errors: Arc<Reporter>,
    live: Arc<Live>,
    backend: Arc<dyn BlockBackend>,
}

impl BlockHandle {
    /// The device's I/O totals (requests completed, bytes, time), counted by the device.
    pub fn stats(&self) -> BlockStats {
        self.stats.snapshot()
    }

    /// Changes the limits (requests per second, bytes per second; 0: unlimited) of
    /// requests not yet started, whether or not the device runs.
    pub fn set_limits(&self, iops: u64, bps: u64) {
        let mut l = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        *l = (iops, bps);
        self.throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reconfigure(iops, bps, Instant::now());
    }

    /// Tells the device that its backend's size changed (the host grew the image): the
    /// configuration space shows the new capacity, requests are checked against it, and
    /// the driver gets a configuration-change interrupt. Returns the capacity in sectors.
    pub fn capacity_changed(&self) -> u64 {
        let sectors = self.backend.size() / SECTOR_SIZE;
        self.live.capacity.store(sectors, Ordering::SeqCst);
        let interrupt = self
            .live
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(i) = interrupt {
            if let Err(e) = i.trigger(InterruptKind::Config) {
                log::warn!("virtio-blk: cannot signal a configuration change: {e}");
            }
        }
        sectors
    }

    /// The limits in force: (requests per second, bytes per second), 0 for unlimited.
    pub fn limits(&self) -> (u64, u64) {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the device reports each request that failed on the host (an I/O error of
    /// the backend, ENOSPC from a full host file system), from then on; `None` stops the
    /// reports. The guest gets VIRTIO_BLK_S_IOERR for those requests either way and the
    /// device goes on serving. The sink is called on a queue worker and must not block.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::{mpsc, Arc};
    /// use keel_block::MemBackend;
    /// use keel_virtio_blk::{Block, BlockOptions, Disk, IoError};
    ///
    /// let disk = Disk::synchronous(Arc::new(MemBackend::new(vec![0; 1 << 20])));
    /// let block = Block::new(disk, BlockOptions::default())?;
    /// // A bounded channel: a guest can make requests fail faster than anyone reads.
    /// let (tx, rx) = mpsc::sync_channel::<IoError>(64);
    /// block.handle().set_io_error_sink(Some(Arc::new(move |e: &IoError| {
    ///     let _ = tx.try_send(*e); // full: this one is dropped
    /// })));
    /// assert!(rx.try_recv().is_err()); // nothing failed yet
    /// # Ok::<(), keel_virtio_blk::Error>(())
    /// ```
    pub fn set_io_error_sink(&self, sink: Option<Arc<dyn IoErrorSink>>) {
        self.errors.set(sink);
    }
}

impl Block {
    /// A device for `disk` with `opts`. It starts one worker thread per queue when the
    /// driver activates it (through a keel-virtio transport) and stops them on reset.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keel_block::MemBackend;
    /// use keel_virtio::device::VirtioDevice;
    /// use keel_virtio_blk::{Block, BlockOptions, Disk, BLOCK_DEVICE_TYPE};
    /// use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO};
    ///
    /// // A read-only 1 MiB disk in memory, served by two queues.
    /// let disk = Disk::synchronous(Arc::new(MemBackend::read_only(vec![0; 1 << 20])));
    /// let opts = BlockOptions { queues: 2, ..BlockOptions::default() };
    /// let block = Block::new(disk, opts)?;
    /// assert_eq!(block.device_type(), BLOCK_DEVICE_TYPE);
    /// assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    /// assert_ne!(block.features() & (1 << VIRTIO_BLK_F_MQ), 0);
    /// let mut capacity = [0u8; 8];
    /// block.read_config(0, &mut capacity);
    /// assert_eq!(u64::from_le_bytes(capacity), 2048); // sectors
    ///
    /// // A disk whose size is not a whole number of sectors is refused.
    /// let odd = Disk::synchronous(Arc::new(MemBackend::new(vec![0; 1000])));
    /// assert!(Block::new(odd, BlockOptions::default()).is_err());
    /// # Ok::<(), keel_virtio_blk::Error>(())
    /// ```
    pub fn new(disk: Disk, opts: BlockOptions) -> Result<Block, Error> {
        if !(1..=64).contains(&opts.queues) {
            return Err(Error::Queues(opts.queues));
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size < 2 {
            return Err(Error::QueueSize(opts.queue_size));
        }
        let size = disk.backend.size();
        if size % SECTOR_SIZE != 0 {
            return Err(Error::Size(size));
        }
        let throttle = Arc::new(Mutex::new(Throttle::new(
            opts.iops,
            opts.bps,
            Instant::now(),
        )));
        Ok(Block {
            writeback: Arc::new(AtomicBool::new(opts.writeback)),
            wce_negotiated: false,
            sizes: vec![opts.queue_size; usize::from(opts.queues)],
            disk,
            opts,
            throttle,
            limits: Arc::new(Mutex::new((opts.iops, opts.bps))),
            stats: Arc::new(Stats::default()),
            errors: Arc::default(),
            live: Arc::new(Live {
                capacity: Arc::new(AtomicU64::new(size / SECTOR_SIZE)),
                interrupt: Mutex::new(None),
            }),
            workers: Vec::new(),
            gate: Arc::new(PauseGate::default()),
        })
    }

    /// A handle for the host: I/O totals, live limits, error reports.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            throttle: self.throttle.clone(),
            limits: self.limits.clone(),
            stats: self.stats.clone(),
            errors: self.errors.clone(),
            live: self.live.clone(),
            backend: self.disk.backend.clone(),
        }
    }

    /// Changes the I/O limits at run time (0: unlimited); applies to requests not yet
    /// started.
    pub fn set_limits(&mut self, iops: u64, bps: u64) {
        self.handle().set_limits(iops, bps);
    }

    fn capacity(&self) -> u64 {
        self.live.capacity.load(Ordering::SeqCst)
    }

    fn read_only(&self) -> bool {
        self.disk.backend.is_read_only()
    }

    fn limits(&self) -> crate::request::Limits {
        limits_for(&self.disk, self.opts.queue_size)
    }

    /// The configuration space (`virtio_blk_config`, virtio 1.2 section 5.2.4) up to the
    /// secure-erase fields, which the device does not offer.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let lim = self.disk.backend.limits();
        let lm = self.limits();
        fn put<const N: usize>(c: &mut [u8; CONFIG_LEN], off: usize, v: [u8; N]) {
            c[off..off + N].copy_from_slice(&v);
        }
        put(&mut c, at!(capacity), self.capacity().to_le_bytes());
        put(&mut c, at!(size_max), lm.size_max.to_le_bytes());
        put(&mut c, at!(seg_max), lm.seg_max.to_le_bytes());
        put(&mut c, at!(blk_size), (SECTOR_SIZE as u32).to_le_bytes());
        // Topology: physical block = request alignment (O_DIRECT files: 512 or 4096).
        let phys = lim.request_alignment.max(SECTOR_SIZE as u32) / SECTOR_SIZE as u32;
        put(
            &mut c,
            at!(physical_block_exp),
            [phys.trailing_zeros() as u8],
        );
        put(&mut c, at!(min_io_size), (phys as u16).to_le_bytes());
        let wce = u8::from(self.writeback.load(Ordering::SeqCst));
        put(&mut c, at!(wce), [wce]);
        put(&mut c, at!(num_queues), self.opts.queues.to_le_bytes());
        put(
            &mut c,
            at!(max_discard_sectors),
            lm.max_discard_sectors.to_le_bytes(),
        );
        put(
            &mut c,
            at!(max_discard_seg),
            lm.max_discard_seg.to_le_bytes(),
        );
        let gran = (lim.discard_granularity as u64 / SECTOR_SIZE).max(1) as u32;
        put(&mut c, at!(discard_sector_alignment), gran.to_le_bytes());
        let wz_sectors = lm.max_write_zeroes_sectors;
        put(
            &mut c,
            at!(max_write_zeroes_sectors),
            wz_sectors.to_le_bytes(),
        );
        put(
            &mut c,
            at!(max_write_zeroes_seg),
            lm.max_write_zeroes_seg.to_le_bytes(),
        );
        put(&mut c, at!(write_zeroes_may_unmap), [1]);
        c
    }

    fn stop_workers(&mut self) {
        self.gate.open();
        for w in &mut self.workers {
            w.stop();
        }
        self.workers.clear();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        BLOCK_DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut f = 0u64;
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
        ] {
            f |= 1 << bit;
        }
        if self.opts.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn features_negotiated(&mut self, features: u64) {
        self.wce_negotiated = features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        // Only `wce` (the writeback toggle) is writable, and only with CONFIG_WCE.
        if let (Some(&v), true) = (
            data.first(),
            offset == at!(wce) as u64 && self.wce_negotiated,
        ) {
            self.writeback.store(v != 0, Ordering::SeqCst);
        }
        false
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.is_empty() {
            return Err(ActivateError::MissingQueue(0));
        }
        let mut limits = self.limits();
        limits.capacity = self.capacity();
        *self
            .live
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(ctx.interrupt.clone());
        let mem = Arc::new(ctx.mem);
        self.gate = Arc::new(PauseGate::default());
        for q in ctx.queues {
            let qc = QueueContext {
                index: q.index,
                queue: q.queue,
                kick: q.notifier,
                mem: mem.clone(),
                interrupt: ctx.interrupt.clone(),
                needs_reset: ctx.needs_reset.clone(),
                limits,
                id: self.disk.id,
                engine: self.disk.engine.clone(),
                memory_access: self.disk.memory,
                writeback: self.writeback.clone(),
                throttle: Some(self.throttle.clone()),
                stats: self.stats.clone(),
                capacity: Some(self.live.capacity.clone()),
                gate: Some(self.gate.clone()),
                poll_us: self.opts.poll_us,
                affinity: self.opts.affinity,
                errors: self.errors.clone(),
                indirect: IndirectDesc::from_features(ctx.features),
            };
            match Worker::spawn(qc) {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    self.stop_workers();
                    return Err(ActivateError::Worker(e));
                }
            }
        }
        Ok(())
    }

    fn pause(&mut self) {
        self.gate.pause(&self.workers, |w| w.wake());
    }

    fn resume(&mut self) {
        self.gate.open();
    }

    fn reset(&mut self) {
        self.gate.open();
        self.stop_workers();
        *self
            .live
            .interrupt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.writeback.store(self.opts.writeback, Ordering::SeqCst);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

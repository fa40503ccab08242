//! The io_uring engine ([`UringQueue`]), behind the default `io_uring` feature.

use std::collections::VecDeque;
use std::ops::Deref;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress, Permissions};

use super::{run_sync, AioOp, AioQueue, AioRequest, Bounce, Completion, Payload};
use crate::backend::{BlockBackend, FileRead, FileSource};
use crate::buf::{AlignedBuf, IoBuf};
use crate::error::{Error, Result};
use crate::mapping::{Extent, ExtentKind, MapExtents, Mapping};
use crate::qcow2::Qcow2;
use crate::raw::{RawFile, WriteGuard};

/// How a [`UringTarget`] takes a write ([`UringTarget::map_write_or_copy`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum WriteMap {
    /// Transfer the data to these extents.
    Direct(Mapping),
    /// A copy on write of the range is in flight: submit the write again once it has
    /// completed ([`UringTarget::wait_copies`] waits for one of another queue's).
    Busy,
    /// Merge the data into the block and write the block, then
    /// [`UringTarget::finish_copy`].
    Copy(CopyWrite),
}

/// A write done as a copy: the block that takes it (a qcow2 cluster copied from the
/// backing image), written whole, with the request's data merged in.
#[derive(Debug)]
pub struct CopyWrite {
    /// Offset in [`UringTarget::data_fd`] the block is written to.
    pub host: u64,
    /// The block's old contents, aligned for the file; the request's data goes at `at`.
    pub block: AlignedBuf,
    /// Where the request's data starts in `block`.
    pub at: usize,
    /// Where the rest of the block's old contents are to be read from (the engine reads
    /// the parts outside the request's data; each piece meets its file's alignment), or
    /// `None` if `block` holds them already.
    pub old: Option<FileRead>,
    /// What [`UringTarget::finish_copy`] needs once the block is written; it pins the
    /// host range until then.
    pub link: CopyLink,
}

/// The part of a [`CopyWrite`] its target needs back to finish it.
#[derive(Debug)]
pub struct CopyLink {
    /// Guest cluster index.
    pub(crate) guest: u64,
    /// Host offset of the block.
    pub(crate) host: u64,
    /// Pins the block until the copy is finished.
    pub(crate) pin: Mapping,
}

/// A backend whose data lives in one file descriptor that io_uring can
/// address directly.
pub trait UringTarget: BlockBackend {
    /// The descriptor data transfers go to.
    fn data_fd(&self) -> RawFd;
    /// Required alignment of offsets, lengths and buffers for `data_fd`.
    fn data_alignment(&self) -> u64;
    /// The raw file behind [`UringTarget::data_fd`], if it is one: writes in flight hold
    /// their ranges of it, so that its read-modify-writes of partial blocks (`O_DIRECT`)
    /// wait for them. Targets that return `None` (the default) get no such ordering.
    fn data_file(&self) -> Option<&RawFile> {
        None
    }
    /// Whether a write of `len` bytes at `offset` must reach the target's own
    /// [`BlockBackend::write_vectored_at`] because the target looks at the data (as
    /// [`ProbedRaw`](crate::probed::ProbedRaw) does for the first sector). [`UringQueue`]
    /// serves such writes synchronously and never maps them. The default: none.
    fn inspects_write(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Maps a device range to host extents, allocating for writes. The
    /// queue keeps the returned [`Mapping`] until every transfer to its
    /// extents has completed, so implementations whose host offsets can
    /// change owner must pin them in it (as [`Qcow2`] does).
    fn map(&self, write: bool, offset: u64, len: u64) -> Result<Mapping>;
    /// Maps a write, which may also be done as a copy or have to wait for one. It never
    /// blocks. The default maps it with [`UringTarget::map`].
    fn map_write_or_copy(&self, offset: u64, len: u64) -> Result<WriteMap> {
        self.map(true, offset, len).map(WriteMap::Direct)
    }
    /// Finishes a [`WriteMap::Copy`] once its block was `written` (or failed to be).
    fn finish_copy(&self, link: CopyLink, written: bool) -> Result<()> {
        let _ = (link, written);
        Ok(())
    }
    /// Blocks until no copy this target has in flight covers `[offset, offset + len)`
    /// (a [`WriteMap::Busy`] range). Only call it with no copy of one's own in flight.
    fn wait_copies(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

impl UringTarget for RawFile {
    fn data_fd(&self) -> RawFd {
        self.fd()
    }
    fn data_file(&self) -> Option<&RawFile> {
        Some(self)
    }
    fn data_alignment(&self) -> u64 {
        self.limits().request_alignment as u64
    }
    fn map(&self, write: bool, offset: u64, len: u64) -> Result<Mapping> {
        if write && self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        crate::backend::check_range(offset, len, self.size())?;
        Ok(Mapping::unpinned(vec![Extent {
            len,
            kind: ExtentKind::Data(offset),
        }]))
    }
}

impl UringTarget for Qcow2<RawFile> {
    fn data_fd(&self) -> RawFd {
        self.file().fd()
    }
    fn data_file(&self) -> Option<&RawFile> {
        Some(self.file())
    }
    fn data_alignment(&self) -> u64 {
        let a = self.file().limits().request_alignment as u64;
        if self.cluster_size() < a {
            // A data cluster may share an aligned block of the file with metadata, which
            // the image writes (read-modify-write) under its metadata lock: a transfer
            // in flight there would have that wait for this queue while this queue waits
            // for the lock. No request meets this alignment: all are served inline.
            u64::MAX
        } else {
            a
        }
    }
    fn map(&self, write: bool, offset: u64, len: u64) -> Result<Mapping> {
        if write {
            self.map_write(offset, len)
        } else {
            self.map_read(offset, len)
        }
    }
    fn map_write_or_copy(&self, offset: u64, len: u64) -> Result<WriteMap> {
        // Page-aligned, as QEMU aligns its buffers: a block in fewer pages.
        let align = self.file().limits().memory_alignment.max(4096) as usize;
        Qcow2::map_write_or_copy(self, offset, len, align)
    }
    fn finish_copy(&self, link: CopyLink, written: bool) -> Result<()> {
        Qcow2::finish_copy(self, link, written)
    }
    fn wait_copies(&self, offset: u64, len: u64) {
        Qcow2::wait_until_copied(self, offset, len)
    }
}

/// A request whose transfers are in flight.
struct Parent<B> {
    user_data: u64,
    remaining: usize,
    error: Option<Error>,
    write: bool,
    /// The memory the transfers use: owned here until every one has completed.
    buf: B,
    /// Pins the host clusters until every piece has completed.
    _mapping: Mapping,
    /// For writes, holds the file ranges written until every piece has completed.
    _writing: Option<WriteGuard>,
    /// A write done as a copy.
    copy: Option<CopyState>,
}

/// A write in flight as a copy: the old contents are read into the block, then the
/// block is written.
struct CopyState {
    /// The block, owned until its transfers complete.
    block: AlignedBuf,
    link: CopyLink,
    /// Where the block goes.
    host: u64,
    /// Reads into the block are in flight (then the write is next).
    reading: bool,
    /// Pins what the reads read from.
    _sources: Vec<Mapping>,
}

/// One transfer between a contiguous piece of a request's buffer and the file.
struct Piece {
    parent: usize,
    write: bool,
    fd: RawFd,
    /// Address of the piece's memory, from the buffer's volatile slice; the parent owns
    /// the buffer, which keeps it valid.
    addr: *mut u8,
    len: usize,
    /// Byte offset in the file.
    offset: u64,
    /// Byte offset in the parent's buffer.
    pos: usize,
}

/// How [`UringQueue`] serves a data request.
pub(super) enum Plan {
    /// Synchronously, through the backend's own read and write paths.
    Inline,
    /// It fails at once.
    Fail(Error),
    /// Transfers between these pieces of the buffer and the file, with the mapping
    /// that pins their host extents.
    Direct {
        pieces: Vec<(*mut u8, usize, u64, usize)>,
        mapping: Mapping,
    },
    /// A copy on write of the range is in flight: later.
    Busy,
    /// Reads of the old contents into the block (the data merged in already), then one
    /// write of the block.
    Copy(AlignedBuf, CopyLink, u64, Option<FileRead>),
}

/// Transfers (io_uring entries) one request may hold in flight; a request whose buffer
/// and mapping would need more is served inline, through a bounded bounce buffer.
pub(super) const MAX_PIECES: usize = 1024;

/// Largest transfer one io_uring entry carries (a longer piece completes short and the
/// rest is resubmitted).
const MAX_ENTRY: usize = 1 << 30;

/// Largest buffer the kernel registers as one fixed buffer (its limit is 1 GiB).
const MAX_FIXED_BUFFER: usize = 1 << 30;

/// Memory registered with the ring as fixed buffers ([`UringQueue::register_memory`]).
struct FixedMemory {
    /// Start address and length of each registered buffer, in the ring's buffer-table
    /// order.
    buffers: Vec<(usize, usize)>,
    /// The handle that keeps the registered memory mapped. Declared after the ring in
    /// [`UringQueue`], so it is dropped after the ring (and its registration) is gone.
    _keep: Box<dyn Send>,
}

impl FixedMemory {
    /// The buffer-table index of the registered buffer that holds all of
    /// `[addr, addr + len)`, if one does.
    fn index(&self, addr: *mut u8, len: usize) -> Option<u16> {
        let a = addr as usize;
        let end = a.checked_add(len)?;
        let i = self
            .buffers
            .iter()
            .position(|&(start, n)| start <= a && end <= start + n)?;
        u16::try_from(i).ok()
    }
}

/// An io_uring engine for one device queue.
///
/// The data file is registered with the ring (a fixed file: the kernel does not look it
/// up for every transfer) where the kernel allows it, and memory can be registered too
/// ([`UringQueue::register_memory`]).
pub struct UringQueue<T: UringTarget, B: IoBuf> {
    ring: IoUring,
    /// The data file's descriptor while it is registered as fixed file 0.
    fixed_fd: Option<RawFd>,
    /// Registered memory; after `ring`, so it outlives the registration.
    fixed_mem: Option<FixedMemory>,
    target: Arc<T>,
    parents: Vec<Option<Parent<B>>>,
    free_parents: Vec<usize>,
    pieces: Vec<Option<Piece>>,
    free_pieces: Vec<usize>,
    unsubmitted: usize,
    in_flight: usize,
    done: Vec<Completion<B>>,
    bounce: Bounce,
    /// Writes waiting for a copy on write of their range to finish.
    deferred: VecDeque<AioRequest<B>>,
    /// Copies on write this queue has in flight.
    copies: usize,
    /// A copy finished since the deferred writes were last tried.
    copy_finished: bool,
}

/// Queued transfers are submitted once this many are waiting (and at every wait). Measured
/// with the test guest's blk-bench at depth 32 on this project's machines (raw image,
/// `cache=none`): submitting everything at the next wait sent ~16 requests per
/// io_uring_enter, and the host disk then took 400-480 µs per read and 260-280 µs per
/// write (`/sys/block/*/stat`); groups of 4 brought that to 290-310 and 120-140 µs, and
/// IOPS from 58-69k to 79-84k (reads) and 72-89k to 119-129k (writes). Groups of 1 cost a
/// system call per request (worker CPU per request 6-13 µs against 4.5-5.5), groups of 8
/// were no better than 4. fio shows the same on its own: `--iodepth_batch_submit=16`
/// is 10-25% slower than one at a time.
const SUBMIT_GROUP: usize = 4;

impl<T: UringTarget, B: IoBuf> UringQueue<T, B> {
    /// A queue with room for `depth` requests in flight.
    pub fn new(target: Arc<T>, depth: u32) -> Result<Self> {
        let ring = IoUring::new(depth.next_power_of_two().max(8) * 2)
            .map_err(|e| Error::io("setting up io_uring", e))?;
        // A fixed file saves the kernel a descriptor lookup (and reference) per transfer;
        // a kernel that refuses it gets the plain descriptor.
        let fd = target.data_fd();
        let fixed_fd = ring.submitter().register_files(&[fd]).ok().map(|()| fd);
        Ok(UringQueue {
            ring,
            fixed_fd,
            fixed_mem: None,
            target,
            parents: Vec::new(),
            free_parents: Vec::new(),
            pieces: Vec::new(),
            free_pieces: Vec::new(),
            unsubmitted: 0,
            in_flight: 0,
            done: Vec::new(),
            bounce: Bounce::default(),
            deferred: VecDeque::new(),
            copies: 0,
            copy_finished: false,
        })
    }

    /// Registers the regions of `mem` with the ring as fixed buffers: transfers to and
    /// from them then use the kernel's pinned copy of the pages instead of looking up and
    /// pinning them for every request. The queue keeps `mem` (a handle such as an
    /// `Arc<GuestMemoryMmap>`) until the ring is closed, so the registered mappings stay
    /// in place that long; a second call replaces the first registration.
    ///
    /// The kernel pins every page of `mem` now (they become resident and count against
    /// `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`) and keeps transferring to those very pages:
    /// only for memory whose pages stay where they are for the life of the queue. Memory
    /// its owner discards (`MADV_DONTNEED`, a balloon, free page reporting) or remaps
    /// must not be registered: transfers would reach the discarded pages, not the ones
    /// that replaced them. On an error nothing is registered and transfers go on as
    /// before.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use keel_block::aio::{AioQueue, AioRequest, UringQueue};
    /// use keel_block::buf::GuestBuf;
    /// use keel_block::iov::GuestRange;
    /// use keel_block::{RawFile, RawOptions};
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    ///
    /// let file = Arc::new(RawFile::open("disk.img", RawOptions::default())?);
    /// let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    /// let mut q = UringQueue::new(file, 32)?;
    /// q.register_memory(mem.clone())?;
    /// let buf = GuestBuf::new(mem, [GuestRange::new(GuestAddress(0x1000), 4096)].into_iter().collect());
    /// q.submit(AioRequest::read(0, buf, 1));
    /// let mut done = Vec::new();
    /// q.wait(1, &mut done)?;
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    pub fn register_memory<M>(&mut self, mem: M) -> Result<()>
    where
        M: Deref + Send + 'static,
        M::Target: GuestMemoryBackend,
    {
        let mut buffers = Vec::new();
        for region in mem.iter() {
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let slice = region
                .get_slice(MemoryRegionAddress(0), len)
                .map_err(|source| Error::GuestMemory {
                    addr: region.start_addr().0,
                    len: region.len() as usize,
                    source,
                })?;
            let start = slice.ptr_guard_mut().as_ptr() as usize;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(MAX_FIXED_BUFFER);
                buffers.push((start + at, n));
                at += n;
            }
        }
        let iovecs: Vec<libc::iovec> = buffers
            .iter()
            .map(|&(start, len)| libc::iovec {
                iov_base: start as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        if self.fixed_mem.take().is_some() {
            // Transfers in flight keep their own reference on the old buffers.
            self.ring
                .submitter()
                .unregister_buffers()
                .map_err(|e| Error::io("unregistering io_uring buffers", e))?;
        }
        // SAFETY: every iovec is a whole mapping of one of `mem`'s regions (or a piece of
        // one), and `mem`, kept in `fixed_mem`, holds those mappings for as long as the
        // queue exists; dropping the queue unregisters them (and the ring, declared
        // before `fixed_mem`, is closed before the mappings go; pages the kernel still
        // has pinned stay allocated until it lets go). The kernel only transfers data
        // through these buffers for requests this queue submits, each for memory a
        // request's buffer owns.
        unsafe { self.ring.submitter().register_buffers(&iovecs) }
            .map_err(|e| Error::io("registering guest memory with io_uring", e))?;
        self.fixed_mem = Some(FixedMemory {
            buffers,
            _keep: Box::new(mem),
        });
        Ok(())
    }

    /// Serves a request synchronously.
    fn inline(&mut self, mut req: AioRequest<B>) {
        // A write served here may be a read-modify-write of partial blocks, which waits
        // for the writes in flight to its blocks; this queue's own complete only when it
        // reaps them, so it first lets them complete.
        let rmw_possible = matches!(req.op(), AioOp::Write | AioOp::WriteZeroes { .. })
            && self.target.data_alignment() > 1;
        // The synchronous paths wait for copies on write in flight in their range, and
        // this queue's own complete only when it reaps them.
        if rmw_possible || self.copies > 0 {
            if let Err(e) = self.drain() {
                self.done.push(req.complete(Err(e)));
                return;
            }
        }
        let result = run_sync(&*self.target, &mut req, &mut self.bounce);
        self.done.push(req.complete(result));
    }

    /// Submits the deferred writes again (those still busy are deferred again).
    fn retry_deferred(&mut self) {
        self.copy_finished = false;
        for r in std::mem::take(&mut self.deferred) {
            self.submit(r);
        }
    }

    /// Waits until every transfer this queue has in flight has completed (their
    /// completions are kept for [`AioQueue::wait`]).
    fn drain(&mut self) -> Result<()> {
        loop {
            self.reap();
            if self.in_flight == 0 {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("waiting for io_uring", e)),
            }
        }
    }

    /// Decides how to serve a transfer of `buf` at `offset`; zeroes the parts of a read
    /// that map to no data.
    pub(super) fn plan(&self, write: bool, offset: u64, buf: &mut B) -> Plan {
        let access = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut iov = match buf.slices(access) {
            Ok(iov) => iov,
            Err(e) => return Plan::Fail(e),
        };
        let a = self.target.data_alignment();
        let aligned = a <= 1
            || (offset % a == 0
                && iov.len() as u64 % a == 0
                && iov
                    .iter()
                    .all(|s| s.len() as u64 % a == 0 && s.ptr_guard().as_ptr() as u64 % a == 0));
        // Misaligned, more pieces than a request may hold in flight, or a write the
        // target must see.
        if !aligned
            || iov.segments().len() > MAX_PIECES
            || (write && self.target.inspects_write(offset, iov.len() as u64))
        {
            return Plan::Inline;
        }
        // The mapping pins the host clusters until the parent completes.
        let len = iov.len() as u64;
        let mapped = if write {
            self.target.map_write_or_copy(offset, len)
        } else {
            self.target.map(false, offset, len).map(WriteMap::Direct)
        };
        let mut mapping = match mapped {
            Ok(WriteMap::Direct(m)) => m,
            Ok(WriteMap::Busy) => return Plan::Busy,
            Ok(WriteMap::Copy(CopyWrite {
                host,
                mut block,
                at,
                old,
                link,
            })) => {
                iov.copy_to_slice(0, &mut block.as_mut_slice()[at..at + len as usize]);
                return Plan::Copy(block, link, host, old);
            }
            Err(e) => return Plan::Fail(e),
        };
        // Backing-file and compressed data go through the driver's own read
        // path (another image, or decompression), inline like metadata ops.
        let direct = mapping
            .extents()
            .iter()
            .all(|e| !matches!(e.kind, ExtentKind::Backing | ExtentKind::Compressed { .. }));
        if !direct {
            return Plan::Inline;
        }
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        for e in mapping.take_extents() {
            let n = e.len as usize;
            match e.kind {
                ExtentKind::Data(host) => {
                    let mut at = 0usize;
                    for s in iov.range(pos, n) {
                        if pieces.len() == MAX_PIECES {
                            // Mapped in too many pieces (a fragmented image).
                            return Plan::Inline;
                        }
                        let addr = s.ptr_guard_mut().as_ptr();
                        pieces.push((addr, s.len(), host + at as u64, pos + at));
                        at += s.len();
                    }
                }
                // Only reads map to these.
                ExtentKind::Zero | ExtentKind::Unallocated => iov.fill_zero(pos, n),
                // Served inline above; never reached.
                ExtentKind::Backing | ExtentKind::Compressed { .. } => {}
            }
            pos += n;
        }
        Plan::Direct { pieces, mapping }
    }

    /// Queues one transfer. On failure the piece is not queued (and its
    /// parent is not charged for it).
    /// Stores a new request in a free slot and counts it in flight; returns its index.
    fn add_parent(&mut self, parent: Parent<B>) -> usize {
        let pidx = match self.free_parents.pop() {
            Some(i) => i,
            None => {
                self.parents.push(None);
                self.parents.len() - 1
            }
        };
        self.parents[pidx] = Some(parent);
        self.in_flight += 1;
        pidx
    }

    /// Queues the pieces of request `pidx`, each counted in its `remaining`, then
    /// releases the count held while queuing. On a failure the rest is not queued:
    /// pieces already queued still use the buffer, so the error is reported by the
    /// completion, once they are done.
    fn queue_pieces(&mut self, pidx: usize, pieces: impl Iterator<Item = Piece>) {
        let mut failed = None;
        for piece in pieces {
            match self.push_piece(piece) {
                Ok(()) => {
                    if let Some(p) = self.parents[pidx].as_mut() {
                        p.remaining += 1;
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.finish_piece(pidx, failed);
    }

    fn push_piece(&mut self, p: Piece) -> Result<()> {
        let idx = match self.free_pieces.pop() {
            Some(i) => i,
            None => {
                self.pieces.push(None);
                self.pieces.len() - 1
            }
        };
        let len = p.len.min(MAX_ENTRY) as u32;
        let fixed_buf = self
            .fixed_mem
            .as_ref()
            .and_then(|m| m.index(p.addr, len as usize));
        let entry = match (self.fixed_fd == Some(p.fd), fixed_buf, p.write) {
            (true, Some(i), true) => opcode::WriteFixed::new(types::Fixed(0), p.addr, len, i)
                .offset(p.offset)
                .build(),
            (true, Some(i), false) => opcode::ReadFixed::new(types::Fixed(0), p.addr, len, i)
                .offset(p.offset)
                .build(),
            (false, Some(i), true) => opcode::WriteFixed::new(types::Fd(p.fd), p.addr, len, i)
                .offset(p.offset)
                .build(),
            (false, Some(i), false) => opcode::ReadFixed::new(types::Fd(p.fd), p.addr, len, i)
                .offset(p.offset)
                .build(),
            (true, None, true) => opcode::Write::new(types::Fixed(0), p.addr, len)
                .offset(p.offset)
                .build(),
            (true, None, false) => opcode::Read::new(types::Fixed(0), p.addr, len)
                .offset(p.offset)
                .build(),
            (false, None, true) => opcode::Write::new(types::Fd(p.fd), p.addr, len)
                .offset(p.offset)
                .build(),
            (false, None, false) => opcode::Read::new(types::Fd(p.fd), p.addr, len)
                .offset(p.offset)
                .build(),
        }
        .user_data(idx as u64);
        loop {
            // SAFETY: the entry's memory is `len` bytes of the parent's buffer, which the
            // parent owns until this piece's completion has been reaped (the IoBuf
            // contract keeps it valid that long, wherever the buffer moves); the kernel
            // is the only one to access it through this address.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            if let Err(e) = self.ring.submit() {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.free_pieces.push(idx);
                return Err(Error::io("submitting to io_uring", e));
            }
            self.unsubmitted = 0;
        }
        self.pieces[idx] = Some(p);
        self.unsubmitted += 1;
        // Hand the kernel small groups as they come rather than everything queued at the
        // next wait: a long convoy reaches the host disk as one plugged batch, which it
        // serves more slowly per request (see SUBMIT_GROUP). A failed submit here is
        // retried by the next one, or by the wait, which reports it.
        if self.unsubmitted >= SUBMIT_GROUP && self.ring.submit().is_ok() {
            self.unsubmitted = 0;
        }
        Ok(())
    }

    fn finish_piece(&mut self, parent: usize, err: Option<Error>) {
        let done = match self.parents[parent].as_mut() {
            Some(p) => {
                if p.error.is_none() {
                    p.error = err;
                }
                p.remaining -= 1;
                p.remaining == 0
            }
            None => false,
        };
        if done && self.next_copy_stage(parent) {
            return;
        }
        if done {
            // Dropping the parent drops its Mapping: every transfer is done,
            // so its host clusters may be reused.
            if let Some(mut p) = self.parents[parent].take() {
                self.free_parents.push(parent);
                self.in_flight -= 1;
                if let Some(c) = p.copy.take() {
                    // The block is written (or failed): link it (or free it).
                    let CopyState { block, link, .. } = c;
                    drop(block);
                    let finished = self.target.finish_copy(link, p.error.is_none());
                    if let (None, Err(e)) = (&p.error, finished) {
                        p.error = Some(e);
                    }
                    self.copies -= 1;
                    self.copy_finished = true;
                }
                if !p.write {
                    // The kernel wrote into the buffer behind the bitmap's back.
                    mark_dirty(&mut p.buf);
                }
                self.done.push(Completion {
                    user_data: p.user_data,
                    result: match p.error {
                        None => Ok(()),
                        Some(e) => Err(e),
                    },
                    buf: Some(p.buf),
                });
            }
        }
    }

    /// Starts a write done as a copy: the reads of the block's old contents outside
    /// `data` (a range of the block the request's data fills already), then, from
    /// [`UringQueue::next_copy_stage`], the write of the block.
    #[allow(clippy::too_many_arguments)]
    fn submit_copy(
        &mut self,
        user_data: u64,
        buf: B,
        mut block: AlignedBuf,
        link: CopyLink,
        host: u64,
        old: Option<FileRead>,
        data: (usize, usize),
    ) {
        let base = block.as_mut_slice().as_mut_ptr();
        // Pieces to read: (block position, length, fd, file offset).
        let mut reads = Vec::new();
        let mut sources = Vec::new();
        if let Some(old) = old {
            let mut p = 0usize;
            for e in &old.extents {
                let end = p + e.len as usize;
                if let FileSource::File { fd, offset, .. } = e.source {
                    for (s, t) in [(p, end.min(data.0)), (p.max(data.1), end)] {
                        if s < t {
                            reads.push((s, t - s, fd, offset + (s - p) as u64));
                        }
                    }
                }
                p = end;
            }
            sources = old.pins;
        }
        let writing = self
            .target
            .data_file()
            .and_then(|f| f.lock_writes(&[(host, host + block.len() as u64)]));
        let pidx = self.add_parent(Parent {
            user_data,
            remaining: 1,
            error: None,
            write: true,
            buf,
            _mapping: Mapping::unpinned(Vec::new()),
            _writing: writing,
            copy: Some(CopyState {
                block,
                link,
                host,
                reading: true,
                _sources: sources,
            }),
        });
        self.copies += 1;
        let pieces = reads.into_iter().map(|(pos, len, fd, offset)| Piece {
            parent: pidx,
            write: false,
            fd,
            // Inside the block, which the parent owns until the piece completes.
            addr: base.wrapping_add(pos),
            len,
            offset,
            pos,
        });
        self.queue_pieces(pidx, pieces);
    }

    /// Once every transfer of a copy's current stage has completed: after the reads,
    /// submits the write of the block and returns true (the request goes on).
    fn next_copy_stage(&mut self, parent: usize) -> bool {
        let fd = self.target.data_fd();
        let Some(p) = self.parents[parent].as_mut() else {
            return false;
        };
        let Some(c) = p.copy.as_mut() else {
            return false;
        };
        if !c.reading || p.error.is_some() {
            return false;
        }
        c.reading = false;
        let piece = Piece {
            parent,
            write: true,
            fd,
            addr: c.block.as_mut_slice().as_mut_ptr(),
            len: c.block.len(),
            offset: c.host,
            pos: 0,
        };
        p.remaining = 1;
        match self.push_piece(piece) {
            Ok(()) => true,
            Err(e) => {
                if let Some(p) = self.parents[parent].as_mut() {
                    p.remaining = 0;
                    p.error = Some(e);
                }
                false
            }
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            let idx = ud as usize;
            let Some(mut p) = self.pieces.get_mut(idx).and_then(|s| s.take()) else {
                continue;
            };
            self.free_pieces.push(idx);
            let parent = p.parent;
            if res < 0 {
                let what = if p.write {
                    "writing (io_uring)"
                } else {
                    "reading (io_uring)"
                };
                let e = Error::io(what, std::io::Error::from_raw_os_error(-res));
                self.finish_piece(parent, Some(e));
                continue;
            }
            let n = res as usize;
            if n < p.len {
                if n == 0 && !p.write {
                    // End of file: the rest reads as zeroes.
                    let zeroed = match self.parents.get_mut(parent).and_then(|s| s.as_mut()) {
                        Some(par) if par.copy.is_some() => {
                            // A read of a copy's old contents, into its block.
                            // SAFETY: the piece's `len` bytes at `addr` lie in the
                            // block, which the parent owns, and the kernel is done with
                            // them (this is their completion).
                            unsafe { std::ptr::write_bytes(p.addr, 0, p.len) };
                            Ok(())
                        }
                        Some(par) => par
                            .buf
                            .slices(Permissions::Write)
                            .map(|mut iov| iov.fill_zero(p.pos, p.len)),
                        None => Ok(()),
                    };
                    self.finish_piece(parent, zeroed.err());
                    continue;
                } else if n == 0 {
                    let e = Error::io(
                        "writing (io_uring)",
                        std::io::Error::from(std::io::ErrorKind::WriteZero),
                    );
                    self.finish_piece(parent, Some(e));
                    continue;
                } else {
                    // Short transfer: resubmit the remainder (n < len, so the address
                    // stays inside the piece).
                    p.addr = p.addr.wrapping_add(n);
                    p.len -= n;
                    p.pos += n;
                    p.offset += n as u64;
                    if let Err(e) = self.push_piece(p) {
                        self.finish_piece(parent, Some(e));
                    }
                    continue;
                }
            }
            self.finish_piece(parent, None);
        }
    }
}

/// Marks the whole of `buf` dirty in its memory's bitmap (a no-op without one).
fn mark_dirty<B: IoBuf>(buf: &mut B) {
    if let Ok(iov) = buf.slices(Permissions::Write) {
        for s in &iov {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

impl<T: UringTarget, B: IoBuf> AioQueue<B> for UringQueue<T, B> {
    fn submit(&mut self, req: AioRequest<B>) {
        // Flush, discard and write-zeroes are metadata operations for qcow2 (and
        // a single fdatasync/fallocate for raw): they run inline and complete at
        // once. Clusters that in-flight transfers use stay pinned meanwhile.
        let AioRequest {
            payload,
            offset,
            user_data,
        } = req;
        let (write, mut buf) = match payload {
            Payload::Read(b) => (false, b),
            Payload::Write(b) => (true, b),
            payload => {
                return self.inline(AioRequest {
                    payload,
                    offset,
                    user_data,
                })
            }
        };
        if buf.is_empty() {
            return self.done.push(Completion {
                user_data,
                result: Ok(()),
                buf: Some(buf),
            });
        }
        let (pieces, mapping) = match self.plan(write, offset, &mut buf) {
            Plan::Direct { pieces, mapping } => (pieces, mapping),
            Plan::Copy(block, link, host, old) => {
                let at = (offset & (block.len() as u64 - 1)) as usize;
                let len = buf.len();
                return self.submit_copy(user_data, buf, block, link, host, old, (at, at + len));
            }
            Plan::Busy => {
                return self.deferred.push_back(AioRequest {
                    payload: Payload::Write(buf),
                    offset,
                    user_data,
                })
            }
            Plan::Fail(e) => {
                return self.done.push(Completion {
                    user_data,
                    result: Err(e),
                    buf: Some(buf),
                })
            }
            Plan::Inline => {
                let payload = if write {
                    Payload::Write(buf)
                } else {
                    Payload::Read(buf)
                };
                return self.inline(AioRequest {
                    payload,
                    offset,
                    user_data,
                });
            }
        };
        // A write holds the file ranges it covers until it completes (see
        // `UringTarget::data_file`).
        let writing = match (write, self.target.data_file()) {
            (true, Some(f)) => {
                let ranges: Vec<(u64, u64)> = pieces
                    .iter()
                    .map(|&(_, len, host, _)| (host, host + len as u64))
                    .collect();
                f.lock_writes(&ranges)
            }
            _ => None,
        };
        // One extra count held while queuing, released by `queue_pieces`.
        let pidx = self.add_parent(Parent {
            user_data,
            remaining: 1,
            error: None,
            write,
            buf,
            _mapping: mapping,
            _writing: writing,
            copy: None,
        });
        let fd = self.target.data_fd();
        let pieces = pieces.into_iter().map(|(addr, len, offset, pos)| Piece {
            parent: pidx,
            write,
            fd,
            addr,
            len,
            offset,
            pos,
        });
        self.queue_pieces(pidx, pieces);
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion<B>>) -> Result<()> {
        loop {
            self.reap();
            if self.copy_finished && !self.deferred.is_empty() {
                self.retry_deferred();
                continue;
            }
            if self.done.len() >= min || (self.in_flight == 0 && self.deferred.is_empty()) {
                break;
            }
            if self.in_flight == 0 {
                // Only writes waiting for another queue's copies: wait for those.
                if let Some(r) = self.deferred.front() {
                    self.target.wait_copies(r.offset, r.len());
                }
                self.retry_deferred();
                continue;
            }
            let want = if self.done.len() < min { 1 } else { 0 };
            self.ring
                .submit_and_wait(want)
                .map_err(|e| Error::io("waiting for io_uring", e))?;
            self.unsubmitted = 0;
        }
        if self.unsubmitted > 0 {
            self.ring
                .submit()
                .map_err(|e| Error::io("submitting to io_uring", e))?;
            self.unsubmitted = 0;
        }
        out.append(&mut self.done);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len() + self.deferred.len()
    }
}

impl<T: UringTarget, B: IoBuf> Drop for UringQueue<T, B> {
    fn drop(&mut self) {
        // The kernel may still be transferring to or from buffers the parents own: wait
        // until every transfer has completed before they are freed.
        while self.in_flight > 0 {
            self.reap();
            if self.in_flight == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // No way to learn when the kernel is done: leak the buffers rather
                    // than free memory it may still write.
                    std::mem::forget(std::mem::take(&mut self.parents));
                    return;
                }
            }
        }
        // Closing a ring does not end its registrations there and then: the kernel tears
        // the ring down later, on a worker of its own, and until it has, the fixed file
        // keeps the image open (a file system holding it cannot be unmounted right after
        // the VMM exits) and registered memory stays pinned. Unregistering, with nothing
        // in flight, releases both before this returns.
        // Should the kernel refuse (it has no reason to, with nothing in flight), closing
        // the ring still releases both, only later: nothing is lost.
        if self.fixed_fd.is_some() {
            let _ = self.ring.submitter().unregister_files();
        }
        if self.fixed_mem.is_some() {
            let _ = self.ring.submitter().unregister_buffers();
        }
    }
}

//! Completion-based asynchronous I/O queues.
//!
//! A device queue submits [`AioRequest`]s, each tagged with a `user_data`
//! value, and later collects [`Completion`]s carrying the same tag, the shape
//! of io_uring and of virtio queues. Each device queue owns one [`AioQueue`];
//! the backend behind it is shared (`Arc`) between queues.
//!
//! * [`SyncQueue`] runs each request inline on any [`BlockBackend`]; it is the
//!   baseline every backend has.
//! * [`ThreadQueue`] runs requests on worker threads, for any backend.
//! * [`UringQueue`] submits data transfers to io_uring. It drives any
//!   [`UringTarget`]: a [`RawFile`] maps guest offsets one to one, a
//!   [`Qcow2`] over a [`RawFile`] maps them through its L1/L2 tables
//!   (allocating clusters synchronously under its metadata lock) and only the
//!   data transfer is asynchronous.
//!
//! Requests whose buffer or offset do not meet an `O_DIRECT` file's
//! alignment are served synchronously through the backend's bounce buffers.
//!
//! Requests may overlap in any order, on one queue or across queues and the
//! synchronous API, as an untrusted guest may issue them: a qcow2 host
//! cluster with a transfer in flight is pinned by the request's [`Mapping`]
//! until the transfer completes, so a discard or write-zeroes of the same
//! range can free it but nothing can reuse it meanwhile. A late write lands
//! in a free cluster and a late read returns the data it was issued for,
//! never another guest offset's (see [`crate::qcow2::inflight`]).

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::io::RawFd;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::backend::{BlockBackend, WriteFlags};
use crate::error::{Error, Result};
use crate::mapping::{Extent, ExtentKind, MapExtents, Mapping};
use crate::qcow2::Qcow2;
use crate::raw::RawFile;

/// The operation of an [`AioRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioOp {
    /// Read `len` bytes at `offset` into `buf`.
    Read,
    /// Write `len` bytes from `buf` at `offset`.
    Write,
    /// Make completed writes durable (`buf`, `len`, `offset` ignored).
    Flush,
    /// Discard `len` bytes at `offset` (`buf` ignored).
    Discard,
    /// Zero `len` bytes at `offset`, deallocating where `unmap` allows and the
    /// backend can (`buf` ignored).
    WriteZeroes {
        /// The device may deallocate instead of writing zeroes.
        unmap: bool,
    },
}

impl AioOp {
    /// Whether the request transfers data through its buffer.
    pub fn transfers_data(self) -> bool {
        matches!(self, AioOp::Read | AioOp::Write)
    }
}

/// One asynchronous request. The buffer is a raw pointer because it
/// typically points into guest memory and must outlive the call.
#[derive(Debug, Clone, Copy)]
pub struct AioRequest {
    /// What to do.
    pub op: AioOp,
    /// Byte offset on the device.
    pub offset: u64,
    /// Start of the data buffer.
    pub buf: *mut u8,
    /// Length of the data buffer.
    pub len: usize,
    /// Returned unchanged in the [`Completion`].
    pub user_data: u64,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Completion {
    /// The request's `user_data`.
    pub user_data: u64,
    /// Success, or why it failed.
    pub result: Result<()>,
}

/// A submission/completion queue for one device queue.
pub trait AioQueue {
    /// Queues a request.
    ///
    /// # Safety
    /// `req.buf` must be valid for `req.len` bytes (writable for reads) and
    /// must be neither freed nor accessed by the caller until the completion
    /// carrying `req.user_data` has been returned by [`AioQueue::wait`].
    unsafe fn submit(&mut self, req: AioRequest) -> Result<()>;

    /// Waits until at least `min` completions are available (or nothing is
    /// in flight) and appends every available completion to `out`.
    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()>;

    /// Requests submitted and not yet returned as completions.
    fn in_flight(&self) -> usize;
}

/// Runs each request synchronously on a shared backend.
pub struct SyncQueue<B: BlockBackend> {
    backend: Arc<B>,
    done: VecDeque<Completion>,
}

impl<B: BlockBackend> SyncQueue<B> {
    /// A queue over `backend`.
    pub fn new(backend: Arc<B>) -> Self {
        SyncQueue {
            backend,
            done: VecDeque::new(),
        }
    }
}

/// Executes a request synchronously.
///
/// # Safety
/// Same contract as [`AioQueue::submit`].
unsafe fn run_sync<B: BlockBackend + ?Sized>(b: &B, req: &AioRequest) -> Result<()> {
    match req.op {
        AioOp::Read => {
            // SAFETY: the caller guarantees buf is valid and exclusive for len bytes.
            let s = unsafe { std::slice::from_raw_parts_mut(req.buf, req.len) };
            b.read_vectored_at(&mut [IoSliceMut::new(s)], req.offset)
        }
        AioOp::Write => {
            // SAFETY: the caller guarantees buf is valid for len bytes.
            let s = unsafe { std::slice::from_raw_parts(req.buf, req.len) };
            b.write_vectored_at(&[IoSlice::new(s)], req.offset, WriteFlags::NONE)
        }
        AioOp::Flush => b.flush(),
        AioOp::Discard => b.discard(req.offset, req.len as u64),
        AioOp::WriteZeroes { unmap } => b.write_zeroes(req.offset, req.len as u64, unmap),
    }
}

impl<B: BlockBackend> AioQueue for SyncQueue<B> {
    unsafe fn submit(&mut self, req: AioRequest) -> Result<()> {
        // SAFETY: forwarded caller contract.
        let result = unsafe { run_sync(&*self.backend, &req) };
        self.done.push_back(Completion {
            user_data: req.user_data,
            result,
        });
        Ok(())
    }

    fn wait(&mut self, _min: usize, out: &mut Vec<Completion>) -> Result<()> {
        out.extend(self.done.drain(..));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

/// A request handed to a worker thread.
struct Job(AioRequest);

// SAFETY: the raw buffer pointer in the request is only dereferenced by the
// one worker that receives the job, and the submit contract keeps the buffer
// valid and untouched by the submitter until the completion is returned.
unsafe impl Send for Job {}

/// Runs requests on a pool of worker threads, for backends io_uring cannot
/// drive (any [`BlockBackend`]); like QEMU's `aio=threads`.
pub struct ThreadQueue {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    completions: std::sync::mpsc::Receiver<Completion>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    done: Vec<Completion>,
}

impl ThreadQueue {
    /// A queue over `backend` served by `threads` worker threads.
    pub fn new<B: BlockBackend + 'static>(backend: Arc<B>, threads: usize) -> Result<Self> {
        let (jtx, jrx) = std::sync::mpsc::channel::<Job>();
        let (ctx, crx) = std::sync::mpsc::channel::<Completion>();
        let jrx = Arc::new(std::sync::Mutex::new(jrx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (jrx, ctx, backend) = (jrx.clone(), ctx.clone(), backend.clone());
            let h = std::thread::Builder::new()
                .name(format!("keel-aio-{i}"))
                .spawn(move || loop {
                    let job = {
                        let rx = jrx.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    let Ok(Job(req)) = job else { return };
                    // SAFETY: the submitter upheld the AioQueue::submit contract.
                    let result = unsafe { run_sync(&*backend, &req) };
                    if ctx
                        .send(Completion {
                            user_data: req.user_data,
                            result,
                        })
                        .is_err()
                    {
                        return;
                    }
                })
                .map_err(|e| Error::io("starting an I/O worker thread", e))?;
            workers.push(h);
        }
        Ok(ThreadQueue {
            jobs: Some(jtx),
            completions: crx,
            workers,
            in_flight: 0,
            done: Vec::new(),
        })
    }
}

impl AioQueue for ThreadQueue {
    unsafe fn submit(&mut self, req: AioRequest) -> Result<()> {
        let sent = self.jobs.as_ref().map(|tx| tx.send(Job(req)));
        match sent {
            Some(Ok(())) => {
                self.in_flight += 1;
                Ok(())
            }
            _ => Err(Error::io(
                "submitting to the I/O worker threads",
                std::io::Error::from(std::io::ErrorKind::BrokenPipe),
            )),
        }
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        while let Ok(c) = self.completions.try_recv() {
            self.in_flight -= 1;
            self.done.push(c);
        }
        while self.done.len() < min && self.in_flight > 0 {
            match self.completions.recv() {
                Ok(c) => {
                    self.in_flight -= 1;
                    self.done.push(c);
                }
                Err(_) => {
                    return Err(Error::io(
                        "waiting for the I/O worker threads",
                        std::io::Error::from(std::io::ErrorKind::BrokenPipe),
                    ))
                }
            }
        }
        out.append(&mut self.done);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }
}

impl Drop for ThreadQueue {
    fn drop(&mut self) {
        // Let in-flight requests finish so no worker touches a freed buffer
        // after the owner has dropped the queue.
        let mut sink = Vec::new();
        let _ = self.wait(usize::MAX, &mut sink);
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A backend whose data lives in one file descriptor that io_uring can
/// address directly.
pub trait UringTarget: BlockBackend {
    /// The descriptor data transfers go to.
    fn data_fd(&self) -> RawFd;
    /// Required alignment of offsets, lengths and buffers for `data_fd`.
    fn data_alignment(&self) -> u64;
    /// Maps a device range to host extents, allocating for writes. The
    /// queue keeps the returned [`Mapping`] until every transfer to its
    /// extents has completed, so implementations whose host offsets can
    /// change owner must pin them in it (as [`Qcow2`] does).
    fn map(&self, write: bool, offset: u64, len: u64) -> Result<Mapping>;
}

impl UringTarget for RawFile {
    fn data_fd(&self) -> RawFd {
        self.fd()
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
    fn data_alignment(&self) -> u64 {
        self.file().limits().request_alignment as u64
    }
    fn map(&self, write: bool, offset: u64, len: u64) -> Result<Mapping> {
        if write {
            self.map_write(offset, len)
        } else {
            self.map_read(offset, len)
        }
    }
}

struct Parent {
    user_data: u64,
    remaining: usize,
    error: Option<Error>,
    /// Pins the host clusters until every piece has completed.
    _mapping: Mapping,
}

struct Piece {
    parent: usize,
    write: bool,
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    offset: u64,
}

/// An io_uring engine for one device queue.
pub struct UringQueue<T: UringTarget> {
    ring: IoUring,
    target: Arc<T>,
    parents: Vec<Option<Parent>>,
    free_parents: Vec<usize>,
    pieces: Vec<Option<Piece>>,
    free_pieces: Vec<usize>,
    unsubmitted: usize,
    in_flight: usize,
    done: Vec<Completion>,
}

impl<T: UringTarget> UringQueue<T> {
    /// A queue with room for `depth` requests in flight.
    pub fn new(target: Arc<T>, depth: u32) -> Result<Self> {
        let ring = IoUring::new(depth.next_power_of_two().max(8) * 2)
            .map_err(|e| Error::io("setting up io_uring", e))?;
        Ok(UringQueue {
            ring,
            target,
            parents: Vec::new(),
            free_parents: Vec::new(),
            pieces: Vec::new(),
            free_pieces: Vec::new(),
            unsubmitted: 0,
            in_flight: 0,
            done: Vec::new(),
        })
    }

    /// Queues one transfer. On failure the piece is not queued (and its
    /// parent is not charged for it).
    fn push_piece(&mut self, p: Piece) -> Result<()> {
        let idx = match self.free_pieces.pop() {
            Some(i) => i,
            None => {
                self.pieces.push(None);
                self.pieces.len() - 1
            }
        };
        let entry = if p.write {
            opcode::Write::new(types::Fd(p.fd), p.buf, p.len as u32)
                .offset(p.offset)
                .build()
        } else {
            opcode::Read::new(types::Fd(p.fd), p.buf, p.len as u32)
                .offset(p.offset)
                .build()
        }
        .user_data(idx as u64);
        loop {
            // SAFETY: the buffer stays valid until the completion is reaped (the
            // submit contract), and the Piece describing it is kept in self.
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
        if done {
            // Dropping the parent drops its Mapping: every transfer is done,
            // so its host clusters may be reused.
            if let Some(p) = self.parents[parent].take() {
                self.free_parents.push(parent);
                self.in_flight -= 1;
                self.done.push(Completion {
                    user_data: p.user_data,
                    result: match p.error {
                        None => Ok(()),
                        Some(e) => Err(e),
                    },
                });
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
                    // SAFETY: buf is valid for len bytes per the submit contract.
                    unsafe { std::ptr::write_bytes(p.buf, 0, p.len) };
                } else if n == 0 {
                    let e = Error::io(
                        "writing (io_uring)",
                        std::io::Error::from(std::io::ErrorKind::WriteZero),
                    );
                    self.finish_piece(parent, Some(e));
                    continue;
                } else {
                    // Short transfer: resubmit the remainder.
                    // SAFETY: n < len, so the advanced pointer stays inside the buffer.
                    p.buf = unsafe { p.buf.add(n) };
                    p.len -= n;
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

impl<T: UringTarget> AioQueue for UringQueue<T> {
    unsafe fn submit(&mut self, req: AioRequest) -> Result<()> {
        let a = self.target.data_alignment();
        let aligned =
            a <= 1 || (req.offset % a == 0 && req.len as u64 % a == 0 && (req.buf as u64) % a == 0);
        // Flush, discard and write-zeroes are metadata operations for qcow2 (and
        // a single fdatasync/fallocate for raw): they run inline and complete at
        // once. Clusters that in-flight transfers use stay pinned meanwhile.
        if !req.op.transfers_data() || !aligned {
            // SAFETY: forwarded caller contract.
            let result = unsafe { run_sync(&*self.target, &req) };
            self.done.push(Completion {
                user_data: req.user_data,
                result,
            });
            return Ok(());
        }
        let write = req.op == AioOp::Write;
        // The mapping pins the host clusters until the parent completes.
        let mut mapping = match self.target.map(write, req.offset, req.len as u64) {
            Ok(m) => m,
            Err(e) => {
                self.done.push(Completion {
                    user_data: req.user_data,
                    result: Err(e),
                });
                return Ok(());
            }
        };
        // Backing-file and compressed data go through the driver's own read
        // path (another image, or decompression), inline like metadata ops.
        let direct = mapping
            .extents()
            .iter()
            .all(|e| !matches!(e.kind, ExtentKind::Backing | ExtentKind::Compressed { .. }));
        if !direct {
            drop(mapping);
            // SAFETY: forwarded caller contract.
            let result = unsafe { run_sync(&*self.target, &req) };
            self.done.push(Completion {
                user_data: req.user_data,
                result,
            });
            return Ok(());
        }
        let extents = mapping.take_extents();
        let pidx = match self.free_parents.pop() {
            Some(i) => i,
            None => {
                self.parents.push(None);
                self.parents.len() - 1
            }
        };
        // One extra count held while queuing, released below.
        self.parents[pidx] = Some(Parent {
            user_data: req.user_data,
            remaining: 1,
            error: None,
            _mapping: mapping,
        });
        self.in_flight += 1;
        let fd = self.target.data_fd();
        let mut pos = 0usize;
        let mut failed = None;
        for e in extents {
            // SAFETY: pos + len <= req.len, inside the caller's buffer.
            let buf = unsafe { req.buf.add(pos) };
            match e.kind {
                ExtentKind::Data(host) => {
                    let pushed = self.push_piece(Piece {
                        parent: pidx,
                        write,
                        fd,
                        buf,
                        len: e.len as usize,
                        offset: host,
                    });
                    match pushed {
                        Ok(()) => {
                            if let Some(p) = self.parents[pidx].as_mut() {
                                p.remaining += 1;
                            }
                        }
                        Err(err) => {
                            // Pieces already queued still use the buffer: the
                            // error is reported by the completion, once they
                            // are done.
                            failed = Some(err);
                            break;
                        }
                    }
                }
                ExtentKind::Backing | ExtentKind::Compressed { .. } => {
                    // Served synchronously above; never reached.
                }
                ExtentKind::Zero | ExtentKind::Unallocated => {
                    // Only reads map to these.
                    // SAFETY: buf is valid for len bytes per the contract.
                    unsafe { std::ptr::write_bytes(buf, 0, e.len as usize) };
                }
            }
            pos += e.len as usize;
        }
        self.finish_piece(pidx, failed);
        Ok(())
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion>) -> Result<()> {
        loop {
            self.reap();
            if self.done.len() >= min || self.in_flight == 0 {
                break;
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
        self.in_flight + self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;
    use crate::raw::{CacheMode, RawOptions};

    fn run_queue<Q: AioQueue>(q: &mut Q, size: u64) {
        let n = 64usize;
        let mut bufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(4096, 4096)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.as_mut_slice().fill(i as u8 + 1);
            let req = AioRequest {
                op: AioOp::Write,
                offset: (i as u64 * 4096 * 3) % size,
                buf: b.as_mut_ptr(),
                len: 4096,
                user_data: i as u64,
            };
            // SAFETY: bufs outlive the loop below that reaps every completion.
            unsafe { q.submit(req).unwrap() };
        }
        let mut out = Vec::new();
        while out.len() < n {
            q.wait(1, &mut out).unwrap();
        }
        assert!(out.iter().all(|c| c.result.is_ok()));
        let mut seen: Vec<u64> = out.iter().map(|c| c.user_data).collect();
        seen.sort();
        assert_eq!(seen, (0..n as u64).collect::<Vec<_>>());
        out.clear();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.as_mut_slice().fill(0);
            let req = AioRequest {
                op: AioOp::Read,
                offset: (i as u64 * 4096 * 3) % size,
                buf: b.as_mut_ptr(),
                len: 4096,
                user_data: 100 + i as u64,
            };
            // SAFETY: as above.
            unsafe { q.submit(req).unwrap() };
        }
        while out.len() < n {
            q.wait(1, &mut out).unwrap();
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1), "buffer {i}");
        }
        // Discard and write-zeroes go through the queue too. Write-zeroes ranges then
        // read as zeroes; a discarded range reads as zeroes or as before (qcow2 drops
        // whole clusters only, as QEMU does).
        let ops = [
            AioOp::Discard,
            AioOp::WriteZeroes { unmap: false },
            AioOp::WriteZeroes { unmap: true },
        ];
        out.clear();
        for (i, op) in ops.into_iter().enumerate() {
            let req = AioRequest {
                op,
                offset: (i as u64 * 4096 * 3) % size,
                buf: std::ptr::null_mut(),
                len: 4096,
                user_data: 200 + i as u64,
            };
            // SAFETY: these operations touch no buffer.
            unsafe { q.submit(req).unwrap() };
        }
        while out.len() < ops.len() {
            q.wait(1, &mut out).unwrap();
        }
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        out.clear();
        for (i, b) in bufs.iter_mut().enumerate().take(4) {
            let req = AioRequest {
                op: AioOp::Read,
                offset: (i as u64 * 4096 * 3) % size,
                buf: b.as_mut_ptr(),
                len: 4096,
                user_data: 300 + i as u64,
            };
            // SAFETY: as above.
            unsafe { q.submit(req).unwrap() };
        }
        while out.len() < 4 {
            q.wait(1, &mut out).unwrap();
        }
        let discarded = bufs[0].as_slice();
        assert!(discarded.iter().all(|&x| x == 0) || discarded.iter().all(|&x| x == 1));
        for (i, b) in bufs.iter().enumerate().take(4).skip(1) {
            let want = if i < 3 { 0 } else { i as u8 + 1 };
            assert!(
                b.as_slice().iter().all(|&x| x == want),
                "block {i} after zeroing"
            );
        }
    }

    #[test]
    fn two_uring_queues_share_one_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("mq.qcow2");
        std::fs::File::create(&q).unwrap();
        let opts = RawOptions {
            cache: CacheMode::None,
            growable: true,
            ..Default::default()
        };
        let f = RawFile::open(&q, opts).unwrap();
        crate::qcow2::create(
            &f,
            &crate::qcow2::CreateOptions {
                size: 64 << 20,
                cluster_size: 65536,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Arc::new(Qcow2::open(f, Default::default()).unwrap());
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || {
                    let mut q = UringQueue::new(img, 16).unwrap();
                    let n = 256usize;
                    let mut bufs: Vec<AlignedBuf> =
                        (0..n).map(|_| AlignedBuf::new(4096, 4096)).collect();
                    for (i, b) in bufs.iter_mut().enumerate() {
                        b.as_mut_slice().fill((t * 100 + i as u64 % 100) as u8);
                        // Both queues allocate into the same clusters, in
                        // different 4 KiB blocks.
                        let req = AioRequest {
                            op: AioOp::Write,
                            offset: (i as u64 * 2 + t) * 4096,
                            buf: b.as_mut_ptr(),
                            len: 4096,
                            user_data: i as u64,
                        };
                        // SAFETY: bufs outlive the completions reaped below.
                        unsafe { q.submit(req).unwrap() };
                        if q.in_flight() >= 16 {
                            let mut out = Vec::new();
                            q.wait(1, &mut out).unwrap();
                            assert!(out.iter().all(|c| c.result.is_ok()));
                        }
                    }
                    let mut out = Vec::new();
                    while q.in_flight() > 0 {
                        q.wait(1, &mut out).unwrap();
                    }
                    assert!(out.iter().all(|c| c.result.is_ok()));
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        for i in 0..512u64 {
            let (t, k) = (i % 2, i / 2);
            let mut b = vec![0u8; 4096];
            img.read_at(&mut b, i * 4096).unwrap();
            assert!(
                b.iter().all(|&x| x == (t * 100 + k % 100) as u8),
                "block {i}"
            );
        }
        img.flush().unwrap();
        let r = crate::qcow2::check(img.file(), crate::qcow2::Fix::None).unwrap();
        assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
    }

    #[test]
    fn uring_raw_and_qcow2_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let p = dir.path().join("a.raw");
        RawFile::create(&p, size).unwrap();
        let opts = RawOptions {
            cache: CacheMode::None,
            ..Default::default()
        };
        let raw = Arc::new(RawFile::open(&p, opts).unwrap());
        run_queue(&mut UringQueue::new(raw.clone(), 32).unwrap(), size);
        run_queue(&mut SyncQueue::new(raw.clone()), size);
        run_queue(&mut ThreadQueue::new(raw, 4).unwrap(), size);

        let q = dir.path().join("a.qcow2");
        std::fs::File::create(&q).unwrap();
        let grow = RawOptions {
            growable: true,
            ..opts
        };
        let f = RawFile::open(&q, grow).unwrap();
        crate::qcow2::create(
            &f,
            &crate::qcow2::CreateOptions {
                size,
                cluster_size: 8192,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Arc::new(Qcow2::open(f, Default::default()).unwrap());
        run_queue(&mut UringQueue::new(img.clone(), 32).unwrap(), size);
        img.flush().unwrap();
        let r = crate::qcow2::check(img.file(), crate::qcow2::Fix::None).unwrap();
        assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
    }
}

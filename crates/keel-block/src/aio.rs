//! Completion-based asynchronous I/O queues.
//!
//! A device queue submits [`AioRequest`]s, each tagged with a `user_data`
//! value, and later collects [`Completion`]s carrying the same tag, the shape
//! of io_uring and of virtio queues. Each device queue owns one [`AioQueue`];
//! the backend behind it is shared (`Arc`) between queues.
//!
//! A request owns its buffer (an [`IoBuf`]: an owned host buffer, or guest
//! ranges together with the handle that keeps guest memory mapped, see
//! [`crate::buf::GuestBuf`]) from submission until its completion hands it
//! back, so submitting is safe: no caller has to promise that memory outlives
//! the request. Engines reach the buffer only through vm-memory's volatile
//! slices and never form Rust references to guest memory.
//!
//! * [`SyncQueue`] runs each request inline on any [`BlockBackend`]; it is the
//!   baseline every backend has.
//! * [`ThreadQueue`] runs requests on worker threads, for any backend.
//! * [`UringQueue`] submits data transfers to io_uring. It drives any
//!   [`UringTarget`]: a [`RawFile`] maps guest offsets one to one, a
//!   [`Qcow2`] over a [`RawFile`] maps them through its L1/L2 tables
//!   (allocating clusters synchronously under its metadata lock) and only the
//!   data transfer is asynchronous. The kernel transfers straight to and from
//!   the buffer's memory; reads into guest memory mark the pages dirty in its
//!   bitmap when they complete.
//!
//! The synchronous paths (both synchronous engines, and requests
//! [`UringQueue`] serves inline) copy guest data through a host bounce buffer
//! with volatile accesses; host buffers are used in place.
//!
//! Requests whose buffer or offset do not meet an `O_DIRECT` file's
//! alignment are served synchronously.
//!
//! Requests may overlap in any order, on one queue or across queues and the
//! synchronous API, as an untrusted guest may issue them: a qcow2 host
//! cluster with a transfer in flight is pinned by the request's [`Mapping`]
//! until the transfer completes, so a discard or write-zeroes of the same
//! range can free it but nothing can reuse it meanwhile. A late write lands
//! in a free cluster and a late read returns the data it was issued for,
//! never another guest offset's (see [`crate::qcow2::inflight`]). Under
//! `O_DIRECT`, a write covering part of a block is a read-modify-write of the
//! block ([`RawFile`]); it holds the block exclusively, and writes in flight
//! hold their ranges of the file until they complete, so neither undoes the
//! other.
//!
//! ```
//! use std::sync::Arc;
//! use keel_block::aio::{AioQueue, AioRequest, SyncQueue};
//! use keel_block::MemBackend;
//!
//! let disk = Arc::new(MemBackend::new(vec![0; 4096]));
//! let mut q = SyncQueue::new(disk);
//! q.submit(AioRequest::write(512, vec![7u8; 512], 1));
//! q.submit(AioRequest::read(512, vec![0u8; 512], 2));
//! let mut done = Vec::new();
//! q.wait(2, &mut done).unwrap();
//! assert!(done.iter().all(|c| c.result.is_ok()));
//! let read = done.into_iter().find(|c| c.user_data == 2).and_then(|c| c.buf).unwrap();
//! assert_eq!(read, vec![7u8; 512]);
//! ```

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::Permissions;

use crate::backend::{BlockBackend, WriteFlags};
use crate::buf::{AlignedBuf, IoBuf};
use crate::error::{Error, Result};

/// The operation of an [`AioRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioOp {
    /// Read into the request's buffer.
    Read,
    /// Write the request's buffer.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Discard,
    /// Zero a range, deallocating where `unmap` allows and the backend can.
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

/// What a request carries besides its offset and tag.
#[derive(Debug)]
enum Payload<B> {
    Read(B),
    Write(B),
    Flush,
    Discard(u64),
    WriteZeroes { len: u64, unmap: bool },
}

/// One asynchronous request. It owns its buffer until the [`Completion`] hands
/// it back.
#[derive(Debug)]
pub struct AioRequest<B> {
    payload: Payload<B>,
    offset: u64,
    user_data: u64,
}

impl<B: IoBuf> AioRequest<B> {
    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub fn read(offset: u64, buf: B, user_data: u64) -> Self {
        AioRequest {
            payload: Payload::Read(buf),
            offset,
            user_data,
        }
    }

    /// Writes `buf` at `offset`.
    pub fn write(offset: u64, buf: B, user_data: u64) -> Self {
        AioRequest {
            payload: Payload::Write(buf),
            offset,
            user_data,
        }
    }

    /// Makes every completed write durable.
    pub fn flush(user_data: u64) -> Self {
        AioRequest {
            payload: Payload::Flush,
            offset: 0,
            user_data,
        }
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(offset: u64, len: u64, user_data: u64) -> Self {
        AioRequest {
            payload: Payload::Discard(len),
            offset,
            user_data,
        }
    }

    /// Zeroes `len` bytes at `offset`; with `unmap` the backend may deallocate them.
    pub fn write_zeroes(offset: u64, len: u64, unmap: bool, user_data: u64) -> Self {
        AioRequest {
            payload: Payload::WriteZeroes { len, unmap },
            offset,
            user_data,
        }
    }

    /// The operation.
    pub fn op(&self) -> AioOp {
        match self.payload {
            Payload::Read(_) => AioOp::Read,
            Payload::Write(_) => AioOp::Write,
            Payload::Flush => AioOp::Flush,
            Payload::Discard(_) => AioOp::Discard,
            Payload::WriteZeroes { unmap, .. } => AioOp::WriteZeroes { unmap },
        }
    }

    /// Byte offset on the device.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes the request covers on the device (0 for a flush).
    pub fn len(&self) -> u64 {
        match &self.payload {
            Payload::Read(b) | Payload::Write(b) => b.len() as u64,
            Payload::Flush => 0,
            Payload::Discard(len) | Payload::WriteZeroes { len, .. } => *len,
        }
    }

    /// Whether the request covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tag its completion carries.
    pub fn user_data(&self) -> u64 {
        self.user_data
    }

    /// The completion of this request with `result`.
    fn complete(self, result: Result<()>) -> Completion<B> {
        let buf = match self.payload {
            Payload::Read(b) | Payload::Write(b) => Some(b),
            _ => None,
        };
        Completion {
            user_data: self.user_data,
            result,
            buf,
        }
    }
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Completion<B> {
    /// The request's `user_data`.
    pub user_data: u64,
    /// Success, or why it failed.
    pub result: Result<()>,
    /// The request's buffer, back from the engine (`None` for requests without one).
    pub buf: Option<B>,
}

/// A submission/completion queue for one device queue, over buffers of type `B`.
pub trait AioQueue<B: IoBuf> {
    /// Queues a request. Every request submitted completes exactly once through
    /// [`AioQueue::wait`], failures (including failing to queue it) included.
    fn submit(&mut self, req: AioRequest<B>);

    /// Waits until at least `min` completions are available (or nothing is
    /// in flight) and appends every available completion to `out`.
    fn wait(&mut self, min: usize, out: &mut Vec<Completion<B>>) -> Result<()>;

    /// Requests submitted and not yet returned as completions.
    fn in_flight(&self) -> usize;
}

/// Bytes copied through the bounce buffer at a time: bounds the host memory one
/// request of guest memory can pin.
const BOUNCE_CHUNK: usize = 1 << 20;

/// A reusable host buffer the synchronous paths copy guest data through.
#[derive(Default)]
struct Bounce {
    buf: Option<AlignedBuf>,
    align: usize,
}

impl Bounce {
    /// `len` bytes aligned to `align` (a power of two).
    fn get(&mut self, len: usize, align: usize) -> &mut [u8] {
        let align = align.max(1);
        let fits = self
            .buf
            .as_ref()
            .is_some_and(|b| b.len() >= len && self.align >= align);
        if !fits {
            self.buf = None;
            self.align = align;
        }
        let b = self.buf.get_or_insert_with(|| AlignedBuf::new(len, align));
        &mut b.as_mut_slice()[..len]
    }
}

/// Executes a request synchronously.
fn run_sync<K: BlockBackend + ?Sized, B: IoBuf>(
    k: &K,
    req: &mut AioRequest<B>,
    bounce: &mut Bounce,
) -> Result<()> {
    let offset = req.offset;
    match &mut req.payload {
        Payload::Read(buf) => read_sync(k, buf, offset, bounce),
        Payload::Write(buf) => write_sync(k, buf, offset, bounce),
        Payload::Flush => k.flush(),
        Payload::Discard(len) => k.discard(offset, *len),
        Payload::WriteZeroes { len, unmap } => k.write_zeroes(offset, *len, *unmap),
    }
}

/// Reads into `buf`: in place for host memory, through the bounce buffer and volatile
/// copies (which mark what they write dirty) for guest memory.
fn read_sync<K: BlockBackend + ?Sized, B: IoBuf>(
    k: &K,
    buf: &mut B,
    offset: u64,
    bounce: &mut Bounce,
) -> Result<()> {
    if let Some(host) = buf.host_bytes() {
        return k.read_at(host, offset);
    }
    let mut iov = buf.slices(Permissions::Write)?;
    let align = k.limits().memory_alignment as usize;
    let mut pos = 0;
    while pos < iov.len() {
        let n = (iov.len() - pos).min(BOUNCE_CHUNK);
        let tmp = bounce.get(n, align);
        k.read_at(tmp, offset + pos as u64)?;
        iov.copy_from_slice(pos, tmp);
        pos += n;
    }
    Ok(())
}

/// Writes `buf`: in place for host memory, through volatile copies into the bounce
/// buffer for guest memory.
fn write_sync<K: BlockBackend + ?Sized, B: IoBuf>(
    k: &K,
    buf: &mut B,
    offset: u64,
    bounce: &mut Bounce,
) -> Result<()> {
    if let Some(host) = buf.host_bytes() {
        return k.write_vectored_at(&[std::io::IoSlice::new(host)], offset, WriteFlags::NONE);
    }
    let iov = buf.slices(Permissions::Read)?;
    let align = k.limits().memory_alignment as usize;
    let mut pos = 0;
    while pos < iov.len() {
        let n = (iov.len() - pos).min(BOUNCE_CHUNK);
        let tmp = bounce.get(n, align);
        iov.copy_to_slice(pos, tmp);
        k.write_vectored_at(
            &[std::io::IoSlice::new(tmp)],
            offset + pos as u64,
            WriteFlags::NONE,
        )?;
        pos += n;
    }
    Ok(())
}

/// Runs each request synchronously on a shared backend.
pub struct SyncQueue<K, B> {
    backend: Arc<K>,
    bounce: Bounce,
    done: VecDeque<Completion<B>>,
}

impl<K: BlockBackend, B: IoBuf> SyncQueue<K, B> {
    /// A queue over `backend`.
    pub fn new(backend: Arc<K>) -> Self {
        SyncQueue {
            backend,
            bounce: Bounce::default(),
            done: VecDeque::new(),
        }
    }
}

impl<K: BlockBackend, B: IoBuf> AioQueue<B> for SyncQueue<K, B> {
    fn submit(&mut self, mut req: AioRequest<B>) {
        let result = run_sync(&*self.backend, &mut req, &mut self.bounce);
        self.done.push_back(req.complete(result));
    }

    fn wait(&mut self, _min: usize, out: &mut Vec<Completion<B>>) -> Result<()> {
        out.extend(self.done.drain(..));
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

/// Runs requests on a pool of worker threads, for backends io_uring cannot
/// drive (any [`BlockBackend`]); like QEMU's `aio=threads`.
pub struct ThreadQueue<B> {
    jobs: Option<std::sync::mpsc::Sender<AioRequest<B>>>,
    completions: std::sync::mpsc::Receiver<Completion<B>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    in_flight: usize,
    done: Vec<Completion<B>>,
}

impl<B: IoBuf> ThreadQueue<B> {
    /// A queue over `backend` served by `threads` worker threads.
    pub fn new<K: BlockBackend + 'static>(backend: Arc<K>, threads: usize) -> Result<Self> {
        let (jtx, jrx) = std::sync::mpsc::channel::<AioRequest<B>>();
        let (ctx, crx) = std::sync::mpsc::channel::<Completion<B>>();
        let jrx = Arc::new(std::sync::Mutex::new(jrx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let (jrx, ctx, backend) = (jrx.clone(), ctx.clone(), backend.clone());
            let h = std::thread::Builder::new()
                .name(format!("keel-aio-{i}"))
                .spawn(move || {
                    let mut bounce = Bounce::default();
                    loop {
                        let job = {
                            let rx = jrx.lock().unwrap_or_else(|p| p.into_inner());
                            rx.recv()
                        };
                        let Ok(mut req) = job else { return };
                        let result = run_sync(&*backend, &mut req, &mut bounce);
                        if ctx.send(req.complete(result)).is_err() {
                            return;
                        }
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

impl<B: IoBuf> AioQueue<B> for ThreadQueue<B> {
    fn submit(&mut self, req: AioRequest<B>) {
        let Some(tx) = self.jobs.as_ref() else {
            return self
                .done
                .push(req.complete(Err(workers_gone("submitting to the I/O worker threads"))));
        };
        match tx.send(req) {
            Ok(()) => self.in_flight += 1,
            Err(std::sync::mpsc::SendError(req)) => self
                .done
                .push(req.complete(Err(workers_gone("submitting to the I/O worker threads")))),
        }
    }

    fn wait(&mut self, min: usize, out: &mut Vec<Completion<B>>) -> Result<()> {
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
                Err(_) => return Err(workers_gone("waiting for the I/O worker threads")),
            }
        }
        out.append(&mut self.done);
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }
}

/// The worker threads have exited (one panicked).
fn workers_gone(what: &str) -> Error {
    Error::io(what, std::io::Error::from(std::io::ErrorKind::BrokenPipe))
}

impl<B> Drop for ThreadQueue<B> {
    fn drop(&mut self) {
        // Let in-flight requests finish, then stop the workers.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(feature = "io_uring")]
mod uring;
#[cfg(feature = "io_uring")]
pub use uring::{CopyLink, CopyWrite, UringQueue, UringTarget, WriteMap};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::{AlignedBuf, GuestBuf};
    use crate::iov::GuestRange;
    use crate::qcow2::Qcow2;
    use crate::raw::{CacheMode, RawFile, RawOptions};
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// Submits `reqs` and waits for all of them; returns the completions sorted by tag.
    fn run_all<B: IoBuf, Q: AioQueue<B>>(
        q: &mut Q,
        reqs: impl IntoIterator<Item = AioRequest<B>>,
    ) -> Vec<Completion<B>> {
        let mut n = 0;
        for r in reqs {
            q.submit(r);
            n += 1;
        }
        let mut out = Vec::new();
        while out.len() < n {
            q.wait(1, &mut out).unwrap();
        }
        out.sort_by_key(|c| c.user_data);
        out
    }

    fn filled(byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(4096, 4096);
        b.as_mut_slice().fill(byte);
        b
    }

    fn run_queue<Q: AioQueue<AlignedBuf>>(q: &mut Q, size: u64) {
        let n = 64usize;
        let at = |i: usize| (i as u64 * 4096 * 3) % size;
        let out = run_all(
            q,
            (0..n).map(|i| AioRequest::write(at(i), filled(i as u8 + 1), i as u64)),
        );
        assert!(out.iter().all(|c| c.result.is_ok()));
        let seen: Vec<u64> = out.iter().map(|c| c.user_data).collect();
        assert_eq!(seen, (0..n as u64).collect::<Vec<_>>());
        let out = run_all(
            q,
            (0..n).map(|i| AioRequest::read(at(i), filled(0), 100 + i as u64)),
        );
        for (i, c) in out.iter().enumerate() {
            assert!(c.result.is_ok());
            let b = c.buf.as_ref().unwrap();
            assert!(b.as_slice().iter().all(|&x| x == i as u8 + 1), "buffer {i}");
        }
        // Discard and write-zeroes go through the queue too. Write-zeroes ranges then
        // read as zeroes; a discarded range reads as zeroes or as before (qcow2 drops
        // whole clusters only, as QEMU does).
        let out = run_all(
            q,
            [
                AioRequest::discard(at(0), 4096, 200),
                AioRequest::write_zeroes(at(1), 4096, false, 201),
                AioRequest::write_zeroes(at(2), 4096, true, 202),
            ],
        );
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        assert!(out.iter().all(|c| c.buf.is_none()));
        let out = run_all(
            q,
            (0..4).map(|i| AioRequest::read(at(i), filled(0xee), 300 + i as u64)),
        );
        let bufs: Vec<AlignedBuf> = out.into_iter().map(|c| c.buf.unwrap()).collect();
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

    type Tracked = vm_memory::GuestMemoryMmap<AtomicBitmap>;

    /// Guest-memory requests: data lands where the ranges say (across two regions),
    /// reads mark what they filled dirty, ranges outside guest memory fail the request.
    fn run_guest_queue<Q: AioQueue<GuestBuf<Arc<Tracked>>>>(q: &mut Q, mem: &Arc<Tracked>) {
        let r = |a: u64, l: usize| GuestRange::new(GuestAddress(a), l);
        let buf =
            |ranges: &[GuestRange]| GuestBuf::new(mem.clone(), ranges.iter().copied().collect());
        mem.write_slice(&[0x5a; 4096], GuestAddress(0xf000))
            .unwrap();
        mem.write_slice(&[0xa5; 4096], GuestAddress(0x10000))
            .unwrap();
        for region in mem.iter() {
            region.bitmap().reset();
        }
        // 8 KiB straddling the two regions' boundary.
        let out = run_all(q, [AioRequest::write(8192, buf(&[r(0xf000, 8192)]), 1)]);
        assert!(out[0].result.is_ok(), "{out:?}");
        // Back into two pages, and 512 bytes at an address O_DIRECT cannot use.
        let out = run_all(
            q,
            [
                AioRequest::read(8192, buf(&[r(0x4000, 4096), r(0x18000, 4096)]), 2),
                AioRequest::read(8192, buf(&[r(0x6100, 512)]), 3),
            ],
        );
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert!(got.iter().all(|&x| x == 0x5a));
        mem.read_slice(&mut got, GuestAddress(0x18000)).unwrap();
        assert!(got.iter().all(|&x| x == 0xa5));
        mem.read_slice(&mut got[..512], GuestAddress(0x6100))
            .unwrap();
        assert!(got[..512].iter().all(|&x| x == 0x5a));
        let dirty = |a: u64| {
            let (region, off) = mem.to_region_addr(GuestAddress(a)).unwrap();
            region.bitmap().dirty_at(off.0 as usize)
        };
        for a in [0x4000, 0x18000, 0x6100] {
            assert!(dirty(a), "page {a:#x} read into but not dirty");
        }
        assert!(!dirty(0x7000), "page 0x7000 dirty");
        let out = run_all(q, [AioRequest::read(0, buf(&[r(0x1_0000_0000, 4096)]), 3)]);
        assert!(
            matches!(
                out[0].result,
                Err(Error::GuestMemory {
                    addr: 0x1_0000_0000,
                    ..
                })
            ),
            "{out:?}"
        );
    }

    /// A new raw file of `size` bytes in `dir`, opened with O_DIRECT (cache=none).
    fn direct_raw(dir: &tempfile::TempDir, name: &str, size: u64) -> Arc<RawFile> {
        let p = dir.path().join(name);
        RawFile::create(&p, size).unwrap();
        let opts = RawOptions {
            cache: CacheMode::None,
            ..Default::default()
        };
        Arc::new(RawFile::open(&p, opts).unwrap())
    }

    fn guest_memory() -> Arc<Tracked> {
        Arc::new(
            Tracked::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
                .unwrap(),
        )
    }

    #[test]
    fn guest_buffers_through_every_engine() {
        let dir = tempfile::tempdir().unwrap();
        let raw = direct_raw(&dir, "g.raw", 1 << 20);
        let mem = guest_memory();
        #[cfg(feature = "io_uring")]
        run_guest_queue(&mut UringQueue::new(raw.clone(), 8).unwrap(), &mem);
        run_guest_queue(&mut SyncQueue::new(raw.clone()), &mem);
        run_guest_queue(&mut ThreadQueue::new(raw, 2).unwrap(), &mem);
        let m = Arc::new(crate::MemBackend::new(vec![0; 1 << 20]));
        run_guest_queue(&mut SyncQueue::new(m), &mem);
    }

    /// A request whose transfer would be thousands of io_uring entries (a guest's
    /// fragmented buffers) is served inline through a bounded bounce buffer instead of
    /// holding that many pieces in flight; its data still lands where the ranges say.
    #[cfg(feature = "io_uring")]
    #[test]
    fn requests_of_too_many_pieces_are_served_inline() {
        use super::uring::{Plan, MAX_PIECES};
        let dir = tempfile::tempdir().unwrap();
        let raw = direct_raw(&dir, "pieces.raw", 4 << 20);
        let a = raw.limits().request_alignment as usize;
        let mem = Arc::new(Tracked::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap());
        let n = 2 * MAX_PIECES;
        // Every other aligned block of guest memory: no two ranges merge.
        let ranges = (0..n as u64).map(|i| GuestRange::new(GuestAddress(i * 2 * a as u64), a));
        for i in 0..n as u64 {
            mem.write_slice(&vec![(i % 251) as u8; a], GuestAddress(i * 2 * a as u64))
                .unwrap();
        }
        let mut q: UringQueue<RawFile, GuestBuf<Arc<Tracked>>> =
            UringQueue::new(raw.clone(), 8).unwrap();
        let mut buf = GuestBuf::new(mem.clone(), ranges.collect());
        assert!(
            matches!(q.plan(true, 0, &mut buf), Plan::Inline),
            "{n} pieces planned for io_uring"
        );
        let out = run_all(&mut q, [AioRequest::write(0, buf, 1)]);
        assert!(out[0].result.is_ok(), "{out:?}");
        let mut back = vec![0u8; a];
        for i in 0..n as u64 {
            raw.read_at(&mut back, i * a as u64).unwrap();
            assert!(back.iter().all(|&x| x == (i % 251) as u8), "block {i}");
        }
    }

    #[cfg(feature = "io_uring")]
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
                    for i in 0..n {
                        let mut b = AlignedBuf::new(4096, 4096);
                        b.as_mut_slice().fill((t * 100 + i as u64 % 100) as u8);
                        // Both queues allocate into the same clusters, in
                        // different 4 KiB blocks.
                        q.submit(AioRequest::write((i as u64 * 2 + t) * 4096, b, i as u64));
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
        assert!(r.is_clean(), "{:?}", r.messages);
    }

    #[test]
    fn uring_raw_and_qcow2_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let raw = direct_raw(&dir, "a.raw", size);
        #[cfg(feature = "io_uring")]
        run_queue(&mut UringQueue::new(raw.clone(), 32).unwrap(), size);
        run_queue(&mut SyncQueue::new(raw.clone()), size);
        run_queue(&mut ThreadQueue::new(raw, 4).unwrap(), size);

        let q = dir.path().join("a.qcow2");
        std::fs::File::create(&q).unwrap();
        let grow = RawOptions {
            growable: true,
            cache: CacheMode::None,
            ..Default::default()
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
        #[cfg(feature = "io_uring")]
        run_queue(&mut UringQueue::new(img.clone(), 32).unwrap(), size);
        img.flush().unwrap();
        let r = crate::qcow2::check(img.file(), crate::qcow2::Fix::None).unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
    }
}

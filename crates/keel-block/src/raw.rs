//! Raw images over a POSIX file or block device, with QEMU's cache modes.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::backend::{
    check_range, BlockBackend, FileExtent, FileRead, FileSource, Limits, WriteFlags,
};
use crate::buf::AlignedBuf;
use crate::error::{Error, InvalidArgument, Result, Unsupported};
use crate::iov::Iov;

/// Host cache mode, with the same names and meaning as QEMU's `cache=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `O_DIRECT`; flush still calls `fdatasync`.
    None,
    /// Host page cache; flush calls `fdatasync` (QEMU's default).
    #[default]
    Writeback,
    /// Host page cache with `O_DSYNC`: every write is durable on completion.
    Writethrough,
    /// `O_DIRECT | O_DSYNC`.
    DirectSync,
    /// Host page cache and flushes are ignored. Fast and unsafe on host crash.
    Unsafe,
}

impl CacheMode {
    /// Whether the file is opened with `O_DIRECT`.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }
    /// Whether the file is opened with `O_DSYNC` (guest sees no write cache).
    pub fn dsync(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }
    /// Whether flush requests are ignored.
    pub fn ignores_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
    /// QEMU's name for this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::DirectSync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

impl FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::DirectSync,
            "unsafe" => CacheMode::Unsafe,
            _ => {
                return Err(Error::InvalidArgument(InvalidArgument::CacheMode(
                    s.to_string(),
                )))
            }
        })
    }
}

/// How to open a [`RawFile`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawOptions {
    /// Host cache mode.
    pub cache: CacheMode,
    /// Open read-only.
    pub read_only: bool,
    /// Allow writes past the end of the file, growing it. Used when the file
    /// holds an image format such as qcow2; a raw guest disk has a fixed size.
    pub growable: bool,
}

/// A raw image: guest offset `n` is file offset `n`.
pub struct RawFile {
    file: File,
    opts: RawOptions,
    size: AtomicU64,
    /// Request and memory alignment (1 unless `O_DIRECT`).
    align: u64,
    /// Under `O_DIRECT`, the ranges being written: a read-modify-write of partial blocks
    /// excludes every other write of those blocks, aligned ones included.
    writing: Arc<WriteRanges>,
}

/// Byte ranges of a file being written, each shared (an ordinary write, which may run
/// beside other writes) or exclusive (a read-modify-write of partial blocks, which must
/// not have another write of its blocks land between its read and its write).
#[derive(Default)]
struct WriteRanges {
    held: Mutex<Held>,
    released: Condvar,
}

/// What [`WriteRanges`] guards.
#[derive(Default)]
struct Held {
    /// The next guard's id.
    next: u64,
    /// Every range held.
    ranges: Vec<HeldRange>,
    /// Threads waiting in [`WriteRanges::lock`]: a release wakes them only if there are
    /// any (a wake is a system call, and every write in flight releases its ranges).
    waiters: usize,
}

struct HeldRange {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl WriteRanges {
    /// Waits until no held range overlapping one of `ranges` conflicts (either side
    /// exclusive), then holds them until the guard drops. Waiters do not block later
    /// shared holders: a thread holding shared ranges (writes in flight) never waits for a
    /// thread that only waits.
    fn lock(self: &Arc<Self>, ranges: &[(u64, u64)], exclusive: bool) -> WriteGuard {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.ranges.iter().any(|h| {
            (exclusive || h.exclusive) && ranges.iter().any(|&(s, e)| s < h.end && h.start < e)
        }) {
            held.waiters += 1;
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
            held.waiters -= 1;
        }
        let id = held.next;
        held.next += 1;
        held.ranges
            .extend(ranges.iter().map(|&(start, end)| HeldRange {
                id,
                start,
                end,
                exclusive,
            }));
        WriteGuard {
            ranges: self.clone(),
            id,
        }
    }
}

/// Ranges of a [`RawFile`] held for writing (see `RawFile::lock_writes`); released on
/// drop.
pub(crate) struct WriteGuard {
    ranges: Arc<WriteRanges>,
    id: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut held = self
            .ranges
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.ranges.retain(|h| h.id != self.id);
        let waiters = held.waiters > 0;
        drop(held);
        if waiters {
            self.ranges.released.notify_all();
        }
    }
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate only reads its scalar arguments; fd is a valid open descriptor.
    let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn not_supported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl RawFile {
    /// Opens `path` with the given options.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::{BlockBackend, CacheMode, RawFile, RawOptions};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("disk.raw");
    /// RawFile::create(&path, 1 << 20)?;
    /// let disk = RawFile::open(&path, RawOptions { cache: CacheMode::Writeback, ..Default::default() })?;
    /// disk.write_at(&[1, 2, 3], 512)?;
    /// let mut buf = [0u8; 3];
    /// disk.read_at(&mut buf, 512)?;
    /// assert_eq!(buf, [1, 2, 3]);
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    pub fn open(path: impl AsRef<Path>, opts: RawOptions) -> Result<RawFile> {
        let path = path.as_ref();
        let mut flags = 0;
        if opts.cache.direct() {
            flags |= libc::O_DIRECT;
        }
        if opts.cache.dsync() {
            flags |= libc::O_DSYNC;
        }
        // Non-blocking, so that opening a FIFO (an image can name anything as its backing
        // file) returns instead of waiting for a writer; `from_file` then refuses it.
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // Blocking again: io_uring would answer EAGAIN rather than wait on a file opened
        // non-blocking.
        // SAFETY: F_SETFL on a descriptor we own, with flags read from it just before.
        let r = unsafe {
            let fd = file.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK)
            }
        };
        if r < 0 {
            return Err(Error::last_os("making the image file blocking"));
        }
        Self::from_file(file, opts).map_err(|e| match e {
            Error::Unsupported(Unsupported::FileType { kind, path: None }) => {
                Error::Unsupported(Unsupported::FileType {
                    kind,
                    path: Some(path.to_path_buf()),
                })
            }
            e => e,
        })
    }

    /// Creates (or truncates) `path` as a raw image of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<()> {
        let path = path.as_ref();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        f.set_len(size)
            .map_err(|e| Error::io(format!("setting the size of {}", path.display()), e))
    }

    /// Wraps an already open file: a regular file or a block device, anything else is
    /// refused ([`Unsupported::FileType`]). `opts.cache` must describe how it was opened.
    pub fn from_file(file: File, opts: RawOptions) -> Result<RawFile> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("reading file metadata", e))?;
        let t = meta.file_type();
        if !t.is_file() && !t.is_block_device() {
            let kind = if t.is_fifo() {
                "FIFO"
            } else if t.is_socket() {
                "socket"
            } else if t.is_char_device() {
                "character device"
            } else {
                "directory"
            };
            return Err(Error::Unsupported(Unsupported::FileType {
                kind,
                path: None,
            }));
        }
        let size = if meta.file_type().is_block_device() {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the valid pointer we pass.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut sz as *mut u64) };
            if r != 0 {
                return Err(Error::last_os("querying the block device size"));
            }
            sz
        } else {
            meta.len()
        };
        let mut raw = RawFile {
            file,
            opts,
            size: AtomicU64::new(size),
            align: 1,
            writing: Arc::default(),
        };
        if opts.cache.direct() {
            raw.align = raw.probe_alignment();
        }
        Ok(raw)
    }

    fn probe_alignment(&self) -> u64 {
        let mut buf = AlignedBuf::new(4096, 4096);
        for align in [512u64, 4096] {
            // SAFETY: the buffer is valid for `align` (<= 4096) bytes of writes.
            let r = unsafe {
                libc::pread(
                    self.fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    align as usize,
                    0,
                )
            };
            if r >= 0 {
                return align;
            }
        }
        4096
    }

    /// The underlying descriptor, for asynchronous engines.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The options this file was opened with.
    pub fn options(&self) -> RawOptions {
        self.opts
    }

    /// Changes the file length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("resizing the file", e))?;
        self.size.store(len, Ordering::Release);
        Ok(())
    }

    /// Holds the (block-aligned) byte ranges `ranges` for ordinary writes until the guard
    /// drops: a read-modify-write of partial blocks in them waits meanwhile. `None` when
    /// the file needs no alignment (no read-modify-writes happen).
    pub(crate) fn lock_writes(&self, ranges: &[(u64, u64)]) -> Option<WriteGuard> {
        (self.align > 1).then(|| self.writing.lock(ranges, false))
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        if self.opts.growable {
            offset
                .checked_add(len)
                .map(|_| ())
                .ok_or(Error::OutOfRange {
                    offset,
                    len,
                    size: self.size(),
                })
        } else {
            check_range(offset, len, self.size())
        }
    }

    fn aligned_iov(&self, mut segs: impl Iterator<Item = (*const u8, usize)>, offset: u64) -> bool {
        let a = self.align;
        if a == 1 {
            return true;
        }
        offset % a == 0 && segs.all(|(p, len)| len as u64 % a == 0 && (p as u64) % a == 0)
    }

    /// preadv until done; zero-fills anything past end of file.
    fn preadv_full(&self, mut bufs: Iov<&mut [u8]>, offset: u64) -> Result<()> {
        let total = bufs.len();
        let mut done = 0usize;
        let mut iov: Iov<libc::iovec> = bufs
            .reborrow()
            .into_iter()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        while done < total {
            let segs = iov.segments();
            let cnt = segs.len().min(1024);
            // SAFETY: every iovec points into a live, exclusively borrowed buffer
            // of the stated length (`bufs`, which is not touched until the call returns).
            let r = unsafe {
                libc::preadv(
                    self.fd(),
                    segs.as_ptr(),
                    cnt as i32,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(format!("reading at offset {}", offset), e));
            }
            if r == 0 {
                bufs.fill_zero(done, total - done);
                return Ok(());
            }
            done += r as usize;
            if done < total {
                iov.advance(r as usize);
            }
        }
        Ok(())
    }

    fn pwritev_full(&self, bufs: Iov<&[u8]>, offset: u64) -> Result<()> {
        let total = bufs.len();
        let mut done = 0usize;
        let mut iov: Iov<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        while done < total {
            let segs = iov.segments();
            let cnt = segs.len().min(1024);
            // SAFETY: every iovec points into a live buffer of the stated length;
            // pwritev only reads through them.
            let r = unsafe {
                libc::pwritev(
                    self.fd(),
                    segs.as_ptr(),
                    cnt as i32,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io(format!("writing at offset {}", offset), e));
            }
            if r == 0 {
                return Err(Error::io(
                    format!("writing at offset {}", offset),
                    std::io::Error::from(std::io::ErrorKind::WriteZero),
                ));
            }
            done += r as usize;
            if done < total {
                iov.advance(r as usize);
            }
        }
        Ok(())
    }

    fn grew(&self, end: u64) {
        if self.opts.growable {
            self.size.fetch_max(end, Ordering::AcqRel);
        }
    }

    fn after_write(&self, flags: WriteFlags) -> Result<()> {
        if flags.fua && !self.opts.cache.dsync() && !self.opts.cache.ignores_flush() {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        // SAFETY: fdatasync takes a plain descriptor.
        if unsafe { libc::fdatasync(self.fd()) } != 0 {
            return Err(Error::last_os("flushing the file"));
        }
        Ok(())
    }

    /// A bounce buffer for a request of `len` bytes at `offset`: the aligned range
    /// enclosing it, up to [`BOUNCE_CHUNK`] bytes (the request then goes through in
    /// pieces, see [`BounceChunks`]).
    fn bounce_buf(&self, offset: u64, len: u64) -> AlignedBuf {
        let a = self.align;
        let span = (offset + len).div_ceil(a) * a - offset / a * a;
        AlignedBuf::new(span.min(BOUNCE_CHUNK.max(a)) as usize, a as usize)
    }

    /// Reads through a bounce buffer of bounded size, one aligned chunk at a time.
    fn bounce_read(&self, mut bufs: Iov<&mut [u8]>, offset: u64, len: u64) -> Result<()> {
        let mut bb = self.bounce_buf(offset, len);
        for c in BounceChunks::new(offset, len, self.align) {
            let b = &mut bb.as_mut_slice()[..c.span()];
            self.preadv_full(Iov::from(&mut *b), c.start)?;
            bufs.copy_from_slice(c.done as usize, &b[c.skip()..c.skip() + c.len as usize]);
        }
        Ok(())
    }

    /// Writes through a bounce buffer of bounded size, one aligned chunk at a time; the
    /// partial blocks at either end are read, modified and written back.
    fn bounce_write(&self, bufs: Iov<&[u8]>, offset: u64, len: u64) -> Result<()> {
        let a = self.align as usize;
        let mut bb = self.bounce_buf(offset, len);
        for c in BounceChunks::new(offset, len, self.align) {
            let b = &mut bb.as_mut_slice()[..c.span()];
            let (head, tail) = (c.skip() != 0, c.skip() + c.len as usize != b.len());
            // Only the memory misaligned (neither end partial): an ordinary write.
            // Otherwise the blocks are held exclusively from the read to the write.
            let _guard = self
                .writing
                .lock(&[(c.start, c.start + b.len() as u64)], head || tail);
            if head {
                self.preadv_full(Iov::from(&mut b[..a]), c.start)?;
            }
            if tail && (b.len() > a || !head) {
                let n = b.len();
                self.preadv_full(Iov::from(&mut b[n - a..]), c.start + (n - a) as u64)?;
            }
            bufs.copy_to_slice(c.done as usize, &mut b[c.skip()..c.skip() + c.len as usize]);
            self.pwritev_full(Iov::from(&*b), c.start)?;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = AlignedBuf::new(CHUNK.min(len.max(1)) as usize, 4096);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_vectored_at(
                &[IoSlice::new(&zero.as_slice()[..n as usize])],
                offset + done,
                WriteFlags::NONE,
            )?;
            done += n;
        }
        Ok(())
    }
}

/// Bytes a bounce buffer holds at most: a request of any length goes through in chunks
/// of this size (a guest chooses the length, and a failed allocation aborts).
const BOUNCE_CHUNK: u64 = 1 << 20;

/// One piece of a bounced request: `len` bytes of the request, from byte `done` of it,
/// inside the aligned file range from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BounceChunk {
    start: u64,
    /// Where the piece starts in the file.
    at: u64,
    done: u64,
    len: u64,
    align: u64,
}

impl BounceChunk {
    /// Bytes of the aligned file range (and of the bounce buffer used).
    fn span(&self) -> usize {
        ((self.at + self.len).div_ceil(self.align) * self.align - self.start) as usize
    }
    /// Where the piece starts in the bounce buffer.
    fn skip(&self) -> usize {
        (self.at - self.start) as usize
    }
}

/// The pieces of a request of `len` bytes at `offset` for an alignment of `align`, each
/// spanning at most [`BOUNCE_CHUNK`] aligned bytes; only the first and last may cover
/// partial blocks.
struct BounceChunks {
    offset: u64,
    len: u64,
    align: u64,
    done: u64,
}

impl BounceChunks {
    fn new(offset: u64, len: u64, align: u64) -> Self {
        BounceChunks {
            offset,
            len,
            align,
            done: 0,
        }
    }
}

impl Iterator for BounceChunks {
    type Item = BounceChunk;
    fn next(&mut self) -> Option<BounceChunk> {
        if self.done >= self.len {
            return None;
        }
        let at = self.offset + self.done;
        let start = at / self.align * self.align;
        let chunk = BOUNCE_CHUNK.max(self.align);
        let len = (self.len - self.done).min(chunk - (at - start));
        let c = BounceChunk {
            start,
            at,
            done: self.done,
            len,
            align: self.align,
        };
        self.done += len;
        Some(c)
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl BlockBackend for RawFile {
    fn map_file_read(&self, offset: u64, len: u64) -> Result<Option<FileRead>> {
        check_range(offset, len, self.size())?;
        Ok(Some(FileRead {
            extents: vec![FileExtent {
                len,
                source: FileSource::File {
                    fd: self.fd(),
                    offset,
                    align: {
                        let l = self.limits();
                        l.request_alignment.max(l.memory_alignment) as u64
                    },
                },
            }],
            pins: Vec::new(),
        }))
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.align as u32,
            memory_alignment: self.align as u32,
            discard_granularity: 4096,
            max_transfer: 1 << 30,
        }
    }

    fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let bufs = Iov::from_io_slices_mut(bufs);
        let len = bufs.len() as u64;
        if !self.opts.growable {
            check_range(offset, len, self.size())?;
        }
        if len == 0 {
            return Ok(());
        }
        if self.aligned_iov(bufs.iter().map(|b| (b.as_ptr(), b.len())), offset) {
            self.preadv_full(bufs, offset)
        } else {
            self.bounce_read(bufs, offset, len)
        }
    }

    fn write_vectored_at(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let bufs = Iov::from_io_slices(bufs);
        let len = bufs.len() as u64;
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.aligned_iov(bufs.iter().map(|b| (b.as_ptr(), b.len())), offset) {
            let _guard = self.lock_writes(&[(offset, offset + len)]);
            self.pwritev_full(bufs, offset)?;
        } else {
            self.bounce_write(bufs, offset, len)?;
        }
        self.grew(offset + len);
        self.after_write(flags)
    }

    fn flush(&self) -> Result<()> {
        if self.opts.cache.ignores_flush() || self.opts.read_only {
            return Ok(());
        }
        self.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            self.fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if not_supported(&e) => Ok(()),
            Err(e) => Err(Error::io("punching a hole for discard", e)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let size = self.size();
        let fd = self.fd();
        let mut done = false;
        if unmap && offset + len <= size {
            match fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Ok(()) => done = true,
                Err(e) if not_supported(&e) => {}
                Err(e) => return Err(Error::io("punching a hole for write-zeroes", e)),
            }
        }
        if !done {
            let mode = if offset + len <= size {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE
            };
            match fallocate(fd, mode, offset, len) {
                Ok(()) => done = true,
                Err(e) if not_supported(&e) => {}
                Err(e) => return Err(Error::io("zeroing a range", e)),
            }
        }
        if !done {
            // write_vectored_at already handles growth and O_DSYNC.
            return self.write_zero_buffers(offset, len);
        }
        self.grew(offset + len);
        if self.opts.cache.dsync() {
            self.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modes() -> [CacheMode; 5] {
        [
            CacheMode::None,
            CacheMode::Writeback,
            CacheMode::Writethrough,
            CacheMode::DirectSync,
            CacheMode::Unsafe,
        ]
    }

    /// The open flags each cache mode asks for are the ones the kernel shows for the fd
    /// (where the file system takes O_DIRECT at all: tmpfs does not, and open then fails
    /// with a clear error rather than silently caching).
    #[test]
    fn cache_modes_set_o_direct_and_o_dsync() {
        let dir = tempfile::tempdir().unwrap();
        for mode in modes() {
            let p = dir.path().join(format!("flags-{}.raw", mode.as_str()));
            RawFile::create(&p, 4096).unwrap();
            let opts = RawOptions {
                cache: mode,
                ..Default::default()
            };
            let f = match RawFile::open(&p, opts) {
                Ok(f) => f,
                Err(e) => {
                    assert!(mode.direct(), "{}: {e}", mode.as_str());
                    assert!(
                        e.to_string().contains("O_DIRECT") || e.to_string().contains("direct"),
                        "{}: {e}",
                        mode.as_str()
                    );
                    continue;
                }
            };
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.fd())).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|v| i64::from_str_radix(v.trim(), 8).unwrap())
                .expect("flags in fdinfo");
            let has = |bit: libc::c_int| flags & i64::from(bit) != 0;
            assert_eq!(
                has(libc::O_DIRECT),
                mode.direct(),
                "{}: O_DIRECT",
                mode.as_str()
            );
            assert_eq!(
                has(libc::O_DSYNC),
                mode.dsync(),
                "{}: O_DSYNC",
                mode.as_str()
            );
        }
        assert!(CacheMode::Unsafe.ignores_flush());
        assert!(modes().iter().filter(|m| m.ignores_flush()).count() == 1);
    }

    #[test]
    fn every_cache_mode_round_trips_unaligned_io() {
        let dir = tempfile::tempdir().unwrap();
        for mode in modes() {
            let p = dir.path().join(format!("{}.raw", mode.as_str()));
            RawFile::create(&p, 64 * 1024).unwrap();
            let f = RawFile::open(
                &p,
                RawOptions {
                    cache: mode,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(f.size(), 64 * 1024);
            // Unaligned offset, length and memory, split across two buffers.
            let a: Vec<u8> = (0..700u32).map(|i| (i % 251) as u8).collect();
            let b = vec![0xabu8; 333];
            f.write_vectored_at(
                &[IoSlice::new(&a[1..]), IoSlice::new(&b)],
                1001,
                WriteFlags::FUA,
            )
            .unwrap();
            f.flush().unwrap();
            let mut out = vec![0u8; 1032];
            f.read_at(&mut out, 1001).unwrap();
            assert_eq!(&out[..699], &a[1..]);
            assert_eq!(&out[699..], &b[..]);
            // Neighbouring bytes untouched by the read-modify-write.
            let mut edge = [1u8; 2];
            f.read_at(&mut edge, 999).unwrap();
            assert_eq!(edge, [0, 0]);
            // Aligned request on aligned memory.
            let mut ab = AlignedBuf::new(4096, 4096);
            ab.as_mut_slice().fill(7);
            f.write_at(ab.as_slice(), 8192).unwrap();
            let mut back = AlignedBuf::new(4096, 4096);
            f.read_at(back.as_mut_slice(), 8192).unwrap();
            assert!(back.as_slice().iter().all(|&x| x == 7));
            // Write-zeroes with and without unmap, and discard.
            f.write_zeroes(8192, 1024, false).unwrap();
            f.write_zeroes(9216, 1024, true).unwrap();
            f.read_at(back.as_mut_slice(), 8192).unwrap();
            assert!(back.as_slice()[..2048].iter().all(|&x| x == 0));
            assert!(back.as_slice()[2048..].iter().all(|&x| x == 7));
            f.discard(0, 64 * 1024).unwrap();
            // Out of range and fixed size.
            assert!(matches!(
                f.write_at(&[1], 64 * 1024),
                Err(Error::OutOfRange { .. })
            ));
        }
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ro.raw");
        RawFile::create(&p, 4096).unwrap();
        let f = RawFile::open(
            &p,
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(f.write_at(&[1], 0), Err(Error::ReadOnly)));
        assert!(matches!(f.discard(0, 512), Err(Error::ReadOnly)));
        assert!(matches!(f.write_zeroes(0, 512, true), Err(Error::ReadOnly)));
    }

    #[test]
    fn discard_punches_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hole.raw");
        RawFile::create(&p, 1 << 20).unwrap();
        let f = RawFile::open(&p, RawOptions::default()).unwrap();
        f.write_at(&vec![5u8; 1 << 20], 0).unwrap();
        f.flush().unwrap();
        let used = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks() * 512
        };
        let before = used(&p);
        f.discard(0, 1 << 20).unwrap();
        let after = used(&p);
        assert!(
            after < before,
            "discard released nothing: {before} -> {after}"
        );
        let mut b = vec![1u8; 4096];
        f.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn cache_mode_names_parse() {
        for m in modes() {
            assert_eq!(m.as_str().parse::<CacheMode>().unwrap(), m);
        }
        assert!("bogus".parse::<CacheMode>().is_err());
    }
}

//! qcow2 images, versions 2 and 3, over any [`BlockBackend`].
//!
//! Supported: cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits,
//! L2 and refcount caches of configurable size, allocation with crash-safe
//! metadata ordering, zero clusters, discard, write-zeroes, the dirty bit and
//! lazy refcounts (refcounts are rebuilt on a read-write open of a dirty
//! image), the corrupt bit (such images open read-only), overlap checks that
//! mark the image corrupt, unknown header extensions kept, image creation and
//! `check` with repair.
//!
//! Not yet supported (refused with [`Error::Unsupported`] where needed):
//! reading or writing compressed clusters, backing files (read-only opens
//! work until an unallocated cluster is read), writing to images with
//! internal snapshots, encryption, external data files and extended L2.

pub mod check;
pub mod header;
pub mod inflight;
mod meta;
pub mod refcount;

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Mutex, MutexGuard};

use crate::backend::{check_range, iov_len, zero_iov, BlockBackend, Limits, WriteFlags};
use crate::error::{Error, Result};
pub use check::{check, CheckReport, Fix};
pub use header::Header;
use header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
pub use inflight::Mapping;
use meta::{classify, L2State, Meta, COPIED, OFFSET_MASK, ZERO};

/// How far ahead of an allocating write the file is extended.
const PREALLOC_BYTES: u64 = 1 << 20;

/// Options for [`Qcow2::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Options {
    /// Open read-only.
    pub read_only: bool,
    /// L2 cache size in bytes. Default: enough to map the whole image, at
    /// most 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// Refcount cache size in bytes. Default: 4 clusters, at least 256 KiB.
    pub refcount_cache_size: Option<u64>,
    /// Write metadata back after every write (the `writethrough` cache modes).
    pub write_through: bool,
}

/// Options for [`Qcow2::create`].
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// Set the lazy refcounts compatible feature (version 3 only).
    pub lazy_refcounts: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
        }
    }
}

/// How a guest range is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data at this host offset.
    Data(u64),
    /// Reads as zeroes.
    Zero,
    /// Not allocated in this image (reads as zeroes without a backing file).
    Unallocated,
}

/// A contiguous guest range with one storage kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// How it is stored.
    pub kind: ExtentKind,
}

/// Summary of an image, for `keel-img info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// qcow2 version.
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts feature.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit.
    pub dirty: bool,
    /// Compression type name.
    pub compression_type: &'static str,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Backing file name.
    pub backing_file: Option<String>,
}

/// An open qcow2 image.
///
/// Metadata is guarded by one mutex; data I/O to already allocated clusters
/// runs outside it, so several queues can read and write in parallel. Host
/// clusters with data I/O in flight are pinned and never reallocated until
/// the I/O completes, whatever discards or writes overlap it (see
/// [`inflight`]).
pub struct Qcow2<F: BlockBackend> {
    file: F,
    read_only: bool,
    write_through: bool,
    size: u64,
    cb: u32,
    has_backing: bool,
    meta: Mutex<Meta>,
}

fn read_u64s(f: &dyn BlockBackend, off: u64, n: usize) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; n * 8];
    f.read_at(&mut buf, off)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// Reads and parses the header of the image in `f`.
pub fn read_header(f: &dyn BlockBackend) -> Result<Header> {
    let fsize = f.size();
    let mut first = vec![0u8; fsize.min(4096) as usize];
    f.read_at(&mut first, 0)?;
    if first.len() < 24 {
        return Header::parse(&first, fsize);
    }
    let cb = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
    if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cb) {
        return Header::parse(&first, fsize);
    }
    let n = fsize.min(1u64 << cb) as usize;
    let mut buf = vec![0u8; n];
    f.read_at(&mut buf, 0)?;
    Header::parse(&buf, fsize)
}

/// Whether `f` starts with the qcow2 magic.
pub fn probe(f: &dyn BlockBackend) -> bool {
    let mut m = [0u8; 4];
    f.size() >= 4 && f.read_at(&mut m, 0).is_ok() && u32::from_be_bytes(m) == header::MAGIC
}

impl<F: BlockBackend> Qcow2<F> {
    /// Opens the image stored in `file`.
    pub fn open(file: F, opts: Qcow2Options) -> Result<Qcow2<F>> {
        let read_only = opts.read_only || file.is_read_only();
        let mut hdr = read_header(&file)?;
        if !read_only {
            if hdr.backing_file.is_some() {
                return Err(Error::Unsupported(
                    "writing to an image with a backing file (backing chains are not implemented yet); open it read-only".into(),
                ));
            }
            if hdr.nb_snapshots > 0 {
                return Err(Error::Unsupported(
                    "writing to an image with internal snapshots; open it read-only".into(),
                ));
            }
            if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(Error::Corrupt(
                    "the image is marked corrupt; open it read-only or repair it with `check -r all`".into(),
                ));
            }
            if hdr.version >= 3 && hdr.autoclear_features != 0 {
                // We implement no autoclear feature: clear them all.
                hdr.autoclear_features = 0;
                file.write_at(&0u64.to_be_bytes(), 88)?;
            }
            if hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
                let report = check::check(&file, Fix::All)?;
                if report.corruptions > 0 || report.check_errors > 0 {
                    return Err(Error::Corrupt(format!(
                        "repairing the refcounts of a dirty image left {} corruptions",
                        report.corruptions
                    )));
                }
                hdr.incompatible_features &= !INCOMPAT_DIRTY;
                file.write_at(&hdr.incompatible_features.to_be_bytes(), 72)?;
                file.flush()?;
                hdr = read_header(&file)?;
            }
        }
        let l1 = read_u64s(&file, hdr.l1_table_offset, hdr.l1_size as usize)?;
        let rt_entries = (hdr.refcount_table_clusters as u64 * hdr.cluster_size() / 8) as usize;
        let reftable = read_u64s(&file, hdr.refcount_table_offset, rt_entries)?;
        let cs = hdr.cluster_size();
        let l2_default = (hdr.l1_size as u64 * cs).clamp(2 * cs, (32 << 20).max(2 * cs));
        let rc_default = (4 * cs).max(256 << 10);
        let meta = Meta::new(
            hdr.clone(),
            l1,
            reftable,
            file.size(),
            opts.l2_cache_size.unwrap_or(l2_default),
            opts.refcount_cache_size.unwrap_or(rc_default),
            read_only,
        );
        Ok(Qcow2 {
            read_only,
            write_through: opts.write_through,
            size: hdr.size,
            cb: hdr.cluster_bits,
            has_backing: hdr.backing_file.is_some(),
            meta: Mutex::new(meta),
            file,
        })
    }

    /// Formats `file` (which should be empty) as a new qcow2 image.
    pub fn create(file: &F, opts: &CreateOptions) -> Result<()> {
        create(file, opts)
    }

    /// The underlying file.
    pub fn file(&self) -> &F {
        &self.file
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cb
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta().hdr.clone()
    }

    /// A summary of the image.
    pub fn info(&self) -> ImageInfo {
        info_from_header(&self.meta().hdr)
    }

    /// Maps a guest range for reading. The host clusters of the data extents
    /// are pinned (never reallocated) until the returned [`Mapping`] is
    /// dropped: keep it until the reads from them have completed.
    pub fn map_read(&self, offset: u64, len: u64) -> Result<Mapping> {
        self.map_read_extents(offset, len, true)
    }

    fn map_read_extents(&self, offset: u64, len: u64, pin: bool) -> Result<Mapping> {
        check_range(offset, len, self.size)?;
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        let cs = 1u64 << self.cb;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            let kind = match m.l2_for_read(f, pos)? {
                None => ExtentKind::Unallocated,
                Some(slot) => {
                    let (_, l2i) = m.split(pos);
                    let e = m.l2.slots[slot].data[l2i];
                    match classify(e, m.hdr.version, self.cb) {
                        Err(msg) => return Err(m.corrupt(f, msg)),
                        Ok(L2State::Unallocated) => ExtentKind::Unallocated,
                        Ok(L2State::Zero(_)) => ExtentKind::Zero,
                        Ok(L2State::Normal(h)) => ExtentKind::Data(h + in_off),
                        Ok(L2State::Compressed) => {
                            return Err(Error::Unsupported(
                                "reading compressed clusters (not implemented yet)".into(),
                            ))
                        }
                    }
                }
            };
            if kind == ExtentKind::Unallocated && self.has_backing {
                return Err(Error::Unsupported(
                    "reading an unallocated cluster from a backing file (backing chains are not implemented yet)".into(),
                ));
            }
            push_extent(&mut out, n, kind);
            pos += n;
        }
        if !pin {
            return Ok(Mapping::unpinned(out));
        }
        Ok(Mapping::pinned(out, &m.inflight, self.cb))
    }

    /// Maps a guest range for writing, allocating clusters as needed. Every
    /// returned extent is [`ExtentKind::Data`]; the caller writes the data
    /// there. Clusters newly allocated read as zeroes until the data lands,
    /// so an overlapping read racing the transfer sees zeroes or the new
    /// data. The host clusters are pinned (never reallocated) until the returned
    /// [`Mapping`] is dropped: keep it until the writes have completed.
    pub fn map_write(&self, offset: u64, len: u64) -> Result<Mapping> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        m.before_modify(f)?;
        let cs = 1u64 << self.cb;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            let host = self.map_write_cluster(&mut m, f, pos, n)?;
            push_extent(&mut out, n, ExtentKind::Data(host + in_off));
            pos += n;
        }
        Ok(Mapping::pinned(out, &m.inflight, self.cb))
    }

    fn map_write_cluster(
        &self,
        m: &mut Meta,
        f: &dyn BlockBackend,
        pos: u64,
        n: u64,
    ) -> Result<u64> {
        let cs = 1u64 << self.cb;
        let slot = m.l2_for_write(f, pos)?;
        let (_, l2i) = m.split(pos);
        let e = m.l2.slots[slot].data[l2i];
        let st = match classify(e, m.hdr.version, self.cb) {
            Ok(s) => s,
            Err(msg) => return Err(m.corrupt(f, msg)),
        };
        let check = |m: &mut Meta, host: u64| -> Result<()> {
            match m.overlap(host, cs) {
                Some(what) => Err(m.corrupt(
                    f,
                    format!("data cluster at {host:#x} would overwrite the {what}"),
                )),
                None => Ok(()),
            }
        };
        match st {
            L2State::Normal(h) if e & COPIED != 0 => {
                check(m, h)?;
                Ok(h)
            }
            L2State::Normal(h) => {
                check(m, h)?;
                match m.refcount(f, h >> self.cb)? {
                    0 => Err(m.corrupt(f, format!("data cluster {h:#x} has refcount 0"))),
                    // Sole owner now. Unless a transfer is in flight: it may
                    // be a read through a former sharer, which must not see
                    // this offset's new data, so copy as if still shared.
                    1 if !m.inflight.is_pinned(h >> self.cb) => {
                        m.set_l2(slot, l2i, h | COPIED);
                        Ok(h)
                    }
                    _ => {
                        // Shared cluster: copy on write.
                        let (new, _) = m.alloc(f, 1)?;
                        check(m, new)?;
                        let mut buf = vec![0u8; cs as usize];
                        f.read_at(&mut buf, h)?;
                        f.write_at(&buf, new)?;
                        m.set_l2(slot, l2i, new | COPIED);
                        m.release(f, h)?;
                        Ok(new)
                    }
                }
            }
            // A cluster newly linked for a write reads as zeroes in full
            // before its L2 entry changes, not only outside the range being
            // written: a read overlapping the write while its data is still
            // in flight must see zeroes (the guest cluster's content before
            // the write) or the new data, never what the host cluster held
            // before (another guest offset's data, or data zeroed since).
            L2State::Zero(Some(h)) if e & COPIED != 0 => {
                check(m, h)?;
                f.write_zeroes(h, cs, false)?;
                m.set_l2(slot, l2i, h | COPIED);
                Ok(h)
            }
            L2State::Unallocated | L2State::Zero(_) => {
                let (new, fresh) = m.alloc(f, 1)?;
                check(m, new)?;
                if !fresh {
                    f.write_zeroes(new, cs, false)?;
                } else if n < cs && new + cs > m.prealloc_end {
                    // Extend the file ahead of the data (fallocate), so that the
                    // partial writes that follow do not each extend the file,
                    // which serialises O_DIRECT writers.
                    let len = cs.max(PREALLOC_BYTES);
                    f.write_zeroes(new, len, false)?;
                    m.prealloc_end = new + len;
                }
                m.set_l2(slot, l2i, new | COPIED);
                if let L2State::Zero(Some(h)) = st {
                    m.release(f, h)?;
                }
                Ok(new)
            }
            L2State::Compressed => Err(Error::Unsupported(
                "writing to compressed clusters (not implemented yet)".into(),
            )),
        }
    }

    /// Changes the L2 entries of the whole clusters in `[offset, offset+len)`.
    /// `zero` selects write-zeroes (else discard).
    fn change_clusters(&self, offset: u64, len: u64, zero: bool, unmap: bool) -> Result<()> {
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        m.before_modify(f)?;
        let cs = 1u64 << self.cb;
        let v3 = m.hdr.version >= 3;
        let mut pos = offset;
        while pos < offset + len {
            let slot = match m.l2_for_read(f, pos)? {
                Some(s) => s,
                None => {
                    // The whole L2 range is unallocated and reads as zeroes.
                    let span = cs * m.l2_entries();
                    pos = (pos / span + 1) * span;
                    continue;
                }
            };
            let (_, l2i) = m.split(pos);
            let e = m.l2.slots[slot].data[l2i];
            let st = match classify(e, m.hdr.version, self.cb) {
                Ok(s) => s,
                Err(msg) => return Err(m.corrupt(f, msg)),
            };
            let new = if !v3 || !zero {
                0
            } else {
                match st {
                    L2State::Normal(h) | L2State::Zero(Some(h)) if !unmap && e & COPIED != 0 => {
                        h | COPIED | ZERO
                    }
                    _ => ZERO,
                }
            };
            if new != e {
                m.set_l2(slot, l2i, new);
                if new & OFFSET_MASK == 0 && (e & OFFSET_MASK != 0 || st == L2State::Compressed) {
                    m.release_entry(f, e)?;
                }
            }
            pos += cs;
        }
        Ok(())
    }

    /// Whether the cluster containing `pos` reads as zeroes.
    fn reads_zero(&self, pos: u64, n: u64) -> Result<bool> {
        Ok(self
            .map_read_extents(pos, n, false)?
            .extents()
            .iter()
            .all(|e| !matches!(e.kind, ExtentKind::Data(_))))
    }

    fn after_change(&self) -> Result<()> {
        if self.write_through {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes back all metadata, clears the dirty bit set for lazy
    /// refcounts, and syncs. Called on drop as well (ignoring errors there).
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        m.write_back(f)?;
        f.flush()?;
        if m.dirty_on_disk {
            m.hdr.incompatible_features &= !INCOMPAT_DIRTY;
            m.write_incompat(f)?;
            f.flush()?;
            m.dirty_on_disk = false;
        }
        Ok(())
    }
}

fn push_extent(out: &mut Vec<Extent>, n: u64, kind: ExtentKind) {
    if let Some(last) = out.last_mut() {
        let merge = match (last.kind, kind) {
            (ExtentKind::Data(a), ExtentKind::Data(b)) => a + last.len == b,
            (a, b) => a == b,
        };
        if merge {
            last.len += n;
            return;
        }
    }
    out.push(Extent { len: n, kind });
}

fn slice_iov<'a>(bufs: &'a [IoSlice<'a>], mut skip: u64, mut len: u64) -> Vec<IoSlice<'a>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let bl = b.len() as u64;
        if skip >= bl {
            skip -= bl;
            continue;
        }
        let take = (bl - skip).min(len);
        out.push(IoSlice::new(&b[skip as usize..(skip + take) as usize]));
        len -= take;
        skip = 0;
    }
    out
}

fn slice_iov_mut<'a>(
    bufs: &'a mut [IoSliceMut<'_>],
    mut skip: u64,
    mut len: u64,
) -> Vec<IoSliceMut<'a>> {
    let mut out = Vec::new();
    for b in bufs.iter_mut() {
        if len == 0 {
            break;
        }
        let bl = b.len() as u64;
        if skip >= bl {
            skip -= bl;
            continue;
        }
        let take = (bl - skip).min(len);
        out.push(IoSliceMut::new(
            &mut b[skip as usize..(skip + take) as usize],
        ));
        len -= take;
        skip = 0;
    }
    out
}

impl<F: BlockBackend> BlockBackend for Qcow2<F> {
    fn size(&self) -> u64 {
        self.size
    }

    fn limits(&self) -> Limits {
        let l = self.file.limits();
        Limits {
            discard_granularity: self.cluster_size() as u32,
            ..l
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len = iov_len(bufs);
        // Pinned until the reads below are done.
        let map = self.map_read(offset, len)?;
        let mut pos = 0;
        for e in map.extents() {
            match e.kind {
                ExtentKind::Data(h) => {
                    let mut sub = slice_iov_mut(bufs, pos, e.len);
                    self.file.read_vectored_at(&mut sub, h)?;
                }
                ExtentKind::Zero | ExtentKind::Unallocated => {
                    zero_iov(bufs, pos as usize, e.len as usize)
                }
            }
            pos += e.len;
        }
        Ok(())
    }

    fn write_vectored_at(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let len = iov_len(bufs);
        if len == 0 {
            return if self.read_only {
                Err(Error::ReadOnly)
            } else {
                Ok(())
            };
        }
        // Pinned until the writes below are done.
        let map = self.map_write(offset, len)?;
        let mut pos = 0;
        for e in map.extents() {
            if let ExtentKind::Data(h) = e.kind {
                let sub = slice_iov(bufs, pos, e.len);
                self.file.write_vectored_at(&sub, h, WriteFlags::NONE)?;
            }
            pos += e.len;
        }
        drop(map);
        if flags.fua {
            self.flush()?;
        }
        self.after_change()
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        m.write_back(f)?;
        f.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let cs = self.cluster_size();
        let start = offset.div_ceil(cs) * cs;
        let end = (offset + len) / cs * cs;
        if start < end {
            self.change_clusters(start, end - start, false, true)?;
        }
        self.after_change()
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let cs = self.cluster_size();
        let end = offset + len;
        let start_full = offset.div_ceil(cs) * cs;
        let end_full = (end / cs * cs).max(start_full);
        let zero_bytes = |pos: u64, n: u64| -> Result<()> {
            if n == 0 || self.reads_zero(pos, n)? {
                return Ok(());
            }
            let zeros = vec![0u8; n as usize];
            self.write_vectored_at(&[IoSlice::new(&zeros)], pos, WriteFlags::NONE)
        };
        if start_full >= end {
            zero_bytes(offset, len)?;
            return self.after_change();
        }
        zero_bytes(offset, start_full - offset)?;
        if start_full < end_full {
            self.change_clusters(start_full, end_full - start_full, true, unmap)?;
        }
        zero_bytes(end_full, end - end_full)?;
        self.after_change()
    }
}

impl<F: BlockBackend> Drop for Qcow2<F> {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; call close() to see them.
        let _ = self.close();
    }
}

/// Builds an [`ImageInfo`] from a header.
pub fn info_from_header(h: &Header) -> ImageInfo {
    ImageInfo {
        virtual_size: h.size,
        cluster_size: h.cluster_size(),
        version: h.version,
        refcount_bits: 1 << h.refcount_order,
        lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
        corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
        dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
        compression_type: if h.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        },
        snapshots: h.nb_snapshots,
        backing_file: h
            .backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

/// Formats `file` as a new, empty qcow2 image.
pub fn create(file: &dyn BlockBackend, o: &CreateOptions) -> Result<()> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "cluster size {cs} must be a power of two from 512 to 2M"
        )));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(Error::InvalidArgument(format!(
            "refcount_bits {} must be a power of two up to 64",
            o.refcount_bits
        )));
    }
    if o.version != 2 && o.version != 3 {
        return Err(Error::InvalidArgument(format!(
            "qcow2 version {}",
            o.version
        )));
    }
    if o.version == 2 && (o.refcount_bits != 16 || o.lazy_refcounts) {
        return Err(Error::InvalidArgument(
            "compat=0.10 images need refcount_bits=16 and no lazy refcounts".into(),
        ));
    }
    let cb = cs.trailing_zeros();
    let order = o.refcount_bits.trailing_zeros();
    let per_l1 = 1u128 << (2 * cb - 3);
    let l1_size = (o.size as u128).div_ceil(per_l1);
    if l1_size * 8 > header::MAX_L1_BYTES as u128 || o.size > (1 << 62) {
        return Err(Error::InvalidArgument(
            "image too large for this cluster size (L1 table above 32 MiB)".into(),
        ));
    }
    let l1_size = l1_size as u64;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let rb_entries = cs * 8 / o.refcount_bits as u64;
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let n = 1 + t + b + l1_clusters;
        let nb = n.div_ceil(rb_entries);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    let total = 1 + t + b + l1_clusters;
    let l1_off = (1 + t + b) * cs;
    // L1 table (zeroes).
    if l1_clusters > 0 {
        file.write_zeroes(l1_off, l1_clusters * cs, false)?;
    }
    // Refcount blocks.
    let mut table = vec![0u8; (t * cs) as usize];
    for k in 0..b {
        let mut block = vec![0u8; cs as usize];
        for c in k * rb_entries..((k + 1) * rb_entries).min(total) {
            refcount::set(&mut block, (c - k * rb_entries) as usize, order, 1);
        }
        let off = (1 + t + k) * cs;
        file.write_at(&block, off)?;
        table[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    file.write_at(&table, cs)?;
    let hdr = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size: o.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: cs,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: order,
        header_length: if o.version == 3 { 112 } else { 72 },
        compression_type: 0,
        extensions: if o.version == 3 {
            vec![header::feature_table()]
        } else {
            Vec::new()
        },
        backing_file: None,
    };
    let mut hb = hdr.to_bytes()?;
    hb.resize(cs as usize, 0);
    file.write_at(&hb, 0)?;
    file.flush()
}

/// Opens an image held in memory and exercises it: header, L1, L2 and
/// refcount parsing, reads, and (if it opens read-write) writes, discard,
/// write-zeroes and a consistency check. Never panics on any input; used by
/// the fuzz target.
pub fn fuzz_image(data: &[u8]) {
    use crate::mem::MemBackend;
    if let Ok(img) = Qcow2::open(
        MemBackend::new(data.to_vec()).with_max_size(64 << 20),
        Qcow2Options {
            l2_cache_size: Some(4096),
            refcount_cache_size: Some(4096),
            ..Default::default()
        },
    ) {
        let size = img.size();
        let mut buf = vec![0u8; 8192];
        for off in [0, size / 3, size.saturating_sub(8192)] {
            let n = (size - off).min(8192) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            let _ = img.write_at(&buf[..n.min(1000)], off);
        }
        let _ = img.write_zeroes(0, size.min(1 << 20), true);
        let _ = img.discard(size / 2, size.min(1 << 20) / 2);
        let _ = img.flush();
        let _ = check::check(img.file(), Fix::None);
    }
    let ro = MemBackend::read_only(data.to_vec());
    let _ = check::check(&ro, Fix::None);
    if let Ok(img) = Qcow2::open(ro, Qcow2Options::default()) {
        let mut buf = vec![0u8; 4096];
        let _ = img.read_at(&mut buf, 0);
    }
}

#[cfg(test)]
mod tests;

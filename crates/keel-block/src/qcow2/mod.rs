//! qcow2 images, versions 2 and 3, over any [`BlockBackend`].
//!
//! Supported: cluster sizes 512 B to 2 MiB, refcount widths 1 to 64 bits,
//! L2 and refcount caches of configurable size, allocation with crash-safe
//! metadata ordering, zero clusters, discard, write-zeroes, the dirty bit and
//! lazy refcounts (refcounts are rebuilt on a read-write open of a dirty
//! image), the corrupt bit (such images open read-only), overlap checks that
//! mark the image corrupt, unknown header extensions kept, image creation and
//! `check` with repair; compressed clusters (deflate and zstd: read,
//! overwritten, written by [`Qcow2::write_compressed`]), backing chains
//! ([`backing`]), writes to images with internal snapshots (shared clusters
//! and L2 tables are copied first; [`snapshot`]) and extended L2 entries.
//!
//! Not supported (refused with [`Error::Unsupported`]): encryption, external
//! data files, unknown incompatible features.

pub mod backing;
pub mod check;
pub mod compress;
pub mod header;
pub mod inflight;
mod meta;
pub mod refcount;
pub mod snapshot;

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{
    check_range, copy_to_iov, iov_len, zero_iov, BlockBackend, Limits, WriteFlags,
};
use crate::error::{Error, Result};
pub use check::{check, CheckReport, Fix};
pub use header::Header;
use header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
pub use inflight::Mapping;
use meta::{classify, compressed_range, L2State, Meta, COPIED, OFFSET_MASK, ZERO};

/// How far ahead of an allocating write the file is extended (zero-range fallocate, so
/// O_DIRECT writers do not serialise on extending the file). Each later small write into
/// the range converts part of an unwritten extent, which costs more the larger the range:
/// on ext4 with 4 KiB allocating writes, 1 MiB made depth 1 about 1.9x slower than 64 KiB,
/// 64 KiB made depth 32 about 1.4x slower than 1 MiB, and 256 KiB matched the better of
/// the two at both depths (`scripts/bench-block`, qcow2 "alloc" rows).
const PREALLOC_BYTES: u64 = 256 << 10;

/// Options for [`Qcow2::open`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Options {
    /// Follow a backing file whose format the image does not state (no
    /// backing-format header extension), probing its format. Off by
    /// default: a guest-written raw image can hold a qcow2 header naming any
    /// host file (`/etc/shadow`), which probing would then expose to the
    /// guest. Used by [`backing::open_path`].
    pub allow_probed_backing: bool,
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
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Backing file name, stored as given (relative names are resolved
    /// against the image's directory when it is opened).
    pub backing_file: Option<String>,
    /// Backing file format (`raw` or `qcow2`), stored in the backing-format
    /// header extension.
    pub backing_format: Option<String>,
    /// Compression type for compressed clusters: 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
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
            backing_file: None,
            backing_format: None,
            compression_type: 0,
            extended_l2: false,
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
    /// Not allocated in this image, which has no backing file: reads as
    /// zeroes.
    Unallocated,
    /// Not allocated in this image: reads from the backing file at the same
    /// guest offset (zeroes past its end).
    Backing,
    /// Compressed: the cluster's compressed data is `len` bytes at host
    /// offset `host`; reads must go through the driver, which decompresses.
    Compressed {
        /// Host byte offset of the compressed data.
        host: u64,
        /// Length of the compressed data in bytes.
        len: u64,
    },
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
    /// Backing file format, from the backing-format extension.
    pub backing_format: Option<String>,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
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
    /// Compression type (0 deflate, 1 zstd).
    ctype: u8,
    /// The backing file name the header names, if any.
    backing_name: Option<String>,
    /// The open backing image, if any.
    backing: Option<Arc<dyn BlockBackend>>,
    /// The last decompressed cluster: (host, len, compressed generation, data).
    dcache: Mutex<Option<DecompressedCluster>>,
    meta: Mutex<Meta>,
}

struct DecompressedCluster {
    host: u64,
    len: u64,
    gen: u64,
    data: Arc<Vec<u8>>,
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
    /// Opens the image stored in `file`, without a backing image. An image
    /// that names a backing file opens read-only only, and reading one of its
    /// unallocated clusters fails; use [`Qcow2::open_with_backing`] or
    /// [`backing::open_path`] to follow the chain.
    pub fn open(file: F, opts: Qcow2Options) -> Result<Qcow2<F>> {
        Self::open_with_backing(file, opts, None)
    }

    /// Opens the image stored in `file` over `backing`, the already opened
    /// image its unallocated clusters read from. `backing` is ignored if the
    /// header names no backing file.
    pub fn open_with_backing(
        file: F,
        opts: Qcow2Options,
        backing: Option<Arc<dyn BlockBackend>>,
    ) -> Result<Qcow2<F>> {
        let read_only = opts.read_only || file.is_read_only();
        let mut hdr = read_header(&file)?;
        let backing_name = hdr
            .backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let backing = if backing_name.is_some() {
            backing
        } else {
            None
        };
        if !read_only {
            if let (Some(name), None) = (&backing_name, &backing) {
                return Err(Error::InvalidArgument(format!(
                    "the image has backing file '{name}', which was not opened; open the image with its backing chain or read-only"
                )));
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
        let snaps = snapshot::read_snapshots(&file, &hdr)?;
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
        let mut meta = meta;
        let cs64 = cs;
        for sn in &snaps {
            let len = (sn.l1_size as u64 * 8).div_ceil(cs64) * cs64;
            meta.fixed.push((sn.l1_offset, len, "snapshot L1 table"));
        }
        if hdr.nb_snapshots > 0 {
            let len = snapshot::table_len(&snaps).div_ceil(cs64) * cs64;
            meta.fixed
                .push((hdr.snapshots_offset, len, "snapshot table"));
        }
        Ok(Qcow2 {
            read_only,
            write_through: opts.write_through,
            size: hdr.size,
            cb: hdr.cluster_bits,
            ctype: hdr.compression_type,
            backing_name,
            backing,
            dcache: Mutex::new(None),
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

    fn header_version(&self) -> u32 {
        self.meta().hdr.version
    }

    /// The backing image, if one is open.
    pub fn backing(&self) -> Option<&Arc<dyn BlockBackend>> {
        self.backing.as_ref()
    }

    /// Internal snapshots recorded in the image.
    pub fn snapshots(&self) -> Result<Vec<snapshot::Snapshot>> {
        let hdr = self.header();
        snapshot::read_snapshots(&self.file, &hdr)
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.meta().hdr.clone()
    }

    /// A summary of the image.
    pub fn info(&self) -> ImageInfo {
        info_from_header(&self.meta().hdr)
    }

    /// Maps a guest range for reading. The host clusters of the data and
    /// compressed extents are pinned (never reallocated) until the returned
    /// [`Mapping`] is dropped: keep it until the reads from them have
    /// completed. [`ExtentKind::Backing`] and [`ExtentKind::Compressed`]
    /// extents cannot be read from the file directly; [`BlockBackend::read_vectored_at`]
    /// serves them.
    pub fn map_read(&self, offset: u64, len: u64) -> Result<Mapping> {
        Ok(self.map_read_inner(offset, len, true)?.0)
    }

    fn map_read_extents(&self, offset: u64, len: u64, pin: bool) -> Result<Mapping> {
        Ok(self.map_read_inner(offset, len, pin)?.0)
    }

    /// The kind of a range this image does not allocate.
    fn unallocated(&self) -> Result<ExtentKind> {
        match (&self.backing, &self.backing_name) {
            (Some(_), _) => Ok(ExtentKind::Backing),
            (None, None) => Ok(ExtentKind::Unallocated),
            (None, Some(name)) => Err(Error::Unsupported(format!(
                "reading an unallocated cluster: the backing file '{name}' was not opened"
            ))),
        }
    }

    /// Maps a guest range; also returns the compressed-cluster generation
    /// at mapping time (for the decompressed-cluster cache).
    fn map_read_inner(&self, offset: u64, len: u64, pin: bool) -> Result<(Mapping, u64)> {
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
            let Some(slot) = m.l2_for_read(f, pos)? else {
                push_extent(&mut out, n, self.unallocated()?);
                pos += n;
                continue;
            };
            let (_, l2i) = m.split(pos);
            let e = m.l2_get(slot, l2i);
            let bitmap = m.l2_bitmap(slot, l2i);
            let st = match classify(e, m.hdr.version, self.cb, m.ext, bitmap) {
                Ok(s) => s,
                Err(msg) => return Err(m.corrupt(f, msg)),
            };
            match st {
                L2State::Unallocated if !m.ext => push_extent(&mut out, n, self.unallocated()?),
                L2State::Zero(_) => push_extent(&mut out, n, ExtentKind::Zero),
                L2State::Normal(h) if !m.ext => {
                    push_extent(&mut out, n, ExtentKind::Data(h + in_off))
                }
                L2State::Unallocated | L2State::Normal(_) => {
                    // Extended L2: status per subcluster.
                    let h = e & OFFSET_MASK;
                    let sc = cs / 32;
                    let mut p = in_off;
                    while p < in_off + n {
                        let i = p / sc;
                        let k = ((i + 1) * sc).min(in_off + n) - p;
                        let kind = if bitmap & (1 << i) != 0 {
                            ExtentKind::Data(h + p)
                        } else if bitmap & (1 << (32 + i)) != 0 {
                            ExtentKind::Zero
                        } else {
                            self.unallocated()?
                        };
                        push_extent(&mut out, k, kind);
                        p += k;
                    }
                }
                L2State::Compressed => {
                    let (s, ce) = compressed_range(e, self.cb);
                    let fsize = f.size();
                    if s < cs || s >= fsize {
                        return Err(m.corrupt(
                            f,
                            format!(
                                "compressed cluster at {s:#x} (guest {pos:#x}) is outside the file"
                            ),
                        ));
                    }
                    // The last sector may run past the end of the file.
                    let host_len = ce.min(fsize) - s;
                    push_extent(
                        &mut out,
                        n,
                        ExtentKind::Compressed {
                            host: s,
                            len: host_len,
                        },
                    );
                }
            }
            pos += n;
        }
        let gen = m.cgen;
        if !pin {
            return Ok((Mapping::unpinned(out), gen));
        }
        Ok((Mapping::pinned(out, &m.inflight, self.cb), gen))
    }

    /// The decompressed contents of the compressed cluster whose data is
    /// `len` bytes at `host`. The host range must be pinned.
    fn decompressed(&self, host: u64, len: u64, gen: u64) -> Result<Arc<Vec<u8>>> {
        {
            let c = self.dcache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = c.as_ref() {
                if d.host == host && d.len == len && d.gen == gen {
                    return Ok(d.data.clone());
                }
            }
        }
        let mut src = vec![0u8; len as usize];
        self.file.read_at(&mut src, host)?;
        let mut out = vec![0u8; 1 << self.cb];
        compress::decompress(self.ctype, &src, &mut out, host)?;
        let data = Arc::new(out);
        *self.dcache.lock().unwrap_or_else(|p| p.into_inner()) = Some(DecompressedCluster {
            host,
            len,
            gen,
            data: data.clone(),
        });
        Ok(data)
    }

    /// Reads `len` bytes of the backing image at guest offset `guest` into
    /// `bufs` from `skip` on; zeroes past the backing image's end.
    fn read_backing(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        skip: u64,
        len: u64,
        guest: u64,
    ) -> Result<()> {
        let Some(b) = &self.backing else {
            zero_iov(bufs, skip as usize, len as usize);
            return Ok(());
        };
        let avail = b.size().saturating_sub(guest).min(len);
        if avail > 0 {
            let mut sub = slice_iov_mut(bufs, skip, avail);
            b.read_vectored_at(&mut sub, guest)?;
        }
        if avail < len {
            zero_iov(bufs, (skip + avail) as usize, (len - avail) as usize);
        }
        Ok(())
    }

    /// The current contents of guest range `[guest, guest + buf.len())`,
    /// which lies in one cluster, as seen through the backing image (zeroes
    /// without one).
    fn backing_bytes(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let n = buf.len() as u64;
        self.read_backing(&mut [IoSliceMut::new(buf)], 0, n, guest)
    }

    /// Maps a guest range for writing, allocating clusters as needed. Every
    /// returned extent is [`ExtentKind::Data`]; the caller writes the data
    /// there. Clusters newly allocated read as zeroes, or as their previous
    /// contents (copied from a backing image, a compressed cluster or a
    /// cluster shared with a snapshot), until the data lands, so an
    /// overlapping read racing the transfer sees the old contents, zeroes or
    /// the new data. The host clusters are pinned (never reallocated) until
    /// the returned [`Mapping`] is dropped: keep it until the writes have
    /// completed.
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

    /// Allocates a host cluster for guest cluster data and makes it read as
    /// `old` (the guest cluster's contents before the write, `None` for
    /// zeroes) before it is linked.
    fn alloc_filled(
        &self,
        m: &mut Meta,
        f: &dyn BlockBackend,
        old: Option<&[u8]>,
        partial: bool,
    ) -> Result<u64> {
        let cs = 1u64 << self.cb;
        let (new, fresh) = m.alloc(f, 1)?;
        if let Some(what) = m.overlap(new, cs) {
            return Err(m.corrupt(
                f,
                format!("data cluster at {new:#x} would overwrite the {what}"),
            ));
        }
        match old {
            Some(data) => f.write_at(data, new)?,
            None if !fresh => f.write_zeroes(new, cs, false)?,
            None if partial && new + cs > m.prealloc_end => {
                // Extend the file ahead of the data (fallocate), so that the
                // partial writes that follow do not each extend the file,
                // which serialises O_DIRECT writers.
                let len = cs.max(PREALLOC_BYTES);
                f.write_zeroes(new, len, false)?;
                m.prealloc_end = new + len;
            }
            None => {}
        }
        Ok(new)
    }

    fn map_write_cluster(
        &self,
        m: &mut Meta,
        f: &dyn BlockBackend,
        pos: u64,
        n: u64,
    ) -> Result<u64> {
        let cs = 1u64 << self.cb;
        let partial = n < cs;
        let slot = m.l2_for_write(f, pos)?;
        let (_, l2i) = m.split(pos);
        let e = m.l2_get(slot, l2i);
        let bitmap = m.l2_bitmap(slot, l2i);
        let st = match classify(e, m.hdr.version, self.cb, m.ext, bitmap) {
            Ok(s) => s,
            Err(msg) => return Err(m.corrupt(f, msg)),
        };
        if m.ext {
            return self.map_write_subclusters(m, f, slot, l2i, st, e, bitmap, pos, n);
        }
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
                        // Shared cluster (a snapshot's): copy on write.
                        let mut buf = vec![0u8; cs as usize];
                        f.read_at(&mut buf, h)?;
                        let new = self.alloc_filled(m, f, Some(&buf), partial)?;
                        m.set_l2(slot, l2i, new | COPIED);
                        m.release(f, h)?;
                        Ok(new)
                    }
                }
            }
            // A cluster newly linked for a write reads as its old contents
            // (zeroes here) in full before its L2 entry changes, not only
            // outside the range being written: a read overlapping the write
            // while its data is still in flight must see the guest cluster's
            // content before the write or the new data, never what the host
            // cluster held before (another guest offset's data, or data
            // zeroed since).
            L2State::Zero(Some(h)) if e & COPIED != 0 => {
                check(m, h)?;
                f.write_zeroes(h, cs, false)?;
                m.set_l2(slot, l2i, h | COPIED);
                Ok(h)
            }
            L2State::Zero(_) => {
                let new = self.alloc_filled(m, f, None, partial)?;
                m.set_l2(slot, l2i, new | COPIED);
                if let L2State::Zero(Some(h)) = st {
                    m.release(f, h)?;
                }
                Ok(new)
            }
            L2State::Unallocated => {
                // Copy on write from the backing image when only part of
                // the cluster is written.
                let old = match (&self.backing, partial) {
                    (Some(_), true) => {
                        let mut buf = vec![0u8; cs as usize];
                        self.backing_bytes(&mut buf, pos & !(cs - 1))?;
                        Some(buf)
                    }
                    _ => None,
                };
                let new = self.alloc_filled(m, f, old.as_deref(), partial)?;
                m.set_l2(slot, l2i, new | COPIED);
                Ok(new)
            }
            L2State::Compressed => {
                // Read-modify-write: decompress before allocating, so that a
                // damaged cluster fails the write without leaking.
                let old = if partial {
                    Some(self.read_compressed_now(m, f, e)?)
                } else {
                    None
                };
                let new = self.alloc_filled(m, f, old.as_deref(), partial)?;
                m.set_l2(slot, l2i, new | COPIED);
                m.release_entry(f, e)?;
                Ok(new)
            }
        }
    }

    /// Decompresses the cluster of compressed L2 entry `e`, under the
    /// metadata lock (so its host range cannot be freed meanwhile).
    fn read_compressed_now(&self, m: &mut Meta, f: &dyn BlockBackend, e: u64) -> Result<Vec<u8>> {
        let cs = 1u64 << self.cb;
        let (s, ce) = compressed_range(e, self.cb);
        let fsize = f.size();
        if s < cs || s >= fsize {
            return Err(m.corrupt(
                f,
                format!("compressed cluster at {s:#x} is outside the file"),
            ));
        }
        let mut src = vec![0u8; (ce.min(fsize) - s) as usize];
        f.read_at(&mut src, s)?;
        let mut out = vec![0u8; cs as usize];
        compress::decompress(self.ctype, &src, &mut out, s)?;
        Ok(out)
    }

    /// Extended L2: maps the write of `[pos, pos + n)` (inside one cluster)
    /// to host bytes, allocating the cluster and marking the subclusters
    /// written as allocated. Subclusters only partly written are first
    /// filled with their old contents (backing image or zeroes); those
    /// written in full are zeroed, so a racing read sees zeroes, old or new
    /// data.
    #[allow(clippy::too_many_arguments)]
    fn map_write_subclusters(
        &self,
        m: &mut Meta,
        f: &dyn BlockBackend,
        slot: usize,
        l2i: usize,
        st: L2State,
        e: u64,
        bitmap: u64,
        pos: u64,
        n: u64,
    ) -> Result<u64> {
        let cs = 1u64 << self.cb;
        let sc = cs / 32;
        let base = pos & !(cs - 1);
        let in_off = pos - base;
        let (first, last) = (in_off / sc, (in_off + n - 1) / sc);
        let mut bitmap = bitmap;
        // A host cluster this entry owns alone, with its subclusters' old
        // contents in place.
        let host = match st {
            L2State::Normal(h) if e & COPIED != 0 => {
                if let Some(what) = m.overlap(h, cs) {
                    return Err(m.corrupt(
                        f,
                        format!("data cluster at {h:#x} would overwrite the {what}"),
                    ));
                }
                h
            }
            L2State::Normal(h) => match m.refcount(f, h >> self.cb)? {
                0 => return Err(m.corrupt(f, format!("data cluster {h:#x} has refcount 0"))),
                1 if !m.inflight.is_pinned(h >> self.cb) => h,
                _ => {
                    let mut buf = vec![0u8; cs as usize];
                    f.read_at(&mut buf, h)?;
                    let new = self.alloc_filled(m, f, Some(&buf), true)?;
                    m.set_l2(slot, l2i, new | COPIED);
                    m.release(f, h)?;
                    new
                }
            },
            L2State::Compressed => {
                let old = self.read_compressed_now(m, f, e)?;
                let new = self.alloc_filled(m, f, Some(&old), true)?;
                m.set_l2(slot, l2i, new | COPIED);
                m.set_l2_bitmap(slot, l2i, 0xffff_ffff);
                m.release_entry(f, e)?;
                bitmap = 0xffff_ffff;
                new
            }
            L2State::Unallocated | L2State::Zero(_) => self.alloc_filled(m, f, None, true)?,
        };
        // Subclusters newly allocated get their old contents (or zeroes)
        // before the bitmap says they are allocated.
        for i in first..=last {
            if bitmap & (1 << i) != 0 {
                continue;
            }
            let (s, e_) = (i * sc, (i + 1) * sc);
            let full = in_off <= s && in_off + n >= e_;
            if !full && bitmap & (1 << (32 + i)) == 0 && self.backing.is_some() {
                let mut buf = vec![0u8; sc as usize];
                self.backing_bytes(&mut buf, base + s)?;
                f.write_at(&buf, host + s)?;
            } else {
                f.write_zeroes(host + s, sc, false)?;
            }
        }
        let mut mask = 0u64;
        for i in first..=last {
            mask |= 1 << i;
        }
        let new_bitmap = (bitmap | mask) & !(mask << 32);
        m.set_l2(slot, l2i, host | COPIED);
        m.set_l2_bitmap(slot, l2i, new_bitmap);
        Ok(host)
    }

    /// Writes one whole cluster compressed, with the image's compression
    /// type, as `qemu-img convert -c` does. `offset` must be cluster
    /// aligned and `data` a cluster long, except in the image's last
    /// cluster, where the rest of the cluster is written as zeroes. A cluster
    /// that does not shrink is written normally.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = 1u64 << self.cb;
        let len = data.len() as u64;
        check_range(offset, len, self.size)?;
        let last = offset.saturating_add(cs) >= self.size;
        if offset % cs != 0 || (len != cs && !last) || len == 0 || len > cs {
            return Err(Error::InvalidArgument(format!(
                "compressed writes take one whole cluster ({len} bytes at {offset})"
            )));
        }
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut full = data.to_vec();
        full.resize(cs as usize, 0);
        let Some(c) = compress::compress(self.ctype, &full)? else {
            let tail = (self.size - offset).min(cs) as usize;
            return self.write_at(&full[..tail], offset);
        };
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        m.before_modify(f)?;
        let slot = m.l2_for_write(f, offset)?;
        let (_, l2i) = m.split(offset);
        let old = m.l2_get(slot, l2i);
        let old_bitmap = m.l2_bitmap(slot, l2i);
        if let Err(msg) = classify(old, m.hdr.version, self.cb, m.ext, old_bitmap) {
            return Err(m.corrupt(f, msg));
        }
        let host = m.alloc_bytes(f, c.len() as u64)?;
        let x = 62 - (self.cb - 8);
        if host + c.len() as u64 > 1 << x {
            return Err(Error::Unsupported(
                "compressed data beyond the offsets a compressed L2 entry can hold".into(),
            ));
        }
        if let Some(what) = m.overlap(host, c.len() as u64) {
            return Err(m.corrupt(
                f,
                format!("compressed data at {host:#x} would overwrite the {what}"),
            ));
        }
        // Data, then (after the refcount) the L2 entry.
        f.write_at(&c, host)?;
        let extra = ((host + c.len() as u64 - 1) >> 9) - (host >> 9);
        m.set_l2(slot, l2i, meta::COMPRESSED | (extra << x) | host);
        m.set_l2_bitmap(slot, l2i, 0);
        if old & OFFSET_MASK != 0 || old & meta::COMPRESSED != 0 {
            m.release_entry(f, old)?;
        }
        drop(m);
        self.after_change()
    }

    /// Changes the L2 entries of the whole clusters in `[offset, offset+len)`.
    /// `zero` selects write-zeroes (else discard).
    fn change_clusters(&self, offset: u64, len: u64, zero: bool, unmap: bool) -> Result<()> {
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        m.before_modify(f)?;
        let cs = 1u64 << self.cb;
        let v3 = m.hdr.version >= 3;
        // With a backing image an unallocated cluster shows the backing
        // data, so both discard and write-zeroes leave zero clusters.
        let zero = zero || self.backing.is_some();
        let mut pos = offset;
        while pos < offset + len {
            let slot = match m.l2_for_change(f, pos)? {
                Some(s) => s,
                None if zero && self.backing.is_some() => m.l2_for_write(f, pos)?,
                None => {
                    // The whole L2 range is unallocated and reads as zeroes.
                    let span = cs * m.l2_entries();
                    pos = (pos / span + 1) * span;
                    continue;
                }
            };
            let (_, l2i) = m.split(pos);
            let e = m.l2_get(slot, l2i);
            let bitmap = m.l2_bitmap(slot, l2i);
            let st = match classify(e, m.hdr.version, self.cb, m.ext, bitmap) {
                Ok(s) => s,
                Err(msg) => return Err(m.corrupt(f, msg)),
            };
            let keep = match st {
                L2State::Normal(h) | L2State::Zero(Some(h)) if !unmap && e & COPIED != 0 => Some(h),
                _ => None,
            };
            let (new, new_bitmap) = if !v3 || !zero {
                (0, 0)
            } else if m.ext {
                (keep.map_or(0, |h| h | COPIED), 0xffff_ffffu64 << 32)
            } else {
                (keep.map_or(ZERO, |h| h | COPIED | ZERO), 0)
            };
            if new != e || new_bitmap != bitmap {
                m.set_l2(slot, l2i, new);
                m.set_l2_bitmap(slot, l2i, new_bitmap);
                if new & OFFSET_MASK == 0 && (e & OFFSET_MASK != 0 || st == L2State::Compressed) {
                    m.release_entry(f, e)?;
                }
            }
            pos += cs;
        }
        Ok(())
    }

    /// Whether `[pos, pos + n)` reads as zeroes without looking at data.
    fn reads_zero(&self, pos: u64, n: u64) -> Result<bool> {
        Ok(self
            .map_read_extents(pos, n, false)?
            .extents()
            .iter()
            .all(|e| matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated)))
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
            // One extent per compressed cluster.
            (ExtentKind::Compressed { .. }, _) => false,
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
        let (map, gen) = self.map_read_inner(offset, len, true)?;
        let cs = 1u64 << self.cb;
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
                ExtentKind::Backing => self.read_backing(bufs, pos, e.len, offset + pos)?,
                ExtentKind::Compressed { host, len } => {
                    let data = self.decompressed(host, len, gen)?;
                    let skip = ((offset + pos) & (cs - 1)) as usize;
                    copy_to_iov(bufs, pos as usize, &data[skip..skip + e.len as usize]);
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
        if self.backing.is_some() && self.header_version() < 3 {
            // Version 2 cannot mark clusters zero, and unallocating them
            // would show the backing data: discard is advisory, skip it.
            return Ok(());
        }
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
        let mut start_full = offset.div_ceil(cs) * cs;
        let mut end_full = (end / cs * cs).max(start_full);
        if self.backing.is_some() && self.header_version() < 3 {
            // No zero clusters in version 2: write zeroes as data.
            start_full = end;
            end_full = end;
        }
        let zero_bytes = |mut pos: u64, n: u64| -> Result<()> {
            let end = pos + n;
            while pos < end {
                let k = (end - pos).min(1 << 20);
                if !self.reads_zero(pos, k)? {
                    let zeros = vec![0u8; k as usize];
                    self.write_vectored_at(&[IoSlice::new(&zeros)], pos, WriteFlags::NONE)?;
                }
                pos += k;
            }
            Ok(())
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
        compression_type: compress::type_name(h.compression_type),
        snapshots: h.nb_snapshots,
        backing_file: h
            .backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        backing_format: h.backing_format(),
        extended_l2: h.incompatible_features & header::INCOMPAT_EXTL2 != 0,
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
    if o.extended_l2 && (o.version < 3 || cb < 14) {
        return Err(Error::InvalidArgument(
            "extended_l2 needs compat=1.1 and clusters of at least 16 KiB".into(),
        ));
    }
    if o.compression_type > 1 || (o.compression_type != 0 && o.version < 3) {
        return Err(Error::InvalidArgument(format!(
            "compression type {} (0 zlib, 1 zstd; zstd needs compat=1.1)",
            o.compression_type
        )));
    }
    let mut extensions = Vec::new();
    if let Some(fmt) = &o.backing_format {
        if fmt != "raw" && fmt != "qcow2" {
            return Err(Error::InvalidArgument(format!(
                "backing format '{fmt}' (use raw or qcow2)"
            )));
        }
        extensions.push(header::Extension {
            kind: header::EXT_BACKING_FORMAT,
            data: fmt.as_bytes().to_vec(),
        });
    }
    if o.version == 3 {
        extensions.push(header::feature_table());
    }
    let ext = o.extended_l2 as u32;
    let per_l1 = 1u128 << (2 * cb - 3 - ext);
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
        incompatible_features: if o.extended_l2 {
            header::INCOMPAT_EXTL2
        } else {
            0
        } | if o.compression_type == 1 {
            header::INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible_features: if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: order,
        header_length: if o.version == 3 { 112 } else { 72 },
        compression_type: o.compression_type,
        extensions,
        backing_file: None,
    };
    let mut hdr = hdr;
    let mut hb = hdr.to_bytes()?;
    if let Some(name) = &o.backing_file {
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::InvalidArgument(format!(
                "backing file name of {} bytes (1 to 1023)",
                name.len()
            )));
        }
        hdr.backing_file_offset = hb.len() as u64;
        hdr.backing_file_size = name.len() as u32;
        hb = hdr.to_bytes()?;
        hb.extend_from_slice(name.as_bytes());
        if hb.len() as u64 > cs {
            return Err(Error::InvalidArgument(
                "header, extensions and backing file name do not fit in one cluster".into(),
            ));
        }
    }
    hb.resize(cs as usize, 0);
    file.write_at(&hb, 0)?;
    file.flush()
}

/// Opens an image held in memory and exercises it: header, L1, L2 (plain
/// and extended) and refcount parsing, snapshot tables, reads (compressed
/// clusters too, and of an in-memory backing image when the header names
/// one), and (if it opens read-write) writes (copy-on-write from the backing
/// image, over compressed and shared clusters), compressed writes, discard,
/// write-zeroes and a consistency check. Never panics on any input; used by
/// the fuzz target.
pub fn fuzz_image(data: &[u8]) {
    use crate::mem::MemBackend;
    let backing: Arc<dyn BlockBackend> = Arc::new(MemBackend::read_only(
        (0..256 << 10).map(|i| (i % 251) as u8).collect(),
    ));
    if let Ok(img) = Qcow2::open_with_backing(
        MemBackend::new(data.to_vec()).with_max_size(64 << 20),
        Qcow2Options {
            l2_cache_size: Some(4096),
            refcount_cache_size: Some(4096),
            ..Default::default()
        },
        Some(backing.clone()),
    ) {
        let size = img.size();
        let mut buf = vec![0u8; 8192];
        for off in [0, size / 3, size.saturating_sub(8192)] {
            let n = (size - off).min(8192) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            let _ = img.write_at(&buf[..n.min(1000)], off);
        }
        let cs = img.cluster_size();
        if size >= 2 * cs && cs <= 1 << 16 {
            let text: Vec<u8> = (0..cs).map(|i| (i / 64) as u8).collect();
            let _ = img.write_compressed(cs, &text);
            let _ = img.read_at(&mut buf[..100], cs + 10);
            let _ = img.write_at(&buf[..100], cs + 50);
        }
        let _ = img.write_zeroes(0, size.min(1 << 20), true);
        let _ = img.discard(size / 2, size.min(1 << 20) / 2);
        let _ = img.flush();
        let _ = check::check(img.file(), Fix::None);
    }
    let ro = MemBackend::read_only(data.to_vec());
    let _ = check::check(&ro, Fix::None);
    if let Ok(img) = Qcow2::open_with_backing(ro, Qcow2Options::default(), Some(backing)) {
        let mut buf = vec![0u8; 4096];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.snapshots();
    }
}

#[cfg(test)]
mod tests;

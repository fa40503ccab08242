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

mod backend;
pub mod backing;
pub mod bitmaps;
pub mod check;
pub mod compress;
mod create;
pub mod edit;
pub mod header;
pub mod inflight;
mod info;
mod meta;
mod options;
mod read;
pub mod refcount;
pub mod snapshot;
mod write;

use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::BlockBackend;
use crate::error::{Corruption, Error, InvalidArgument, Metadata, Result, Unsupported};
pub use check::{check, CheckReport, Fix};
pub use compress::CompressionType;
pub use create::{check_options, create, create_path};
pub use header::Header;
use header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
pub use info::{info_from_header, ImageInfo};
use meta::Meta;
pub use options::{CacheSizes, CreateOptions, Qcow2Options};
pub use read::Allocation;

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
    /// Compression type of compressed clusters.
    ctype: CompressionType,
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

/// Refuses a table two of whose entries (masked by `mask`) name the same cluster.
fn refuse_aliases(entries: &[u64], mask: u64, table: Metadata) -> Result<()> {
    let mut seen = std::collections::HashMap::with_capacity(entries.len().min(1 << 16));
    for (index, &e) in entries.iter().enumerate() {
        let offset = e & mask;
        if offset == 0 {
            continue;
        }
        if let Some(other) = seen.insert(offset, index) {
            return Err(Error::Corrupt(Corruption::Aliased {
                table,
                index,
                other,
                offset,
            }));
        }
    }
    Ok(())
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
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
    /// use keel_block::{BlockBackend, MemBackend};
    ///
    /// let file = MemBackend::new(Vec::new());
    /// qcow2::create(&file, &CreateOptions { size: 1 << 20, ..Default::default() })?;
    ///
    /// let img = Qcow2::open(file, Qcow2Options::default())?;
    /// img.write_at(b"hello", 4096)?;
    /// let mut buf = [0u8; 5];
    /// img.read_at(&mut buf, 4096)?;
    /// assert_eq!(&buf, b"hello");
    /// img.close()?;
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    ///
    /// With the image on disk, open its file as a growable [`RawFile`](crate::RawFile):
    ///
    /// ```no_run
    /// use keel_block::qcow2::{CacheSizes, Qcow2, Qcow2Options};
    /// use keel_block::{CacheMode, RawFile, RawOptions};
    ///
    /// let file = RawFile::open(
    ///     "disk.qcow2",
    ///     RawOptions { cache: CacheMode::None, growable: true, ..Default::default() },
    /// )?;
    /// let opts = Qcow2Options {
    ///     cache_sizes: CacheSizes { l2: Some(4 << 20), ..Default::default() },
    ///     ..Default::default()
    /// };
    /// let img = Qcow2::open(file, opts)?;
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    pub fn open(file: F, opts: Qcow2Options) -> Result<Qcow2<F>> {
        Self::open_with_backing(file, opts, None)
    }

    /// Opens the image stored in `file` over `backing`, the already opened
    /// image its unallocated clusters read from. `backing` is ignored if the
    /// header names no backing file.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    ///
    /// use keel_block::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
    /// use keel_block::{BlockBackend, Format, MemBackend};
    ///
    /// let base: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(vec![7u8; 1 << 20]));
    /// let file = MemBackend::new(Vec::new());
    /// let opts = CreateOptions {
    ///     size: 1 << 20,
    ///     backing_file: Some("base.raw".into()),
    ///     backing_format: Some(Format::Raw),
    ///     ..Default::default()
    /// };
    /// qcow2::create(&file, &opts)?;
    ///
    /// let img = Qcow2::open_with_backing(file, Qcow2Options::default(), Some(base))?;
    /// img.write_at(&[1; 512], 0)?;
    /// let mut buf = [0u8; 1024];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf[..512], [1; 512]); // written to the overlay
    /// assert_eq!(buf[512..], [7; 512]); // from the backing image
    /// # Ok::<(), keel_block::Error>(())
    /// ```
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
                return Err(Error::InvalidArgument(InvalidArgument::UnopenedBacking {
                    name: name.clone(),
                }));
            }
            if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(Error::Corrupt(Corruption::MarkedCorrupt));
            }
            if hdr.version >= 3 && hdr.autoclear_features != 0 {
                // We implement no autoclear feature: clear them all.
                hdr.autoclear_features = 0;
                file.write_at(&0u64.to_be_bytes(), 88)?;
            }
            if hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
                let report = check::check(&file, Fix::All)?;
                if report.corruptions > 0 || report.check_errors > 0 {
                    return Err(Error::Corrupt(Corruption::DirtyRepair {
                        corruptions: report.corruptions,
                        check_errors: report.check_errors,
                    }));
                }
                hdr.incompatible_features &= !INCOMPAT_DIRTY;
                file.write_at(&hdr.incompatible_features.to_be_bytes(), 72)?;
                file.flush()?;
                hdr = read_header(&file)?;
            }
        }
        // Header validation admits only the types there are.
        let ctype = CompressionType::from_raw(hdr.compression_type)
            .ok_or(Unsupported::CompressionType(hdr.compression_type))?;
        let snaps = snapshot::read_snapshots(&file, &hdr)?;
        let l1 = read_u64s(&file, hdr.l1_table_offset, hdr.l1_size as usize)?;
        let rt_entries = (hdr.refcount_table_clusters as u64 * hdr.cluster_size() / 8) as usize;
        let reftable = read_u64s(&file, hdr.refcount_table_offset, rt_entries)?;
        // Aliased tables would make the allocator and lookups repeat their work per alias
        // (a reftable whose every entry names one full block: 10^10 clusters to scan).
        refuse_aliases(&l1, meta::OFFSET_MASK, Metadata::L1Table)?;
        refuse_aliases(&reftable, !meta::REFT_RESERVED, Metadata::RefcountTable)?;
        let cs = hdr.cluster_size();
        let l2_default = (hdr.l1_size as u64 * cs).clamp(2 * cs, (32 << 20).max(2 * cs));
        let rc_default = (4 * cs).max(256 << 10);
        let meta = Meta::new(
            hdr.clone(),
            l1,
            reftable,
            file.size(),
            opts.cache_sizes.l2.unwrap_or(l2_default),
            opts.cache_sizes.refcount.unwrap_or(rc_default),
            read_only,
        );
        let mut meta = meta;
        let cs64 = cs;
        for sn in &snaps {
            let len = (sn.l1_size as u64 * 8).div_ceil(cs64) * cs64;
            meta.fixed
                .push((sn.l1_offset, len, Metadata::SnapshotL1Table));
        }
        if hdr.nb_snapshots > 0 {
            let len = snapshot::table_len(&snaps).div_ceil(cs64) * cs64;
            meta.fixed
                .push((hdr.snapshots_offset, len, Metadata::SnapshotTable));
        }
        Ok(Qcow2 {
            read_only,
            write_through: opts.write_through,
            size: hdr.size,
            cb: hdr.cluster_bits,
            ctype,
            backing_name,
            backing,
            dcache: Mutex::new(None),
            meta: Mutex::new(meta),
            file,
        })
    }

    /// Formats `file` (which should be empty) as a new qcow2 image.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::qcow2::{CompressionType, CreateOptions, Qcow2, Qcow2Options};
    /// use keel_block::{BlockBackend, MemBackend};
    ///
    /// let file = MemBackend::new(Vec::new());
    /// let opts = CreateOptions {
    ///     size: 64 << 20,
    ///     cluster_size: 4096,
    ///     compression_type: CompressionType::Zstd,
    ///     ..Default::default()
    /// };
    /// Qcow2::create(&file, &opts)?;
    ///
    /// let img = Qcow2::open(file, Qcow2Options::default())?;
    /// assert_eq!(img.size(), 64 << 20);
    /// assert_eq!(img.cluster_size(), 4096);
    /// assert_eq!(img.info().compression_type, CompressionType::Zstd);
    /// # Ok::<(), keel_block::Error>(())
    /// ```
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

    pub(super) fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn header_version(&self) -> u32 {
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

impl<F: BlockBackend> Drop for Qcow2<F> {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; call close() to see them.
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests;

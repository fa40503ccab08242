//! Offline edits of a qcow2 image's metadata: resize, internal snapshots
//! (create, apply, delete), amend (compat, lazy refcounts, refcount width),
//! backing file change and emptying the active layer.
//!
//! Each edit is a *metadata switch*: the new metadata (active L1 table, the
//! L2 tables whose contents change, snapshot L1 tables and snapshot table
//! that change, and a whole refcount structure counted from the references)
//! is written beside the old, in clusters the old image does not use (its
//! free clusters, then past the end of the file), and synced; then one write of the header's first
//! bytes switches the image to it, and a second sync makes the switch
//! durable. A crash (or `kill -9`) at any point leaves either the old image
//! or the new one, never a mixture: the clusters the new metadata was being
//! written to are unreferenced free space in the old image, and the old
//! metadata is free space (refcount 0) in the new one. Data clusters never
//! move, so an edit costs time and space in proportion to the metadata, not
//! to the data.
//!
//! The image must not be open elsewhere (in particular not by a running VM):
//! these are the operations `qemu-img resize`, `snapshot`, `amend`,
//! `rebase -u` and `commit` perform on an image at rest. Dirty images (lazy
//! refcounts after a crash) are repaired first; images marked corrupt, and
//! images with persistent dirty bitmaps (whose clusters this module does not
//! count), are refused.
//!
//! # Examples
//!
//! ```
//! use std::sync::Arc;
//!
//! use keel_block::qcow2::{self, edit, CreateOptions, Qcow2, Qcow2Options};
//! use keel_block::{BlockBackend, MemBackend};
//!
//! let file = Arc::new(MemBackend::new(Vec::new()));
//! qcow2::create(&file, &CreateOptions { size: 1 << 20, ..Default::default() })?;
//! {
//!     let img = Qcow2::open(file.clone(), Qcow2Options::default())?;
//!     img.write_at(&[1; 4096], 0)?;
//!     img.close()?;
//! }
//! edit::snapshot_create(&file, "before")?;
//! {
//!     let img = Qcow2::open(file.clone(), Qcow2Options::default())?;
//!     img.write_at(&[2; 4096], 0)?;
//!     img.close()?;
//! }
//! edit::snapshot_apply(&file, "before")?;
//! edit::resize(&file, 1 << 30)?;
//! let img = Qcow2::open(file.clone(), Qcow2Options::default())?;
//! let mut buf = [0u8; 4096];
//! img.read_at(&mut buf, 0)?;
//! assert_eq!(buf, [1; 4096]);
//! assert_eq!(img.size(), 1 << 30);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;

use super::check::{self, Fix};
use super::header::{
    self, Header, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE,
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES,
};
use super::meta::{classify, compressed_range, L2State, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::{read_header, read_u64s, refcount, snapshot};
use crate::backend::BlockBackend;
use crate::error::Error;
use crate::image::Format;

/// Header extension: persistent dirty bitmaps.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Marks an L2 word of a [`Plan`] override as "a new cluster of zeroes goes here".
const NEW_ZERO_CLUSTER: u64 = u64::MAX;

/// Why an edit failed. Nothing was changed unless the variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// Reading the header or tables failed, or they are invalid.
    #[error("reading the image metadata")]
    Read(#[source] Error),
    /// The image is marked corrupt.
    #[error("the image is marked corrupt; repair it first (check -r all)")]
    MarkedCorrupt,
    /// Repairing a dirty image (lazy refcounts left by a crash) failed.
    #[error("repairing the refcounts of the dirty image")]
    Repair(#[source] Error),
    /// The dirty image has corruptions a repair could not fix.
    #[error("the dirty image has {corruptions} corruptions its repair could not fix")]
    Unrepaired {
        /// Corruptions left.
        corruptions: u64,
    },
    /// The image has persistent dirty bitmaps, whose clusters edits do not count.
    #[error("images with persistent dirty bitmaps cannot be edited")]
    Bitmaps,
    /// An L2 or L1 entry is invalid.
    #[error("invalid {what} entry {entry:#x} in the table at {table:#x}")]
    BadEntry {
        /// "L1", "L2", "refcount table", "snapshot table" or "header".
        what: &'static str,
        /// Offset of the table.
        table: u64,
        /// The entry.
        entry: u64,
    },
    /// A refcount would not fit the image's refcount width.
    #[error(
        "cluster {cluster} would need refcount {refcount}, more than {bits}-bit refcounts hold"
    )]
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// The refcount it needs.
        refcount: u64,
        /// Refcount width.
        bits: u32,
    },
    /// The new refcount table or L1 table would pass QEMU's size limit.
    #[error("the new {what} would take {bytes} bytes, more than the limit of {limit}")]
    TableTooLarge {
        /// Which table.
        what: &'static str,
        /// Bytes it would take.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The snapshots' L1 tables, each within the file, add up to more than the file: they
    /// share space, which an image QEMU or keel wrote never does.
    #[error(
        "the snapshots' L1 tables take {bytes} bytes, more than the whole file ({file} bytes)"
    )]
    SnapshotTables {
        /// Their bytes together.
        bytes: u64,
        /// The file's size.
        file: u64,
    },
    /// A snapshot states a disk size no image can have.
    #[error("snapshot {name} states a disk size of {size} bytes, more than an image can have")]
    SnapshotSize {
        /// The snapshot's name.
        name: String,
        /// The size it states.
        size: u64,
    },
    /// Writing the new metadata failed; the image is unchanged.
    #[error("writing the new metadata")]
    Write(#[source] Error),
    /// Writing the header that switches to the new metadata failed.
    #[error("switching the header to the new metadata")]
    Switch(#[source] Error),
    /// Size not a multiple of 512 bytes.
    #[error("The new size must be a multiple of 512")]
    SizeAlignment {
        /// The size asked for.
        size: u64,
    },
    /// Size beyond what the cluster size allows.
    #[error("the new size {size} is too large for this image")]
    SizeTooLarge {
        /// The size asked for.
        size: u64,
    },
    /// Version 2 images with internal snapshots cannot be resized.
    #[error("Can't resize a v2 image which has internal snapshots")]
    ResizeV2WithSnapshots,
    /// No snapshot has this id or name.
    #[error("snapshot not found")]
    SnapshotNotFound {
        /// The id or name looked for.
        name: String,
    },
    /// A snapshot name or id longer than the table allows.
    #[error("snapshot name of {len} bytes is too long")]
    SnapshotName {
        /// Its length.
        len: usize,
    },
    /// Too many snapshots.
    #[error("too many snapshots")]
    TooManySnapshots,
    /// An amend option this image cannot take.
    #[error("{0}")]
    Amend(AmendProblem),
    /// The backing file name does not fit.
    #[error("the backing file name of {len} bytes does not fit in the header")]
    BackingName {
        /// Its length.
        len: usize,
    },
}

/// Why an amend is refused (the messages are qemu-img's).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AmendProblem {
    /// Lazy refcounts need version 3.
    LazyNeedsV3,
    /// Refcount widths other than 16 need version 3.
    RefcountBitsNeedV3,
    /// A refcount width that is not a power of two up to 64.
    RefcountBits(u32),
    /// Version 2 cannot hold extended L2 entries.
    DowngradeExtendedL2,
    /// Version 2 cannot hold zstd compression.
    DowngradeCompression,
}

impl std::fmt::Display for AmendProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AmendProblem::LazyNeedsV3 => f.write_str(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ),
            AmendProblem::RefcountBitsNeedV3 => {
                f.write_str("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
            }
            AmendProblem::RefcountBits(b) => write!(
                f,
                "Refcount width must be a power of two and may not exceed 64 bits (not {b})"
            ),
            AmendProblem::DowngradeExtendedL2 => {
                f.write_str("Cannot downgrade an image with extended L2 entries")
            }
            AmendProblem::DowngradeCompression => f.write_str(
                "Cannot downgrade an image with a compression type other than zlib",
            ),
        }
    }
}

/// Result of an edit.
pub type EditResult<T> = std::result::Result<T, EditError>;

/// One entry of the snapshot table, kept as its bytes (so fields and extra
/// data this module does not interpret survive) with its L1 table.
#[derive(Clone)]
struct SnapEntry {
    /// The whole entry, padded to 8 bytes.
    raw: Vec<u8>,
    l1: Vec<u64>,
    /// Where its L1 table is now (0 for a new snapshot).
    l1_offset: u64,
    id: String,
    name: String,
    disk_size: Option<u64>,
}

/// An image's metadata, loaded.
struct Loaded {
    hdr: Header,
    cs: u64,
    cb: u32,
    ext: bool,
    l1: Vec<u64>,
    snaps: Vec<SnapEntry>,
}

/// What the image should become.
struct Plan {
    hdr: Header,
    l1: Vec<u64>,
    snaps: Vec<SnapEntry>,
    /// New contents of L2 tables, by their current offset.
    l2_override: HashMap<u64, Vec<u64>>,
    /// Rewrite the whole header (version, extensions, backing name changed).
    full_header: bool,
}

fn rd(e: Error) -> EditError {
    EditError::Read(e)
}

/// Reads the header, repairing a dirty image and refusing what edits cannot handle.
fn prepare(f: &dyn BlockBackend) -> EditResult<Header> {
    let mut hdr = read_header(f).map_err(rd)?;
    if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(EditError::MarkedCorrupt);
    }
    if hdr.extensions.iter().any(|e| e.kind == EXT_BITMAPS) {
        return Err(EditError::Bitmaps);
    }
    if hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
        let report = check::check(f, Fix::All).map_err(EditError::Repair)?;
        if report.corruptions > 0 || report.check_errors > 0 {
            return Err(EditError::Unrepaired {
                corruptions: report.corruptions + report.check_errors,
            });
        }
        hdr = read_header(f).map_err(rd)?;
        if hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
            hdr.incompatible_features &= !INCOMPAT_DIRTY;
            f.write_at(&hdr.incompatible_features.to_be_bytes(), 72)
                .and_then(|_| f.flush())
                .map_err(EditError::Repair)?;
        }
    }
    Ok(hdr)
}

fn load(f: &dyn BlockBackend) -> EditResult<Loaded> {
    let hdr = prepare(f)?;
    let cs = hdr.cluster_size();
    let l1 = read_u64s(f, hdr.l1_table_offset, hdr.l1_size as usize).map_err(rd)?;
    let parsed = snapshot::read_snapshots(f, &hdr).map_err(rd)?;
    let mut snaps = Vec::with_capacity(parsed.len());
    let mut off = hdr.snapshots_offset;
    // Each snapshot's L1 table is checked on its own when the table is parsed; together
    // they must still fit the file (65536 snapshots may name one 32 MiB table).
    let fsize = f.size();
    let mut l1_bytes = 0u64;
    for s in &parsed {
        l1_bytes += u64::from(s.l1_size) * 8;
        if l1_bytes > fsize {
            return Err(EditError::SnapshotTables {
                bytes: l1_bytes,
                file: fsize,
            });
        }
    }
    for s in parsed {
        let mut raw = vec![0u8; s.entry_len as usize];
        f.read_at(&mut raw, off).map_err(rd)?;
        off += s.entry_len;
        let l1s = read_u64s(f, s.l1_offset, s.l1_size as usize).map_err(rd)?;
        snaps.push(SnapEntry {
            raw,
            l1: l1s,
            l1_offset: s.l1_offset,
            id: s.id,
            name: s.name,
            disk_size: s.disk_size,
        });
    }
    Ok(Loaded {
        cb: hdr.cluster_bits,
        ext: hdr.incompatible_features & INCOMPAT_EXTL2 != 0,
        cs,
        l1,
        snaps,
        hdr,
    })
}

impl Loaded {
    fn plan(&self) -> Plan {
        Plan {
            hdr: self.hdr.clone(),
            l1: self.l1.clone(),
            snaps: self.snaps.clone(),
            l2_override: HashMap::new(),
            full_header: false,
        }
    }

    /// Entries of one L2 table.
    fn l2_entries(&self) -> u64 {
        self.cs / 8 / (1 + self.ext as u64)
    }

    /// L1 entries needed for `size` bytes.
    fn l1_size_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cs * self.l2_entries())
    }
}

/// Applies `plan`: writes the new metadata past the end of the file, syncs,
/// switches the header, syncs.
fn switch(f: &dyn BlockBackend, ld: &Loaded, mut plan: Plan) -> EditResult<()> {
    let cs = ld.cs;
    let cb = ld.cb;
    let ext = ld.ext;
    let stride = 1 + ext as usize;
    let version = plan.hdr.version;
    let order = plan.hdr.refcount_order;
    let fsize = f.size();
    let file_clusters = fsize.div_ceil(cs);

    // Every distinct L2 table any L1 table names, with its contents.
    let mut tables: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut l1_refs: HashMap<u64, u64> = HashMap::new();
    let all_l1s = std::iter::once(&plan.l1).chain(plan.snaps.iter().map(|s| &s.l1));
    let mut order_seen: Vec<u64> = Vec::new();
    for l1 in all_l1s {
        for &e in l1 {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 || off + cs > fsize {
                return Err(EditError::BadEntry {
                    what: "L1",
                    table: 0,
                    entry: e,
                });
            }
            *l1_refs.entry(off).or_insert(0) += 1;
            if let std::collections::hash_map::Entry::Vacant(v) = tables.entry(off) {
                let t = match plan.l2_override.get(&off) {
                    Some(t) => t.clone(),
                    None => read_u64s(f, off, (cs / 8) as usize).map_err(rd)?,
                };
                v.insert(t);
                order_seen.push(off);
            }
        }
    }
    let old_tables: HashMap<u64, Vec<u64>> = tables.clone();

    // New clusters go where the old image has nothing: its free clusters, then past its end.
    let mut space = Space {
        used: old_used(f, ld, file_clusters, Clusters::All)?,
        cursor: 1,
    };
    // New data clusters (zero-cluster expansion).
    let mut new_zero_clusters: Vec<u64> = Vec::new();
    for off in &order_seen {
        let t = tables.get_mut(off).expect("every seen table was loaded");
        for w in t.iter_mut().step_by(stride) {
            if *w == NEW_ZERO_CLUSTER {
                let c = space.take(1);
                *w = c << cb;
                new_zero_clusters.push(c);
            }
        }
    }

    // References to data clusters: one per L1 entry naming an L2 table that names them.
    let mut data_refs: HashMap<u64, u64> = HashMap::new();
    for off in &order_seen {
        let t = &tables[off];
        let n = l1_refs[off];
        for words in t.chunks_exact(stride) {
            let e = words[0];
            let bitmap = if ext { words[1] } else { 0 };
            let st = classify(e, version.max(ld.hdr.version), cb, ext, bitmap).map_err(|_| {
                EditError::BadEntry {
                    what: "L2",
                    table: *off,
                    entry: e,
                }
            })?;
            match st {
                L2State::Normal(h) | L2State::Zero(Some(h)) => {
                    *data_refs.entry(h >> cb).or_insert(0) += n;
                }
                L2State::Compressed => {
                    let (s, end) = compressed_range(e, cb);
                    let mut c = s >> cb;
                    while c << cb < end {
                        *data_refs.entry(c).or_insert(0) += n;
                        c += 1;
                    }
                }
                _ => {}
            }
        }
    }

    // COPIED flags of the active tables: set exactly where the refcount is one.
    let mut active: Vec<u64> = plan.l1.iter().map(|e| e & OFFSET_MASK).collect();
    active.sort_unstable();
    active.dedup();
    for off in active.into_iter().filter(|&o| o != 0) {
        let t = tables.get_mut(&off).expect("active table was loaded");
        for w in t.iter_mut().step_by(stride) {
            let e = *w;
            if e & COMPRESSED != 0 {
                continue;
            }
            let h = e & OFFSET_MASK;
            if h == 0 {
                *w &= !COPIED;
                continue;
            }
            if data_refs.get(&(h >> cb)).copied().unwrap_or(0) == 1 {
                *w |= COPIED;
            } else {
                *w &= !COPIED;
            }
        }
    }

    // Tables whose contents changed move to new clusters; every L1 entry
    // naming one follows it.
    let mut moved: HashMap<u64, u64> = HashMap::new();
    let mut to_write: Vec<(u64, Vec<u64>)> = Vec::new();
    for off in &order_seen {
        let t = &tables[off];
        if !plan.l2_override.contains_key(off) && old_tables[off] == *t {
            continue;
        }
        let new = space.take(1) << cb;
        moved.insert(*off, new);
        to_write.push((new, t.clone()));
    }
    let repoint = |l1: &mut Vec<u64>| -> bool {
        let mut changed = false;
        for e in l1.iter_mut() {
            let off = *e & OFFSET_MASK;
            if let Some(&n) = moved.get(&off) {
                *e = (*e & !OFFSET_MASK) | n;
                changed = true;
            }
        }
        changed
    };
    repoint(&mut plan.l1);
    for s in plan.snaps.iter_mut() {
        if repoint(&mut s.l1) {
            s.l1_offset = 0;
        }
        for e in s.l1.iter_mut() {
            *e &= OFFSET_MASK;
        }
    }
    let mut new_l1_refs: HashMap<u64, u64> = HashMap::new();
    for (off, n) in &l1_refs {
        new_l1_refs.insert(moved.get(off).copied().unwrap_or(*off), *n);
    }
    for e in plan.l1.iter_mut() {
        let off = *e & OFFSET_MASK;
        *e = if off == 0 {
            0
        } else if new_l1_refs[&off] == 1 {
            off | COPIED
        } else {
            off
        };
    }

    // Layout of the rest: active L1, changed snapshot L1 tables, snapshot table.
    let clusters = |bytes: u64| bytes.div_ceil(cs).max(1);
    if plan.l1.len() as u64 * 8 > MAX_L1_BYTES {
        return Err(EditError::TableTooLarge {
            what: "L1 table",
            bytes: plan.l1.len() as u64 * 8,
            limit: MAX_L1_BYTES,
        });
    }
    let l1_clusters = clusters(plan.l1.len() as u64 * 8);
    let l1_off = space.take(l1_clusters) << cb;
    let mut snap_l1_writes: Vec<(u64, Vec<u64>)> = Vec::new();
    for s in plan.snaps.iter_mut() {
        if s.l1_offset == 0 {
            s.l1_offset = space.take(clusters(s.l1.len() as u64 * 8)) << cb;
            snap_l1_writes.push((s.l1_offset, s.l1.clone()));
        }
        s.raw[0..8].copy_from_slice(&s.l1_offset.to_be_bytes());
        s.raw[8..12].copy_from_slice(&(s.l1.len() as u32).to_be_bytes());
    }
    let table: Vec<u8> = plan.snaps.iter().flat_map(|s| s.raw.clone()).collect();
    let snap_off = if plan.snaps.is_empty() {
        0
    } else {
        space.take(clusters(table.len() as u64)) << cb
    };

    // The refcount structure, covering itself.
    let rbe = (cs * 8) >> order;
    let mut cover = space.end();
    let (t, rt_first, blocks) = loop {
        let b = cover.div_ceil(rbe).max(1);
        let t = (b * 8).div_ceil(cs);
        if t * cs > MAX_REFTABLE_BYTES {
            return Err(EditError::TableTooLarge {
                what: "refcount table",
                bytes: t * cs,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        let saved = space.clone();
        let rt_first = space.take(t);
        let blocks: Vec<u64> = (0..b).map(|_| space.take(1)).collect();
        if space.end().div_ceil(rbe) <= b {
            break (t, rt_first, blocks);
        }
        cover = space.end();
        space = saved;
    };
    let b = blocks.len() as u64;
    let rt_off = rt_first << cb;
    let total = b * rbe;

    let mut rc = vec![0u64; total as usize];
    rc[0] += 1;
    let add = |rc: &mut Vec<u64>, c: u64, n: u64| rc[c as usize] += n;
    for c in 0..l1_clusters {
        add(&mut rc, (l1_off >> cb) + c, 1);
    }
    for s in &plan.snaps {
        for c in 0..clusters(s.l1.len() as u64 * 8) {
            add(&mut rc, (s.l1_offset >> cb) + c, 1);
        }
    }
    if snap_off != 0 {
        for c in 0..clusters(table.len() as u64) {
            add(&mut rc, (snap_off >> cb) + c, 1);
        }
    }
    for (off, n) in &new_l1_refs {
        add(&mut rc, off >> cb, *n);
    }
    for (c, n) in &data_refs {
        if *c >= total {
            return Err(EditError::BadEntry {
                what: "L2",
                table: 0,
                entry: c << cb,
            });
        }
        add(&mut rc, *c, *n);
    }
    for c in rt_first..rt_first + t {
        add(&mut rc, c, 1);
    }
    for &c in &blocks {
        add(&mut rc, c, 1);
    }
    for &c in &new_zero_clusters {
        // Counted with the data references of their tables; check they are covered.
        debug_assert!(c < total);
    }
    let max = refcount::max_value(order);
    if let Some((c, &v)) = rc.iter().enumerate().find(|(_, &v)| v > max) {
        return Err(EditError::RefcountOverflow {
            cluster: c as u64,
            refcount: v,
            bits: 1 << order,
        });
    }

    // Write everything new, then sync.
    let w = |data: &[u8], off: u64| f.write_at(data, off).map_err(EditError::Write);
    let zero = vec![0u8; cs as usize];
    for c in &new_zero_clusters {
        w(&zero, c << cb)?;
    }
    let enc = |t: &[u64]| -> Vec<u8> { t.iter().flat_map(|e| e.to_be_bytes()).collect() };
    for (off, t) in &to_write {
        w(&enc(t), *off)?;
    }
    let pad = |mut v: Vec<u8>, n: u64| {
        v.resize((n * cs) as usize, 0);
        v
    };
    w(&pad(enc(&plan.l1), l1_clusters), l1_off)?;
    for (off, t) in &snap_l1_writes {
        w(&pad(enc(t), clusters(t.len() as u64 * 8)), *off)?;
    }
    if snap_off != 0 {
        w(&pad(table.clone(), clusters(table.len() as u64)), snap_off)?;
    }
    let mut rt = vec![0u8; (t * cs) as usize];
    for k in 0..b {
        let mut block = vec![0u8; cs as usize];
        for c in k * rbe..((k + 1) * rbe).min(total) {
            refcount::set(&mut block, (c - k * rbe) as usize, order, rc[c as usize]);
        }
        let off = blocks[k as usize] << cb;
        w(&block, off)?;
        rt[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    w(&rt, rt_off)?;
    f.flush().map_err(EditError::Write)?;

    // The switch: one write within the header's first sector.
    let h = &mut plan.hdr;
    h.l1_size = plan.l1.len() as u32;
    h.l1_table_offset = l1_off;
    h.refcount_table_offset = rt_off;
    h.refcount_table_clusters = t as u32;
    h.nb_snapshots = plan.snaps.len() as u32;
    h.snapshots_offset = snap_off;
    h.incompatible_features &= !INCOMPAT_DIRTY;
    h.autoclear_features = 0;
    let bytes = if plan.full_header {
        header_bytes(h)?
    } else {
        let mut all = vec![0u8; 104];
        put_fields(&mut all, h);
        let end = if h.version >= 3 { 100 } else { 72 };
        all[..end].to_vec()
    };
    if plan.full_header {
        f.write_at(&bytes, 0).map_err(EditError::Switch)?;
    } else {
        f.write_at(&bytes[24..], 24).map_err(EditError::Switch)?;
    }
    f.flush().map_err(EditError::Switch)?;
    Ok(())
}

/// Clusters for new metadata: those the old image does not use, then past
/// the end of the file.
#[derive(Clone)]
struct Space {
    /// Clusters the old image uses (or this edit has taken).
    used: Vec<bool>,
    /// Where single-cluster searches resume.
    cursor: u64,
}

impl Space {
    /// Takes `n` contiguous free clusters, returning the first.
    fn take(&mut self, n: u64) -> u64 {
        let mut start = if n == 1 { self.cursor } else { 1 };
        let mut c = start;
        while c - start < n {
            if self.used.get(c as usize).copied().unwrap_or(false) {
                start = c + 1;
            }
            c += 1;
        }
        let end = (start + n) as usize;
        if self.used.len() < end {
            self.used.resize(end, false);
        }
        self.used[start as usize..end].fill(true);
        if n == 1 {
            self.cursor = start + 1;
        }
        start
    }

    /// One past the last cluster in use or taken.
    fn end(&self) -> u64 {
        self.used.len() as u64
    }
}

/// Which clusters [`old_used`] marks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clusters {
    /// Metadata and the data every L2 table names.
    All,
    /// Metadata only: header, tables, refcount structure, snapshot table, L2 tables.
    Metadata,
}

/// The clusters the old image uses: header, tables, refcount structure, snapshot
/// table, L2 tables and (with [`Clusters::All`]) data of every L1 table.
///
/// Every range must lie within the file: the image's own tables were checked against
/// its size when it was opened, and an entry naming a cluster past the end (the offsets
/// of a hostile image reach 2^56) is refused rather than sized into this map.
fn old_used(
    f: &dyn BlockBackend,
    ld: &Loaded,
    file_clusters: u64,
    data: Clusters,
) -> EditResult<Vec<bool>> {
    let cs = ld.cs;
    let cb = ld.cb;
    let mut used = vec![false; file_clusters.max(1) as usize];
    // (what, table) name the entry for the error.
    let mark = |used: &mut Vec<bool>,
                off: u64,
                len: u64,
                (what, table, entry): (&'static str, u64, u64)|
     -> EditResult<()> {
        if len == 0 {
            return Ok(());
        }
        let last = off.checked_add(len - 1).map(|l| l >> cb);
        match last {
            Some(last) if last < used.len() as u64 => {
                used[(off >> cb) as usize..=last as usize].fill(true);
                Ok(())
            }
            _ => Err(EditError::BadEntry { what, table, entry }),
        }
    };
    let h = &ld.hdr;
    mark(&mut used, 0, cs, ("header", 0, 0))?;
    mark(
        &mut used,
        h.l1_table_offset,
        h.l1_size as u64 * 8,
        ("header", 0, h.l1_table_offset),
    )?;
    let rt_len = h.refcount_table_clusters as u64 * cs;
    mark(
        &mut used,
        h.refcount_table_offset,
        rt_len,
        ("header", 0, h.refcount_table_offset),
    )?;
    for e in read_u64s(f, h.refcount_table_offset, (rt_len / 8) as usize).map_err(rd)? {
        let off = e & !0x1ff;
        if off != 0 {
            mark(
                &mut used,
                off,
                cs,
                ("refcount table", h.refcount_table_offset, e),
            )?;
        }
    }
    let table_len: u64 = ld.snaps.iter().map(|s| s.raw.len() as u64).sum();
    if !ld.snaps.is_empty() {
        mark(
            &mut used,
            h.snapshots_offset,
            table_len,
            ("header", 0, h.snapshots_offset),
        )?;
    }
    let stride = 1 + ld.ext as usize;
    let mut seen = std::collections::HashSet::new();
    let l1s = std::iter::once((h.l1_table_offset, &ld.l1))
        .chain(ld.snaps.iter().map(|s| (s.l1_offset, &s.l1)));
    for (l1_off, l1) in l1s {
        mark(
            &mut used,
            l1_off,
            l1.len() as u64 * 8,
            ("snapshot table", h.snapshots_offset, l1_off),
        )?;
        for &e in l1 {
            let off = e & OFFSET_MASK;
            if off == 0 || !seen.insert(off) {
                continue;
            }
            mark(&mut used, off, cs, ("L1", l1_off, e))?;
            if data == Clusters::Metadata {
                continue;
            }
            for words in read_u64s(f, off, (cs / 8) as usize)
                .map_err(rd)?
                .chunks_exact(stride)
            {
                let e = words[0];
                if e & COMPRESSED != 0 {
                    let (s, end) = compressed_range(e, cb);
                    // The sector count may run a little past the end of the file (QEMU
                    // counts whole sectors): what lies there reads as zeroes.
                    let end = end.min((file_clusters << cb).max(s.saturating_add(1)));
                    mark(&mut used, s, end - s, ("L2", off, e))?;
                } else if e & OFFSET_MASK != 0 {
                    mark(&mut used, e & OFFSET_MASK, cs, ("L2", off, e))?;
                }
            }
        }
    }
    Ok(used)
}

fn put_fields(b: &mut [u8], h: &Header) {
    b[24..32].copy_from_slice(&h.size.to_be_bytes());
    b[32..36].copy_from_slice(&h.crypt_method.to_be_bytes());
    b[36..40].copy_from_slice(&h.l1_size.to_be_bytes());
    b[40..48].copy_from_slice(&h.l1_table_offset.to_be_bytes());
    b[48..56].copy_from_slice(&h.refcount_table_offset.to_be_bytes());
    b[56..60].copy_from_slice(&h.refcount_table_clusters.to_be_bytes());
    b[60..64].copy_from_slice(&h.nb_snapshots.to_be_bytes());
    b[64..72].copy_from_slice(&h.snapshots_offset.to_be_bytes());
    if h.version >= 3 {
        b[72..80].copy_from_slice(&h.incompatible_features.to_be_bytes());
        b[80..88].copy_from_slice(&h.compatible_features.to_be_bytes());
        b[88..96].copy_from_slice(&h.autoclear_features.to_be_bytes());
        b[96..100].copy_from_slice(&h.refcount_order.to_be_bytes());
    }
}

/// The whole header (fields, extensions, backing file name), padded with
/// zeroes to a 512-byte sector so stale bytes of a longer old header go.
fn header_bytes(h: &mut Header) -> EditResult<Vec<u8>> {
    let name = h.backing_file.clone();
    h.backing_file_offset = 0;
    h.backing_file_size = 0;
    let mut b = h.to_bytes().map_err(EditError::Write)?;
    if let Some(name) = name {
        if name.is_empty() || name.len() > 1023 {
            return Err(EditError::BackingName { len: name.len() });
        }
        h.backing_file_offset = b.len() as u64;
        h.backing_file_size = name.len() as u32;
        b = h.to_bytes().map_err(EditError::Write)?;
        b.extend_from_slice(&name);
        h.backing_file = Some(name);
    }
    if b.len() as u64 > h.cluster_size() {
        return Err(EditError::BackingName {
            len: h.backing_file.as_ref().map_or(0, |n| n.len()),
        });
    }
    b.resize(b.len().div_ceil(512) * 512, 0);
    Ok(b)
}

/// Changes the virtual size of the qcow2 image in `f` to `size` bytes (a
/// multiple of 512), as `qemu-img resize --shrink` does: growing adds
/// unallocated space (and grows the L1 table as needed); shrinking drops the
/// clusters wholly past the new end, in the active layer (snapshots keep
/// theirs). The caller decides whether shrinking is allowed.
pub fn resize(f: &dyn BlockBackend, size: u64) -> EditResult<()> {
    if size % 512 != 0 {
        return Err(EditError::SizeAlignment { size });
    }
    if size > 1 << 62 {
        return Err(EditError::SizeTooLarge { size });
    }
    let ld = load(f)?;
    if ld.hdr.version < 3 && !ld.snaps.is_empty() {
        return Err(EditError::ResizeV2WithSnapshots);
    }
    let mut plan = ld.plan();
    let need = ld.l1_size_for(size);
    if need * 8 > MAX_L1_BYTES {
        return Err(EditError::SizeTooLarge { size });
    }
    if size < ld.hdr.size {
        let cs = ld.cs;
        let span = cs * ld.l2_entries();
        let first_dropped = size.div_ceil(cs);
        // Drop whole L2 tables past the end, and the entries past the end in the last one.
        for (i, e) in plan.l1.iter_mut().enumerate() {
            let off = *e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let start = i as u64 * span / cs;
            let end = start + ld.l2_entries();
            if start >= first_dropped {
                *e = 0;
            } else if end > first_dropped {
                let mut t = read_u64s(f, off, (cs / 8) as usize).map_err(rd)?;
                let stride = 1 + ld.ext as usize;
                for k in (first_dropped - start) as usize..ld.l2_entries() as usize {
                    t[k * stride] = 0;
                    if ld.ext {
                        t[k * stride + 1] = 0;
                    }
                }
                plan.l2_override.insert(off, t);
            }
        }
        plan.l1.truncate(need as usize);
    } else if need as usize > plan.l1.len() {
        plan.l1.resize(need as usize, 0);
    }
    plan.hdr.size = size;
    switch(f, &ld, plan)
}

/// Looks a snapshot up as qemu-img does: by id first, then by name (the first match).
fn find(ld: &Loaded, name: &str) -> EditResult<usize> {
    ld.snaps
        .iter()
        .position(|s| s.id == name)
        .or_else(|| ld.snaps.iter().position(|s| s.name == name))
        .ok_or_else(|| EditError::SnapshotNotFound {
            name: name.to_string(),
        })
}

/// Takes an internal snapshot of the active layer named `name` (with the next
/// free numeric id, the current time, no VM state), as `qemu-img snapshot -c`.
pub fn snapshot_create(f: &dyn BlockBackend, name: &str) -> EditResult<()> {
    let ld = load(f)?;
    if ld.snaps.len() as u32 >= header::MAX_SNAPSHOTS {
        return Err(EditError::TooManySnapshots);
    }
    if name.len() > u16::MAX as usize {
        return Err(EditError::SnapshotName { len: name.len() });
    }
    let id = ld
        .snaps
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let id = id.to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // The extra data QEMU writes for every version: 64-bit VM state size,
    // disk size, instruction count.
    let mut extra = Vec::with_capacity(24);
    extra.extend_from_slice(&0u64.to_be_bytes());
    extra.extend_from_slice(&ld.hdr.size.to_be_bytes());
    extra.extend_from_slice(&0u64.to_be_bytes());
    let mut raw = vec![0u8; 40];
    raw[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
    raw[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
    raw[16..20].copy_from_slice(&(now.as_secs() as u32).to_be_bytes());
    raw[20..24].copy_from_slice(&now.subsec_nanos().to_be_bytes());
    raw[36..40].copy_from_slice(&(extra.len() as u32).to_be_bytes());
    raw.extend_from_slice(&extra);
    raw.extend_from_slice(id.as_bytes());
    raw.extend_from_slice(name.as_bytes());
    raw.resize(raw.len().div_ceil(8) * 8, 0);
    let mut plan = ld.plan();
    plan.snaps.push(SnapEntry {
        raw,
        l1: ld.l1.iter().map(|e| e & OFFSET_MASK).collect(),
        l1_offset: 0,
        id,
        name: name.to_string(),
        disk_size: Some(ld.hdr.size),
    });
    switch(f, &ld, plan)
}

/// Reverts the active layer to the snapshot with id or name `name` (and its
/// disk size), as `qemu-img snapshot -a`. The snapshot stays.
pub fn snapshot_apply(f: &dyn BlockBackend, name: &str) -> EditResult<()> {
    let ld = load(f)?;
    let i = find(&ld, name)?;
    let sn = &ld.snaps[i];
    let mut plan = ld.plan();
    let size = sn.disk_size.unwrap_or(ld.hdr.size);
    // The snapshot's size is the image's word: held to what resize accepts before any
    // table is sized from it.
    if size > 1 << 62 || ld.l1_size_for(size) * 8 > MAX_L1_BYTES {
        return Err(EditError::SnapshotSize {
            name: sn.name.clone(),
            size,
        });
    }
    let need = (ld.l1_size_for(size) as usize).max(sn.l1.len());
    let mut l1: Vec<u64> = sn.l1.iter().map(|e| e & OFFSET_MASK).collect();
    l1.resize(need, 0);
    plan.l1 = l1;
    plan.hdr.size = size;
    switch(f, &ld, plan)
}

/// Deletes the (first) snapshot named `name`, as `qemu-img snapshot -d`
/// (which looks names up, not ids); clusters only it used become free.
pub fn snapshot_delete(f: &dyn BlockBackend, name: &str) -> EditResult<()> {
    let ld = load(f)?;
    let i = ld
        .snaps
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| EditError::SnapshotNotFound {
            name: name.to_string(),
        })?;
    let mut plan = ld.plan();
    plan.snaps.remove(i);
    switch(f, &ld, plan)
}

/// Makes every cluster of the active layer unallocated (reading from the
/// backing file again), as qemu-img does to an overlay after `commit`.
pub fn make_empty(f: &dyn BlockBackend) -> EditResult<()> {
    let ld = load(f)?;
    let mut plan = ld.plan();
    for e in plan.l1.iter_mut() {
        *e = 0;
    }
    switch(f, &ld, plan)
}

/// The backing file an image names: its name, and the format its header states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// The name as stored (relative names are relative to the image's directory).
    pub name: String,
    /// The format, or `None` to leave it unstated.
    pub format: Option<Format>,
}

/// Rewrites the header to name `backing` (or no backing file), touching no
/// data: `qemu-img rebase -u`. The header is rewritten with one write.
pub fn set_backing(f: &dyn BlockBackend, backing: Option<&BackingFile>) -> EditResult<()> {
    let mut hdr = prepare(f)?;
    hdr.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
    match backing {
        Some(b) => {
            if let Some(fmt) = b.format {
                hdr.extensions.insert(
                    0,
                    header::Extension {
                        kind: EXT_BACKING_FORMAT,
                        data: fmt.as_str().as_bytes().to_vec(),
                    },
                );
            }
            hdr.backing_file = Some(b.name.as_bytes().to_vec());
        }
        None => hdr.backing_file = None,
    }
    let bytes = header_bytes(&mut hdr)?;
    f.write_at(&bytes, 0).map_err(EditError::Switch)?;
    f.flush().map_err(EditError::Switch)
}

/// The qcow2 options `qemu-img amend` can change in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `compat`: 2 (`0.10`) or 3 (`1.1`).
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`.
    pub refcount_bits: Option<u32>,
}

/// Changes the image's version, lazy refcounts and refcount width, as
/// `qemu-img amend -o compat=...,lazy_refcounts=...,refcount_bits=...`.
/// A downgrade to version 2 turns zero clusters into unallocated ones (no
/// backing file) or clusters of zeroes.
pub fn amend(f: &dyn BlockBackend, o: &AmendOptions) -> EditResult<()> {
    let ld = load(f)?;
    let mut plan = ld.plan();
    let h = &mut plan.hdr;
    let version = o.version.unwrap_or(h.version);
    let bits = match o.refcount_bits {
        Some(b) if !b.is_power_of_two() || b > 64 => {
            return Err(EditError::Amend(AmendProblem::RefcountBits(b)))
        }
        Some(b) => b,
        None if version < 3 && o.version.is_some() => 16,
        None => 1 << h.refcount_order,
    };
    let lazy = o
        .lazy_refcounts
        .unwrap_or(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0 && version >= 3);
    if version < 3 {
        if lazy {
            return Err(EditError::Amend(AmendProblem::LazyNeedsV3));
        }
        if bits != 16 {
            return Err(EditError::Amend(AmendProblem::RefcountBitsNeedV3));
        }
        if ld.ext {
            return Err(EditError::Amend(AmendProblem::DowngradeExtendedL2));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            return Err(EditError::Amend(AmendProblem::DowngradeCompression));
        }
    }
    if lazy {
        h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
    } else {
        h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
    }
    h.refcount_order = bits.trailing_zeros();
    if version != h.version {
        plan.full_header = true;
        if version >= 3 {
            h.version = 3;
            h.header_length = 112;
            h.compression_type = 0;
            if !h.extensions.iter().any(|e| e.kind == EXT_FEATURE_TABLE) {
                h.extensions.push(header::feature_table());
            }
        } else {
            h.version = 2;
            h.header_length = 72;
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.extensions.retain(|e| e.kind != EXT_FEATURE_TABLE);
            expand_zero_clusters(f, &ld, &mut plan)?;
        }
    } else if o.lazy_refcounts.is_some() && version >= 3 {
        // Only the compatible features change: the field switch writes them.
    }
    switch(f, &ld, plan)
}

/// Turns the zero clusters of every L2 table into clusters version 2 can
/// hold: unallocated without a backing file, else clusters of zeroes (a
/// preallocated one is zeroed where it is; it is unused until the switch).
fn expand_zero_clusters(f: &dyn BlockBackend, ld: &Loaded, plan: &mut Plan) -> EditResult<()> {
    let cs = ld.cs;
    let backing = ld.hdr.backing_file.is_some();
    // Zeroes go only where a data cluster can be: aligned, in the file, not metadata
    // (an entry of a hostile image may name the header or a table).
    let meta = old_used(f, ld, f.size().div_ceil(cs), Clusters::Metadata)?;
    let is_data = |h: u64| h % cs == 0 && meta.get((h / cs) as usize) == Some(&false);
    let mut seen = std::collections::HashSet::new();
    let zero = vec![0u8; cs as usize];
    let l1s: Vec<Vec<u64>> = std::iter::once(plan.l1.clone())
        .chain(plan.snaps.iter().map(|s| s.l1.clone()))
        .collect();
    for l1 in l1s {
        for e in l1 {
            let off = e & OFFSET_MASK;
            if off == 0 || !seen.insert(off) {
                continue;
            }
            let mut t = read_u64s(f, off, (cs / 8) as usize).map_err(rd)?;
            let mut changed = false;
            for w in t.iter_mut() {
                if *w & COMPRESSED != 0 || *w & ZERO == 0 {
                    continue;
                }
                let h = *w & OFFSET_MASK;
                if h != 0 && !is_data(h) {
                    return Err(EditError::BadEntry {
                        what: "L2",
                        table: off,
                        entry: *w,
                    });
                }
                changed = true;
                *w = if h != 0 {
                    // Shared preallocated zero clusters are zeroed once; harmless twice.
                    f.write_at(&zero, h).map_err(EditError::Write)?;
                    h
                } else if backing {
                    NEW_ZERO_CLUSTER
                } else {
                    0
                };
            }
            if changed {
                plan.l2_override.insert(off, t);
            }
        }
    }
    Ok(())
}

/// Names of the internal snapshots: (id, name), in table order.
pub fn snapshot_names(f: &dyn BlockBackend) -> EditResult<Vec<(String, String)>> {
    let hdr = read_header(f).map_err(rd)?;
    Ok(snapshot::read_snapshots(f, &hdr)
        .map_err(rd)?
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::tests::be64;
    use crate::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
    use crate::MemBackend;
    use std::sync::Arc;

    type Mem = Arc<MemBackend>;

    fn image(size: u64, cs: u64) -> Mem {
        let f = Arc::new(MemBackend::new(Vec::new()));
        qcow2::create(
            &f,
            &CreateOptions {
                size,
                cluster_size: cs,
                ..Default::default()
            },
        )
        .unwrap();
        f
    }

    fn write(f: &Mem, data: &[u8], off: u64) {
        let img = Qcow2::open(f.clone(), Qcow2Options::default()).unwrap();
        img.write_at(data, off).unwrap();
        img.close().unwrap();
    }

    fn read(f: &Mem, off: u64, len: usize) -> Vec<u8> {
        let img = Qcow2::open(f.clone(), Qcow2Options::default()).unwrap();
        let mut b = vec![0u8; len];
        img.read_at(&mut b, off).unwrap();
        b
    }

    fn clean(f: &Mem) {
        let r = check::check(f, Fix::None).unwrap();
        assert_eq!(
            (r.corruptions, r.leaks, r.check_errors),
            (0, 0, 0),
            "{:?}",
            r.messages
        );
    }

    /// Entries of a hostile image naming clusters far past the end of the file (an L2
    /// entry near 2^56, a refcount-table entry that overflows) are refused as bad
    /// entries; the map of used clusters was sized from them (2^47 bytes, or an
    /// overflow and an out-of-bounds slice).
    #[test]
    fn entries_past_the_end_of_the_file_are_refused_by_edits() {
        let f = image(1 << 20, 512);
        write(&f, &[7; 512], 0);
        let good = f.to_vec();
        let l1 = be64(&good, 40) as usize;
        let l2 = (be64(&good, l1) & OFFSET_MASK) as usize;
        let mut b = good.clone();
        b[l2..l2 + 8].copy_from_slice(&(COPIED | 0x00ff_ffff_ffff_fe00).to_be_bytes());
        let r = snapshot_create(&MemBackend::new(b), "s");
        assert!(
            matches!(r, Err(EditError::BadEntry { what: "L2", .. })),
            "{r:?}"
        );
        let f = image(1 << 20, 1024);
        write(&f, &[7; 512], 0);
        let mut b = f.to_vec();
        let rt = be64(&b, 48) as usize;
        b[rt + 8..rt + 16].copy_from_slice(&0xffff_ffff_ffff_fe00u64.to_be_bytes());
        let r = resize(&MemBackend::new(b), 2 << 20);
        assert!(
            matches!(
                r,
                Err(EditError::BadEntry {
                    what: "refcount table",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    /// Snapshots whose L1 tables, each within the file, add up to more than the file (a
    /// hostile image can name one 32 MiB table 65536 times: 2 TiB to load) are refused.
    #[test]
    fn snapshot_l1_tables_larger_together_than_the_file_are_refused() {
        let f = image(1 << 20, 512);
        write(&f, &[7; 512], 0);
        snapshot_create(&*f, "a").unwrap();
        snapshot_create(&*f, "b").unwrap();
        let mut b = f.to_vec();
        let fsize = b.len() as u64;
        let mut at = be64(&b, 64) as usize;
        for _ in 0..2 {
            // Each table: from cluster 1 to the end of the file.
            b[at..at + 8].copy_from_slice(&512u64.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&(((fsize - 512) / 8) as u32).to_be_bytes());
            let id = u16::from_be_bytes(b[at + 12..at + 14].try_into().unwrap()) as usize;
            let name = u16::from_be_bytes(b[at + 14..at + 16].try_into().unwrap()) as usize;
            let extra = u32::from_be_bytes(b[at + 36..at + 40].try_into().unwrap()) as usize;
            at += (40 + extra + id + name).div_ceil(8) * 8;
        }
        let r = snapshot_delete(&MemBackend::new(b), "a");
        assert!(
            matches!(r, Err(EditError::SnapshotTables { file, .. }) if file == fsize),
            "{r:?}"
        );
    }

    /// A snapshot whose stated disk size is absurd is refused before anything is sized
    /// from it (the L1 table for 2^64 bytes at 512-byte clusters is 2^52 bytes).
    #[test]
    fn a_snapshot_with_an_absurd_disk_size_is_refused() {
        let f = image(1 << 20, 512);
        write(&f, &[7; 512], 0);
        snapshot_create(&*f, "s").unwrap();
        let mut b = f.to_vec();
        let st = be64(&b, 64) as usize;
        // Entry: 40 bytes of fields, then the extra data: vmstate size, disk size.
        assert!(u32::from_be_bytes(b[st + 36..st + 40].try_into().unwrap()) >= 16);
        b[st + 48..st + 56].copy_from_slice(&u64::MAX.to_be_bytes());
        let r = snapshot_apply(&MemBackend::new(b), "s");
        assert!(
            matches!(r, Err(EditError::SnapshotSize { size: u64::MAX, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn grow_moves_the_l1_table_and_keeps_data() {
        let f = image(1 << 20, 512);
        write(&f, &[7; 4096], 8192);
        // 512-byte clusters: one L2 table maps 32 KiB, so 1 GiB needs 32768 L1 entries.
        resize(&f, 1 << 30).unwrap();
        clean(&f);
        assert_eq!(read(&f, 8192, 4096), vec![7; 4096]);
        write(&f, &[9; 512], (1 << 30) - 512);
        clean(&f);
        assert_eq!(read(&f, (1 << 30) - 512, 512), vec![9; 512]);
    }

    #[test]
    fn shrink_drops_clusters_past_the_end() {
        let f = image(4 << 20, 65536);
        write(&f, &[1; 65536], 0);
        write(&f, &[2; 65536], 3 << 20);
        resize(&f, 1 << 20).unwrap();
        clean(&f);
        resize(&f, 4 << 20).unwrap();
        clean(&f);
        assert_eq!(read(&f, 0, 65536), vec![1; 65536]);
        assert_eq!(read(&f, 3 << 20, 65536), vec![0; 65536]);
        assert!(matches!(
            resize(&f, 1000),
            Err(EditError::SizeAlignment { size: 1000 })
        ));
    }

    #[test]
    fn snapshots_create_apply_delete() {
        let f = image(1 << 20, 4096);
        write(&f, &[1; 8192], 0);
        snapshot_create(&f, "a").unwrap();
        clean(&f);
        write(&f, &[2; 4096], 0);
        clean(&f);
        snapshot_create(&f, "b").unwrap();
        write(&f, &[3; 4096], 4096);
        clean(&f);
        assert_eq!(read(&f, 0, 8192)[..4096], [2; 4096]);
        snapshot_apply(&f, "a").unwrap();
        clean(&f);
        assert_eq!(read(&f, 0, 8192), vec![1; 8192]);
        snapshot_delete(&f, "a").unwrap();
        clean(&f);
        snapshot_apply(&f, "2").unwrap();
        assert!(matches!(
            snapshot_delete(&f, "2"),
            Err(EditError::SnapshotNotFound { .. })
        ));
        clean(&f);
        let b = read(&f, 0, 8192);
        assert_eq!((b[0], b[4096]), (2, 1));
        assert!(matches!(
            snapshot_delete(&f, "a"),
            Err(EditError::SnapshotNotFound { .. })
        ));
        snapshot_delete(&f, "b").unwrap();
        clean(&f);
        assert_eq!(snapshot_names(&f).unwrap(), vec![]);
    }

    #[test]
    fn repeated_edits_reuse_the_space_they_free() {
        let f = image(8 << 20, 4096);
        write(&f, &[1; 1 << 20], 0);
        snapshot_create(&f, "s").unwrap();
        snapshot_delete(&f, "s").unwrap();
        let after_one = f.size();
        for i in 0..20 {
            snapshot_create(&f, "s").unwrap();
            snapshot_delete(&f, "s").unwrap();
            resize(&f, (9 + i % 2) << 20).unwrap();
        }
        clean(&f);
        // The metadata of one edit fits in the space the previous edits freed.
        assert!(
            f.size() <= after_one + 16 * 4096,
            "{} bytes after 60 edits, {after_one} after 2",
            f.size()
        );
        assert_eq!(read(&f, 0, 1 << 20), vec![1; 1 << 20]);
    }

    /// Going back to version 2 zeroes preallocated zero clusters where they are: an entry
    /// naming the L1 table instead is refused before anything is written, and the image
    /// is left as it was.
    #[test]
    fn amend_writes_no_zeroes_over_metadata() {
        let f = image(1 << 20, 512);
        write(&f, &[1; 1024], 0);
        {
            let img = Qcow2::open(f.clone(), Qcow2Options::default()).unwrap();
            img.write_zeroes(0, 512, false).unwrap();
            img.close().unwrap();
        }
        let mut b = f.to_vec();
        let l1 = be64(&b, 40);
        let l2 = (be64(&b, l1 as usize) & OFFSET_MASK) as usize;
        let e = be64(&b, l2);
        assert_ne!(e & ZERO, 0, "a preallocated zero cluster: {e:#x}");
        b[l2..l2 + 8].copy_from_slice(&(ZERO | l1).to_be_bytes());
        let before = b.clone();
        let m = MemBackend::new(b);
        let r = amend(
            &m,
            &AmendOptions {
                version: Some(2),
                ..Default::default()
            },
        );
        assert!(
            matches!(r, Err(EditError::BadEntry { what: "L2", .. })),
            "{r:?}"
        );
        assert!(m.to_vec() == before, "the image changed");
    }

    #[test]
    fn amend_changes_refcount_width_and_version() {
        let f = image(1 << 20, 4096);
        write(&f, &[1; 8192], 0);
        snapshot_create(&f, "s").unwrap();
        for bits in [1, 64, 8, 16] {
            let r = amend(
                &f,
                &AmendOptions {
                    refcount_bits: Some(bits),
                    ..Default::default()
                },
            );
            if bits == 1 {
                assert!(
                    matches!(r, Err(EditError::RefcountOverflow { .. })),
                    "{r:?}"
                );
                continue;
            }
            r.unwrap();
            clean(&f);
            assert_eq!(
                read_header(&f).unwrap().refcount_order,
                bits.trailing_zeros()
            );
        }
        {
            let img = Qcow2::open(f.clone(), Qcow2Options::default()).unwrap();
            img.write_zeroes(0, 4096, false).unwrap();
            img.close().unwrap();
        }
        amend(
            &f,
            &AmendOptions {
                version: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        clean(&f);
        assert_eq!(read_header(&f).unwrap().version, 2);
        assert_eq!(read(&f, 0, 8192)[..4096], [0; 4096]);
        amend(
            &f,
            &AmendOptions {
                version: Some(3),
                lazy_refcounts: Some(true),
                ..Default::default()
            },
        )
        .unwrap();
        clean(&f);
        let h = read_header(&f).unwrap();
        assert_eq!(
            (h.version, h.compatible_features),
            (3, COMPAT_LAZY_REFCOUNTS)
        );
    }
}

//! Consistency check and repair, with `qemu-img check` semantics.
//!
//! Counts references to every host cluster (header, L1 tables, L2 tables,
//! data, snapshot table, refcount structures) and compares them with the
//! stored refcounts: a refcount above the reference count is a leak, below
//! it a corruption. Also checks the COPIED flags of the active L1 and L2
//! tables and every table offset.

use std::collections::{HashMap, HashSet};

use super::header::{
    Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
};
use super::meta::{
    classify, compressed_range, L2State, COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK,
    REFT_RESERVED,
};
use super::read_header;
use super::refcount;

use super::bitmaps::EXT_BITMAPS;
use super::snapshot::MAX_EXTRA;
use crate::backend::BlockBackend;
use crate::error::{Error, InvalidImage, Result, SnapshotProblem, Unsupported};

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// Only report.
    None,
    /// Repair leaked clusters (`-r leaks`).
    Leaks,
    /// Repair leaks and corruptions (`-r all`).
    All,
}

/// Result of a check, with the fields of `qemu-img check --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions remaining.
    pub corruptions: u64,
    /// Leaked clusters remaining.
    pub leaks: u64,
    /// Corruptions found and repaired.
    pub corruptions_fixed: u64,
    /// Leaks found and repaired.
    pub leaks_fixed: u64,
    /// Errors that prevented checking.
    pub check_errors: u64,
    /// End of the last used cluster, in bytes.
    pub image_end_offset: u64,
    /// Clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Human-readable findings, one per line, in qemu-img's wording.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// Whether the check found nothing left to repair: no check errors, no
    /// corruptions, no leaks.
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.corruptions == 0 && self.leaks == 0
    }
}

/// Largest number of host clusters we count references for.
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// An L2 table and the L1 entries naming it.
struct L2Table {
    off: u64,
    /// L1 entries (of any L1 table) naming it.
    refs: u32,
    /// Whether the active L1 table names it.
    active: bool,
}

struct Walk<'a> {
    f: &'a dyn BlockBackend,
    h: Header,
    cs: u64,
    cb: u32,
    /// References from everything but the refcount structures.
    refs: Vec<u32>,
    /// References from the refcount table and blocks.
    rc_refs: Vec<u32>,
    corruptions: u64,
    msgs: Vec<String>,
    bad_l1: Vec<usize>,
    bad_l2: Vec<(u64, usize)>,
    /// (L1 index, L2 offset) of every valid active L2 table.
    active_l2: Vec<(usize, u64)>,
    /// Every distinct L2 table the L1 tables name, in the order first named.
    l2_tables: Vec<L2Table>,
    /// Index in `l2_tables` by offset.
    l2_index: HashMap<u64, usize>,
    /// Clusters of the L1 tables walked so far (snapshot L1 tables must not overlap them).
    l1_clusters: HashSet<u64>,
    allocated: u64,
    reftable: Vec<u64>,
    rb_bad: Vec<bool>,
}

impl<'a> Walk<'a> {
    fn add(&mut self, off: u64, len: u64, rc: bool, what: &str) {
        self.count(off, len, 1, rc, what)
    }

    /// Counts `n` references to the clusters of a data range.
    fn add_n(&mut self, off: u64, len: u64, n: u32, what: &str) {
        self.count(off, len, n, false, what)
    }

    fn count(&mut self, off: u64, len: u64, n: u32, rc: bool, what: &str) {
        if len == 0 {
            return;
        }
        // QEMU's rule: a range that ends a cluster or more past the end of the file (a
        // truncated image) is an error, and its reference is not counted.
        let end = off.saturating_add(len);
        if end.saturating_sub(self.f.size()) >= self.cs {
            self.corruptions += 1;
            self.msgs.push(format!(
                "ERROR counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x} ({what})"
            ));
            return;
        }
        let first = off >> self.cb;
        let last = (end - 1) >> self.cb;
        let v = if rc {
            &mut self.rc_refs
        } else {
            &mut self.refs
        };
        if v.len() <= last as usize {
            v.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            v[c as usize] = v[c as usize].saturating_add(n);
        }
    }

    fn read_table(&self, off: u64, n: usize) -> Result<Vec<u64>> {
        super::read_u64s(self.f, off, n)
    }

    /// Counts the references of one L1 table to its L2 tables and notes the tables;
    /// [`Walk::walk_l2s`] then walks each distinct table once, however many L1 entries
    /// (of this and other L1 tables) name it. Two entries of one L1 table naming the same
    /// L2 table are an error, like any invalid entry.
    fn walk_l1(&mut self, l1_off: u64, l1_size: u32, active: bool) -> Result<()> {
        let l1 = self.read_table(l1_off, l1_size as usize)?;
        let fsize = self.f.size();
        let mut named: HashMap<u64, usize> = HashMap::new();
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 && e & L1_RESERVED == 0 {
                continue;
            }
            if e & L1_RESERVED != 0
                || off % self.cs != 0
                || off == 0
                || off.saturating_add(self.cs) > fsize
            {
                self.corruptions += 1;
                self.msgs.push(format!(
                    "ERROR L1 entry {i} ({e:#x}): invalid L2 table offset"
                ));
                if active {
                    self.bad_l1.push(i);
                }
                continue;
            }
            if let Some(k) = named.insert(off, i) {
                named.insert(off, k);
                self.corruptions += 1;
                self.msgs.push(format!(
                    "ERROR L1 entry {i} ({e:#x}): L2 table also named by L1 entry {k}"
                ));
                if active {
                    self.bad_l1.push(i);
                }
                continue;
            }
            self.add(off, self.cs, false, "L2 table");
            if active {
                self.active_l2.push((i, off));
            }
            let next = self.l2_tables.len();
            let t = *self.l2_index.entry(off).or_insert(next);
            if t == next {
                self.l2_tables.push(L2Table {
                    off,
                    refs: 0,
                    active: false,
                });
            }
            self.l2_tables[t].refs += 1;
            self.l2_tables[t].active |= active;
        }
        Ok(())
    }

    /// Walks every L2 table the L1 tables name, once each, counting its references to
    /// data clusters once per L1 entry naming it.
    fn walk_l2s(&mut self) -> Result<()> {
        let tables = std::mem::take(&mut self.l2_tables);
        for t in &tables {
            self.walk_l2(t.off, t.refs, t.active)?;
        }
        self.l2_tables = tables;
        Ok(())
    }

    fn walk_l2(&mut self, off: u64, refs: u32, active: bool) -> Result<()> {
        let l2 = self.read_table(off, (self.cs / 8) as usize)?;
        let ext = self.h.incompatible_features & INCOMPAT_EXTL2 != 0;
        let stride = 1 + ext as usize;
        for (j, w) in l2.chunks_exact(stride).enumerate() {
            let le = w[0];
            let bitmap = if ext { w[1] } else { 0 };
            let host = le & OFFSET_MASK;
            if le & COMPRESSED == 0 && host % self.cs != 0 && le & L2_RESERVED == 0 {
                // Like qemu-img: report it, and count the reference to the
                // (unaligned) cluster-sized range it claims.
                self.corruptions += 1;
                self.msgs.push(format!(
                    "ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
                self.add_n(host, self.cs, refs, "data cluster");
                if active {
                    self.allocated += 1;
                    self.bad_l2.push((off, j * stride));
                }
                continue;
            }
            match classify(le, self.h.version, self.cb, ext, bitmap) {
                Err(msg) => {
                    self.corruptions += 1;
                    self.msgs
                        .push(format!("ERROR {msg} (L2 table {off:#x} index {j})"));
                    if active {
                        self.bad_l2.push((off, j * stride));
                    }
                }
                Ok(L2State::Normal(h)) => {
                    self.add_n(h, self.cs, refs, "data cluster");
                    if active {
                        self.allocated += 1;
                    }
                }
                Ok(L2State::Zero(Some(h))) => self.add_n(h, self.cs, refs, "data cluster"),
                Ok(L2State::Compressed) => {
                    let (s, e) = compressed_range(le, self.cb);
                    let first = s & !(self.cs - 1);
                    self.add_n(first, e - first, refs, "compressed cluster");
                    if active {
                        self.allocated += 1;
                    }
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Records the clusters of an L1 table; false if one already belongs to another.
    fn claim_l1(&mut self, off: u64, size: u32) -> bool {
        let bytes = size as u64 * 8;
        if bytes == 0 {
            return true;
        }
        let (first, last) = (off >> self.cb, (off + bytes - 1) >> self.cb);
        if (first..=last).any(|c| self.l1_clusters.contains(&c)) {
            return false;
        }
        self.l1_clusters.extend(first..=last);
        true
    }

    fn walk_snapshots(&mut self) -> Result<()> {
        if self.h.nb_snapshots == 0 {
            return Ok(());
        }
        let mut off = self.h.snapshots_offset;
        let fsize = self.f.size();
        for k in 0..self.h.nb_snapshots {
            if off.saturating_add(40) > fsize {
                return Err(Error::InvalidImage(InvalidImage::Snapshot {
                    index: k,
                    problem: SnapshotProblem::PastEnd,
                }));
            }
            let mut fixed = [0u8; 40];
            self.f.read_at(&mut fixed, off)?;
            let l1_off = u64::from_be_bytes(fixed[0..8].try_into().unwrap_or([0; 8]));
            let l1_size = u32::from_be_bytes(fixed[8..12].try_into().unwrap_or([0; 4]));
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as u64;
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as u64;
            let extra = u32::from_be_bytes(fixed[36..40].try_into().unwrap_or([0; 4])) as u64;
            if extra > MAX_EXTRA {
                return Err(Error::InvalidImage(InvalidImage::Snapshot {
                    index: k,
                    problem: SnapshotProblem::ExtraData {
                        len: extra,
                        limit: MAX_EXTRA,
                    },
                }));
            }
            if l1_off % self.cs != 0
                || l1_size as u64 * 8 > MAX_L1_BYTES
                || l1_off.saturating_add(l1_size as u64 * 8) > fsize
            {
                self.corruptions += 1;
                self.msgs
                    .push(format!("ERROR snapshot {k} has an invalid L1 table"));
            } else if !self.claim_l1(l1_off, l1_size) {
                // Each L1 table is walked once: aliased tables cannot multiply the work.
                self.corruptions += 1;
                self.msgs.push(format!(
                    "ERROR snapshot {k}'s L1 table overlaps another L1 table"
                ));
            } else {
                self.add(l1_off, l1_size as u64 * 8, false, "snapshot L1 table");
                self.walk_l1(l1_off, l1_size, false)?;
            }
            off += (40 + extra + id_len + name_len).div_ceil(8) * 8;
        }
        let start = self.h.snapshots_offset;
        self.add(start, off - start, false, "snapshot table");
        Ok(())
    }

    /// Counts the persistent dirty bitmaps (directory, tables and data) when
    /// the bitmaps autoclear bit says they are consistent, as QEMU does.
    fn walk_bitmaps(&mut self) -> Result<()> {
        if self.h.autoclear_features & 1 == 0 {
            return Ok(());
        }
        let Some(ext) = self.h.extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
            return Ok(());
        };
        if ext.data.len() < 24 {
            self.corruptions += 1;
            self.msgs.push("ERROR bitmaps extension too short".into());
            return Ok(());
        }
        let be64 =
            |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let nb = u32::from_be_bytes(ext.data[0..4].try_into().unwrap_or([0; 4]));
        let dir_size = be64(&ext.data, 8);
        let dir_off = be64(&ext.data, 16);
        let fsize = self.f.size();
        if dir_size > 64 << 20 || dir_off % self.cs != 0 || dir_off.saturating_add(dir_size) > fsize
        {
            self.corruptions += 1;
            self.msgs.push("ERROR bitmap directory is invalid".into());
            return Ok(());
        }
        // QEMU's limit on bitmaps per image.
        if nb > 65535 {
            self.corruptions += 1;
            self.msgs
                .push(format!("ERROR bitmaps extension names {nb} bitmaps"));
            return Ok(());
        }
        self.add(dir_off, dir_size, false, "bitmap directory");
        let mut dir = vec![0u8; dir_size as usize];
        self.f.read_at(&mut dir, dir_off)?;
        let mut pos = 0usize;
        // Each table is walked once, and all of them together fit the file: the work is
        // bounded by the file's size however the directory names them.
        let mut walked = std::collections::HashSet::new();
        let mut total = 0u64;
        for _ in 0..nb {
            if pos + 24 > dir.len() {
                self.corruptions += 1;
                self.msgs.push("ERROR bitmap directory is truncated".into());
                break;
            }
            let table_off = be64(&dir, pos);
            let table_size =
                u32::from_be_bytes(dir[pos + 8..pos + 12].try_into().unwrap_or([0; 4])) as u64;
            let name = u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]) as usize;
            let extra =
                u32::from_be_bytes(dir[pos + 20..pos + 24].try_into().unwrap_or([0; 4])) as usize;
            pos += (24 + extra + name).div_ceil(8) * 8;
            let bytes = table_size * 8;
            if table_off % self.cs != 0 || table_off.saturating_add(bytes) > fsize {
                self.corruptions += 1;
                self.msgs
                    .push(format!("ERROR bitmap table at {table_off:#x} is invalid"));
                continue;
            }
            if !walked.insert(table_off) {
                self.corruptions += 1;
                self.msgs.push(format!(
                    "ERROR bitmap table at {table_off:#x} belongs to two bitmaps"
                ));
                continue;
            }
            total += bytes;
            if total > fsize {
                self.corruptions += 1;
                self.msgs
                    .push("ERROR bitmap tables are larger together than the file".into());
                break;
            }
            self.add(table_off, bytes, false, "bitmap table");
            // In pieces: a table may be as large as the (sparse) file.
            const PIECE: u64 = 1 << 16;
            let mut i = 0;
            while i < table_size {
                let n = PIECE.min(table_size - i);
                for e in self.read_table(table_off + i * 8, n as usize)? {
                    let off = e & OFFSET_MASK;
                    if off != 0 {
                        self.add(off, self.cs, false, "bitmap data");
                    }
                }
                i += n;
            }
        }
        Ok(())
    }

    fn walk_refcounts(&mut self) -> Result<()> {
        let n = (self.h.refcount_table_clusters as u64 * self.cs / 8) as usize;
        self.reftable = self.read_table(self.h.refcount_table_offset, n)?;
        self.add(
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters as u64 * self.cs,
            true,
            "refcount table",
        );
        let fsize = self.f.size();
        self.rb_bad = vec![false; n];
        for i in 0..n {
            let e = self.reftable[i];
            let off = e & !REFT_RESERVED;
            if e == 0 {
                continue;
            }
            if e & REFT_RESERVED != 0 || off % self.cs != 0 || off.saturating_add(self.cs) > fsize {
                self.corruptions += 1;
                self.msgs
                    .push(format!("ERROR refcount block {i} ({e:#x}) is invalid"));
                self.rb_bad[i] = true;
                continue;
            }
            self.add(off, self.cs, true, "refcount block");
        }
        Ok(())
    }

    fn run(f: &'a dyn BlockBackend) -> Result<Walk<'a>> {
        let h = read_header(f)?;
        let cs = h.cluster_size();
        let file_clusters = f.size().div_ceil(cs);
        if file_clusters > MAX_CHECK_CLUSTERS {
            return Err(Error::Unsupported(Unsupported::CheckSize {
                clusters: file_clusters,
                limit: MAX_CHECK_CLUSTERS,
            }));
        }
        let mut w = Walk {
            f,
            cs,
            cb: h.cluster_bits,
            refs: vec![0; file_clusters as usize],
            rc_refs: vec![0; file_clusters as usize],
            corruptions: 0,
            msgs: Vec::new(),
            bad_l1: Vec::new(),
            bad_l2: Vec::new(),
            active_l2: Vec::new(),
            l2_tables: Vec::new(),
            l2_index: HashMap::new(),
            l1_clusters: HashSet::new(),
            allocated: 0,
            reftable: Vec::new(),
            rb_bad: Vec::new(),
            h,
        };
        w.add(0, cs, false, "header");
        let (l1o, l1s) = (w.h.l1_table_offset, w.h.l1_size);
        w.add(l1o, l1s as u64 * 8, false, "L1 table");
        w.claim_l1(l1o, l1s);
        w.walk_l1(l1o, l1s, true)?;
        w.walk_snapshots()?;
        w.walk_l2s()?;
        w.walk_bitmaps()?;
        w.walk_refcounts()?;
        Ok(w)
    }

    fn rb_bits(&self) -> u32 {
        self.cb + 3 - self.h.refcount_order
    }

    /// The refcount block covering cluster `c` (read once into `cache`), or `None` when
    /// the table has none there (all its clusters then have a stored refcount of 0).
    fn block<'c>(&self, cache: &'c mut HashMap<u64, Vec<u8>>, c: u64) -> Result<Option<&'c [u8]>> {
        let ti = (c >> self.rb_bits()) as usize;
        if ti >= self.reftable.len() || self.reftable[ti] == 0 || self.rb_bad[ti] {
            return Ok(None);
        }
        let off = self.reftable[ti] & !REFT_RESERVED;
        let b = match cache.entry(off) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut b = vec![0u8; self.cs as usize];
                self.f.read_at(&mut b, off)?;
                v.insert(b)
            }
        };
        Ok(Some(b))
    }

    /// Stored refcount of cluster `c`.
    fn stored(&self, cache: &mut HashMap<u64, Vec<u8>>, c: u64) -> Result<u64> {
        let idx = (c & ((1 << self.rb_bits()) - 1)) as usize;
        Ok(self
            .block(cache, c)?
            .map_or(0, |b| refcount::get(b, idx, self.h.refcount_order)))
    }

    fn want(&self, c: usize) -> u64 {
        self.refs.get(c).copied().unwrap_or(0) as u64
            + self.rc_refs.get(c).copied().unwrap_or(0) as u64
    }
}

struct Findings {
    leaks: Vec<(u64, u64, u64)>,
    errors: Vec<(u64, u64, u64)>,
    copied_l1: Vec<(usize, u64)>,
    copied_l2: Vec<(u64, usize, u64)>,
    /// Refcount blocks referenced more than once: (table index, references).
    shared_rb: Vec<(usize, u64)>,
    end: u64,
}

fn compare(w: &Walk<'_>) -> Result<Findings> {
    let mut cache = HashMap::new();
    let n = w.refs.len().max(w.rc_refs.len());
    let mut fd = Findings {
        leaks: Vec::new(),
        errors: Vec::new(),
        copied_l1: Vec::new(),
        copied_l2: Vec::new(),
        shared_rb: Vec::new(),
        end: 0,
    };
    for (i, &e) in w.reftable.iter().enumerate() {
        if e != 0 && !w.rb_bad[i] {
            let refs = w.want(((e & !REFT_RESERVED) >> w.cb) as usize);
            if refs != 1 {
                fd.shared_rb.push((i, refs));
            }
        }
    }
    // One refcount block at a time: its clusters are looked up in it directly (a
    // reference far past the end of the file makes this loop long).
    let per_block = 1u64 << w.rb_bits();
    let mut first = 0u64;
    while first < n as u64 {
        let end = (first | (per_block - 1)).saturating_add(1).min(n as u64);
        let block = w.block(&mut cache, first)?;
        if block.is_none() && no_refs(&w.refs, first, end) && no_refs(&w.rc_refs, first, end) {
            // Nothing stored, nothing wanted: the usual stretch behind a far reference.
            first = end;
            continue;
        }
        for c in first..end {
            let have = block.map_or(0, |b| {
                refcount::get(b, (c & (per_block - 1)) as usize, w.h.refcount_order)
            });
            let want = w.want(c as usize);
            if have > want {
                fd.leaks.push((c, have, want));
            } else if have < want {
                fd.errors.push((c, have, want));
            }
            if have > 0 || want > 0 {
                fd.end = (c + 1) * w.cs;
            }
        }
        first = end;
    }
    for &(i, off) in &w.active_l2 {
        let l1 = w.read_table(w.h.l1_table_offset + i as u64 * 8, 1)?[0];
        let rc = w.stored(&mut cache, off >> w.cb)?;
        if (rc == 1) != (l1 & COPIED != 0) {
            fd.copied_l1.push((i, rc));
        }
        let l2 = w.read_table(off, (w.cs / 8) as usize)?;
        let ext = w.h.incompatible_features & INCOMPAT_EXTL2 != 0;
        let stride = 1 + ext as usize;
        for (j, words) in l2.chunks_exact(stride).enumerate() {
            let e = words[0];
            let bitmap = if ext { words[1] } else { 0 };
            if let Ok(L2State::Normal(h) | L2State::Zero(Some(h))) =
                classify(e, w.h.version, w.cb, ext, bitmap)
            {
                let rc = w.stored(&mut cache, h >> w.cb)?;
                if (rc == 1) != (e & COPIED != 0) {
                    fd.copied_l2.push((off, j * stride, rc));
                }
            }
        }
    }
    Ok(fd)
}

/// Whether clusters `first..end` have no references counted in `v`.
fn no_refs(v: &[u32], first: u64, end: u64) -> bool {
    const ZEROES: [u32; 1024] = [0; 1024];
    let end = (end as usize).min(v.len());
    let first = (first as usize).min(end);
    // Slice comparison of plain integers is one memcmp per chunk.
    v[first..end]
        .chunks(ZEROES.len())
        .all(|c| c == &ZEROES[..c.len()])
}

fn write_u64(f: &dyn BlockBackend, off: u64, v: u64) -> Result<()> {
    f.write_at(&v.to_be_bytes(), off)
}

/// Rewrites the refcount structure from scratch at the end of the image.
fn rebuild(w: &Walk<'_>) -> Result<()> {
    let f = w.f;
    let cs = w.cs;
    let order = w.h.refcount_order;
    let rb_bits = w.rb_bits();
    let rbe = 1u64 << rb_bits;
    let e = (w.refs.len() as u64).max(f.size().div_ceil(cs));
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let n = e + t + b;
        let nb = n.div_ceil(rbe);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    if t * cs > MAX_REFTABLE_BYTES {
        return Err(Error::Unsupported(Unsupported::RebuiltRefcountTable {
            bytes: t * cs,
            limit: MAX_REFTABLE_BYTES,
        }));
    }
    let max = refcount::max_value(order);
    let mut table = vec![0u8; (t * cs) as usize];
    for k in 0..b {
        let mut block = vec![0u8; cs as usize];
        for c in k * rbe..((k + 1) * rbe).min(e + t + b) {
            let v = if c >= e {
                1
            } else {
                w.refs.get(c as usize).copied().unwrap_or(0) as u64
            };
            refcount::set(&mut block, (c - k * rbe) as usize, order, v.min(max));
        }
        let off = (e + t + k) * cs;
        f.write_at(&block, off)?;
        table[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    f.write_at(&table, e * cs)?;
    f.flush()?;
    let mut hb = [0u8; 12];
    hb[..8].copy_from_slice(&(e * cs).to_be_bytes());
    hb[8..].copy_from_slice(&(t as u32).to_be_bytes());
    f.write_at(&hb, 48)?;
    f.flush()
}

/// Checks the image in `f`, repairing what `fix` allows.
pub fn check(f: &dyn BlockBackend, fix: Fix) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    if fix != Fix::None && f.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let w = match Walk::run(f) {
        Ok(w) => w,
        Err(e @ (Error::Unsupported(_) | Error::InvalidImage(_))) => return Err(e),
        Err(e) => {
            report.check_errors = 1;
            report
                .messages
                .push(format!("ERROR checking the image: {e}"));
            return Ok(report);
        }
    };
    let fd = compare(&w)?;
    if fix == Fix::None {
        return Ok(finish(report, &w, &fd, true));
    }
    let mut before = finish(CheckReport::default(), &w, &fd, false);
    let mut changed = false;
    if fix == Fix::All {
        for &i in &w.bad_l1 {
            write_u64(f, w.h.l1_table_offset + i as u64 * 8, 0)?;
            changed = true;
        }
        let ext = w.h.incompatible_features & INCOMPAT_EXTL2 != 0;
        for &(off, j) in &w.bad_l2 {
            write_u64(f, off + j as u64 * 8, 0)?;
            if ext {
                write_u64(f, off + j as u64 * 8 + 8, 0)?;
            }
            changed = true;
        }
        if changed {
            f.flush()?;
        }
        let w2 = Walk::run(f)?;
        let fd2 = compare(&w2)?;
        let rc_broken = w2.rb_bad.iter().any(|&b| b);
        if !fd2.errors.is_empty() || !fd2.leaks.is_empty() || rc_broken {
            rebuild(&w2)?;
        }
        // COPIED flags, against the now-exact refcounts.
        let w3 = Walk::run(f)?;
        let fd3 = compare(&w3)?;
        for &(i, rc) in &fd3.copied_l1 {
            let off = w3.h.l1_table_offset + i as u64 * 8;
            let e = w3.read_table(off, 1)?[0];
            write_u64(f, off, if rc == 1 { e | COPIED } else { e & !COPIED })?;
        }
        for &(l2, j, rc) in &fd3.copied_l2 {
            let off = l2 + j as u64 * 8;
            let e = w3.read_table(off, 1)?[0];
            write_u64(f, off, if rc == 1 { e | COPIED } else { e & !COPIED })?;
        }
        f.flush()?;
    } else {
        // Leaks only: lower refcounts in place.
        let mut blocks: HashMap<u64, Vec<u8>> = HashMap::new();
        let rb_bits = w.rb_bits();
        for &(c, _, want) in &fd.leaks {
            let ti = (c >> rb_bits) as usize;
            let off = w.reftable[ti] & !REFT_RESERVED;
            if let std::collections::hash_map::Entry::Vacant(v) = blocks.entry(off) {
                let mut b = vec![0u8; w.cs as usize];
                f.read_at(&mut b, off)?;
                v.insert(b);
            }
            if let Some(b) = blocks.get_mut(&off) {
                refcount::set(
                    b,
                    (c & ((1 << rb_bits) - 1)) as usize,
                    w.h.refcount_order,
                    want,
                );
            }
        }
        for (off, b) in &blocks {
            f.write_at(b, *off)?;
        }
        f.flush()?;
    }
    // Double-check the result.
    let wf = Walk::run(f)?;
    let fdf = compare(&wf)?;
    let mut after = finish(CheckReport::default(), &wf, &fdf, true);
    if fix == Fix::All && after.is_clean() {
        let mut h = wf.h.clone();
        if h.version >= 3 && h.incompatible_features & (INCOMPAT_CORRUPT | INCOMPAT_DIRTY) != 0 {
            h.incompatible_features &= !(INCOMPAT_CORRUPT | INCOMPAT_DIRTY);
            write_u64(f, 72, h.incompatible_features)?;
            f.flush()?;
        }
    }
    after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
    after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
    let mut msgs = std::mem::take(&mut before.messages);
    for m in msgs.iter_mut() {
        if let Some(rest) = m.strip_prefix("ERROR") {
            *m = format!("Repairing{rest}");
        } else if let Some(rest) = m.strip_prefix("Leaked") {
            *m = format!("Repairing leaked{rest}");
        }
    }
    msgs.append(&mut after.messages);
    after.messages = msgs;
    Ok(after)
}

fn finish(mut r: CheckReport, w: &Walk<'_>, fd: &Findings, _final: bool) -> CheckReport {
    r.corruptions = w.corruptions
        + fd.errors.len() as u64
        + fd.copied_l1.len() as u64
        + fd.copied_l2.len() as u64
        + fd.shared_rb.len() as u64;
    for &(i, refs) in &fd.shared_rb {
        r.messages
            .push(format!("ERROR refcount block {i} refcount={refs}"));
    }
    r.leaks = fd.leaks.len() as u64;
    for &(c, have, want) in &fd.errors {
        r.messages.push(format!(
            "ERROR cluster {c} refcount={have} reference={want}"
        ));
    }
    for &(c, have, want) in &fd.leaks {
        r.messages.push(format!(
            "Leaked cluster {c} refcount={have} reference={want}"
        ));
    }
    for &(i, rc) in &fd.copied_l1 {
        r.messages.push(format!(
            "ERROR OFLAG_COPIED L2 cluster: l1_index={i} refcount={rc}"
        ));
    }
    for &(off, j, rc) in &fd.copied_l2 {
        r.messages.push(format!(
            "ERROR OFLAG_COPIED data cluster: L2 table {off:#x} index {j} refcount={rc}"
        ));
    }
    r.messages.extend(w.msgs.iter().cloned());
    r.image_end_offset = fd.end;
    r.total_clusters = w.h.size.div_ceil(w.cs);
    r.allocated_clusters = w.allocated;
    r
}

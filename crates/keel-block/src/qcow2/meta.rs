//! In-memory qcow2 metadata: L1, refcount table, L2 and refcount caches,
//! cluster allocation and metadata write ordering.
//!
//! Ordering rules (so that a crash can leak clusters but never corrupt):
//! * a refcount increment reaches the file before any L2 entry or L1 entry
//!   that uses the cluster (`l2_after_rc`);
//! * an L2 change that drops a reference reaches the file before the
//!   refcount decrement (`rc_after_l2`);
//! * the two dependencies are never pending at once: setting one first
//!   writes out the other;
//! * a freed cluster is reused only after the L2 change that freed it has
//!   been written, and only once no data transfer to or from it is in flight
//!   (see [`super::inflight`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar};

use super::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::inflight::InFlight;
use super::refcount;
use crate::backend::BlockBackend;
use crate::error::{Corruption, Error, InvalidArgument, L2Problem, Metadata, Result, Unsupported};

/// Host offset bits of L1 and L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (version 3).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Reads as zero (version 3).
pub const ZERO: u64 = 1;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED: u64 = 0x1ff;

/// The state of one guest cluster according to its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2State {
    /// No data: reads from the backing file or as zeroes.
    Unallocated,
    /// Reads as zeroes; `Some` keeps a preallocated host cluster.
    Zero(Option<u64>),
    /// Data at a host offset.
    Normal(u64),
    /// Compressed data.
    Compressed,
}

/// Decodes an L2 entry, validating reserved bits. With extended L2 entries
/// (`ext`), `bitmap` is the entry's subcluster bitmap; the cluster is then
/// only ever `Unallocated`, `Normal` or `Compressed`, and the per-subcluster
/// state comes from the bitmap.
pub fn classify(
    entry: u64,
    version: u32,
    cluster_bits: u32,
    ext: bool,
    bitmap: u64,
) -> std::result::Result<L2State, L2Problem> {
    if entry & COMPRESSED != 0 {
        return Ok(L2State::Compressed);
    }
    let mut reserved = L2_RESERVED;
    if version < 3 || ext {
        reserved |= ZERO;
    }
    if ext {
        if bitmap & (bitmap >> 32) != 0 {
            return Err(L2Problem::AllocatedAndZero { bitmap });
        }
        if entry & OFFSET_MASK == 0 && bitmap & 0xffff_ffff != 0 {
            return Err(L2Problem::AllocatedUnmapped { bitmap });
        }
    }
    if entry & reserved != 0 {
        return Err(L2Problem::ReservedBits { entry });
    }
    let off = entry & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(L2Problem::Misaligned { entry });
    }
    if entry & ZERO != 0 {
        return Ok(L2State::Zero(if off != 0 { Some(off) } else { None }));
    }
    if off == 0 {
        return Ok(L2State::Unallocated);
    }
    Ok(L2State::Normal(off))
}

/// Host clusters touched by a compressed L2 entry.
pub fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let off = entry & ((1u64 << x) - 1);
    let sectors = ((entry & !COMPRESSED & !COPIED) >> x) + 1;
    let end = (off & !511) + sectors * 512;
    (off, end)
}

pub(crate) struct Slot<T> {
    off: u64,
    pub(crate) data: T,
    pub(crate) dirty: bool,
    used: u64,
}

pub(crate) struct Cache<T> {
    pub(crate) slots: Vec<Slot<T>>,
    index: HashMap<u64, usize>,
    cap: usize,
    clock: u64,
}

impl<T> Cache<T> {
    fn new(cap: usize) -> Self {
        Cache {
            slots: Vec::new(),
            index: HashMap::new(),
            cap: cap.max(2),
            clock: 0,
        }
    }
    fn lookup(&mut self, off: u64) -> Option<usize> {
        let i = *self.index.get(&off)?;
        self.clock += 1;
        self.slots[i].used = self.clock;
        Some(i)
    }
    /// A slot index to reuse, if the cache is full.
    fn victim(&self) -> Option<usize> {
        if self.slots.len() < self.cap {
            return None;
        }
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }
    fn place(&mut self, at: Option<usize>, off: u64, data: T, dirty: bool) -> usize {
        self.clock += 1;
        let slot = Slot {
            off,
            data,
            dirty,
            used: self.clock,
        };
        match at {
            Some(i) => {
                self.index.remove(&self.slots[i].off);
                self.slots[i] = slot;
                self.index.insert(off, i);
                i
            }
            None => {
                self.slots.push(slot);
                self.index.insert(off, self.slots.len() - 1);
                self.slots.len() - 1
            }
        }
    }
    fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }
}

/// Mutable metadata state of an open image, guarded by one mutex.
pub(crate) struct Meta {
    pub(crate) hdr: Header,
    /// Extended L2 entries (two words per entry).
    pub(crate) ext: bool,
    pub(crate) cb: u32,
    pub(crate) cs: u64,
    l2_bits: u32,
    rb_bits: u32,
    pub(crate) l1: Vec<u64>,
    pub(crate) reftable: Vec<u64>,
    pub(crate) l2: Cache<Vec<u64>>,
    rb: Cache<Vec<u8>>,
    l2_after_rc: bool,
    rc_after_l2: bool,
    free_hint: u64,
    /// Clusters at or above this index have never been written.
    zero_tail: u64,
    /// Lazy refcounts are enabled for this session.
    lazy: bool,
    /// The file is known to be extended (with zeroes) up to here.
    pub(crate) prealloc_end: u64,
    /// The dirty bit is set on disk by this session.
    pub(crate) dirty_on_disk: bool,
    pub(crate) corrupt: bool,
    pub(crate) read_only: bool,
    l2_offsets: HashSet<u64>,
    rb_offsets: HashSet<u64>,
    /// Snapshot table and inactive L1 tables: (offset, length, what).
    pub(crate) fixed: Vec<(u64, u64, Metadata)>,
    /// Next free byte of the host cluster compressed clusters are packed
    /// into (0: none).
    cbyte: u64,
    /// Bumped whenever a compressed cluster's host range is released, so a
    /// cached decompressed cluster is never used after its range may have
    /// been reused.
    pub(crate) cgen: u64,
    /// Host clusters with data transfers in flight: never allocated.
    pub(crate) inflight: Arc<InFlight>,
    /// Guest clusters (index) whose copy on write is in flight on an io_uring queue, with
    /// the host cluster allocated for it, not yet linked (see `Qcow2::map_write_or_copy`).
    pub(crate) copying: HashMap<u64, u64>,
    /// Signalled whenever an entry leaves `copying`.
    pub(crate) copy_done: Arc<Condvar>,
}

impl Meta {
    pub(crate) fn new(
        hdr: Header,
        l1: Vec<u64>,
        reftable: Vec<u64>,
        file_size: u64,
        l2_cache_bytes: u64,
        rc_cache_bytes: u64,
        read_only: bool,
    ) -> Meta {
        let cb = hdr.cluster_bits;
        let cs = 1u64 << cb;
        let l2_offsets = l1
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let rb_offsets = reftable
            .iter()
            .map(|e| e & !REFT_RESERVED)
            .filter(|&o| o != 0)
            .collect();
        let lazy = !read_only
            && hdr.version >= 3
            && hdr.compatible_features & super::header::COMPAT_LAZY_REFCOUNTS != 0;
        let ext = hdr.incompatible_features & super::header::INCOMPAT_EXTL2 != 0;
        Meta {
            ext,
            cb,
            cs,
            l2_bits: cb - 3 - ext as u32,
            rb_bits: cb + 3 - hdr.refcount_order,
            l2: Cache::new((l2_cache_bytes / cs) as usize),
            rb: Cache::new((rc_cache_bytes / cs) as usize),
            l1,
            reftable,
            l2_after_rc: false,
            rc_after_l2: false,
            free_hint: 0,
            zero_tail: file_size.div_ceil(cs),
            lazy,
            prealloc_end: 0,
            dirty_on_disk: false,
            corrupt: hdr.incompatible_features & INCOMPAT_CORRUPT != 0,
            read_only,
            l2_offsets,
            rb_offsets,
            fixed: Vec::new(),
            cbyte: 0,
            cgen: 0,
            hdr,
            inflight: Arc::default(),
            copying: HashMap::new(),
            copy_done: Arc::default(),
        }
    }

    /// Whether a guest cluster of `[offset, offset + len)` has a copy on write in flight.
    pub(crate) fn copying_in(&self, offset: u64, len: u64) -> bool {
        if self.copying.is_empty() || len == 0 {
            return false;
        }
        let (first, last) = (offset >> self.cb, (offset + len - 1) >> self.cb);
        self.copying.keys().any(|g| (first..=last).contains(g))
    }

    /// Number of entries in an L2 table.
    pub(crate) fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Splits a guest offset into (L1 index, L2 index).
    pub(crate) fn split(&self, guest: u64) -> (usize, usize) {
        let l2i = (guest >> self.cb) & (self.l2_entries() - 1);
        let l1i = guest >> (self.cb + self.l2_bits);
        (l1i as usize, l2i as usize)
    }

    /// Name of the metadata structure overlapping the host cluster at `off`.
    pub(crate) fn overlap(&self, off: u64, len: u64) -> Option<Metadata> {
        let h = &self.hdr;
        let end = off + len;
        let hits = |s: u64, l: u64| l > 0 && off < s + l && s < end;
        if hits(0, self.cs) {
            return Some(Metadata::Header);
        }
        if hits(
            h.l1_table_offset,
            (h.l1_size as u64 * 8).div_ceil(self.cs) * self.cs,
        ) {
            return Some(Metadata::L1Table);
        }
        if hits(
            h.refcount_table_offset,
            h.refcount_table_clusters as u64 * self.cs,
        ) {
            return Some(Metadata::RefcountTable);
        }
        for &(s, l, what) in &self.fixed {
            if hits(s, l) {
                return Some(what);
            }
        }
        let mut c = off & !(self.cs - 1);
        while c < end {
            if self.l2_offsets.contains(&c) {
                return Some(Metadata::L2Table);
            }
            if self.rb_offsets.contains(&c) {
                return Some(Metadata::RefcountBlock);
            }
            c += self.cs;
        }
        None
    }

    /// Marks the image corrupt (on disk if writable) and returns the error.
    pub(crate) fn corrupt(&mut self, f: &dyn BlockBackend, kind: Corruption) -> Error {
        if !self.corrupt && !self.read_only && self.hdr.version >= 3 {
            self.hdr.incompatible_features |= INCOMPAT_CORRUPT;
            // Best effort: the error is reported either way.
            let _ = self.write_incompat(f).and_then(|_| f.flush());
        }
        self.corrupt = true;
        Error::Corrupt(kind)
    }

    pub(crate) fn write_incompat(&self, f: &dyn BlockBackend) -> Result<()> {
        f.write_at(&self.hdr.incompatible_features.to_be_bytes(), 72)
    }

    /// Call before any metadata change.
    pub(crate) fn before_modify(&mut self, f: &dyn BlockBackend) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.corrupt {
            return Err(Error::Corrupt(Corruption::WritesRefused));
        }
        if self.lazy && !self.dirty_on_disk {
            self.hdr.incompatible_features |= INCOMPAT_DIRTY;
            self.write_incompat(f)?;
            f.flush()?;
            self.dirty_on_disk = true;
        }
        Ok(())
    }

    /// Orders two metadata writes on stable storage. With lazy refcounts the
    /// dirty bit makes ordering unnecessary.
    fn barrier(&self, f: &dyn BlockBackend) -> Result<()> {
        if self.lazy && self.dirty_on_disk {
            return Ok(());
        }
        f.flush()
    }

    fn encode_l2(t: &[u64]) -> Vec<u8> {
        let mut b = Vec::with_capacity(t.len() * 8);
        for e in t {
            b.extend_from_slice(&e.to_be_bytes());
        }
        b
    }

    fn write_l2_slot(&mut self, f: &dyn BlockBackend, i: usize) -> Result<()> {
        if self.l2_after_rc {
            self.flush_rb(f)?;
            self.barrier(f)?;
            self.l2_after_rc = false;
        }
        let s = &self.l2.slots[i];
        f.write_at(&Self::encode_l2(&s.data), s.off)?;
        self.l2.slots[i].dirty = false;
        Ok(())
    }

    fn write_rb_slot(&mut self, f: &dyn BlockBackend, i: usize) -> Result<()> {
        if self.rc_after_l2 {
            self.flush_l2(f)?;
            self.barrier(f)?;
            self.rc_after_l2 = false;
        }
        let s = &self.rb.slots[i];
        f.write_at(&s.data, s.off)?;
        self.rb.slots[i].dirty = false;
        Ok(())
    }

    fn flush_l2(&mut self, f: &dyn BlockBackend) -> Result<()> {
        for i in 0..self.l2.slots.len() {
            if self.l2.slots[i].dirty {
                self.write_l2_slot(f, i)?;
            }
        }
        Ok(())
    }

    fn flush_rb(&mut self, f: &dyn BlockBackend) -> Result<()> {
        for i in 0..self.rb.slots.len() {
            if self.rb.slots[i].dirty {
                self.write_rb_slot(f, i)?;
            }
        }
        Ok(())
    }

    /// Writes both caches back in dependency order (no final sync).
    pub(crate) fn write_back(&mut self, f: &dyn BlockBackend) -> Result<()> {
        if self.rc_after_l2 {
            self.flush_l2(f)?;
            if self.rb.any_dirty() {
                self.barrier(f)?;
            }
            self.rc_after_l2 = false;
            self.flush_rb(f)
        } else {
            self.flush_rb(f)?;
            if self.l2.any_dirty() {
                self.barrier(f)?;
            }
            self.l2_after_rc = false;
            self.flush_l2(f)
        }
    }

    /// Validates an L2 table offset from an L1 entry.
    fn check_l2_offset(&mut self, f: &dyn BlockBackend, l1i: usize, e: u64) -> Result<u64> {
        let off = e & OFFSET_MASK;
        if e & L1_RESERVED != 0 || off % self.cs != 0 {
            return Err(self.corrupt(
                f,
                Corruption::L1Entry {
                    index: l1i,
                    entry: e,
                },
            ));
        }
        if off.saturating_add(self.cs) > f.size() {
            return Err(self.corrupt(
                f,
                Corruption::L2TablePastEnd {
                    offset: off,
                    l1_index: l1i,
                },
            ));
        }
        let h = &self.hdr;
        let l1_len = (h.l1_size as u64 * 8).div_ceil(self.cs) * self.cs;
        let rt_len = h.refcount_table_clusters as u64 * self.cs;
        let bad = off == 0
            || (off < h.l1_table_offset + l1_len && h.l1_table_offset < off + self.cs)
            || (off < h.refcount_table_offset + rt_len && h.refcount_table_offset < off + self.cs)
            || self.rb_offsets.contains(&off);
        if bad {
            return Err(self.corrupt(
                f,
                Corruption::L2TableOverlap {
                    offset: off,
                    l1_index: l1i,
                },
            ));
        }
        Ok(off)
    }

    /// Loads the L2 table at `off` into the cache and returns its slot.
    pub(crate) fn l2_slot(&mut self, f: &dyn BlockBackend, off: u64) -> Result<usize> {
        if let Some(i) = self.l2.lookup(off) {
            return Ok(i);
        }
        let mut buf = vec![0u8; self.cs as usize];
        f.read_at(&mut buf, off)?;
        let table: Vec<u64> = buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let victim = self.l2.victim();
        if let Some(v) = victim {
            if self.l2.slots[v].dirty {
                self.write_l2_slot(f, v)?;
            }
        }
        Ok(self.l2.place(victim, off, table, false))
    }

    /// The L2 slot for a guest offset, or `None` if its L1 entry is empty.
    pub(crate) fn l2_for_read(
        &mut self,
        f: &dyn BlockBackend,
        guest: u64,
    ) -> Result<Option<usize>> {
        let Some((l1i, e)) = self.l1_entry(f, guest)? else {
            return Ok(None);
        };
        let off = self.check_l2_offset(f, l1i, e)?;
        self.l2_slot(f, off).map(Some)
    }

    /// The L1 index and entry for a guest offset, `None` past the table or where the
    /// entry points at no L2 table.
    fn l1_entry(&mut self, f: &dyn BlockBackend, guest: u64) -> Result<Option<(usize, u64)>> {
        let (l1i, _) = self.split(guest);
        let Some(&e) = self.l1.get(l1i) else {
            return Ok(None);
        };
        if e & OFFSET_MASK == 0 {
            if e & L1_RESERVED != 0 {
                return Err(self.corrupt(
                    f,
                    Corruption::L1Entry {
                        index: l1i,
                        entry: e,
                    },
                ));
            }
            return Ok(None);
        }
        Ok(Some((l1i, e)))
    }

    /// The L2 slot for a guest offset, allocating the table if needed.
    pub(crate) fn l2_for_write(&mut self, f: &dyn BlockBackend, guest: u64) -> Result<usize> {
        let (l1i, _) = self.split(guest);
        if l1i >= self.l1.len() {
            return Err(Error::OutOfRange {
                offset: guest,
                len: 1,
                size: self.hdr.size,
            });
        }
        let e = self.l1[l1i];
        if e & OFFSET_MASK != 0 {
            return self.l2_writable(f, l1i, e);
        }
        // Allocate a new L2 table: refcount, then table, then L1 entry.
        let (off, _) = self.alloc(f, 1)?;
        self.flush_rb(f)?;
        self.barrier(f)?;
        self.l2_after_rc = false;
        let table = vec![0u64; self.l2_entries() as usize];
        f.write_at(&Self::encode_l2(&table), off)?;
        self.barrier(f)?;
        self.set_l1(f, l1i, off | COPIED)?;
        self.l2_offsets.insert(off);
        let victim = self.l2.victim();
        if let Some(v) = victim {
            if self.l2.slots[v].dirty {
                self.write_l2_slot(f, v)?;
            }
        }
        Ok(self.l2.place(victim, off, table, false))
    }

    /// The L2 slot for a guest offset about to be modified, or `None` if its
    /// L1 entry is empty. A shared table is copied first.
    pub(crate) fn l2_for_change(
        &mut self,
        f: &dyn BlockBackend,
        guest: u64,
    ) -> Result<Option<usize>> {
        match self.l1_entry(f, guest)? {
            Some((l1i, e)) => self.l2_writable(f, l1i, e).map(Some),
            None => Ok(None),
        }
    }

    /// Makes the existing L2 table of L1 entry `l1i` (value `e`) writable:
    /// a table whose refcount is above one (shared with an internal
    /// snapshot) is copied to a new cluster and the L1 entry repointed, so
    /// the snapshot never changes.
    fn l2_writable(&mut self, f: &dyn BlockBackend, l1i: usize, e: u64) -> Result<usize> {
        let off = self.check_l2_offset(f, l1i, e)?;
        if e & COPIED != 0 {
            return self.l2_slot(f, off);
        }
        match self.refcount(f, off >> self.cb)? {
            0 => Err(self.corrupt(f, Corruption::L2TableRefcountZero { offset: off })),
            1 => {
                self.set_l1(f, l1i, off | COPIED)?;
                self.l2_slot(f, off)
            }
            _ => {
                let slot = self.l2_slot(f, off)?;
                let mut table = self.l2.slots[slot].data.clone();
                // Every cluster the table names is now referenced by both
                // copies, so none has refcount one.
                let stride = 1usize << self.ext as u32;
                for w in table.iter_mut().step_by(stride) {
                    if *w & COMPRESSED == 0 {
                        *w &= !COPIED;
                    }
                }
                // Refcount of the copy, then the copy, then the L1 entry,
                // then the old table's refcount.
                let (new, _) = self.alloc(f, 1)?;
                self.flush_rb(f)?;
                self.barrier(f)?;
                self.l2_after_rc = false;
                f.write_at(&Self::encode_l2(&table), new)?;
                self.barrier(f)?;
                self.set_l1(f, l1i, new | COPIED)?;
                self.l2_offsets.remove(&off);
                self.l2_offsets.insert(new);
                self.barrier(f)?;
                self.adjust(f, off >> self.cb, -1)?;
                let victim = self.l2.victim();
                if let Some(v) = victim {
                    if self.l2.slots[v].dirty {
                        self.write_l2_slot(f, v)?;
                    }
                }
                Ok(self.l2.place(victim, new, table, false))
            }
        }
    }

    /// Allocates `len` bytes (at most a cluster) for compressed data, packing
    /// them after the previous compressed cluster: in its host cluster when they fit,
    /// else across its end into the next host cluster when that is the one allocated
    /// (as QEMU packs them). Each compressed cluster holds one reference to each host
    /// cluster it lies in.
    pub(crate) fn alloc_bytes(&mut self, f: &dyn BlockBackend, len: u64) -> Result<u64> {
        if len == 0 || len > self.cs {
            return Err(Error::InvalidArgument(InvalidArgument::CompressedLength {
                len,
                cluster_size: self.cs,
            }));
        }
        if self.cbyte != 0 {
            let c = self.cbyte >> self.cb;
            let room = ((c + 1) << self.cb) - self.cbyte;
            let rc = self.refcount(f, c)?;
            if len <= room && rc > 0 && rc < refcount::max_value(self.hdr.refcount_order) {
                if self.rc_after_l2 {
                    self.flush_l2(f)?;
                    self.barrier(f)?;
                    self.rc_after_l2 = false;
                }
                self.adjust(f, c, 1)?;
                self.l2_after_rc = true;
                let off = self.cbyte;
                self.cbyte = if len == room { 0 } else { off + len };
                return Ok(off);
            }
        }
        let (start, _) = self.alloc(f, 1)?;
        if self.cbyte != 0 && start == self.cbyte.next_multiple_of(self.cs) {
            // The next host cluster: the data spans the end of the packing cluster
            // into it, as QEMU packs them. Each cluster it touches holds a reference
            // (the new one has its own from the allocation).
            let c = self.cbyte >> self.cb;
            let rc = self.refcount(f, c)?;
            if rc > 0 && rc < refcount::max_value(self.hdr.refcount_order) {
                self.adjust(f, c, 1)?;
                let off = self.cbyte;
                let end = off + len;
                self.cbyte = if end % self.cs == 0 { 0 } else { end };
                return Ok(off);
            }
        }
        self.cbyte = if len == self.cs { 0 } else { start + len };
        Ok(start)
    }

    fn set_l1(&mut self, f: &dyn BlockBackend, i: usize, e: u64) -> Result<()> {
        f.write_at(&e.to_be_bytes(), self.hdr.l1_table_offset + i as u64 * 8)?;
        self.l1[i] = e;
        Ok(())
    }

    /// The L2 entry for `guest` in the cached table `slot`, decoded: (index in the table,
    /// entry, subcluster bitmap, state). An invalid entry marks the image corrupt.
    pub(crate) fn l2_entry(
        &mut self,
        f: &dyn BlockBackend,
        slot: usize,
        guest: u64,
    ) -> Result<(usize, u64, u64, L2State)> {
        let (_, l2i) = self.split(guest);
        let e = self.l2_get(slot, l2i);
        let bitmap = self.l2_bitmap(slot, l2i);
        match classify(e, self.hdr.version, self.cb, self.ext, bitmap) {
            Ok(st) => Ok((l2i, e, bitmap, st)),
            Err(problem) => Err(self.corrupt(f, Corruption::L2Entry { guest, problem })),
        }
    }

    /// An L2 entry (the first word of an extended entry).
    pub(crate) fn l2_get(&self, slot: usize, idx: usize) -> u64 {
        self.l2.slots[slot].data[idx << self.ext as u32]
    }

    /// The subcluster bitmap of an extended L2 entry (0 without extended L2).
    pub(crate) fn l2_bitmap(&self, slot: usize, idx: usize) -> u64 {
        if self.ext {
            self.l2.slots[slot].data[(idx << 1) + 1]
        } else {
            0
        }
    }

    /// Changes an L2 entry in the cache.
    pub(crate) fn set_l2(&mut self, slot: usize, idx: usize, e: u64) {
        let w = idx << self.ext as u32;
        let s = &mut self.l2.slots[slot];
        s.data[w] = e;
        s.dirty = true;
    }

    /// Changes the subcluster bitmap of an extended L2 entry in the cache.
    pub(crate) fn set_l2_bitmap(&mut self, slot: usize, idx: usize, b: u64) {
        if self.ext {
            let s = &mut self.l2.slots[slot];
            s.data[(idx << 1) + 1] = b;
            s.dirty = true;
        }
    }

    fn rb_slot(&mut self, f: &dyn BlockBackend, ti: usize) -> Result<Option<usize>> {
        let e = match self.reftable.get(ti) {
            Some(&e) => e,
            None => return Ok(None),
        };
        let off = e & !REFT_RESERVED;
        if off == 0 {
            return Ok(None);
        }
        if let Some(i) = self.rb.lookup(off) {
            return Ok(Some(i));
        }
        if e & REFT_RESERVED != 0 || off % self.cs != 0 || off.saturating_add(self.cs) > f.size() {
            return Err(self.corrupt(
                f,
                Corruption::RefcountTableEntry {
                    index: ti,
                    entry: e,
                },
            ));
        }
        let mut buf = vec![0u8; self.cs as usize];
        f.read_at(&mut buf, off)?;
        let victim = self.rb.victim();
        if let Some(v) = victim {
            if self.rb.slots[v].dirty {
                self.write_rb_slot(f, v)?;
            }
        }
        Ok(Some(self.rb.place(victim, off, buf, false)))
    }

    /// Refcount of host cluster `c` (0 if not covered by a refcount block).
    pub(crate) fn refcount(&mut self, f: &dyn BlockBackend, c: u64) -> Result<u64> {
        let ti = (c >> self.rb_bits) as usize;
        match self.rb_slot(f, ti)? {
            None => Ok(0),
            Some(i) => {
                let idx = (c & ((1 << self.rb_bits) - 1)) as usize;
                Ok(refcount::get(
                    &self.rb.slots[i].data,
                    idx,
                    self.hdr.refcount_order,
                ))
            }
        }
    }

    fn adjust(&mut self, f: &dyn BlockBackend, c: u64, delta: i64) -> Result<u64> {
        let ti = (c >> self.rb_bits) as usize;
        let slot = match self.rb_slot(f, ti)? {
            Some(s) => s,
            None => return Err(self.corrupt(f, Corruption::NoRefcountBlock { cluster: c })),
        };
        let idx = (c & ((1 << self.rb_bits) - 1)) as usize;
        let order = self.hdr.refcount_order;
        let cur = refcount::get(&self.rb.slots[slot].data, idx, order);
        let new = if delta >= 0 {
            match cur.checked_add(delta as u64) {
                Some(v) if v <= refcount::max_value(order) => v,
                _ => {
                    return Err(Error::Unsupported(Unsupported::RefcountOverflow {
                        cluster: c,
                        bits: 1u32 << order,
                    }))
                }
            }
        } else {
            match cur.checked_sub(delta.unsigned_abs()) {
                Some(v) => v,
                None => return Err(self.corrupt(f, Corruption::RefcountUnderflow { cluster: c })),
            }
        };
        let s = &mut self.rb.slots[slot];
        refcount::set(&mut s.data, idx, order, new);
        s.dirty = true;
        Ok(new)
    }

    fn find_free_run(&mut self, f: &dyn BlockBackend, n: u64) -> Result<u64> {
        let max_cluster = (1u64 << 56) >> self.cb;
        let mut c = self.free_hint.max(1);
        let mut start = c;
        let mut run = 0u64;
        while run < n {
            if c >= max_cluster {
                return Err(Error::io(
                    "allocating a cluster",
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
            let ti = (c >> self.rb_bits) as usize;
            let covered = self
                .reftable
                .get(ti)
                .is_some_and(|&e| e & !REFT_RESERVED != 0);
            if !covered {
                if run == 0 {
                    start = c;
                }
                let block_end = (ti as u64 + 1) << self.rb_bits;
                let take = (n - run).min(block_end - c);
                run += take;
                c += take;
                continue;
            }
            // A free cluster with a transfer still in flight is not reused
            // until the transfer is done.
            if self.refcount(f, c)? == 0 && !self.inflight.skip_free(c) {
                if run == 0 {
                    start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        // Everything before `start` is in use (or pinned, and offered again once idle):
        // the next search starts here, even if this allocation fails (a refcount table
        // that cannot grow would otherwise have every write rescan the whole image).
        self.free_hint = start;
        Ok(start)
    }

    /// Allocates `n` contiguous clusters, returning the host offset and
    /// whether they are known to read as zeroes.
    pub(crate) fn alloc(&mut self, f: &dyn BlockBackend, n: u64) -> Result<(u64, bool)> {
        if self.rc_after_l2 {
            // A freed cluster may be reused: its L2 change must be on disk first.
            self.flush_l2(f)?;
            self.barrier(f)?;
            self.rc_after_l2 = false;
        }
        if let Some(c) = self.inflight.take_idle() {
            // A cluster passed over while pinned is free to use again.
            self.free_hint = self.free_hint.min(c);
        }
        loop {
            let start = self.find_free_run(f, n)?;
            // A hostile image's refcounts may call its own tables free: handing such a
            // cluster out would write a new table or data over them.
            if let Some(what) = self.overlap(start << self.cb, n << self.cb) {
                return Err(self.corrupt(
                    f,
                    Corruption::FreeMetadata {
                        offset: start << self.cb,
                        metadata: what,
                    },
                ));
            }
            let mut changed = false;
            for c in start..start + n {
                let ti = (c >> self.rb_bits) as usize;
                if ti >= self.reftable.len() {
                    self.grow_reftable(f, ti)?;
                    changed = true;
                    break;
                }
                if self.reftable[ti] & !REFT_RESERVED == 0 {
                    self.create_refblock(f, ti, c)?;
                    changed = true;
                    break;
                }
            }
            if changed {
                continue;
            }
            for c in start..start + n {
                self.adjust(f, c, 1)?;
            }
            self.l2_after_rc = true;
            self.free_hint = start + n;
            let fresh = start >= self.zero_tail;
            self.zero_tail = self.zero_tail.max(start + n);
            return Ok((start << self.cb, fresh));
        }
    }

    /// Drops one reference to the host cluster at `off`, after the L2 change
    /// that dropped it. Returns true if the cluster became free.
    pub(crate) fn release(&mut self, f: &dyn BlockBackend, off: u64) -> Result<bool> {
        // Only data clusters are released through L2 entries: one naming metadata (a
        // hostile image's) would free that cluster for the next allocation to hand out.
        if let Some(what) = self.overlap(off & !(self.cs - 1), self.cs) {
            return Err(self.corrupt(
                f,
                Corruption::DataOverlap {
                    offset: off,
                    metadata: what,
                },
            ));
        }
        if self.l2_after_rc {
            self.flush_rb(f)?;
            self.barrier(f)?;
            self.l2_after_rc = false;
        }
        let c = off >> self.cb;
        let v = self.adjust(f, c, -1)?;
        self.rc_after_l2 = true;
        if v == 0 {
            self.free_hint = self.free_hint.min(c);
            if self.cbyte >> self.cb == c {
                // The packing cluster is free: it may be reused for anything.
                self.cbyte = 0;
            }
        }
        Ok(v == 0)
    }

    /// Releases the host clusters referenced by an L2 entry.
    pub(crate) fn release_entry(&mut self, f: &dyn BlockBackend, entry: u64) -> Result<()> {
        if entry & COMPRESSED != 0 {
            self.cgen += 1;
            let (s, e) = compressed_range(entry, self.cb);
            let mut c = s >> self.cb;
            while c << self.cb < e {
                self.release(f, c << self.cb)?;
                c += 1;
            }
            return Ok(());
        }
        let off = entry & OFFSET_MASK;
        if off != 0 && self.release(f, off)? && !self.inflight.is_pinned(off >> self.cb) {
            // Give the space back to the host; discard is advisory. Not while
            // a transfer is in flight: a late read still gets the old data.
            let _ = f.discard(off, self.cs);
        }
        Ok(())
    }

    fn create_refblock(&mut self, f: &dyn BlockBackend, ti: usize, c: u64) -> Result<()> {
        let mut block = vec![0u8; self.cs as usize];
        let idx = (c & ((1 << self.rb_bits) - 1)) as usize;
        refcount::set(&mut block, idx, self.hdr.refcount_order, 1);
        let off = c << self.cb;
        f.write_at(&block, off)?;
        self.barrier(f)?;
        let e = off.to_be_bytes();
        f.write_at(&e, self.hdr.refcount_table_offset + ti as u64 * 8)?;
        self.reftable[ti] = off;
        self.rb_offsets.insert(off);
        self.zero_tail = self.zero_tail.max(c + 1);
        let victim = self.rb.victim();
        if let Some(v) = victim {
            if self.rb.slots[v].dirty {
                self.write_rb_slot(f, v)?;
            }
        }
        self.rb.place(victim, off, block, false);
        Ok(())
    }

    /// Grows the refcount table so that index `need` exists. The new table and
    /// the refcount blocks describing it go at the end of the image.
    fn grow_reftable(&mut self, f: &dyn BlockBackend, need: usize) -> Result<()> {
        let cs = self.cs;
        let per = (cs / 8) as usize;
        let rb_bits = self.rb_bits;
        let old_cap = self.reftable.len();
        let e = ((old_cap as u64) << rb_bits).max(f.size().div_ceil(cs));
        let mut new_cap = (need + 1).max(old_cap + old_cap / 2 + 1);
        let (mut t, mut b) = (0u64, 0u64);
        loop {
            let nt = (new_cap as u64).div_ceil(per as u64);
            let last = e + nt + b.max(1) - 1;
            let nb = (last >> rb_bits) - (e >> rb_bits) + 1;
            new_cap = new_cap.max((last >> rb_bits) as usize + 1);
            let nt2 = (new_cap as u64).div_ceil(per as u64);
            if nt2 == t && nb == b {
                break;
            }
            t = nt2;
            b = nb;
        }
        new_cap = (t as usize) * per;
        if t * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported(Unsupported::RefcountTableGrowth {
                bytes: t * cs,
                limit: super::header::MAX_REFTABLE_BYTES,
            }));
        }
        let table_start = e;
        let blocks_start = e + t;
        let end = blocks_start + b;
        let first_ti = e >> rb_bits;
        let order = self.hdr.refcount_order;
        let mut new_table = self.reftable.clone();
        new_table.resize(new_cap, 0);
        for k in 0..b {
            let ti = first_ti + k;
            let mut block = vec![0u8; cs as usize];
            for x in table_start.max(ti << rb_bits)..end.min((ti + 1) << rb_bits) {
                refcount::set(&mut block, (x & ((1 << rb_bits) - 1)) as usize, order, 1);
            }
            let boff = (blocks_start + k) << self.cb;
            f.write_at(&block, boff)?;
            new_table[ti as usize] = boff;
        }
        let mut tb = Vec::with_capacity((t * cs) as usize);
        for e in &new_table {
            tb.extend_from_slice(&e.to_be_bytes());
        }
        f.write_at(&tb, table_start << self.cb)?;
        self.barrier(f)?;
        let mut hb = [0u8; 12];
        hb[..8].copy_from_slice(&(table_start << self.cb).to_be_bytes());
        hb[8..].copy_from_slice(&(t as u32).to_be_bytes());
        f.write_at(&hb, 48)?;
        self.barrier(f)?;
        let old_off = self.hdr.refcount_table_offset;
        let old_clusters = self.hdr.refcount_table_clusters as u64;
        self.hdr.refcount_table_offset = table_start << self.cb;
        self.hdr.refcount_table_clusters = t as u32;
        self.reftable = new_table;
        for k in 0..b {
            self.rb_offsets.insert((blocks_start + k) << self.cb);
        }
        self.zero_tail = self.zero_tail.max(end);
        // The old table is no longer referenced by the header.
        for c in 0..old_clusters {
            let cl = (old_off >> self.cb) + c;
            self.adjust(f, cl, -1)?;
            self.free_hint = self.free_hint.min(cl);
        }
        Ok(())
    }
}

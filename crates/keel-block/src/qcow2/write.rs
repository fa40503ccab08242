//! Mapping guest ranges for writing (allocation, copy on write), compressed
//! writes, and discard / write-zeroes at cluster granularity.

use super::meta::{self, classify, compressed_range, L2State, Meta, COPIED, OFFSET_MASK, ZERO};
use super::{compress, Qcow2};
use crate::backend::{check_range, BlockBackend};
use crate::error::{Corruption, Error, InvalidArgument, Result, Unsupported};
use crate::iov::Iov;
use crate::mapping::{push_extent, Extent, ExtentKind, Mapping};
#[cfg(feature = "io_uring")]
use crate::{
    aio::{CopyLink, CopyWrite, WriteMap},
    backend::{FileExtent, FileRead, FileSource},
    buf::AlignedBuf,
};
use std::sync::{MutexGuard, PoisonError};

/// How far ahead of an allocating write the file is extended (zero-range fallocate, so
/// O_DIRECT writers do not serialise on extending the file). Each later small write into
/// the range converts part of an unwritten extent, which costs more the larger the range:
/// on ext4 with 4 KiB allocating writes, 1 MiB made depth 1 about 1.9x slower than 64 KiB,
/// 64 KiB made depth 32 about 1.4x slower than 1 MiB, and 256 KiB matched the better of
/// the two at both depths (`scripts/bench-block`, qcow2 "alloc" rows).
const PREALLOC_BYTES: u64 = 256 << 10;

/// How far ahead of an asynchronous copy on write the file is extended.
#[cfg(feature = "io_uring")]
const COPY_PREALLOC_BYTES: u64 = 2 << 20;

impl<F: BlockBackend> Qcow2<F> {
    /// Maps a guest range for writing, allocating as needed: the body of
    /// [`MapExtents::map_write`](crate::mapping::MapExtents::map_write), documented there.
    pub(super) fn map_write_inner(&self, offset: u64, len: u64) -> Result<Mapping> {
        Ok(self.map_write_with(offset, len, None)?.0)
    }

    /// [`Qcow2::map_write_inner`], given the data when the caller has it: a cluster
    /// copied on write (from the backing image, a compressed cluster or a snapshot's)
    /// then gets the new bytes merged into the copy, so that the copy and the data land
    /// in one write before the L2 entry links the cluster. Also returns the ranges
    /// (relative to `offset`, in order) whose data is thus written already.
    pub(super) fn map_write_with(
        &self,
        offset: u64,
        len: u64,
        data: Option<&Iov<&[u8]>>,
    ) -> Result<(Mapping, Vec<(u64, u64)>)> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let m = self.meta();
        let mut m = self.wait_copies(m, offset, len);
        self.map_write_locked(&mut m, offset, len, data)
    }

    /// Waits, releasing the metadata lock meanwhile, until no guest cluster of
    /// `[offset, offset + len)` has a copy on write in flight: their L2 entries change
    /// only once the copy is linked. Callers must not have such copies in flight
    /// themselves ([`UringQueue`](crate::aio::UringQueue) completes its own first).
    pub(super) fn wait_copies<'a>(
        &self,
        mut m: MutexGuard<'a, Meta>,
        offset: u64,
        len: u64,
    ) -> MutexGuard<'a, Meta> {
        while m.copying_in(offset, len) {
            let done = m.copy_done.clone();
            m = done.wait(m).unwrap_or_else(PoisonError::into_inner);
        }
        m
    }

    /// [`Qcow2::wait_copies`] from outside the lock.
    #[cfg(feature = "io_uring")]
    pub(crate) fn wait_until_copied(&self, offset: u64, len: u64) {
        drop(self.wait_copies(self.meta(), offset, len));
    }

    /// The body of [`Qcow2::map_write_with`], under the metadata lock, with no copy in
    /// flight in the range.
    fn map_write_locked(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
        data: Option<&Iov<&[u8]>>,
    ) -> Result<(Mapping, Vec<(u64, u64)>)> {
        let f: &dyn BlockBackend = &self.file;
        m.before_modify(f)?;
        let cs = 1u64 << self.cb;
        let mut out: Vec<Extent> = Vec::new();
        let mut written = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            let new = data.map(|d| d.sub((pos - offset) as usize, n as usize));
            let (host, done) = self.map_write_cluster(m, f, pos, n, new.as_ref())?;
            if done {
                written.push((pos - offset, n));
            }
            push_extent(&mut out, n, ExtentKind::Data(host + in_off));
            pos += n;
        }
        Ok((Mapping::pinned(out, &m.inflight, self.cb), written))
    }

    #[cfg(feature = "io_uring")]
    /// For [`UringQueue`](crate::aio::UringQueue): maps a write of `[offset, offset +
    /// len)`, never waiting. A write inside one cluster that has to copy the rest of the
    /// cluster from the backing image becomes a [`CopyWrite`]: the host cluster is
    /// allocated (and pinned) but not linked, the cluster's old contents are read into a
    /// buffer aligned to `align`, and the engine merges the data in, writes the cluster
    /// and calls [`Qcow2::finish_copy`], which links it. The copy and the data thus land
    /// in one write, asynchronously, before the L2 entry links the cluster (as QEMU
    /// does), and a read meanwhile sees the backing data. A write to a cluster whose copy
    /// is in flight is [`WriteMap::Busy`]; every other write is mapped as
    /// [`MapExtents::map_write`](crate::mapping::MapExtents::map_write) maps it.
    pub(crate) fn map_write_or_copy(
        &self,
        offset: u64,
        len: u64,
        align: usize,
    ) -> Result<WriteMap> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        if m.copying_in(offset, len) {
            return Ok(WriteMap::Busy);
        }
        let cs = 1u64 << self.cb;
        let in_off = offset & (cs - 1);
        // A partial write inside one cluster.
        let copy = self.backing.is_some() && !m.ext && len > 0 && len < cs && in_off + len <= cs;
        if copy && self.unallocated_for_copy(&mut m, f, offset)? {
            m.before_modify(f)?;
            let (host, _) = m.alloc(f, 1)?;
            if let Some(what) = m.overlap(host, cs) {
                return Err(m.corrupt(
                    f,
                    Corruption::DataOverlap {
                        offset: host,
                        metadata: what,
                    },
                ));
            }
            if host + cs > m.prealloc_end {
                // Extend the file ahead of the copies (fallocate), so that their writes
                // do not each extend it, which serialises O_DIRECT writers.
                let len = cs.max(COPY_PREALLOC_BYTES);
                f.write_zeroes(host, len, false)?;
                m.prealloc_end = host + len;
            }
            let pin = Mapping::pinned(
                vec![Extent {
                    len: cs,
                    kind: ExtentKind::Data(host),
                }],
                &m.inflight,
                self.cb,
            );
            let guest = offset >> self.cb;
            m.copying.insert(guest, host);
            drop(m);
            let link = CopyLink { guest, host, pin };
            let align = align.max(1);
            let mut block = AlignedBuf::new(cs as usize, align);
            let data = (in_off, in_off + len);
            // The engine reads the old contents itself where the backing image says
            // where they are, aligned; else they are read here.
            let old = match self.copy_sources(guest << self.cb, data, align as u64) {
                Ok(Some(old)) => Ok(Some(old)),
                Ok(None) => self
                    .backing_bytes(block.as_mut_slice(), guest << self.cb)
                    .map(|()| None),
                Err(e) => Err(e),
            };
            let old = match old {
                Ok(old) => old,
                Err(e) => {
                    // Frees the cluster; the read's error is the one to report.
                    let _ = self.finish_copy(link, false);
                    return Err(e);
                }
            };
            return Ok(WriteMap::Copy(CopyWrite {
                host,
                block,
                at: in_off as usize,
                old,
                link,
            }));
        }
        Ok(WriteMap::Direct(
            self.map_write_locked(&mut m, offset, len, None)?.0,
        ))
    }

    #[cfg(feature = "io_uring")]
    /// Where the backing image's data for the cluster at guest offset `base` lies in
    /// files, if it does and every piece of it outside `data` (a range of the cluster)
    /// meets its file's alignment, which divides `align` (the block's).
    fn copy_sources(&self, base: u64, data: (u64, u64), align: u64) -> Result<Option<FileRead>> {
        let Some(b) = &self.backing else {
            return Ok(None);
        };
        let cs = 1u64 << self.cb;
        let avail = b.size().saturating_sub(base).min(cs);
        let mut r = if avail > 0 {
            match b.map_file_read(base, avail)? {
                Some(r) => r,
                None => return Ok(None),
            }
        } else {
            FileRead::default()
        };
        if avail < cs {
            r.extents.push(FileExtent {
                len: cs - avail,
                source: FileSource::Zero,
            });
        }
        let mut p = 0u64;
        for e in &r.extents {
            if let FileSource::File {
                offset, align: a, ..
            } = e.source
            {
                let a = a.max(1);
                let cuts_aligned = [p, p + e.len, data.0, data.1].iter().all(|&x| x % a == 0);
                if align % a != 0 || offset % a != 0 || !cuts_aligned {
                    return Ok(None);
                }
            }
            p += e.len;
        }
        Ok(Some(r))
    }

    #[cfg(feature = "io_uring")]
    /// Whether the cluster of `guest` is unallocated in this image (without allocating
    /// an L2 table to look).
    fn unallocated_for_copy(&self, m: &mut Meta, f: &dyn BlockBackend, guest: u64) -> Result<bool> {
        Ok(match m.l2_for_read(f, guest)? {
            None => true,
            Some(slot) => m.l2_entry(f, slot, guest)?.3 == L2State::Unallocated,
        })
    }

    #[cfg(feature = "io_uring")]
    /// Ends a copy [`Qcow2::map_write_or_copy`] began, once its write completed
    /// (`written`) or failed: links the cluster, or frees it, and lets the requests
    /// waiting for the guest cluster go on.
    pub(crate) fn finish_copy(&self, link: CopyLink, written: bool) -> Result<()> {
        let f: &dyn BlockBackend = &self.file;
        let CopyLink { guest, host, pin } = link;
        let mut m = self.meta();
        m.copying.remove(&guest);
        m.copy_done.notify_all();
        if !written {
            m.release(f, host)?;
            return Ok(());
        }
        let pos = guest << self.cb;
        let entry = m
            .l2_for_write(f, pos)
            .and_then(|slot| Ok((slot, m.l2_entry(f, slot, pos)?)));
        let (slot, (l2i, e, _, st)) = match entry {
            Ok(x) => x,
            Err(e) => {
                m.release(f, host)?;
                return Err(e);
            }
        };
        m.set_l2(slot, l2i, host | COPIED);
        // Every change to the entry waits for the copy, so it is still unallocated;
        // were it not, this write replaced it.
        if st != L2State::Unallocated && (e & OFFSET_MASK != 0 || st == L2State::Compressed) {
            m.release_entry(f, e)?;
        }
        drop(m);
        drop(pin);
        self.after_change()
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
                Corruption::DataOverlap {
                    offset: new,
                    metadata: what,
                },
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

    /// Maps the write of `[pos, pos + n)` (inside one cluster) to the host cluster that
    /// takes it, allocating it (and copying the cluster's old contents) as needed. With
    /// `new`, the range's bytes, a copy gets them merged in; the flag says so.
    fn map_write_cluster(
        &self,
        m: &mut Meta,
        f: &dyn BlockBackend,
        pos: u64,
        n: u64,
        new: Option<&Iov<&[u8]>>,
    ) -> Result<(u64, bool)> {
        let cs = 1u64 << self.cb;
        let partial = n < cs;
        let slot = m.l2_for_write(f, pos)?;
        let (l2i, e, bitmap, st) = m.l2_entry(f, slot, pos)?;
        if m.ext {
            return self
                .map_write_subclusters(m, f, slot, l2i, st, e, bitmap, pos, n)
                .map(|h| (h, false));
        }
        // Puts the new bytes over the old contents of the cluster in `buf`.
        let merged = |buf: &mut [u8]| match new {
            Some(d) => {
                let at = (pos & (cs - 1)) as usize;
                d.copy_to_slice(0, &mut buf[at..at + n as usize]);
                true
            }
            None => false,
        };
        let check = |m: &mut Meta, host: u64| -> Result<()> {
            match m.overlap(host, cs) {
                Some(what) => Err(m.corrupt(
                    f,
                    Corruption::DataOverlap {
                        offset: host,
                        metadata: what,
                    },
                )),
                None => Ok(()),
            }
        };
        match st {
            L2State::Normal(h) if e & COPIED != 0 => {
                check(m, h)?;
                Ok((h, false))
            }
            L2State::Normal(h) => {
                check(m, h)?;
                match m.refcount(f, h >> self.cb)? {
                    0 => Err(m.corrupt(f, Corruption::DataRefcountZero { offset: h })),
                    // Sole owner now. Unless a transfer is in flight: it may
                    // be a read through a former sharer, which must not see
                    // this offset's new data, so copy as if still shared.
                    1 if !m.inflight.is_pinned(h >> self.cb) => {
                        m.set_l2(slot, l2i, h | COPIED);
                        Ok((h, false))
                    }
                    _ => {
                        // Shared cluster (a snapshot's): copy on write.
                        let mut buf = vec![0u8; cs as usize];
                        f.read_at(&mut buf, h)?;
                        let done = merged(&mut buf);
                        let new = self.alloc_filled(m, f, Some(&buf), partial)?;
                        m.set_l2(slot, l2i, new | COPIED);
                        m.release(f, h)?;
                        Ok((new, done))
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
                Ok((h, false))
            }
            L2State::Zero(_) => {
                let new = self.alloc_filled(m, f, None, partial)?;
                m.set_l2(slot, l2i, new | COPIED);
                if let L2State::Zero(Some(h)) = st {
                    m.release(f, h)?;
                }
                Ok((new, false))
            }
            L2State::Unallocated => {
                // Copy on write from the backing image when only part of
                // the cluster is written.
                let mut done = false;
                let old = match (&self.backing, partial) {
                    (Some(_), true) => {
                        let mut buf = vec![0u8; cs as usize];
                        self.backing_bytes(&mut buf, pos & !(cs - 1))?;
                        done = merged(&mut buf);
                        Some(buf)
                    }
                    _ => None,
                };
                let new = self.alloc_filled(m, f, old.as_deref(), partial)?;
                m.set_l2(slot, l2i, new | COPIED);
                Ok((new, done))
            }
            L2State::Compressed => {
                // Read-modify-write: decompress before allocating, so that a
                // damaged cluster fails the write without leaking.
                let mut done = false;
                let old = if partial {
                    let mut buf = self.read_compressed_now(m, f, e, pos)?;
                    done = merged(&mut buf);
                    Some(buf)
                } else {
                    None
                };
                let new = self.alloc_filled(m, f, old.as_deref(), partial)?;
                m.set_l2(slot, l2i, new | COPIED);
                m.release_entry(f, e)?;
                Ok((new, done))
            }
        }
    }

    /// Decompresses the cluster of compressed L2 entry `e`, under the
    /// metadata lock (so its host range cannot be freed meanwhile).
    fn read_compressed_now(
        &self,
        m: &mut Meta,
        f: &dyn BlockBackend,
        e: u64,
        guest: u64,
    ) -> Result<Vec<u8>> {
        let cs = 1u64 << self.cb;
        let (s, ce) = compressed_range(e, self.cb);
        let fsize = f.size();
        if s < cs || s >= fsize {
            return Err(m.corrupt(f, Corruption::CompressedOutsideFile { host: s, guest }));
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
        // A data cluster the image names must not be metadata: writing there (the
        // guest's data, or zeroes for newly allocated subclusters) would hand the
        // image's own tables to the writer.
        let check = |m: &mut Meta, h: u64| match m.overlap(h, cs) {
            Some(what) => Err(m.corrupt(
                f,
                Corruption::DataOverlap {
                    offset: h,
                    metadata: what,
                },
            )),
            None => Ok(()),
        };
        // A host cluster this entry owns alone, with its subclusters' old
        // contents in place.
        let host = match st {
            L2State::Normal(h) if e & COPIED != 0 => {
                check(m, h)?;
                h
            }
            L2State::Normal(h) => match m.refcount(f, h >> self.cb)? {
                0 => return Err(m.corrupt(f, Corruption::DataRefcountZero { offset: h })),
                1 if !m.inflight.is_pinned(h >> self.cb) => {
                    check(m, h)?;
                    h
                }
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
                let old = self.read_compressed_now(m, f, e, pos)?;
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
            return Err(Error::InvalidArgument(InvalidArgument::CompressedWrite {
                offset,
                len,
            }));
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
        let m = self.meta();
        let mut m = self.wait_copies(m, offset, cs);
        m.before_modify(f)?;
        let slot = m.l2_for_write(f, offset)?;
        let (_, l2i) = m.split(offset);
        let old = m.l2_get(slot, l2i);
        let old_bitmap = m.l2_bitmap(slot, l2i);
        if let Err(problem) = classify(old, m.hdr.version, self.cb, m.ext, old_bitmap) {
            return Err(m.corrupt(
                f,
                Corruption::L2Entry {
                    guest: offset,
                    problem,
                },
            ));
        }
        let host = m.alloc_bytes(f, c.len() as u64)?;
        let x = 62 - (self.cb - 8);
        if host + c.len() as u64 > 1 << x {
            return Err(Error::Unsupported(Unsupported::CompressedOffset { host }));
        }
        if let Some(what) = m.overlap(host, c.len() as u64) {
            return Err(m.corrupt(
                f,
                Corruption::CompressedOverlap {
                    offset: host,
                    metadata: what,
                },
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
    pub(super) fn change_clusters(
        &self,
        offset: u64,
        len: u64,
        zero: bool,
        unmap: bool,
    ) -> Result<()> {
        let f: &dyn BlockBackend = &self.file;
        let m = self.meta();
        let mut m = self.wait_copies(m, offset, len);
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
            let (l2i, e, bitmap, st) = m.l2_entry(f, slot, pos)?;
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

    pub(super) fn after_change(&self) -> Result<()> {
        if self.write_through {
            self.flush()?;
        }
        Ok(())
    }
}

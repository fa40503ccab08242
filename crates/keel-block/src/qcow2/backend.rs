//! The traits [`Qcow2`] implements for its users: [`MapExtents`] (the read
//! and write mappings) and [`BlockBackend`] (guest I/O over them).

use std::io::{IoSlice, IoSliceMut};

use super::Qcow2;
use crate::backend::{check_range, BlockBackend, FileRead, Limits, WriteFlags};
use crate::error::{Error, Result};
use crate::iov::Iov;
use crate::mapping::{ExtentKind, MapExtents, Mapping};

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
        let mut bufs = Iov::from_io_slices_mut(bufs);
        let len = bufs.len() as u64;
        // Pinned until the reads below are done.
        let (map, gen) = self.map_read_inner(offset, len, true)?;
        let cs = 1u64 << self.cb;
        let mut pos = 0;
        for e in map.extents() {
            match e.kind {
                ExtentKind::Data(h) => {
                    let mut sub = bufs.reborrow().slice(pos as usize, e.len as usize);
                    self.file.read_vectored_at(&mut sub.io_slices_mut(), h)?;
                }
                ExtentKind::Zero | ExtentKind::Unallocated => {
                    bufs.fill_zero(pos as usize, e.len as usize)
                }
                ExtentKind::Backing => self.read_backing(&mut bufs, pos, e.len, offset + pos)?,
                ExtentKind::Compressed { host, len } => {
                    let data = self.decompressed(host, len, gen)?;
                    let skip = ((offset + pos) & (cs - 1)) as usize;
                    bufs.copy_from_slice(pos as usize, &data[skip..skip + e.len as usize]);
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
        let bufs = Iov::from_io_slices(bufs);
        let len = bufs.len() as u64;
        if len == 0 {
            return if self.read_only {
                Err(Error::ReadOnly)
            } else {
                Ok(())
            };
        }
        // Pinned until the writes below are done. Clusters copied on write come back
        // with their part of the data written already.
        let (map, written) = self.map_write_with(offset, len, Some(&bufs))?;
        let mut written = written.into_iter().peekable();
        let mut pos = 0;
        for e in map.extents() {
            if let ExtentKind::Data(h) = e.kind {
                // The parts of the extent not written with a copy.
                let end = pos + e.len;
                let mut at = pos;
                while at < end {
                    let upto = match written.peek() {
                        Some(&(w, k)) if w < end => {
                            if w <= at {
                                at = w + k;
                                written.next();
                                continue;
                            }
                            w
                        }
                        _ => end,
                    };
                    let sub = bufs.sub(at as usize, (upto - at) as usize);
                    self.file.write_vectored_at(
                        &sub.io_slices(),
                        h + (at - pos),
                        WriteFlags::NONE,
                    )?;
                    at = upto;
                }
            }
            pos += e.len;
        }
        drop(map);
        if flags.fua {
            self.flush()?;
        }
        self.after_change()
    }

    fn map_file_read(&self, offset: u64, len: u64) -> Result<Option<FileRead>> {
        self.map_file_read_inner(offset, len)
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

impl<F: BlockBackend> MapExtents for Qcow2<F> {
    /// Maps a guest range for reading. The host clusters of the data and
    /// compressed extents are pinned (never reallocated) until the returned
    /// [`Mapping`] is dropped: keep it until the reads from them have
    /// completed. [`ExtentKind::Backing`] and [`ExtentKind::Compressed`]
    /// extents cannot be read from the file directly; [`BlockBackend::read_vectored_at`]
    /// serves them.
    fn map_read(&self, offset: u64, len: u64) -> Result<Mapping> {
        Ok(self.map_read_inner(offset, len, true)?.0)
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
    fn map_write(&self, offset: u64, len: u64) -> Result<Mapping> {
        self.map_write_inner(offset, len)
    }
}

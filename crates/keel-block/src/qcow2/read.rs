//! Mapping guest ranges for reading, and reading what the file alone cannot
//! serve (compressed clusters, the backing image).

use std::sync::Arc;

use super::meta::{compressed_range, L2State, OFFSET_MASK};
use super::{compress, DecompressedCluster, Qcow2};
use crate::backend::{check_range, BlockBackend, FileExtent, FileRead, FileSource};
use crate::error::{Corruption, Error, Result, Unsupported};
use crate::iov::Iov;
use crate::mapping::{push_extent, Extent, ExtentKind, Mapping};

/// How this image alone stores a guest range (its backing file not consulted), as
/// `qemu-img map` reports it per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Not allocated here: reads from the backing file, or as zeroes without one.
    /// `host` is where the range would be stored when its cluster is allocated but
    /// not this subcluster (extended L2 entries).
    Unallocated {
        /// Host offset of the range in its allocated cluster.
        host: Option<u64>,
    },
    /// Reads as zeroes; `host` is the preallocated host cluster an allocated zero
    /// cluster keeps.
    Zero {
        /// Host offset of the range in a preallocated zero cluster.
        host: Option<u64>,
    },
    /// Data at this host offset.
    Data(u64),
    /// Compressed data.
    Compressed,
}

/// The state of one subcluster in an extended L2 entry's bitmap.
#[derive(Clone, Copy)]
enum Subcluster {
    Data,
    Zero,
    Unallocated,
}

/// The subcluster runs of `[from, to)` within a cluster of `cs` bytes whose
/// extended L2 bitmap is `bitmap`: (offset in the cluster, length, state).
fn subclusters(
    bitmap: u64,
    cs: u64,
    from: u64,
    to: u64,
) -> impl Iterator<Item = (u64, u64, Subcluster)> {
    let sc = cs / 32;
    let mut p = from;
    std::iter::from_fn(move || {
        if p >= to {
            return None;
        }
        let i = p / sc;
        let k = ((i + 1) * sc).min(to) - p;
        let sub = if bitmap & (1 << i) != 0 {
            Subcluster::Data
        } else if bitmap & (1 << (32 + i)) != 0 {
            Subcluster::Zero
        } else {
            Subcluster::Unallocated
        };
        let run = (p, k, sub);
        p += k;
        Some(run)
    })
}

impl<F: BlockBackend> Qcow2<F> {
    /// How this image alone stores `[offset, offset + len)`: runs of one
    /// [`Allocation`] in guest order (data runs merged when their host offsets
    /// are contiguous), never consulting the backing file.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::qcow2::{self, Allocation, CreateOptions, Qcow2, Qcow2Options};
    /// use keel_block::{BlockBackend, MemBackend};
    ///
    /// let file = MemBackend::new(Vec::new());
    /// qcow2::create(&file, &CreateOptions { size: 1 << 20, ..Default::default() })?;
    /// let img = Qcow2::open(file, Qcow2Options::default())?;
    /// img.write_at(&[1; 4096], 65536)?;
    /// let runs = img.allocation(0, 1 << 20)?;
    /// assert_eq!(runs[0], (65536, Allocation::Unallocated { host: None }));
    /// assert!(matches!(runs[1], (65536, Allocation::Data(_))));
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, Allocation)>> {
        check_range(offset, len, self.size)?;
        let f: &dyn BlockBackend = &self.file;
        let mut m = self.meta();
        let cs = 1u64 << self.cb;
        let mut out: Vec<(u64, Allocation)> = Vec::new();
        let mut push = |n: u64, a: Allocation| {
            if let Some((ln, la)) = out.last_mut() {
                let merge = match (*la, a) {
                    (Allocation::Data(h), Allocation::Data(k)) => h + *ln == k,
                    (Allocation::Zero { host: Some(h) }, Allocation::Zero { host: Some(k) })
                    | (
                        Allocation::Unallocated { host: Some(h) },
                        Allocation::Unallocated { host: Some(k) },
                    ) => h + *ln == k,
                    (x, y) => x == y,
                };
                if merge {
                    *ln += n;
                    return;
                }
            }
            out.push((n, a));
        };
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            let Some(slot) = m.l2_for_read(f, pos)? else {
                push(n, Allocation::Unallocated { host: None });
                pos += n;
                continue;
            };
            let (_, e, bitmap, st) = m.l2_entry(f, slot, pos)?;
            match st {
                L2State::Unallocated if !m.ext => push(n, Allocation::Unallocated { host: None }),
                L2State::Zero(h) => push(
                    n,
                    Allocation::Zero {
                        host: h.map(|h| h + in_off),
                    },
                ),
                L2State::Normal(h) if !m.ext => push(n, Allocation::Data(h + in_off)),
                L2State::Unallocated | L2State::Normal(_) => {
                    let h = e & OFFSET_MASK;
                    let host = |p: u64| (h != 0).then_some(h + p);
                    for (p, k, sub) in subclusters(bitmap, cs, in_off, in_off + n) {
                        let a = match sub {
                            Subcluster::Data => Allocation::Data(h + p),
                            Subcluster::Zero => Allocation::Zero { host: host(p) },
                            Subcluster::Unallocated => Allocation::Unallocated { host: host(p) },
                        };
                        push(k, a);
                    }
                }
                L2State::Compressed => push(n, Allocation::Compressed),
            }
            pos += n;
        }
        Ok(out)
    }

    pub(super) fn map_read_extents(&self, offset: u64, len: u64, pin: bool) -> Result<Mapping> {
        Ok(self.map_read_inner(offset, len, pin)?.0)
    }

    /// The kind of a range this image does not allocate.
    fn unallocated(&self) -> Result<ExtentKind> {
        match (&self.backing, &self.backing_name) {
            (Some(_), _) => Ok(ExtentKind::Backing),
            (None, None) => Ok(ExtentKind::Unallocated),
            (None, Some(name)) => Err(Error::Unsupported(Unsupported::UnopenedBacking {
                name: name.clone(),
            })),
        }
    }

    /// Maps a guest range; also returns the compressed-cluster generation
    /// at mapping time (for the decompressed-cluster cache).
    pub(super) fn map_read_inner(
        &self,
        offset: u64,
        len: u64,
        pin: bool,
    ) -> Result<(Mapping, u64)> {
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
            let (_, e, bitmap, st) = m.l2_entry(f, slot, pos)?;
            match st {
                L2State::Unallocated if !m.ext => push_extent(&mut out, n, self.unallocated()?),
                L2State::Zero(_) => push_extent(&mut out, n, ExtentKind::Zero),
                L2State::Normal(h) if !m.ext => {
                    push_extent(&mut out, n, ExtentKind::Data(h + in_off))
                }
                L2State::Unallocated | L2State::Normal(_) => {
                    // Extended L2: status per subcluster.
                    let h = e & OFFSET_MASK;
                    for (p, k, sub) in subclusters(bitmap, cs, in_off, in_off + n) {
                        let kind = match sub {
                            Subcluster::Data => ExtentKind::Data(h + p),
                            Subcluster::Zero => ExtentKind::Zero,
                            Subcluster::Unallocated => self.unallocated()?,
                        };
                        push_extent(&mut out, k, kind);
                    }
                }
                L2State::Compressed => {
                    let (s, ce) = compressed_range(e, self.cb);
                    let fsize = f.size();
                    if s < cs || s >= fsize {
                        return Err(m.corrupt(
                            f,
                            Corruption::CompressedOutsideFile {
                                host: s,
                                guest: pos,
                            },
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
    pub(super) fn decompressed(&self, host: u64, len: u64, gen: u64) -> Result<Arc<Vec<u8>>> {
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
    pub(super) fn read_backing(
        &self,
        bufs: &mut Iov<&mut [u8]>,
        skip: u64,
        len: u64,
        guest: u64,
    ) -> Result<()> {
        let Some(b) = &self.backing else {
            bufs.fill_zero(skip as usize, len as usize);
            return Ok(());
        };
        let avail = b.size().saturating_sub(guest).min(len);
        if avail > 0 {
            let mut sub = bufs.reborrow().slice(skip as usize, avail as usize);
            b.read_vectored_at(&mut sub.io_slices_mut(), guest)?;
        }
        if avail < len {
            bufs.fill_zero((skip + avail) as usize, (len - avail) as usize);
        }
        Ok(())
    }

    /// The current contents of guest range `[guest, guest + buf.len())`,
    /// which lies in one cluster, as seen through the backing image (zeroes
    /// without one).
    pub(super) fn backing_bytes(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let n = buf.len() as u64;
        self.read_backing(&mut Iov::from(buf), 0, n, guest)
    }

    /// [`BlockBackend::map_file_read`]: the data extents through the file's, zeroes as
    /// zeroes, unallocated ranges through the backing image's (zeroes past its end);
    /// `None` if a part is compressed or a file or backing image cannot say.
    pub(super) fn map_file_read_inner(&self, offset: u64, len: u64) -> Result<Option<FileRead>> {
        let mapping = self.map_read_extents(offset, len, true)?;
        let mut out = FileRead::default();
        let mut pos = offset;
        for e in mapping.extents() {
            let sub = match e.kind {
                ExtentKind::Data(h) => self.file.map_file_read(h, e.len)?,
                ExtentKind::Zero | ExtentKind::Unallocated => Some(FileRead {
                    extents: vec![FileExtent {
                        len: e.len,
                        source: FileSource::Zero,
                    }],
                    pins: Vec::new(),
                }),
                ExtentKind::Backing => match &self.backing {
                    Some(b) => {
                        let avail = b.size().saturating_sub(pos).min(e.len);
                        let mut r = if avail > 0 {
                            b.map_file_read(pos, avail)?
                        } else {
                            Some(FileRead::default())
                        };
                        if let Some(r) = &mut r {
                            if avail < e.len {
                                r.extents.push(FileExtent {
                                    len: e.len - avail,
                                    source: FileSource::Zero,
                                });
                            }
                        }
                        r
                    }
                    None => None,
                },
                ExtentKind::Compressed { .. } => None,
            };
            let Some(sub) = sub else {
                return Ok(None);
            };
            out.extents.extend(sub.extents);
            out.pins.extend(sub.pins);
            pos += e.len;
        }
        out.pins.push(mapping);
        Ok(Some(out))
    }

    /// Whether `[pos, pos + n)` reads as zeroes without looking at data.
    pub(super) fn reads_zero(&self, pos: u64, n: u64) -> Result<bool> {
        Ok(self
            .map_read_extents(pos, n, false)?
            .extents()
            .iter()
            .all(|e| matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated)))
    }
}

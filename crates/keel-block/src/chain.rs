//! A backing chain opened layer by layer, and the block status of guest ranges in it:
//! which layer serves each range and how (data, zeroes, compressed, at which host
//! offset), as `qemu-img map` reports it.
//!
//! [`Chain::open`] opens an image and every backing file under it, each on its own and
//! read-only, after checking the whole chain under the backing policy of
//! [`crate::qcow2::backing`]. [`Chain::block_status`] walks a guest range: for each
//! run it asks the top layer, then the layers under it while the range is not
//! allocated, like QEMU's block layer. Data ranges are also looked up in the file
//! holding them (`SEEK_DATA`/`SEEK_HOLE`): a hole there reads as zeroes.

use std::path::{Path, PathBuf};

use crate::backend::{check_range, BlockBackend};
use crate::error::{Error, Result};
use crate::image::{Format, Image, ImageOptions};
use crate::qcow2::{self, backing, Allocation, ImageInfo, Qcow2, Qcow2Options};
use crate::raw::{RawFile, RawOptions};

/// A file's identity, its device and inode (the same file however it is named); `None`
/// if it cannot be looked up (it does not exist).
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// One image of a chain, opened alone (read-only, its backing file not attached).
pub struct Layer {
    path: PathBuf,
    image: LayerImage,
    /// Whether data ranges are also looked up in the file (see [`recurses`]).
    recurse: bool,
}

enum LayerImage {
    Raw(RawFile),
    Qcow2(Box<Qcow2<RawFile>>),
}

impl Layer {
    /// Its path: the name given to [`Chain::open`] for the top layer, the backing
    /// name resolved against the directory of the image naming it for the others.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> Format {
        match self.image {
            LayerImage::Raw(_) => Format::Raw,
            LayerImage::Qcow2(_) => Format::Qcow2,
        }
    }

    /// Its virtual size as QEMU sees it: a raw file's size is rounded up to whole
    /// 512-byte sectors.
    pub fn size(&self) -> u64 {
        match &self.image {
            LayerImage::Raw(r) => r.size().div_ceil(512) * 512,
            LayerImage::Qcow2(q) => q.size(),
        }
    }

    /// The qcow2 header summary (`None` for raw).
    pub fn qcow2_info(&self) -> Option<ImageInfo> {
        match &self.image {
            LayerImage::Raw(_) => None,
            LayerImage::Qcow2(q) => Some(q.info()),
        }
    }

    /// The qcow2 header (`None` for raw).
    pub fn qcow2_header(&self) -> Option<qcow2::Header> {
        match &self.image {
            LayerImage::Raw(_) => None,
            LayerImage::Qcow2(q) => Some(q.header()),
        }
    }

    /// The file holding the layer's data (the image file itself).
    pub fn file(&self) -> &RawFile {
        match &self.image {
            LayerImage::Raw(r) => r,
            LayerImage::Qcow2(q) => q.file(),
        }
    }

    /// The layer's own contents, its backing file not consulted (unallocated qcow2
    /// ranges read as zeroes).
    pub fn backend(&self) -> &dyn BlockBackend {
        match &self.image {
            LayerImage::Raw(r) => r,
            LayerImage::Qcow2(q) => &**q,
        }
    }
}

/// An image and its backing files, top first.
pub struct Chain {
    layers: Vec<Layer>,
    image: Image,
}

/// The block status of a guest range: where in the chain it is served from and how,
/// with the fields of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer that answered (0: the top image). For a range no layer
    /// allocates, the bottom layer, or the first layer past whose backing file's end
    /// it lies.
    pub depth: usize,
    /// Allocated in the layer at `depth` (data, or zeroes it stores).
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Stored as data (possibly in a hole of the file, then also `zero`).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Offset in the layer's file, when the range is stored there as it is.
    pub offset: Option<u64>,
}

/// What one layer says about the start of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Flags {
    allocated: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    offset: Option<u64>,
}

/// Allocation runs of one qcow2 layer, fetched a window at a time.
#[derive(Default)]
struct Window {
    start: u64,
    runs: Vec<(u64, Allocation)>,
}

/// Largest guest window whose qcow2 allocation is fetched at once.
const WINDOW: u64 = 1 << 30;

impl Chain {
    /// Opens the image at `path` in `format` and its backing chain, read-only, under
    /// `opts`' backing policy (the chain is first opened whole, so a chain that
    /// [`Image::open`] refuses is refused here with the same error).
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::chain::Chain;
    /// use keel_block::qcow2::{self, CreateOptions};
    /// use keel_block::{Format, Qcow2Options, RawFile, RawOptions};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let base = dir.path().join("base.raw");
    /// RawFile::create(&base, 1 << 20)?;
    /// let top = dir.path().join("top.qcow2");
    /// RawFile::create(&top, 0)?;
    /// let f = RawFile::open(&top, RawOptions { growable: true, ..Default::default() })?;
    /// let opts = CreateOptions {
    ///     size: 1 << 20,
    ///     backing_file: Some("base.raw".into()),
    ///     backing_format: Some(Format::Raw),
    ///     ..Default::default()
    /// };
    /// qcow2::create(&f, &opts)?;
    /// drop(f);
    ///
    /// let chain = Chain::open(&top, Format::Qcow2, Qcow2Options::default())?;
    /// assert_eq!(chain.layers().len(), 2);
    /// assert_eq!(chain.layers()[1].path(), base);
    /// // Nothing is allocated in the overlay: the raw file (a hole) answers.
    /// let st = chain.block_status(0, 1 << 20)?;
    /// assert_eq!((st[0].depth, st[0].zero, st[0].data), (1, true, false));
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    pub fn open(path: &Path, format: Format, opts: Qcow2Options) -> Result<Chain> {
        let ro = RawOptions {
            read_only: true,
            ..Default::default()
        };
        let whole = Image::open(
            path,
            format,
            ImageOptions {
                file: ro,
                qcow2: opts,
            },
        )?;
        let mut layers = Vec::new();
        let mut next = Some((path.to_path_buf(), format));
        while let Some((p, fmt)) = next.take() {
            let file = RawFile::open(&p, ro)?;
            let mut recurse = true;
            let image = match fmt {
                Format::Raw => LayerImage::Raw(file),
                Format::Qcow2 => {
                    let hdr = qcow2::read_header(&file)?;
                    if layers.len() <= backing::MAX_BACKING_DEPTH {
                        next = backing::backing_of(&p, &hdr, opts)?;
                    }
                    let q = Qcow2::open(
                        file,
                        Qcow2Options {
                            read_only: true,
                            ..opts
                        },
                    )?;
                    recurse = recurses(&p, &q)?;
                    LayerImage::Qcow2(Box::new(q))
                }
            };
            layers.push(Layer {
                path: p,
                image,
                recurse,
            });
        }
        Ok(Chain {
            layers,
            image: whole,
        })
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Whether `path` is one of the chain's files, however it is named (the same device
    /// and inode); false if it does not exist. A tool that writes `path` checks this
    /// first: writing the chain it reads from would destroy what it reads.
    pub fn contains_file(&self, path: &Path) -> bool {
        let Some(target) = file_id(path) else {
            return false;
        };
        self.layers.iter().any(|l| file_id(&l.path) == Some(target))
    }

    /// The whole image, opened read-only with its backing chain: reads through it see
    /// what a guest would.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The virtual size of the chain (its top image's).
    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    /// The block status of `[offset, offset + len)`, in guest order, adjacent ranges
    /// merged when they agree in every field and their offsets are contiguous (as
    /// `qemu-img map` merges them).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<BlockStatus>> {
        check_range(offset, len, self.size())?;
        let mut windows: Vec<Window> = self.layers.iter().map(|_| Window::default()).collect();
        let mut out: Vec<BlockStatus> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let mut n = end - pos;
            let mut depth = 0;
            let flags = loop {
                let (run, f) = self.layer_status(depth, &mut windows[depth], pos, n)?;
                n = run;
                if f.data || f.zero || depth + 1 == self.layers.len() {
                    break f;
                }
                depth += 1;
            };
            let st = BlockStatus {
                start: pos,
                length: n,
                depth,
                present: flags.allocated,
                zero: flags.zero,
                data: flags.data,
                compressed: flags.compressed,
                offset: flags.offset,
            };
            match out.last_mut() {
                Some(last) if mergeable(last, &st) => last.length += n,
                _ => out.push(st),
            }
            pos += n;
        }
        Ok(out)
    }

    /// What layer `d` says about `[pos, pos + n)`: the length of its first run (at
    /// most `n`) and its flags.
    fn layer_status(&self, d: usize, w: &mut Window, pos: u64, n: u64) -> Result<(u64, Flags)> {
        let layer = &self.layers[d];
        match &layer.image {
            LayerImage::Raw(r) => {
                let (run, data) = file_status(r, pos, n)?;
                Ok((
                    run,
                    Flags {
                        allocated: true,
                        zero: !data,
                        data,
                        offset: Some(pos),
                        ..Default::default()
                    },
                ))
            }
            LayerImage::Qcow2(q) => {
                let (run, a) = window_run(q, w, pos, n)?;
                Ok(match a {
                    Allocation::Data(h) => {
                        let (frun, data) = if layer.recurse {
                            file_status(q.file(), h, run)?
                        } else {
                            (run, true)
                        };
                        (
                            frun,
                            Flags {
                                allocated: true,
                                zero: !data,
                                data: true,
                                offset: Some(h),
                                ..Default::default()
                            },
                        )
                    }
                    Allocation::Zero { host } => (
                        run,
                        Flags {
                            allocated: true,
                            zero: true,
                            offset: host,
                            ..Default::default()
                        },
                    ),
                    Allocation::Compressed => (
                        run,
                        Flags {
                            allocated: true,
                            data: true,
                            compressed: true,
                            ..Default::default()
                        },
                    ),
                    Allocation::Unallocated { host } => {
                        // Zeroes without a backing file, and past the backing file's end.
                        let zero = match self.layers.get(d + 1) {
                            None => true,
                            Some(b) => pos >= b.size(),
                        };
                        (
                            run,
                            Flags {
                                zero,
                                offset: host,
                                ..Default::default()
                            },
                        )
                    }
                })
            }
        }
    }
}

/// The run of `q`'s allocation starting at `pos` (at most `n` bytes).
fn window_run(q: &Qcow2<RawFile>, w: &mut Window, pos: u64, n: u64) -> Result<(u64, Allocation)> {
    let covers = |w: &Window| {
        let end = w.start + w.runs.iter().map(|r| r.0).sum::<u64>();
        pos >= w.start && pos < end
    };
    if !covers(w) {
        let len = WINDOW.min(q.size() - pos);
        *w = Window {
            start: pos,
            runs: q.allocation(pos, len)?,
        };
    }
    let mut s = w.start;
    for &(len, a) in &w.runs {
        if pos < s + len {
            let skip = pos - s;
            let a = match a {
                Allocation::Data(h) => Allocation::Data(h + skip),
                Allocation::Zero { host } => Allocation::Zero {
                    host: host.map(|h| h + skip),
                },
                Allocation::Unallocated { host } => Allocation::Unallocated {
                    host: host.map(|h| h + skip),
                },
                a => a,
            };
            return Ok(((len - skip).min(n), a));
        }
        s += len;
    }
    unreachable!("the window covers pos")
}

/// Whether the file holds data at `pos` (else a hole, or past its end), and for how
/// many bytes (at most `n`), as `SEEK_DATA`/`SEEK_HOLE` tell.
fn file_status(f: &RawFile, pos: u64, n: u64) -> Result<(u64, bool)> {
    let fd = f.fd();
    let seek = |whence: i32| -> Result<Option<u64>> {
        // SAFETY: lseek on a descriptor the RawFile owns and keeps open for this call;
        // it only moves the file offset, which no RawFile I/O uses (they are
        // positioned reads and writes).
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(Error::io("looking for data in the image file (lseek)", e))
        }
    };
    match seek(libc::SEEK_DATA)? {
        // Past the last data: a trailing hole, or past the end.
        None => Ok((n, false)),
        Some(d) if d > pos => Ok(((d - pos).min(n), false)),
        Some(_) => {
            let hole = seek(libc::SEEK_HOLE)?.unwrap_or(u64::MAX);
            Ok(((hole.saturating_sub(pos)).clamp(1, n), true))
        }
    }
}

/// Whether the data ranges of a qcow2 image are also looked up in its file, as QEMU
/// does only for images that look metadata-preallocated: more host clusters with a
/// refcount than the file has clusters' worth of disk blocks (by a tenth, and two).
fn recurses(path: &Path, q: &Qcow2<RawFile>) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let f = q.file();
    let h = q.header();
    let cs = h.cluster_size();
    let blocks = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading the metadata of {}", path.display()), e))?
        .blocks();
    let real_clusters = (blocks * 512) / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = f.size().div_ceil(cs);
    let order = h.refcount_order;
    let per_block = (cs * 8) >> order;
    let rt_len = h.refcount_table_clusters as u64 * cs;
    let mut rt = vec![0u8; rt_len as usize];
    f.read_at(&mut rt, h.refcount_table_offset)?;
    let mut count = 0u64;
    let mut block = vec![0u8; cs as usize];
    for (i, e) in rt.chunks_exact(8).enumerate() {
        let first = i as u64 * per_block;
        if first >= end_cluster || count > threshold {
            break;
        }
        let off = u64::from_be_bytes(e.try_into().unwrap_or_default()) & !0x1ff;
        if off == 0 {
            continue;
        }
        f.read_at(&mut block, off)?;
        let n = per_block.min(end_cluster - first);
        count += (0..n as usize)
            .filter(|&k| qcow2::refcount::get(&block, k, order) != 0)
            .count() as u64;
    }
    Ok(count > threshold)
}

/// Whether `b` extends `a` in `qemu-img map`'s sense.
fn mergeable(a: &BlockStatus, b: &BlockStatus) -> bool {
    a.length > 0
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.depth == b.depth
        && a.present == b.present
        && match (a.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => x + a.length == y,
            _ => false,
        }
}

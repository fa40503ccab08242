//! A volume's life cycle, over image files at rest: [`resize`] (raw and
//! qcow2), [`commit`] an overlay into its backing chain, [`rebase`] an image
//! onto another backing file. These are the operations of `qemu-img resize`,
//! `commit` and `rebase`; the qcow2 metadata changes they make go through
//! [`crate::qcow2::edit`], whose switches a crash cannot tear.
//!
//! # Examples
//!
//! ```
//! use keel_block::volume::{self, Preallocation, ResizeOptions};
//! use keel_block::{Format, RawFile};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("disk.raw");
//! RawFile::create(&path, 1 << 20)?;
//! volume::resize(&path, Format::Raw, 4 << 20, &ResizeOptions::default())?;
//! assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
//! // Shrinking needs saying so, as `qemu-img resize --shrink`.
//! assert!(volume::resize(&path, Format::Raw, 1 << 20, &ResizeOptions::default()).is_err());
//! let shrink = ResizeOptions { shrink: true, preallocation: Preallocation::Off };
//! volume::resize(&path, Format::Raw, 1 << 20, &shrink)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::backend::BlockBackend;
use crate::chain::Chain;
use crate::error::Error;
use crate::image::{Format, Image, ImageOptions};
use crate::mapping::{ExtentKind, MapExtents};
use crate::qcow2::edit::{self, BackingFile, EditError};
use crate::qcow2::{self, backing, Qcow2, Qcow2Options};
use crate::raw::{RawFile, RawOptions};

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// Opening an image failed.
    #[error("opening {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: Error,
    },
    /// A shrink without [`ResizeOptions::shrink`].
    #[error("Use the --shrink option to perform a shrink operation.")]
    ShrinkRefused,
    /// Preallocation asked for while shrinking.
    #[error("Preallocation can only be used for growing images")]
    PreallocShrink,
    /// A preallocation mode the format does not have.
    #[error("Unsupported preallocation mode: {}", mode.as_str())]
    PreallocMode {
        /// The mode.
        mode: Preallocation,
    },
    /// Resizing a raw file failed.
    #[error("resizing {}", path.display())]
    RawResize {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Error,
    },
    /// Editing qcow2 metadata failed.
    #[error("changing the metadata of {}", path.display())]
    Edit {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: EditError,
    },
    /// Preallocating the new space failed.
    #[error("preallocating the new space")]
    Preallocate(#[source] Error),
    /// The image has no backing file to commit to.
    #[error("Image does not have a backing file")]
    NoBacking,
    /// The base given for a commit is not in the image's backing chain.
    #[error("Did not find '{base}' in the backing chain of '{image}'")]
    BaseNotInChain {
        /// The base as given.
        base: String,
        /// The image as given.
        image: String,
    },
    /// Reading the data to copy failed.
    #[error("reading {} at offset {offset}", path.display())]
    Read {
        /// The image read from.
        path: PathBuf,
        /// Guest offset.
        offset: u64,
        /// Why.
        #[source]
        source: Error,
    },
    /// Writing the copied data failed.
    #[error("writing {} at offset {offset}", path.display())]
    Write {
        /// The image written to.
        path: PathBuf,
        /// Guest offset.
        offset: u64,
        /// Why.
        #[source]
        source: Error,
    },
    /// Flushing or closing an image failed.
    #[error("closing {}", path.display())]
    Close {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: Error,
    },
    /// Reading a backing chain failed.
    #[error("reading the backing chain of {}", path.display())]
    Chain {
        /// The image naming the backing file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Error,
    },
    /// Opening the new backing file of a rebase failed.
    #[error("Could not open new backing file '{name}'")]
    NewBacking {
        /// The name as given.
        name: String,
        /// Why.
        #[source]
        source: Error,
    },
    /// The new backing file of a rebase reads the image being rebased (is it, or has it
    /// in its chain): the chain would loop.
    #[error("The new backing file '{name}' is this image or has it in its backing chain")]
    BackingLoop {
        /// The name as given.
        name: String,
    },
    /// An unsafe rebase needs the new backing file's format.
    #[error("Could not change the backing file to '{name}': backing format must be specified")]
    BackingFormatRequired {
        /// The new backing file as given.
        name: String,
    },
    /// The operation needs a qcow2 image.
    #[error("the {op} operation needs a qcow2 image, not {format}")]
    NotQcow2 {
        /// The operation.
        op: &'static str,
        /// The image's format.
        format: Format,
    },
}

/// How an image's space is preallocated (qemu-img's `preallocation` option): the space
/// a resize adds (`--preallocation`), or a new image's ([`crate::measure`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Preallocation {
    /// Not allocated.
    #[default]
    Off,
    /// qcow2 only: metadata (L2 tables and cluster allocation), no data.
    Metadata,
    /// Space reserved with `fallocate`.
    Falloc,
    /// Space written with zeroes.
    Full,
}

impl Preallocation {
    /// The name qemu-img uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

impl std::str::FromStr for Preallocation {
    type Err = UnknownPreallocation;
    fn from_str(s: &str) -> Result<Self, UnknownPreallocation> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return Err(UnknownPreallocation(s.to_string())),
        })
    }
}

/// A preallocation mode name that is not one of qemu-img's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid preallocation mode '{0}'")]
pub struct UnknownPreallocation(pub String);

/// Options of [`resize`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// Allow shrinking (`--shrink`); without it a smaller size is refused.
    pub shrink: bool,
    /// How the added space is allocated.
    pub preallocation: Preallocation,
}

fn open_err(path: &Path) -> impl FnOnce(Error) -> VolumeError + '_ {
    move |source| VolumeError::Open {
        path: path.to_path_buf(),
        source,
    }
}

fn edit_err(path: &Path) -> impl FnOnce(EditError) -> VolumeError + '_ {
    move |source| VolumeError::Edit {
        path: path.to_path_buf(),
        source,
    }
}

fn rw_file(path: &Path) -> Result<RawFile, VolumeError> {
    RawFile::open(
        path,
        RawOptions {
            growable: true,
            ..Default::default()
        },
    )
    .map_err(open_err(path))
}

/// The virtual size of the image at `path`.
pub fn virtual_size(path: &Path, format: Format) -> Result<u64, VolumeError> {
    let f = RawFile::open(
        path,
        RawOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .map_err(open_err(path))?;
    match format {
        Format::Raw => Ok(f.size()),
        Format::Qcow2 => Ok(qcow2::read_header(&f).map_err(open_err(path))?.size),
    }
}

/// Changes the virtual size of the image at `path` to `size` bytes, as
/// `qemu-img resize`: shrinking needs [`ResizeOptions::shrink`] and no
/// preallocation; growing allocates the new space as `preallocation` says.
pub fn resize(
    path: &Path,
    format: Format,
    size: u64,
    opts: &ResizeOptions,
) -> Result<(), VolumeError> {
    let old = virtual_size(path, format)?;
    if size < old && !opts.shrink {
        return Err(VolumeError::ShrinkRefused);
    }
    if size <= old && opts.preallocation != Preallocation::Off {
        return Err(VolumeError::PreallocShrink);
    }
    let raw_err = |source| VolumeError::RawResize {
        path: path.to_path_buf(),
        source,
    };
    match format {
        Format::Raw => {
            let f = rw_file(path)?;
            match opts.preallocation {
                Preallocation::Metadata => {
                    return Err(VolumeError::PreallocMode {
                        mode: Preallocation::Metadata,
                    })
                }
                Preallocation::Off => f.set_len(size).map_err(raw_err)?,
                Preallocation::Falloc | Preallocation::Full => {
                    f.set_len(size).map_err(raw_err)?;
                    if size > old {
                        fill(&f, old, size - old, opts.preallocation)
                            .map_err(VolumeError::Preallocate)?;
                    }
                }
            }
            f.flush().map_err(raw_err)
        }
        Format::Qcow2 => {
            // The image and its backing chain must open before anything changes: growing
            // then zeroes the new space over the backing file's data through the chain,
            // and an image that could not be opened would be left resized, that space
            // showing the backing file (or the image unusable).
            drop(open_image(path, format, true)?);
            let f = rw_file(path)?;
            edit::resize(&f, size).map_err(edit_err(path))?;
            drop(f);
            if size > old {
                zero_over_backing(path, old, size)?;
            }
            let f = rw_file(path)?;
            if size > old && opts.preallocation != Preallocation::Off {
                preallocate_qcow2(f, old, size, opts.preallocation)
                    .map_err(VolumeError::Preallocate)?;
            }
            Ok(())
        }
    }
}

/// Makes `[old, new)` of a grown qcow2 image read as zeroes where its
/// backing file has data there (as qemu-img does), instead of showing it.
fn zero_over_backing(path: &Path, old: u64, new: u64) -> Result<(), VolumeError> {
    let img = open_image(path, Format::Qcow2, false)?;
    let Image::Qcow2(q) = &img else {
        return Ok(());
    };
    let end = q.backing().map_or(0, |b| b.size()).min(new);
    if end > old {
        q.write_zeroes(old, end - old, false)
            .map_err(|source| VolumeError::Write {
                path: path.to_path_buf(),
                offset: old,
                source,
            })?;
    }
    img.close().map_err(|source| VolumeError::Close {
        path: path.to_path_buf(),
        source,
    })
}

/// Allocates `[off, off+len)` of a raw file: reserved, or written with zeroes.
fn fill(f: &RawFile, off: u64, len: u64, mode: Preallocation) -> Result<(), Error> {
    if mode == Preallocation::Falloc {
        // SAFETY: posix_fallocate only reads its scalar arguments; the descriptor is open.
        let r = unsafe { libc::posix_fallocate(f.fd(), off as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        if r != libc::EOPNOTSUPP && r != libc::EINVAL {
            return Err(Error::io(
                "reserving space",
                std::io::Error::from_raw_os_error(r),
            ));
        }
    }
    let zeros = vec![0u8; 1 << 20];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(zeros.len() as u64);
        f.write_at(&zeros[..n as usize], pos)?;
        pos += n;
    }
    Ok(())
}

/// Allocates clusters for `[old, new)` of a qcow2 image, and for `falloc` and
/// `full` the host space under them.
fn preallocate_qcow2(f: RawFile, old: u64, new: u64, mode: Preallocation) -> Result<(), Error> {
    let img = Qcow2::open(f, Qcow2Options::default())?;
    let cs = img.cluster_size();
    let mut pos = old;
    let mut end = 0;
    while pos < new {
        let n = (new - pos).min(256 * cs - pos % cs);
        let m = img.map_write(pos, n)?;
        for e in m.extents() {
            if let ExtentKind::Data(h) = e.kind {
                end = end.max((h + e.len).div_ceil(cs) * cs);
                if mode != Preallocation::Metadata {
                    fill(img.file(), h, e.len, mode)?;
                }
            }
        }
        drop(m);
        pos += n;
    }
    img.close()?;
    // The clusters allocated lie inside the file (reading as zeroes).
    if img.file().size() < end {
        img.file().set_len(end)?;
    }
    Ok(())
}

/// The image a commit writes into.
struct ChainLink {
    path: PathBuf,
    format: Format,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn open_image(path: &Path, format: Format, read_only: bool) -> Result<Image, VolumeError> {
    Image::open(
        path,
        format,
        ImageOptions {
            file: RawOptions {
                read_only,
                ..Default::default()
            },
            qcow2: Qcow2Options {
                allow_probed_backing: true,
                ..Default::default()
            },
        },
    )
    .map_err(open_err(path))
}

/// Options of [`commit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOptions {
    /// The image of the chain to commit into (`-b`); default the image's
    /// backing file. Naming one implies [`CommitOptions::keep`].
    pub base: Option<PathBuf>,
    /// Leave the image as it is after the commit (`-d`); else it is emptied.
    pub keep: bool,
}

/// Progress of a long operation, in percent (0 to 100), as qemu-img's `-p` shows it.
pub type Progress<'a> = &'a mut dyn FnMut(f64);

/// Guest ranges (offset, length) the qcow2 image `img` allocates itself.
fn allocated(img: &Image, path: &Path) -> Result<Vec<(u64, u64)>, VolumeError> {
    let Image::Qcow2(q) = img else {
        let size = img.backend().size();
        return Ok(vec![(0, size)]);
    };
    let size = q.size();
    let step = q.cluster_size() * 4096;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let n = step.min(size - pos);
        let m = q.map_read(pos, n).map_err(|source| VolumeError::Read {
            path: path.to_path_buf(),
            offset: pos,
            source,
        })?;
        let mut p = pos;
        for e in m.extents() {
            if !matches!(e.kind, ExtentKind::Backing | ExtentKind::Unallocated) {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == p => last.1 += e.len,
                    _ => out.push((p, e.len)),
                }
            }
            p += e.len;
        }
        pos += n;
    }
    Ok(out)
}

/// Copies `ranges` of `from` into `to`, chunk by chunk (zeroes as
/// write-zeroes), reporting progress.
fn copy_ranges(
    from: (&dyn BlockBackend, &Path),
    to: (&dyn BlockBackend, &Path),
    ranges: &[(u64, u64)],
    progress: &mut dyn FnMut(f64),
) -> Result<(), VolumeError> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for &(off, len) in ranges {
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(buf.len() as u64) as usize;
            from.0
                .read_at(&mut buf[..n], pos)
                .map_err(|source| VolumeError::Read {
                    path: from.1.to_path_buf(),
                    offset: pos,
                    source,
                })?;
            let werr = |source| VolumeError::Write {
                path: to.1.to_path_buf(),
                offset: pos,
                source,
            };
            if buf[..n].iter().all(|&b| b == 0) {
                to.0.write_zeroes(pos, n as u64, false).map_err(werr)?;
            } else {
                to.0.write_at(&buf[..n], pos).map_err(werr)?;
            }
            pos += n as u64;
            done += n as u64;
            progress(done as f64 * 100.0 / total.max(1) as f64);
        }
    }
    Ok(())
}

/// Writes the data of the image at `path` (and of the images between it
/// and the base) into the base, as `qemu-img commit`: the base is the
/// image's backing file or [`CommitOptions::base`]; a base smaller than the
/// image grows to its size. Unless [`CommitOptions::keep`] (or a base was
/// named), the image is then emptied, every cluster reading from the
/// backing file again.
///
/// # Examples
///
/// ```
/// use keel_block::qcow2::{self, CreateOptions};
/// use keel_block::volume::{self, CommitOptions, RebaseOptions};
/// use keel_block::{BlockBackend, Format, Image, ImageOptions, RawFile, RawOptions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
/// RawFile::create(&base, 1 << 20)?;
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
/// let img = Image::open(&top, Format::Qcow2, ImageOptions::default())?;
/// img.backend().write_at(&[7; 4096], 8192)?;
/// img.close()?;
/// drop(img);
///
/// // Into base.raw, with progress in percent.
/// let mut last = 0.0;
/// volume::commit(&top, Format::Qcow2, &CommitOptions::default(), &mut |p| last = p)?;
/// assert_eq!(last, 100.0);
/// let mut buf = [0u8; 4096];
/// RawFile::open(&base, RawOptions::default())?.read_at(&mut buf, 8192)?;
/// assert_eq!(buf, [7; 4096]);
///
/// // The overlay is empty now; flattening it copies the base in.
/// volume::rebase(&top, Format::Qcow2, &RebaseOptions::default(), &mut |_| {})?;
/// std::fs::remove_file(&base).unwrap();
/// let img = Image::open(&top, Format::Qcow2, ImageOptions::default())?;
/// img.backend().read_at(&mut buf, 8192)?;
/// assert_eq!(buf, [7; 4096]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn commit(
    path: &Path,
    format: Format,
    opts: &CommitOptions,
    progress: Progress<'_>,
) -> Result<(), VolumeError> {
    if format != Format::Qcow2 {
        return Err(VolumeError::NoBacking);
    }
    let chain = Chain::open(
        path,
        format,
        Qcow2Options {
            allow_probed_backing: true,
            ..Default::default()
        },
    )
    .map_err(open_err(path))?;
    let layers = chain.layers();
    if layers.len() < 2 {
        return Err(VolumeError::NoBacking);
    }
    let base_idx = match &opts.base {
        None => 1,
        Some(b) => layers
            .iter()
            .skip(1)
            .position(|l| same_file(l.path(), b))
            .map(|i| i + 1)
            .ok_or_else(|| VolumeError::BaseNotInChain {
                base: b.display().to_string(),
                image: path.display().to_string(),
            })?,
    };
    let keep = opts.keep || opts.base.is_some();
    progress(0.0);
    // What the images above the base allocate, read through the top image.
    let top_size = chain.size();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < top_size {
        let n = (top_size - pos).min(1 << 30);
        let status = chain
            .block_status(pos, n)
            .map_err(|source| VolumeError::Read {
                path: path.to_path_buf(),
                offset: pos,
                source,
            })?;
        for st in status {
            if st.present && st.depth < base_idx {
                match ranges.last_mut() {
                    Some(last) if last.0 + last.1 == st.start => last.1 += st.length,
                    _ => ranges.push((st.start, st.length)),
                }
            }
        }
        pos += n;
    }
    let base = ChainLink {
        path: layers[base_idx].path().to_path_buf(),
        format: layers[base_idx].format(),
    };
    if virtual_size(&base.path, base.format)? < top_size {
        resize(
            &base.path,
            base.format,
            top_size,
            &ResizeOptions {
                shrink: false,
                preallocation: Preallocation::Off,
            },
        )?;
    }
    let top = chain.image();
    {
        let bimg = open_image(&base.path, base.format, false)?;
        copy_ranges(
            (top.backend(), path),
            (bimg.backend(), &base.path),
            &ranges,
            progress,
        )?;
        bimg.close().map_err(|source| VolumeError::Close {
            path: base.path.clone(),
            source,
        })?;
    }
    drop(chain);
    if !keep {
        let f = rw_file(path)?;
        edit::make_empty(&f).map_err(edit_err(path))?;
    }
    progress(100.0);
    Ok(())
}

/// Options of [`rebase`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebaseOptions {
    /// The new backing file (name as stored in the header, relative names
    /// relative to the image's directory), or `None` for no backing file.
    pub backing: Option<BackingFile>,
    /// Only rewrite the header (`-u`): the caller vouches that the new backing
    /// file holds what the old one did.
    pub unsafe_mode: bool,
}

/// Makes the image at `path` use another backing file, as `qemu-img rebase`.
/// In safe mode every unallocated range whose contents differ between the
/// old backing chain and the new one is first copied into the image, so its
/// contents do not change; then the header names the new backing file.
pub fn rebase(
    path: &Path,
    format: Format,
    opts: &RebaseOptions,
    progress: Progress<'_>,
) -> Result<(), VolumeError> {
    if format != Format::Qcow2 {
        return Err(VolumeError::NotQcow2 {
            op: "rebase",
            format,
        });
    }
    progress(0.0);
    if !opts.unsafe_mode {
        let img = open_image(path, format, false)?;
        // The new backing file with its chain, read as the image will read it.
        let new: Option<Chain> = match &opts.backing {
            None => None,
            Some(b) => {
                let bp = backing::resolve(path, b.name.as_bytes());
                let fmt = match b.format {
                    Some(f) => f,
                    None => Format::probe(&bp).map_err(|source| VolumeError::NewBacking {
                        name: b.name.clone(),
                        source,
                    })?,
                };
                let chain = Chain::open(
                    &bp,
                    fmt,
                    Qcow2Options {
                        allow_probed_backing: true,
                        ..Default::default()
                    },
                )
                .map_err(|source| VolumeError::NewBacking {
                    name: b.name.clone(),
                    source,
                })?;
                if chain.contains_file(path) {
                    return Err(VolumeError::BackingLoop {
                        name: b.name.clone(),
                    });
                }
                Some(chain)
            }
        };
        let Image::Qcow2(q) = &img else {
            unreachable!("opened as qcow2")
        };
        let size = q.size();
        let cs = q.cluster_size();
        // Unallocated ranges: everything the image does not allocate.
        let alloc = allocated(&img, path)?;
        let mut holes = Vec::new();
        let mut p = 0;
        for (o, l) in alloc.iter().copied().chain(std::iter::once((size, 0))) {
            if o > p {
                holes.push((p, o - p));
            }
            p = o + l;
        }
        let total: u64 = holes.iter().map(|h| h.1).sum();
        let mut done = 0u64;
        let chunk = cs.max(64 << 10);
        let mut old_buf = vec![0u8; chunk as usize];
        let mut new_buf = vec![0u8; chunk as usize];
        for (off, len) in holes {
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(chunk - pos % chunk) as usize;
                let rerr = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| VolumeError::Read {
                        path,
                        offset: pos,
                        source,
                    }
                };
                img.backend()
                    .read_at(&mut old_buf[..n], pos)
                    .map_err(rerr(path))?;
                new_buf[..n].fill(0);
                if let Some(nb) = new.as_ref().map(Chain::image) {
                    let bsize = nb.backend().size();
                    if pos < bsize {
                        let k = (bsize - pos).min(n as u64) as usize;
                        nb.backend()
                            .read_at(&mut new_buf[..k], pos)
                            .map_err(rerr(path))?;
                    }
                }
                if old_buf[..n] != new_buf[..n] {
                    img.backend()
                        .write_at(&old_buf[..n], pos)
                        .map_err(|source| VolumeError::Write {
                            path: path.to_path_buf(),
                            offset: pos,
                            source,
                        })?;
                }
                pos += n as u64;
                done += n as u64;
                progress(done as f64 * 100.0 / total.max(1) as f64);
            }
        }
        img.close().map_err(|source| VolumeError::Close {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let f = rw_file(path)?;
    edit::set_backing(&f, opts.backing.as_ref()).map_err(edit_err(path))?;
    progress(100.0);
    Ok(())
}

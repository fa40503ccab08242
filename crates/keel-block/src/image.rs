//! Opening an image file by format: the one place that knows how each format sits on a
//! file (raw directly, qcow2 over a growable raw file), shared by keel-img and VMMs.

use std::path::Path;
use std::sync::Arc;

use crate::backend::BlockBackend;
use crate::error::{Error, Result, Unsupported};
use crate::qcow2::{self, Qcow2, Qcow2Options};
use crate::raw::{CacheMode, RawFile, RawOptions};

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The bytes of the disk, as they are.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl Format {
    /// The format's name (`raw`, `qcow2`).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Guesses the format from the file's first bytes (qcow2 magic, else raw). Guessing
    /// is for tools; a VMM should be told, since a raw image may hold anything.
    pub fn probe(path: &Path) -> Result<Format> {
        let f = RawFile::open(
            path,
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )?;
        Ok(if qcow2::probe(&f) {
            Format::Qcow2
        } else {
            Format::Raw
        })
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::Unsupported(Unsupported::Format(other.to_string()))),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Host cache mode.
    pub cache: CacheMode,
    /// Refuse writes.
    pub read_only: bool,
    /// qcow2 L2 cache size in bytes (`None`: the default).
    pub l2_cache_size: Option<u64>,
    /// qcow2 refcount cache size in bytes (`None`: the default).
    pub refcount_cache_size: Option<u64>,
    /// Follow qcow2 backing files whose format the image does not state,
    /// probing it (off by default; see [`qcow2::backing`]).
    pub allow_probed_backing: bool,
}

/// An open image.
pub enum Image {
    /// A raw image.
    Raw(Arc<RawFile>),
    /// A qcow2 image on a raw file.
    Qcow2(Arc<Qcow2<RawFile>>),
}

impl Image {
    /// Opens `path` as `format`.
    pub fn open(path: &Path, format: Format, opts: OpenOptions) -> Result<Image> {
        let raw = |growable| RawOptions {
            cache: opts.cache,
            read_only: opts.read_only,
            growable,
        };
        match format {
            Format::Raw => Ok(Image::Raw(Arc::new(RawFile::open(path, raw(false))?))),
            Format::Qcow2 => {
                let q = qcow2::backing::open_path(
                    path,
                    raw(true),
                    Qcow2Options {
                        read_only: opts.read_only,
                        write_through: opts.cache.dsync(),
                        l2_cache_size: opts.l2_cache_size,
                        refcount_cache_size: opts.refcount_cache_size,
                        allow_probed_backing: opts.allow_probed_backing,
                    },
                )?;
                Ok(Image::Qcow2(Arc::new(q)))
            }
        }
    }

    /// The image as a backend.
    pub fn backend(&self) -> &dyn BlockBackend {
        match self {
            Image::Raw(r) => &**r,
            Image::Qcow2(q) => &**q,
        }
    }

    /// Its format.
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }

    /// Flushes, and for qcow2 closes cleanly (clears the dirty bit).
    pub fn close(&self) -> Result<()> {
        match self {
            Image::Raw(r) => r.flush(),
            Image::Qcow2(q) => q.close(),
        }
    }
}

//! Opening an image file by format: the one place that knows how each format sits on a
//! file (raw directly, qcow2 over a growable raw file), shared by keel-img and VMMs.

use std::path::Path;
use std::sync::Arc;

use crate::backend::BlockBackend;
use crate::error::{Error, Result, Unsupported};
use crate::qcow2::{self, header, Qcow2, Qcow2Options};
use crate::raw::{RawFile, RawOptions};

/// Bytes at the start of an image that probing looks at ([`Format::detect`]): one
/// 512-byte sector, as QEMU's probe buffer.
pub const PROBE_BYTES: usize = 512;

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
    /// is for tools; a VMM should be told, since a raw image may hold anything (or guard
    /// a probed raw image with [`ProbedRaw`](crate::probed::ProbedRaw)).
    pub fn probe(path: &Path) -> Result<Format> {
        let f = RawFile::open(
            path,
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )?;
        let mut first = vec![0u8; (PROBE_BYTES as u64).min(f.size()) as usize];
        f.read_at(&mut first, 0)?;
        Ok(Format::detect(&first))
    }

    /// The format an image whose first bytes are `first` (up to [`PROBE_BYTES`] of them;
    /// fewer for a shorter image) probes as: qcow2 if they start with its magic, else raw.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::image::Format;
    ///
    /// assert_eq!(Format::detect(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
    /// assert_eq!(Format::detect(&[0u8; 512]), Format::Raw);
    /// assert_eq!(Format::detect(b"QFI"), Format::Raw);
    /// ```
    pub fn detect(first: &[u8]) -> Format {
        match first.get(..4) {
            Some(m) if m == header::MAGIC.to_be_bytes() => Format::Qcow2,
            _ => Format::Raw,
        }
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

/// How to open an image: the options of its file, and those of its format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// The image file (and its backing files): host cache mode, read-only.
    /// `growable` applies to raw images; a qcow2 image's file always grows.
    pub file: RawOptions,
    /// qcow2 images: metadata caches, backing policy. They are also opened
    /// read-only when `file.read_only` is set, and write metadata through
    /// when `file.cache` is a write-through mode.
    pub qcow2: Qcow2Options,
}

/// An open image.
pub enum Image {
    /// A raw image.
    Raw(Arc<RawFile>),
    /// A qcow2 image on a raw file.
    Qcow2(Arc<Qcow2<RawFile>>),
}

impl Image {
    /// Opens `path` as `format`: a raw image directly, a qcow2 image over its
    /// (growable) file with its whole backing chain.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_block::image::{Format, Image, ImageOptions};
    /// use keel_block::qcow2::{self, CreateOptions};
    /// use keel_block::{CacheMode, RawFile, RawOptions};
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("disk.qcow2");
    /// RawFile::create(&path, 0)?;
    /// let file = RawFile::open(&path, RawOptions { growable: true, ..Default::default() })?;
    /// qcow2::create(&file, &CreateOptions { size: 1 << 30, ..Default::default() })?;
    /// drop(file);
    ///
    /// let opts = ImageOptions {
    ///     file: RawOptions { cache: CacheMode::Writethrough, ..Default::default() },
    ///     ..Default::default()
    /// };
    /// let img = Image::open(&path, Format::probe(&path)?, opts)?;
    /// assert_eq!(img.format(), Format::Qcow2);
    /// img.backend().write_at(&[0x5a; 4096], 1 << 20)?;
    /// img.close()?;
    /// # Ok::<(), keel_block::Error>(())
    /// ```
    pub fn open(path: &Path, format: Format, opts: ImageOptions) -> Result<Image> {
        let file = opts.file;
        match format {
            Format::Raw => Ok(Image::Raw(Arc::new(RawFile::open(path, file)?))),
            Format::Qcow2 => {
                let q = qcow2::backing::open_path(
                    path,
                    RawOptions {
                        growable: true,
                        ..file
                    },
                    Qcow2Options {
                        read_only: opts.qcow2.read_only || file.read_only,
                        write_through: opts.qcow2.write_through || file.cache.dsync(),
                        ..opts.qcow2
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

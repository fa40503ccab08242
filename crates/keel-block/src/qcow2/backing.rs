//! Opening a qcow2 image on a file together with its backing chain.
//!
//! Policy:
//! * A backing file is opened read-only, in the format the overlay's
//!   backing-format header extension states (`raw` or `qcow2`).
//! * An image that names a backing file without stating its format is
//!   refused unless [`Qcow2Options::allow_probed_backing`] is set: probing
//!   would let a guest that wrote a qcow2 header into its raw disk make the
//!   host open any file (`/etc/shadow`) as that disk's backing file.
//! * Relative backing names are resolved against the directory of the image
//!   that names them; absolute names are used as they are.
//! * Chains are at most [`MAX_BACKING_DEPTH`] images below the top one;
//!   a file that appears twice in a chain (a loop) is refused.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{read_header, Header, Qcow2, Qcow2Options};
use crate::backend::BlockBackend;
use crate::error::{ChainProblem, Error, Result};
use crate::image::Format;
use crate::raw::{RawFile, RawOptions};

/// Most backing images below the top image of a chain.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Resolves a backing file name found in the image at `overlay`.
pub fn resolve(overlay: &Path, name: &[u8]) -> PathBuf {
    let p = Path::new(std::ffi::OsStr::from_bytes(name));
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Opens the qcow2 image at `path` (with `raw` options for its file) and its
/// whole backing chain. Backing images are opened read-only, with the same
/// cache mode.
pub fn open_path(path: &Path, raw: RawOptions, opts: Qcow2Options) -> Result<Qcow2<RawFile>> {
    let mut seen = Vec::new();
    open_level(path, raw, opts, 0, &mut seen)
}

fn chain_err(path: &Path, reason: ChainProblem) -> Error {
    Error::BackingChain {
        image: path.to_path_buf(),
        reason,
    }
}

fn open_level(
    path: &Path,
    raw: RawOptions,
    opts: Qcow2Options,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
) -> Result<Qcow2<RawFile>> {
    let file = RawFile::open(path, raw)?;
    let id = std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| Error::io(format!("reading the metadata of {}", path.display()), e))?;
    if seen.contains(&id) {
        return Err(chain_err(path, ChainProblem::Loop));
    }
    seen.push(id);
    let hdr = read_header(&file)?;
    if let (Some(name), true) = (&hdr.backing_file, depth >= MAX_BACKING_DEPTH) {
        return Err(chain_err(
            path,
            ChainProblem::TooDeep {
                name: String::from_utf8_lossy(name).into_owned(),
                max: MAX_BACKING_DEPTH,
            },
        ));
    }
    let backing: Option<Arc<dyn BlockBackend>> = match backing_of(path, &hdr, opts)? {
        None => None,
        Some((bpath, fmt)) => {
            let braw = RawOptions {
                read_only: true,
                growable: false,
                ..raw
            };
            let b: Arc<dyn BlockBackend> = match fmt {
                Format::Raw => {
                    Arc::new(RawFile::open(&bpath, braw).map_err(|e| backing_err(&bpath, e))?)
                }
                Format::Qcow2 => {
                    let bopts = Qcow2Options {
                        read_only: true,
                        ..opts
                    };
                    let q = open_level(
                        &bpath,
                        RawOptions {
                            growable: true,
                            ..braw
                        },
                        bopts,
                        depth + 1,
                        seen,
                    )
                    .map_err(|e| backing_err(&bpath, e))?;
                    Arc::new(q)
                }
            };
            Some(b)
        }
    };
    Qcow2::open_with_backing(file, opts, backing)
}

/// The backing file of the qcow2 image at `path` whose header is `hdr`: its path
/// (resolved against `path`'s directory) and format, under the policy of this module
/// (the format the header states; probed only with
/// [`Qcow2Options::allow_probed_backing`]). `None` if the header names none.
pub fn backing_of(
    path: &Path,
    hdr: &Header,
    opts: Qcow2Options,
) -> Result<Option<(PathBuf, Format)>> {
    let Some(name) = &hdr.backing_file else {
        return Ok(None);
    };
    let bpath = resolve(path, name);
    let shown = String::from_utf8_lossy(name).into_owned();
    let fmt = match hdr.backing_format() {
        Some(f) => match f.parse::<Format>() {
            Ok(f) => f,
            Err(_) => {
                return Err(chain_err(
                    path,
                    ChainProblem::UnsupportedFormat {
                        name: shown,
                        format: f,
                    },
                ))
            }
        },
        None if opts.allow_probed_backing => {
            let probe = RawFile::open(
                &bpath,
                RawOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .map_err(|e| backing_err(&bpath, e))?;
            if super::probe(&probe) {
                Format::Qcow2
            } else {
                Format::Raw
            }
        }
        None => {
            return Err(chain_err(
                path,
                ChainProblem::UnstatedFormat { name: shown },
            ))
        }
    };
    Ok(Some((bpath, fmt)))
}

fn backing_err(path: &Path, e: Error) -> Error {
    match e {
        // Already names the image it is about.
        e @ Error::BackingChain { .. } | e @ Error::Backing { .. } => e,
        e => Error::Backing {
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    }
}

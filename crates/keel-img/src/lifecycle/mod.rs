//! The verbs that change a volume over its life: `resize`, `snapshot`,
//! `commit`, `rebase`, `amend`. Each is a thin command over a keel-block call
//! ([`keel_block::volume`], [`keel_block::qcow2::edit`]), one module per verb.

pub(crate) mod amend;
pub(crate) mod commit;
pub(crate) mod rebase;
pub(crate) mod resize;
pub(crate) mod snapshot;

use std::path::{Path, PathBuf};

use keel_block::qcow2::edit::EditError;
use keel_block::volume::VolumeError;
use keel_block::{Format, RawFile, RawOptions};

/// Errors of the life-cycle verbs, worded as qemu-img words them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum VerbError {
    /// The library's volume operations failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A snapshot operation failed.
    #[error("Could not {verb} snapshot '{name}'")]
    Snapshot {
        verb: &'static str,
        name: String,
        #[source]
        source: EditError,
    },
    /// Snapshots of a format that has none.
    #[error("Could not create snapshot '{name}': Operation not supported")]
    NoSnapshots { name: String },
    /// An amend failed.
    #[error("Error while amending options")]
    Amend(#[source] EditError),
    /// Probing or opening the image failed.
    #[error("Could not open '{}'", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: keel_block::Error,
    },
    /// A required argument is missing (qemu-img's wording; exit code 1 as qemu-img's).
    #[error("{0}")]
    Missing(&'static str),
    /// A size that does not parse.
    #[error("Parameter 'size' expects a non-negative number below 2^64")]
    Size,
    /// A size of zero (or below).
    #[error("New image size must be positive")]
    NotPositive,
    /// A format keel-img does not know.
    #[error("Unknown file format '{0}'")]
    Format(String),
    /// Amend options that are not `key=value` pairs qemu-img can amend.
    #[error("Invalid parameter '{0}'")]
    AmendOption(String),
    /// A value of an amend option that does not parse.
    #[error("Parameter '{key}' expects {expects}")]
    AmendValue {
        key: &'static str,
        expects: &'static str,
    },
    /// An amend of an image that is not qcow2.
    #[error("Format driver '{0}' does not support option amendment")]
    AmendFormat(Format),
    /// Opening the image file for an edit failed.
    #[error("Could not open '{}'", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: keel_block::Error,
    },
}

/// The image's format: as given, else probed.
pub(crate) fn format(path: &Path, given: Option<&str>) -> Result<Format, VerbError> {
    match given {
        Some(f) => f.parse().map_err(|_| VerbError::Format(f.to_string())),
        None => Format::probe(path).map_err(|source| VerbError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The image file, opened read-write for a metadata edit.
pub(crate) fn edit_file(path: &Path) -> Result<RawFile, VerbError> {
    RawFile::open(
        path,
        RawOptions {
            growable: true,
            ..Default::default()
        },
    )
    .map_err(|source| VerbError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// A size with qemu-img's suffixes (k, M, G, T, P, E; bytes without one).
pub(crate) fn parse_size(s: &str) -> Result<u64, VerbError> {
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(VerbError::Size),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or(VerbError::Size);
    }
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && f * (mult as f64) < 1.8e19 => Ok((f * mult as f64) as u64),
        _ => Err(VerbError::Size),
    }
}

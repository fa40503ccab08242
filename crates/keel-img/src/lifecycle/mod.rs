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

use crate::progress::Progress;
use keel_block::{Format, RawFile};

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
    crate::open_raw(path, false).map_err(|source| VerbError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The options `commit` and `rebase` share: progress, format, quiet, and the image.
#[derive(clap::Args, Debug)]
pub(crate) struct ChainImage {
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Format (probed if omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Image file.
    file: Option<PathBuf>,
}

impl ChainImage {
    /// The image file and its format (probed when -f is not given).
    pub(crate) fn open(&self) -> Result<(PathBuf, Format), VerbError> {
        let file = self
            .file
            .clone()
            .ok_or(VerbError::Missing("Expecting one image file name"))?;
        let fmt = format(&file, self.format.as_deref())?;
        Ok((file, fmt))
    }

    /// Runs `op` with a progress meter (shown with -p unless -q) fed its percentages.
    pub(crate) fn with_progress(
        &self,
        op: impl FnOnce(keel_block::volume::Progress<'_>) -> Result<(), VolumeError>,
    ) -> Result<(), VerbError> {
        let mut meter = Progress::new(self.progress && !self.quiet);
        op(&mut |p| meter.update(p / 100.0))?;
        meter.finish();
        Ok(())
    }
}

/// A size with qemu-img's suffixes (k, M, G, T, P, E; bytes without one).
pub(crate) fn parse_size(s: &str) -> Result<u64, VerbError> {
    crate::size::parse(s, true).map_err(|_| VerbError::Size)
}

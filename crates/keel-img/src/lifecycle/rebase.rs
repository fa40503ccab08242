//! `rebase [-u] -b BACKING [-F FMT] [-p] [-f FMT] [-q] FILE` (`-b ""`: no backing file).

use std::path::PathBuf;

use keel_block::qcow2::edit::BackingFile;
use keel_block::volume::{self, RebaseOptions, VolumeError};
use keel_block::Format;

use super::{format, VerbError};
use crate::progress::Progress;

/// Command line of `rebase`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Unsafe mode: only rewrite the header.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The new backing file ("" for none), relative to the image's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the new backing file.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Format (probed if omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: Option<PathBuf>,
}

/// Runs `rebase`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    let file = a
        .file
        .ok_or(VerbError::Missing("Expecting one image file name"))?;
    let fmt = format(&file, a.format.as_deref())?;
    let name = match a.backing {
        Some(b) => b,
        None if a.unsafe_mode => String::new(),
        None => {
            return Err(VerbError::Missing(
                "Must specify backing file (-b) or use unsafe mode (-u)",
            ))
        }
    };
    let backing = if name.is_empty() {
        None
    } else {
        let bfmt = match a.backing_format.as_deref() {
            Some(f) => Some(
                f.parse::<Format>()
                    .map_err(|_| VerbError::Format(f.to_string()))?,
            ),
            None if a.unsafe_mode => return Err(VolumeError::BackingFormatRequired { name }.into()),
            None => None,
        };
        Some(BackingFile { name, format: bfmt })
    };
    let mut meter = Progress::new(a.progress && !a.quiet);
    let opts = RebaseOptions {
        backing,
        unsafe_mode: a.unsafe_mode,
    };
    volume::rebase(&file, fmt, &opts, &mut |p| meter.update(p / 100.0))?;
    meter.finish();
    Ok(0)
}

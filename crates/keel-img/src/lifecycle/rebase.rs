//! `rebase [-u] -b BACKING [-F FMT] [-p] [-f FMT] [-q] FILE` (`-b ""`: no backing file).

use std::path::PathBuf;

use keel_block::qcow2::edit::BackingFile;
use keel_block::volume::{self, RebaseOptions, VolumeError};
use keel_block::Format;

use super::progress::Progress;
use super::{format, VerbError};

/// Command line of `rebase`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Unsafe mode: only rewrite the header.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The new backing file ("" for none), relative to the image's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: String,
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
    file: PathBuf,
}

/// Runs `rebase`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    let fmt = format(&a.file, a.format.as_deref())?;
    let backing = if a.backing.is_empty() {
        None
    } else {
        let bfmt = match a.backing_format.as_deref() {
            Some(f) => Some(
                f.parse::<Format>()
                    .map_err(|_| VerbError::Format(f.to_string()))?,
            ),
            None if a.unsafe_mode => {
                return Err(VolumeError::BackingFormatRequired { name: a.backing }.into())
            }
            None => None,
        };
        Some(BackingFile {
            name: a.backing,
            format: bfmt,
        })
    };
    let mut meter = Progress::new(a.progress && !a.quiet);
    let opts = RebaseOptions {
        backing,
        unsafe_mode: a.unsafe_mode,
    };
    volume::rebase(&a.file, fmt, &opts, &mut |p| meter.update(p))?;
    meter.finish();
    Ok(0)
}

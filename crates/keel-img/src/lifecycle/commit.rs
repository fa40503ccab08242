//! `commit [-b BASE] [-d] [-p] [-f FMT] [-q] FILE`.

use std::path::PathBuf;

use keel_block::volume::{self, CommitOptions};

use super::{format, VerbError};
use crate::progress::Progress;

/// Command line of `commit`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The image of the backing chain to commit into (default: the backing
    /// file); implies -d.
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Leave the image as it is (default: emptied after the commit).
    #[arg(short = 'd')]
    keep: bool,
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

/// Runs `commit`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    let file = a
        .file
        .ok_or(VerbError::Missing("Expecting one image file name"))?;
    let fmt = format(&file, a.format.as_deref())?;
    let mut meter = Progress::new(a.progress && !a.quiet);
    let opts = CommitOptions {
        base: a.base,
        keep: a.keep,
    };
    volume::commit(&file, fmt, &opts, &mut |p| meter.update(p / 100.0))?;
    meter.finish();
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

//! `commit [-b BASE] [-d] [-p] [-f FMT] [-q] FILE`.

use std::path::PathBuf;

use keel_block::volume::{self, CommitOptions};

use super::{ChainImage, VerbError};

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
    #[command(flatten)]
    image: ChainImage,
}

/// Runs `commit`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    let (file, fmt) = a.image.open()?;
    let opts = CommitOptions {
        base: a.base,
        keep: a.keep,
    };
    a.image
        .with_progress(|p| volume::commit(&file, fmt, &opts, p))?;
    if !a.image.quiet {
        println!("Image committed.");
    }
    Ok(0)
}

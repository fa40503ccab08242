//! `rebase [-u] -b BACKING [-F FMT] [-p] [-f FMT] [-q] FILE` (`-b ""`: no backing file).

use keel_block::qcow2::edit::BackingFile;
use keel_block::volume::{self, RebaseOptions, VolumeError};
use keel_block::Format;

use super::{ChainImage, VerbError};

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
    #[command(flatten)]
    image: ChainImage,
}

/// Runs `rebase`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    let (file, fmt) = a.image.open()?;
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
    let opts = RebaseOptions {
        backing,
        unsafe_mode: a.unsafe_mode,
    };
    a.image
        .with_progress(|p| volume::rebase(&file, fmt, &opts, p))?;
    Ok(0)
}

//! `resize [--shrink] [--preallocation=MODE] [-f FMT] [-q] FILE [+-]SIZE`.

use std::path::PathBuf;

use keel_block::volume::{self, Preallocation, ResizeOptions, UnknownPreallocation};

use super::{format, parse_size, VerbError};

/// Command line of `resize`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Allocation of the added space: off, metadata (qcow2), falloc, full.
    #[arg(long, value_parser = |s: &str| s.parse::<Preallocation>().map_err(|e: UnknownPreallocation| e.to_string()))]
    preallocation: Option<Preallocation>,
    /// Format (probed if omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: Option<PathBuf>,
    /// New size, or +SIZE / -SIZE relative to the current one (suffixes k, M, G, T).
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// Runs `resize`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    let (Some(file), Some(arg)) = (a.file, a.size) else {
        return Err(VerbError::Missing("Expecting image file name and size"));
    };
    let fmt = format(&file, a.format.as_deref())?;
    let current = volume::virtual_size(&file, fmt)?;
    let size = if let Some(d) = arg.strip_prefix('+') {
        current.checked_add(parse_size(d)?).ok_or(VerbError::Size)?
    } else if let Some(d) = arg.strip_prefix('-') {
        current.saturating_sub(parse_size(d)?)
    } else {
        parse_size(&arg)?
    };
    if size == 0 {
        return Err(VerbError::NotPositive);
    }
    let opts = ResizeOptions {
        shrink: a.shrink,
        preallocation: a.preallocation.unwrap_or_default(),
    };
    volume::resize(&file, fmt, size, &opts)?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

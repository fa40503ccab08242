//! `snapshot [-l | -c NAME | -a NAME | -d NAME] [-f FMT] [-q] FILE`.

use std::path::PathBuf;

use keel_block::qcow2::edit;
use keel_block::Format;

use super::{edit_file, format, VerbError};

/// Command line of `snapshot`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("op").args(["list", "create", "apply", "delete"])))]
pub(crate) struct Args {
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot of the current contents.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the image to a snapshot (id or name).
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete a snapshot (id or name).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Format (probed if omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: Option<PathBuf>,
}

/// Runs `snapshot`; `list` prints the listing.
pub(crate) fn run(
    a: Args,
    list: impl FnOnce(&std::path::Path) -> Result<i32, crate::CliError>,
) -> Result<i32, crate::CliError> {
    let file = a
        .file
        .ok_or(VerbError::Missing("Expecting one image file name"))?;
    let (verb, name, op): (&str, String, fn(&dyn keel_block::BlockBackend, &str) -> _) =
        match (a.create, a.apply, a.delete) {
            (Some(n), _, _) => ("create", n, edit::snapshot_create),
            (_, Some(n), _) => ("apply", n, edit::snapshot_apply),
            (_, _, Some(n)) => ("delete", n, edit::snapshot_delete),
            // A raw image has no snapshots to list: nothing, as qemu-img.
            _ if format(&file, a.format.as_deref())? != Format::Qcow2 => return Ok(0),
            _ => return list(&file),
        };
    let fmt = format(&file, a.format.as_deref())?;
    if fmt != Format::Qcow2 {
        return Err(VerbError::NoSnapshots { name }.into());
    }
    let f = edit_file(&file)?;
    op(&f, &name).map_err(|source| VerbError::Snapshot { verb, name, source })?;
    Ok(0)
}

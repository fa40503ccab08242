//! `amend -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N [-f qcow2] [-p] [-q] FILE`.

use std::path::PathBuf;

use keel_block::qcow2::edit::{self, AmendOptions};
use keel_block::Format;

use super::{edit_file, format, VerbError};
use crate::progress::Progress;

/// Command line of `amend`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Options to change: compat, lazy_refcounts, refcount_bits.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Format (probed if omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    file: Option<PathBuf>,
}

fn on_off(v: &str, key: &'static str) -> Result<bool, VerbError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(VerbError::AmendValue {
            key,
            expects: "'on' or 'off'",
        }),
    }
}

/// The options qemu-img can amend in place, from `-o` lists.
fn parse(opts: &[String]) -> Result<AmendOptions, VerbError> {
    let mut o = AmendOptions::default();
    for kv in opts
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        match k {
            "compat" => {
                o.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(VerbError::AmendValue {
                            key: "compat",
                            expects: "'0.10' or '1.1'",
                        })
                    }
                })
            }
            "lazy_refcounts" => o.lazy_refcounts = Some(on_off(v, "lazy_refcounts")?),
            "refcount_bits" => {
                o.refcount_bits = Some(v.parse().map_err(|_| VerbError::AmendValue {
                    key: "refcount_bits",
                    expects: "a non-negative number below 2^64",
                })?)
            }
            _ => return Err(VerbError::AmendOption(k.to_string())),
        }
    }
    Ok(o)
}

/// Runs `amend`.
pub(crate) fn run(a: Args) -> Result<i32, VerbError> {
    if a.options.is_empty() {
        return Err(VerbError::Missing("Must specify options (-o)"));
    }
    let file = a
        .file
        .ok_or(VerbError::Missing("Expecting one image file name"))?;
    let o = parse(&a.options)?;
    let fmt = format(&file, a.format.as_deref())?;
    if fmt != Format::Qcow2 {
        return Err(VerbError::AmendFormat(fmt));
    }
    let meter = Progress::new(a.progress && !a.quiet);
    let f = edit_file(&file)?;
    edit::amend(&f, &o).map_err(VerbError::Amend)?;
    meter.finish();
    Ok(0)
}

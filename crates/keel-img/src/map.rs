//! `keel-img map`: the block status of an image through its backing chain, printed as
//! `qemu-img map` prints it.

use std::io::Write as _;
use std::path::Path;

use keel_block::chain::BlockStatus;

use crate::{image_format, qcow2_options, CliError, OutputFormat, Result};

/// Runs `map` over `[start, start + max_len)` (clamped to the image).
pub(crate) fn cmd_map(
    file: &Path,
    fmt: Option<&str>,
    output: OutputFormat,
    start: u64,
    max_len: Option<u64>,
    allow_probed_backing: bool,
) -> Result<i32> {
    let format = image_format(file, fmt)?.parse()?;
    let chain = crate::open_chain(file, format, qcow2_options(allow_probed_backing))?;
    let size = chain.size();
    let end = match max_len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let entries = if start < end {
        chain.block_status(start, end - start)?
    } else {
        // qemu-img prints one empty entry for an empty range.
        vec![BlockStatus {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        }]
    };
    let mut out = std::io::stdout().lock();
    let w = |r: std::io::Result<()>| r.map_err(CliError::Stdout);
    match output {
        OutputFormat::Json => {
            for (i, e) in entries.iter().enumerate() {
                w(write!(
                    out,
                    "{}{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    if i == 0 { "[" } else { ",\n" },
                    e.start,
                    e.length,
                    e.depth,
                    e.present,
                    e.zero,
                    e.data,
                    e.compressed
                ))?;
                if let Some(o) = e.offset {
                    w(write!(out, ", \"offset\": {o}"))?;
                }
                w(write!(out, "}}"))?;
            }
            w(writeln!(out, "]"))?;
        }
        OutputFormat::Human => {
            w(writeln!(
                out,
                "{:<16}{:<16}{:<16}File",
                "Offset", "Length", "Mapped to"
            ))?;
            for e in &entries {
                if e.data && e.offset.is_none() {
                    return Err(CliError::CompressedInHumanMap);
                }
                if let (true, false, Some(off)) = (e.data, e.zero, e.offset) {
                    let name = chain.layers()[e.depth].path().display().to_string();
                    w(writeln!(
                        out,
                        "{:<16}{:<16}{:<16}{name}",
                        hex(e.start),
                        hex(e.length),
                        hex(off)
                    ))?;
                }
            }
        }
    }
    Ok(0)
}

/// C's `%#x`: `0` for zero, else `0x` and lowercase hex digits.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

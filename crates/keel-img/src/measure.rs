//! `keel-img measure`: the sizes a new image needs, printed as qemu-img measure does.

use std::path::Path;

use keel_block::measure::{measure, Preallocation, Source, Target};
use serde::Serialize;

use crate::{
    image_format, parse_create_opts, qcow2_options, CliError, OutputFormat, Result, Usage,
};

/// Options of `measure`.
pub(crate) struct MeasureArgs<'a> {
    pub(crate) file: Option<&'a Path>,
    pub(crate) size: Option<u64>,
    pub(crate) format: Option<&'a str>,
    pub(crate) out_format: &'a str,
    pub(crate) options: Option<&'a str>,
    pub(crate) output: OutputFormat,
    pub(crate) allow_probed_backing: bool,
}

#[derive(Serialize)]
struct Json {
    #[serde(skip_serializing_if = "Option::is_none")]
    bitmaps: Option<u64>,
    required: u64,
    #[serde(rename = "fully-allocated")]
    fully_allocated: u64,
}

/// Splits `preallocation=` out of a `-o` string.
fn preallocation(opts: Option<&str>) -> Result<(Preallocation, Option<String>)> {
    let mut p = Preallocation::Off;
    let mut rest = Vec::new();
    for kv in opts
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        match kv.split_once('=') {
            Some(("preallocation", v)) => {
                p = v.parse().map_err(|_| Usage::Preallocation(v.to_string()))?
            }
            _ => rest.push(kv),
        }
    }
    Ok((p, (!rest.is_empty()).then(|| rest.join(","))))
}

/// Runs `measure`.
pub(crate) fn cmd_measure(a: &MeasureArgs<'_>) -> Result<i32> {
    let (prealloc, opts) = preallocation(a.options)?;
    let target = match a.out_format {
        "raw" => {
            if opts.is_some() {
                return Err(Usage::RawOptions.into());
            }
            Target::Raw
        }
        "qcow2" => Target::Qcow2(parse_create_opts(opts.as_deref(), 0)?, prealloc),
        other => {
            return Err(
                keel_block::Error::Unsupported(keel_block::error::Unsupported::Format(
                    other.to_string(),
                ))
                .into(),
            )
        }
    };
    let chain;
    let source = match (a.file, a.size) {
        (Some(_), Some(_)) => return Err(Usage::MeasureSizeAndFile.into()),
        (None, None) => return Err(Usage::MeasureNeedsInput.into()),
        (None, Some(s)) => Source::Size(s),
        (Some(f), None) => {
            let fmt = image_format(f, a.format)?.parse()?;
            chain = crate::open_chain(f, fmt, qcow2_options(a.allow_probed_backing))?;
            Source::Image(&chain)
        }
    };
    let m = measure(&target, source)?;
    match a.output {
        OutputFormat::Json => {
            let j = Json {
                bitmaps: m.bitmaps,
                required: m.required,
                fully_allocated: m.fully_allocated,
            };
            let s = serde_json::to_string_pretty(&j).map_err(CliError::Json)?;
            // qemu-img indents by four spaces.
            println!("{}", s.replace("\n  ", "\n    "));
        }
        OutputFormat::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}

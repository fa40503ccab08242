//! `keel-img compare`: qemu-img compare's messages and exit codes (0 identical, 1
//! different, 2 error).

use std::path::Path;

use keel_block::chain::Chain;
use keel_block::compare::{compare, Difference};

use crate::progress::Progress;
use crate::{image_format, print_error, qcow2_options, Result};

/// Options of `compare`.
pub(crate) struct CompareArgs<'a> {
    pub(crate) files: [&'a Path; 2],
    pub(crate) formats: [Option<&'a str>; 2],
    pub(crate) strict: bool,
    pub(crate) progress: bool,
    pub(crate) quiet: bool,
    pub(crate) allow_probed_backing: bool,
}

/// Runs `compare`; errors are reported here and exit 2.
pub(crate) fn cmd_compare(a: &CompareArgs<'_>) -> Result<i32> {
    match run(a) {
        Ok(code) => Ok(code),
        Err(e) => {
            print_error(&e);
            Ok(2)
        }
    }
}

fn run(a: &CompareArgs<'_>) -> Result<i32> {
    let open = |i: usize| -> Result<Chain> {
        let fmt = image_format(a.files[i], a.formats[i])?.parse()?;
        crate::open_chain(a.files[i], fmt, qcow2_options(a.allow_probed_backing))
    };
    let (c1, c2) = (open(0)?, open(1)?);
    let mut progress = Progress::new(a.progress && !a.quiet);
    let r = compare(&c1, &c2, a.strict, &mut |f| progress.update(f))?;
    let say = |s: &str| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let code = match r.difference {
        None => {
            if r.sizes_differ {
                say("Warning: Image size mismatch!");
            }
            say("Images are identical.");
            0
        }
        Some(Difference::Size) => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Some(Difference::Status { offset }) => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
        Some(Difference::Content { offset, past_end }) => {
            if past_end {
                say("Warning: Image size mismatch!");
            }
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Some(_) => 1,
    };
    if a.progress && !a.quiet {
        println!();
    }
    Ok(code)
}

//! `keel-img`: the command (see the crate's README).

use std::process::ExitCode;

fn main() -> ExitCode {
    keel_img::main_with_args(std::env::args_os())
}

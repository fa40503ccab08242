//! keel-img and its library calls: build a chain of three images, see where each range
//! comes from (`keel-img map`), measure a flattened copy, build a volume from another
//! (`convert -B`) and compare it with the chain.
//!
//! `cargo run -p keel-examples --example volume_chain`

use std::path::PathBuf;
use std::process::ExitCode;

use keel_block::chain::Chain;
use keel_block::compare::compare;
use keel_block::measure::{measure, Preallocation, Source, Target};
use keel_block::qcow2::CreateOptions;
use keel_block::{Format, Qcow2Options};

/// A directory removed (with its files) when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a keel-img command line in-process; fails on a non-zero exit.
fn keel_img(args: &[&str]) -> Result<(), String> {
    println!("$ keel-img {}", args.join(" "));
    match keel_img::main_with_args(["keel-img"].iter().chain(args)) {
        ExitCode::SUCCESS => Ok(()),
        code => Err(format!("keel-img {args:?} exited with {code:?}")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir =
        TempDir(std::env::temp_dir().join(format!("keel-volume-example-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let path = |n: &str| dir.0.join(n).to_string_lossy().into_owned();
    let (base, mid, top) = (path("base.qcow2"), path("mid.qcow2"), path("top.qcow2"));

    // base <- mid <- top, each holding some data of its own.
    keel_img(&["create", "-q", "-f", "qcow2", &base, "4M"])?;
    keel_img(&["write", "-P", "1", &base, "0", "256k"])?;
    keel_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &mid,
    ])?;
    keel_img(&["write", "-P", "2", &mid, "64k", "64k"])?;
    keel_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top,
    ])?;
    keel_img(&["write", "-P", "3", &top, "1M", "4k"])?;

    // Where each range is served from: depth 0 is top, 2 is base.
    keel_img(&["map", &top])?;
    keel_img(&["map", "--output=json", &top])?;
    keel_img(&["info", "--backing-chain", &top])?;

    // The same as library calls.
    let chain = Chain::open(top.as_ref(), Format::Qcow2, Qcow2Options::default())?;
    for st in chain.block_status(0, chain.size())? {
        if st.present {
            println!(
                "{:>8} +{:<8} from {}",
                st.start,
                st.length,
                chain.layers()[st.depth].path().display()
            );
        }
    }
    let m = measure(
        &Target::Qcow2(CreateOptions::default(), Preallocation::Off),
        Source::Image(&chain),
    )?;
    println!(
        "a flattened qcow2 copy needs {} bytes ({} fully allocated)",
        m.required, m.fully_allocated
    );

    // A volume built from another: only what differs from base.qcow2.
    let delta = path("delta.qcow2");
    keel_img(&[
        "convert",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "-O",
        "qcow2",
        &top,
        &delta,
    ])?;
    keel_img(&["compare", &top, &delta])?;
    let other = Chain::open(delta.as_ref(), Format::Qcow2, Qcow2Options::default())?;
    let r = compare(&chain, &other, false, &mut |_| {})?;
    assert_eq!(r.difference, None);
    println!("delta.qcow2 over base.qcow2 reads as the chain");
    Ok(())
}

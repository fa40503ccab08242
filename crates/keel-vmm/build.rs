//! Builds the project's bare-metal test guest (crates/keel-test-guest, a separate cargo
//! project) so that keel can embed it as its default kernel and tests can find it.
//! The path is exported to the crate as `KEEL_TEST_GUEST`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest = here.join("../keel-test-guest");
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let target_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("guest");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The guest is freestanding: flags meant for the host crates (coverage, sanitizers,
    // a cross target) must not reach it.
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("cannot run cargo to build the test guest");
    assert!(status.success(), "building crates/keel-test-guest failed");
    let image = target_dir.join("release/keel-test-guest");
    assert!(image.exists(), "no test guest at {}", image.display());
    println!("cargo:rustc-env=KEEL_TEST_GUEST={}", image.display());
}

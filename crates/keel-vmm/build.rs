//! Builds the project's bare-metal test guest (crates/keel-test-guest, a separate cargo
//! project) so that keel can embed it as its default kernel and tests can find it.
//! The path is exported to the crate as `KEEL_TEST_GUEST`.
//!
//! It also links the `keel` binary statically where it can (see [`link_keel_statically`]).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    link_keel_statically();
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

/// The C libraries rustc asks the linker for on a `-gnu` target that is not `crt-static`
/// (std's and the `libc` crate's `-l` flags), and the static archive that stands in for each.
const STATIC_STAND_INS: [(&str, &str); 7] = [
    ("libc.a", "libc.a"),
    ("libm.a", "libm.a"),
    ("libpthread.a", "libpthread.a"),
    ("libdl.a", "libdl.a"),
    ("librt.a", "librt.a"),
    ("libutil.a", "libutil.a"),
    // The unwinder: `-lgcc_s` asks for the shared one, libgcc_eh.a is its static twin.
    ("libgcc_s.a", "libgcc_eh.a"),
];

/// Links the `keel` binary (only it: not the library, tests or benches, nor the crates that
/// depend on this one) as a static PIE against glibc's archives (issue 18, Must 2: no ld.so,
/// libc.so or libgcc_s to map and relocate, only the parts of glibc keel calls; 3.6 MiB peak
/// RSS for the trivial guest's run before, 2.75 MiB after: crates/keel-vmm/README.md,
/// "Performance: resident memory").
///
/// `-C target-feature=+crt-static` would be the usual way, but without an explicit
/// `--target` cargo passes RUSTFLAGS to proc-macro crates too, which cannot be static, so
/// the README's plain `cargo build`/`cargo run` could not use it. Instead the binary's link
/// gets `-static-pie` and, first on the library search path, a directory in which each
/// `-lNAME` rustc emits finds glibc's (or libgcc's) static archive before the shared object.
///
/// Skipped, leaving an ordinary dynamically linked keel, when: the target is not
/// `*-linux-gnu` or differs from the host (the archives found are the host C compiler's),
/// the build is `crt-static` already, a sanitizer is on (they need the dynamic loader), the
/// C compiler has no `libc.a` (glibc's static archives are not installed: on Debian they
/// come with libc6-dev), or `KEEL_LINK=dynamic` is set.
fn link_keel_statically() {
    println!("cargo:rerun-if-env-changed=KEEL_LINK");
    println!("cargo:rerun-if-env-changed=CC");
    let var = |name: &str| env::var(name).unwrap_or_default();
    let skip = |why: &str| println!("cargo:warning=keel is linked dynamically: {why}");
    if var("KEEL_LINK") == "dynamic" {
        return;
    }
    if var("CARGO_CFG_TARGET_OS") != "linux"
        || var("CARGO_CFG_TARGET_ENV") != "gnu"
        || var("TARGET") != var("HOST")
        || var("CARGO_CFG_TARGET_FEATURE")
            .split(',')
            .any(|f| f == "crt-static")
        || var("CARGO_ENCODED_RUSTFLAGS").contains("sanitizer")
    {
        return;
    }
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = PathBuf::from(var("OUT_DIR")).join("static-libs");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return skip(&format!("cannot create {}: {e}", dir.display()));
    }
    for (name, archive) in STATIC_STAND_INS {
        let Some(found) = find_archive(&cc, archive) else {
            return skip(&format!(
                "`{cc} -print-file-name={archive}` finds no {archive}"
            ));
        };
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        if let Err(e) = std::os::unix::fs::symlink(&found, &link) {
            return skip(&format!(
                "cannot link {} to {}: {e}",
                link.display(),
                found.display()
            ));
        }
    }
    println!("cargo:rustc-link-arg-bin=keel=-static-pie");
    println!("cargo:rustc-link-arg-bin=keel=-L{}", dir.display());
}

/// Where the C compiler `cc` would find `archive`, if it has one.
fn find_archive(cc: &str, archive: &str) -> Option<PathBuf> {
    let out = Command::new(cc)
        .arg(format!("-print-file-name={archive}"))
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    // Without the file, gcc and clang print the bare name back.
    (path.is_absolute() && path.is_file()).then(|| path.canonicalize().unwrap_or(path))
}

//! Helpers shared by the integration tests (keel-img's tests include this file too).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Fails the test (never skips) when the QEMU oracle is missing.
pub fn require_qemu() {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is required for these tests (install qemu-utils: apt-get install -y qemu-utils)"
        );
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

/// Runs a command and asserts it succeeded.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let o = run(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// `TOOL create -q -f FMT OPTS... PATH [SIZE]` (TOOL: qemu-img or keel-img), asserting success.
pub fn create_image(tool: &str, fmt: &str, opts: &[&str], path: &Path, size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(opts);
    args.push(p(path));
    args.extend(size);
    ok(tool, &args);
}

/// `qemu-io -f FMT -c CMD... PATH`, asserting success.
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(path));
    ok("qemu-io", &args);
}

/// One qemu-io command on a qcow2 image, asserting success.
pub fn qio(path: &Path, cmd: &str) {
    qemu_io("qcow2", path, &[cmd]);
}

/// A temporary directory holding two empty directories named `a` and `b`, returned
/// with their paths (the directory lives as long as the `TempDir`).
pub fn two_dirs(a: &str, b: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join(a), dir.path().join(b));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    (dir, a, b)
}

/// Copies every file of the directory `from` into the directory `to`.
pub fn copy_files(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `qemu-img compare A B` finds the two images' contents identical (exit code 0).
pub fn assert_same_contents(a: &Path, b: &Path, what: &str) {
    let o = run("qemu-img", &["compare", p(a), p(b)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: {} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img check --output=json`: (exit code, corruptions, leaks, check-errors).
pub fn qemu_check(path: &Path) -> (i32, u64, u64, u64) {
    let o = run("qemu-img", &["check", "--output=json", p(path)]);
    let code = o.status.code().unwrap_or(-1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check output not JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (code, n("corruptions"), n("leaks"), n("check-errors"))
}

/// The qcow2 `image` is clean for `qemu-img check` and `qemu-img compare` finds it
/// identical to `want` (written to `want.raw` in `dir`).
pub fn assert_clean_and_equal(image: &Path, want: &[u8], dir: &Path) {
    let (code, corrupt, leaks, errors) = qemu_check(image);
    assert_eq!(
        (code, corrupt, leaks, errors),
        (0, 0, 0, 0),
        "qemu-img check"
    );
    let reference = dir.join("want.raw");
    std::fs::write(&reference, want).unwrap();
    let out = ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(image),
            p(&reference),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Host mapping of a qcow2 image from `qemu-img map --output=json`:
/// (guest start, length, host offset) for every data extent.
pub fn qemu_map(path: &Path) -> Vec<(u64, u64, u64)> {
    let out = ok(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", p(path)],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    v.as_array()
        .expect("map array")
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .filter_map(|e| {
            Some((
                e["start"].as_u64()?,
                e["length"].as_u64()?,
                e.get("offset")?.as_u64()?,
            ))
        })
        .collect()
}

/// qemu-img's release as (major, minor), from `qemu-img --version`.
pub fn qemu_img_release() -> (u32, u32) {
    let out = ok("qemu-img", &["--version"]);
    let v = out
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("no version in `qemu-img --version`: {out}"));
    let mut parts = v.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

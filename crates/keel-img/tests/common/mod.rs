//! Helpers shared by keel-img's integration tests: keel-block's (QEMU oracle, PRNG), and
//! keel-img's own.
#![allow(dead_code)]

use std::path::Path;

#[path = "../../../keel-block/tests/common/mod.rs"]
mod block;
pub use block::*;

/// keel-img built by cargo for this test run.
pub const KEEL_IMG: &str = env!("CARGO_BIN_EXE_keel-img");

/// `lazy.qcow2` in `dir`: a qcow2 image of SIZE with 4 KiB clusters and lazy refcounts, made
/// by `keel-img create`.
pub fn keel_lazy_image(dir: &Path, size: &str) -> std::path::PathBuf {
    let q = dir.join("lazy.qcow2");
    create_image(
        KEEL_IMG,
        "qcow2",
        &["-o", "cluster_size=4k,lazy_refcounts=on"],
        &q,
        Some(size),
    );
    q
}

/// `keel-img check --output=json`: (exit code, corruptions, leaks, check-errors).
pub fn keel_check(path: &Path) -> (i32, u64, u64, u64) {
    let o = run(KEEL_IMG, &["check", "--output=json", p(path)]);
    let code = o.status.code().unwrap_or(-1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "keel-img check output not JSON ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (code, n("corruptions"), n("leaks"), n("check-errors"))
}

/// One row of `snapshot -l`, parsed so that listings from any QEMU release compare:
/// (id, tag, VM state size, date and time, VM clock in milliseconds, icount).
pub type SnapshotRow = (String, String, String, String, u64, String);

/// Parses a `snapshot -l` listing (both QEMU 7's `VM SIZE`/`HH:MM:SS.mmm` layout and
/// QEMU 8+'s `VM_SIZE`/`HHHH:MM:SS.mmm` one). Tags must not contain spaces.
pub fn snapshot_rows(listing: &str) -> Vec<SnapshotRow> {
    let mut lines = listing.lines();
    assert_eq!(lines.next(), Some("Snapshot list:"), "listing: {listing}");
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header.first(), Some(&"ID"), "listing: {listing}");
    lines
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 7, "short snapshot row {line:?}");
            let clock: Vec<u64> = f[6]
                .split([':', '.'])
                .map(|n| n.parse().unwrap_or_else(|_| panic!("VM clock {:?}", f[6])))
                .collect();
            assert_eq!(clock.len(), 4, "VM clock {:?}", f[6]);
            let ms = ((clock[0] * 60 + clock[1]) * 60 + clock[2]) * 1000 + clock[3];
            (
                f[0].to_string(),
                f[1].to_string(),
                format!("{} {}", f[2], f[3]),
                format!("{} {}", f[4], f[5]),
                ms,
                f.get(7).unwrap_or(&"").to_string(),
            )
        })
        .collect()
}

/// Asserts keel-img's `snapshot -l` says what qemu-img's does: the same rows, field by
/// field, for whatever QEMU is installed; and, with QEMU 10 or later (the layout keel-img
/// prints), the same text.
pub fn assert_same_snapshot_listing(keel: &str, qemu: &str) {
    let rows = snapshot_rows(keel);
    assert!(!rows.is_empty(), "no snapshots listed:\n{keel}");
    assert_eq!(
        rows,
        snapshot_rows(qemu),
        "keel-img:\n{keel}\nqemu-img:\n{qemu}"
    );
    if qemu_img_release().0 >= 10 {
        assert_eq!(keel, qemu);
    }
}

//! The machine's own limit for a blk row: fio with io_uring and O_DIRECT, 4 KiB random
//! requests at the row's depth on the same file the VMMs' guests use.

use std::path::Path;
use std::process::Command;

use super::blk::Row;

/// The IOPS fio reaches for `row` on `file` (a raw image: fio writes into it), `requests`
/// requests as in the guest's run.
pub fn iops(file: &Path, row: Row, requests: u64) -> f64 {
    let out = Command::new("fio")
        .args([
            "--name=limit",
            "--ioengine=io_uring",
            "--direct=1",
            "--bs=4k",
            "--output-format=json",
        ])
        .arg(format!("--rw={}", row.op))
        .arg(format!("--iodepth={}", row.depth))
        .arg(format!("--number_ios={requests}"))
        .arg(format!("--filename={}", file.display()))
        .output()
        .expect("cannot run fio (scripts/install-tools installs it)");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio's JSON output");
    let side = if row.op == "randread" {
        "read"
    } else {
        "write"
    };
    report["jobs"][0][side]["iops"]
        .as_f64()
        .unwrap_or_else(|| panic!("no {side} IOPS in fio's report"))
}

/// The first line of `fio --version`.
pub fn version() -> String {
    Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "fio (not installed)".to_string())
}

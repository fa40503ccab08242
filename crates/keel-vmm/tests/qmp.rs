//! keel's QMP control socket, driven by QEMU's own Python client (`qemu.qmp` from PyPI,
//! which scripts/install-tools installs): `tests/qmp/qmp_test.py` runs every check against
//! keel, and the same script against QEMU 10 running the same guest proves the script.

mod support;

use std::process::Command;

use keel_testutil::require_kvm;
use support::{repo_root, TempDir, GUEST};

/// Runs the script against `target` and asserts that it passed.
fn run_script(target: &str) {
    let python = "python3";
    let has_client = Command::new(python)
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_client,
        "Python's qemu.qmp is missing: scripts/install-tools installs it (pip install qemu.qmp)"
    );
    let dir = TempDir::new(&format!("qmp-{target}"));
    let script = repo_root().join("crates/keel-vmm/tests/qmp/qmp_test.py");
    let out = Command::new(python)
        .arg(&script)
        .args(["--target", target, "--vmm", env!("CARGO_BIN_EXE_keel")])
        .args(["--guest", GUEST, "--workdir"])
        .arg(dir.path())
        .output()
        .expect("cannot run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().last() == Some("qmp-test: PASS"),
        "{target}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

#[test]
fn qmp_against_keel() {
    require_kvm!();
    run_script("keel");
}

#[test]
fn qmp_script_against_qemu() {
    require_kvm!();
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.is_ok(),
        "qemu-system-x86_64 is missing: scripts/install-tools installs it"
    );
    run_script("qemu");
}

//! keel's QMP control socket, driven by QEMU's own Python client (`qemu.qmp` from PyPI,
//! which scripts/install-tools installs): `tests/qmp/qmp_test.py` runs every check against
//! keel, and the same script against QEMU 10 running the same guest proves the script.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::time::Duration;

use keel_testutil::require_kvm;
use support::{keel, repo_root, run_keel, Running, TempDir, GUEST};

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

#[test]
fn qmp_fd_serves_an_inherited_listening_socket() {
    require_kvm!();
    let dir = TempDir::new("qmp-fd");
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: F_SETFD on a descriptor this test owns: clearing FD_CLOEXEC so keel inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut cmd = keel();
    cmd.args([
        "--memory",
        "128",
        "--cmdline",
        "keel.test=idle",
        "--serial",
        "none",
    ])
    .args(["--qmp-fd", &fd.to_string()]);
    let vm = Running::start(cmd);
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = BufReader::new(client.try_clone().unwrap()).lines();
    let mut replies = Vec::new();
    client
        .write_all(br#"{"execute":"qmp_capabilities"}{"execute":"quit","id":"q"}"#)
        .unwrap();
    for _ in 0..4 {
        match lines.next() {
            Some(Ok(l)) => replies.push(serde_json::from_str::<serde_json::Value>(&l).unwrap()),
            _ => break,
        }
    }
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(
        replies.len(),
        4,
        "replies {replies:?}; keel's stderr: {}",
        out.stderr
    );
    assert!(replies[0]["QMP"]["version"].is_object());
    assert_eq!(replies[1], serde_json::json!({"return": {}}));
    assert_eq!(replies[2], serde_json::json!({"return": {}, "id": "q"}));
    assert_eq!(replies[3]["data"]["reason"], "host-qmp-quit");
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
}

#[test]
fn qmp_fd_must_be_a_listening_unix_socket() {
    for fd in ["0", "999"] {
        let out = run_keel(&["--qmp-fd", fd], Duration::from_secs(10));
        assert_eq!(out.code(), Some(2), "--qmp-fd {fd}");
        assert!(
            out.stderr
                .contains("not an open, listening Unix stream socket"),
            "{}",
            out.stderr
        );
    }
}

//! Running the `keel` binary from tests: build small PVH guests, start keel, watch its
//! output, signal it, and collect how it ended.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use keel_testutil::TempDir;

/// The `keel` binary under test, with `--debug-exit`: the tests' guests end keel with the
/// status they choose (the test guest's verdict: 0 PASS, 1 FAIL).
pub fn keel() -> Command {
    let mut cmd = keel_without_debug_exit();
    cmd.arg("--debug-exit");
    cmd
}

/// The `keel` binary under test, as a user starts it: no debug-exit port.
pub fn keel_without_debug_exit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keel"))
}

/// Writes a PVH guest whose 32-bit entry code is `body` into `dir` and returns its path.
pub fn pvh_guest(dir: &TempDir, body: &str) -> PathBuf {
    let path = dir.path().join("guest.elf");
    keel_testutil::assemble_pvh(body, &path);
    path
}

/// How a keel run ended.
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A running keel whose stdout and stderr are being collected.
pub struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn collect(
    mut r: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Running {
    /// Starts `cmd` with piped stdin/stdout/stderr.
    pub fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start keel");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// keel's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What keel printed on stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Writes to keel's stdin.
    pub fn input(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until `cond(stdout)` holds; panics with the output after `limit`.
    pub fn wait_for(&mut self, what: &str, limit: Duration, cond: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if cond(&self.stdout()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "keel ended ({status}) before {what}; stdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    String::from_utf8_lossy(&self.stderr.lock().unwrap())
                );
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("timed out waiting for {what}; stdout:\n{}", self.stdout());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to keel.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc_kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for keel to exit (killing it after `limit`).
    pub fn finish(mut self, limit: Duration) -> Outcome {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "keel did not exit within {limit:?}; stdout:\n{}",
                    self.stdout()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            status,
            stdout: self.stdout(),
            stderr: String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned(),
        }
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Runs keel with `args` to completion (stdin closed), within `limit`.
pub fn run_keel(args: &[&str], limit: Duration) -> Outcome {
    let mut cmd = keel();
    cmd.args(args);
    Running::start(cmd).finish(limit)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The built-in test guest's image (built by keel-vmm's build script).
pub const GUEST: &str = env!("KEEL_TEST_GUEST");

/// Runs the test guest's `scenario` under QEMU (the peer VMM): `-M machine`, `cpus`
/// vCPUs, with isa-debug-exit at keel's port when `debug_exit` (QEMU then exits with
/// `(value << 1) | 1`: 1 for PASS), plus `extra` arguments.
pub fn qemu_guest(
    scenario: &str,
    machine: &str,
    cpus: u8,
    debug_exit: bool,
    extra: &[&str],
    limit: Duration,
) -> Outcome {
    let cmdline = format!("keel.test={scenario}");
    qemu_guest_cmdline(&cmdline, machine, cpus, debug_exit, extra, limit)
}

/// Like [`qemu_guest`], with the whole kernel command line given (`keel.test=NAME` and any
/// further words, e.g. a scenario's parameters).
pub fn qemu_guest_cmdline(
    cmdline: &str,
    machine: &str,
    cpus: u8,
    debug_exit: bool,
    extra: &[&str],
    limit: Duration,
) -> Outcome {
    let qemu = "qemu-system-x86_64";
    assert!(
        Command::new(qemu).arg("--version").output().is_ok(),
        "{qemu} is missing: scripts/install-tools installs it (Debian package qemu-system-x86)"
    );
    let mut cmd = Command::new(qemu);
    cmd.args(["-enable-kvm", "-M", machine, "-cpu", "kvm64", "-m", "128"])
        .args(["-smp", &cpus.to_string()])
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
    if debug_exit {
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
    }
    cmd.args(["-kernel", GUEST, "-append", cmdline]).args(extra);
    Running::start(cmd).finish(limit)
}

/// The test guest's verdict lines (`keel-test: PASS ...` / `keel-test: FAIL ...`).
pub fn verdict(out: &Outcome) -> Vec<&str> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("keel-test: PASS") || l.starts_with("keel-test: FAIL"))
        .collect()
}

/// Asserts exactly one verdict, PASS of `scenario`, and the exit status.
pub fn assert_pass(out: &Outcome, scenario: &str, status: i32) {
    assert_eq!(
        verdict(out),
        vec![format!("keel-test: PASS {scenario}").as_str()],
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code(), Some(status), "stderr: {}", out.stderr);
}

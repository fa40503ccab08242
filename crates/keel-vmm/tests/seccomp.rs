//! keel's seccomp filters, seen from outside: a thread that makes a system call outside
//! its list ends keel with a message naming the call and the thread kind (the hidden
//! test aid `--seccomp-selftest KIND` makes one such call); `--seccomp log` lets it
//! through, `--seccomp off` installs nothing; every thread of a running keel shows
//! `Seccomp: 2` (filter mode) in /proc, or 0 with `off`.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use keel_testutil::require_kvm;
use support::{run_keel, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(60);

/// The status keel ends with after a forbidden call: 128 + SIGSYS.
const KILLED: i32 = 159;

/// Runs the `serial` scenario with `args` added.
fn serial_scenario(args: &[&str]) -> support::Outcome {
    let mut all = vec!["--memory", "64", "--cmdline", "keel.test=serial"];
    all.extend_from_slice(args);
    run_keel(&all, LIMIT)
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_keel_naming_it() {
    require_kvm!();
    let out = serial_scenario(&["--seccomp-selftest", "vcpu"]);
    assert_eq!(out.code(), Some(KILLED), "stderr: {}", out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        "keel: seccomp: a vcpu thread made a forbidden system call: getppid (110); stopping"
    );
    // The call came before the guest's first instruction: it printed nothing.
    assert!(!out.stdout.contains("keel-test"), "{}", out.stdout);
}

#[test]
fn every_thread_kind_names_itself() {
    require_kvm!();
    let dir = TempDir::new("seccomp-kinds");
    for kind in ["main", "vcpu", "device", "control"] {
        // A socket each: keel ended by a forbidden call leaves its socket file behind.
        let sock = dir.path().join(format!("{kind}.sock"));
        let sock = sock.to_str().unwrap();
        let out = serial_scenario(&["--qmp", sock, "--seccomp-selftest", kind]);
        assert_eq!(out.code(), Some(KILLED), "{kind}: stderr: {}", out.stderr);
        assert_eq!(
            out.stderr.trim_end(),
            format!(
                "keel: seccomp: a {kind} thread made a forbidden system call: getppid (110); stopping"
            )
        );
    }
}

/// Runs the `serial` scenario with `--seccomp MODE --seccomp-selftest vcpu`; returns
/// keel's pid and how it ended.
fn selftest_run(mode: &str) -> (u32, support::Outcome) {
    let mut cmd = support::keel();
    cmd.args(["--memory", "64", "--cmdline", "keel.test=serial"])
        .args(["--seccomp", mode, "--seccomp-selftest", "vcpu"]);
    let keel = Running::start(cmd);
    let pid = keel.pid();
    (pid, keel.finish(LIMIT))
}

/// The kernel's audit records of calls a filter logged (SECCOMP_RET_LOG) for `pid`.
fn logged_calls(pid: u32) -> Vec<String> {
    let out = std::process::Command::new("dmesg")
        .output()
        .expect("dmesg (the kernel log, where SECCOMP_RET_LOG records go)");
    assert!(
        out.status.success(),
        "dmesg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("type=1326") && l.contains(&format!(" pid={pid} ")))
        .map(str::to_string)
        .collect()
}

#[test]
fn log_lets_the_call_through_and_the_kernel_logs_it() {
    require_kvm!();
    let (pid, out) = selftest_run("log");
    support::assert_pass(&out, "serial", 0);
    assert!(!out.stderr.contains("seccomp"), "{}", out.stderr);
    let logged = logged_calls(pid);
    // 0x7ffc0000 is SECCOMP_RET_LOG; 110 is getppid.
    assert!(
        logged.iter().any(|l| l.contains("comm=\"keel-vcpu0\"")
            && l.contains(" syscall=110 ")
            && l.contains("code=0x7ffc0000")),
        "no log record of the vCPU's getppid: {logged:?}"
    );
}

#[test]
fn off_installs_nothing() {
    require_kvm!();
    let (pid, out) = selftest_run("off");
    support::assert_pass(&out, "serial", 0);
    assert!(!out.stderr.contains("seccomp"), "{}", out.stderr);
    assert_eq!(logged_calls(pid), Vec::<String>::new());
}

/// The `Seccomp:` field of every thread of `pid`, by thread name (`comm`).
fn seccomp_fields(pid: u32) -> BTreeMap<String, Vec<u32>> {
    let mut fields: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("status")),
        ) else {
            continue; // The thread ended meanwhile.
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .expect("a Seccomp: line")
            .trim()
            .parse()
            .unwrap();
        fields
            .entry(comm.trim_end().to_string())
            .or_default()
            .push(mode);
    }
    fields
}

/// Runs the `idle` scenario with a disk (its queue worker writes every tick), a balloon
/// and a control socket with a client connected, and returns the `Seccomp:` field of
/// every thread while it runs.
fn running_threads(mode: &str) -> BTreeMap<String, Vec<u32>> {
    let dir = TempDir::new(&format!("seccomp-{mode}"));
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut cmd = support::keel();
    cmd.args(["--memory", "64", "--cmdline", "keel.test=idle"])
        .args(["--seccomp", mode, "--balloon", "--qmp"])
        .arg(&sock)
        .arg("--disk")
        .arg(format!("path={},format=raw", disk.display()));
    let mut keel = Running::start(cmd);
    keel.wait_for("tick 3", LIMIT, |s| s.contains("keel-test: tick 3"));
    let mut client = UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let mut greeting = [0u8; 16];
    client.read_exact(&mut greeting).unwrap();
    let fields = seccomp_fields(keel.pid());
    keel.signal(15);
    let out = keel.finish(LIMIT);
    assert_eq!(out.code(), Some(128 + 15), "stderr: {}", out.stderr);
    fields
}

#[test]
fn every_thread_of_a_running_keel_is_filtered() {
    require_kvm!();
    let fields = running_threads("on");
    for name in [
        "keel",
        "keel-vcpu0",
        "keel-devices",
        "keel-blk-q0",
        "keel-qmp",
        "keel-qmp-client",
    ] {
        assert!(fields.contains_key(name), "no {name} thread in {fields:?}");
    }
    eprintln!("threads and their Seccomp fields: {fields:?}");
    assert!(
        fields.values().flatten().all(|&m| m == 2),
        "a thread without a filter: {fields:?}"
    );
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    require_kvm!();
    let fields = running_threads("off");
    assert!(fields.contains_key("keel-blk-q0"), "{fields:?}");
    assert!(
        fields.values().flatten().all(|&m| m == 0),
        "a filtered thread: {fields:?}"
    );
}

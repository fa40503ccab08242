//! keel's disks: a VM stopped by a signal in the middle of disk I/O leaves a consistent
//! image (keel stops the virtio-blk workers, after their requests in flight, before it
//! closes the disks); a probed format never follows a backing file.

mod support;

use std::process::Command;
use std::time::Duration;

use keel_testutil::require_kvm;
use support::{run_keel, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn sigterm_during_writes_leaves_a_clean_qcow2() {
    require_kvm!();
    let dir = TempDir::new("disk-shutdown");
    let img = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M")
        .status()
        .expect("qemu-img (scripts/install-tools installs qemu-utils)");
    assert!(st.success());
    let mut cmd = support::keel();
    cmd.args([
        "--memory",
        "128",
        "--cmdline",
        "keel.test=blk-bench keel.blk_n=100000",
        "--disk",
    ])
    .arg(format!("path={},format=qcow2,cache=none", img.display()));
    let mut keel = Running::start(cmd);
    // The random-write row (100000 allocating writes into an empty image, a few seconds):
    // the signal lands while clusters are being allocated.
    keel.wait_for("the random-write row", LIMIT, |s| {
        s.contains("keel-test: blk-bench: begin randwrite depth 1")
    });
    std::thread::sleep(Duration::from_millis(300));
    keel.signal(15);
    let out = keel.finish(LIMIT);
    assert_eq!(out.code(), Some(128 + 15), "stderr: {}", out.stderr);
    assert_eq!(out.stderr.trim(), "keel: stopped by signal 15");
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check after the signal:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&img)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        !info.contains("\"dirty-flag\": true") && !info.contains("\"corrupt\": true"),
        "{info}"
    );
}

fn qemu_img(args: &[&str]) {
    assert!(Command::new("qemu-img")
        .args(args)
        .status()
        .unwrap()
        .success());
}

/// `base.raw` (8 MiB) and `top.qcow2` over it (backing format stated), made by qemu-img.
fn overlay(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", base.to_str().unwrap(), "8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    (base, top)
}

/// keel with `--disk DISK` exits 1 before the guest runs, saying `why`.
fn refused(disk: &str, why: &str) {
    let out = run_keel(&["--memory", "64", "--disk", disk], LIMIT);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.contains(why), "{}", out.stderr);
}

/// keel with `--disk DISK` runs the test guest's serial scenario to the end.
fn runs(disk: &str) {
    let out = run_keel(
        &[
            "--memory",
            "64",
            "--cmdline",
            "keel.test=serial",
            "--disk",
            disk,
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
}

/// A raw image a guest wrote can hold a qcow2 header naming any host file: with the format
/// probed, keel refuses to follow a backing file; with `format=qcow2` it follows it.
#[test]
fn a_probed_qcow2_with_a_backing_file_is_refused() {
    require_kvm!();
    let dir = TempDir::new("disk-probe");
    let (_, top) = overlay(dir.path());
    refused(
        &format!("path={}", top.display()),
        "probed as qcow2 with a backing file; give format=qcow2",
    );
    runs(&format!("path={},format=qcow2", top.display()));
}

/// `backing=refuse`: an image that names a backing file is refused, with the name it
/// states, before anything is opened through it; an image without one runs.
#[test]
fn backing_refuse_refuses_an_image_that_names_a_backing_file() {
    require_kvm!();
    let dir = TempDir::new("disk-backing-refuse");
    let (base, top) = overlay(dir.path());
    let alone = dir.path().join("alone.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", alone.to_str().unwrap(), "8M"]);
    refused(
        &format!("path={},format=qcow2,backing=refuse", top.display()),
        &format!(
            "names the backing file {}, and backing=refuse",
            base.display()
        ),
    );
    runs(&format!(
        "path={},format=qcow2,backing=refuse",
        alone.display()
    ));
}

/// `Cpus_allowed_list` of a thread of `pid` named `comm`, from /proc.
fn allowed_cpus(pid: u32, comm: &str) -> Option<String> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?.path();
        if std::fs::read_to_string(t.join("comm")).ok()?.trim() != comm {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).ok()?;
        return status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string());
    }
    None
}

/// `--disk ...,affinity=CPUS` and `--vcpu-affinity CPUS`: the disk's queue worker and the
/// vCPU run on the host CPUs named (as the kernel reports it in /proc), each without
/// the other's; CPUs the process may not use are refused before the VM starts, with a
/// one-line error naming them.
#[test]
fn disk_workers_and_vcpus_run_on_the_cpus_their_affinity_names() {
    require_kvm!();
    let dir = TempDir::new("disk-affinity");
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mine = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    // The first and the last CPU this test may use; the placements differ only with two.
    let first = mine.split([',', '-']).next().unwrap().to_string();
    let last = mine.rsplit([',', '-']).next().unwrap().to_string();
    if first == last {
        println!("skipped: placement needs two host CPUs, this test has {mine}");
        return;
    }
    let run = |args: &[&str]| {
        let mut cmd = support::keel();
        cmd.args([
            "--memory",
            "128",
            "--cmdline",
            "keel.test=blk-bench keel.blk_n=1000000",
        ])
        .args(args);
        let mut keel = Running::start(cmd);
        keel.wait_for("the first row", LIMIT, |s| {
            s.contains("keel-test: blk-bench: begin randread depth 1")
        });
        let got = (
            allowed_cpus(keel.pid(), "keel-blk-q0"),
            allowed_cpus(keel.pid(), "keel-vcpu0"),
        );
        keel.signal(15);
        let out = keel.finish(LIMIT);
        assert_eq!(out.code(), Some(128 + 15), "stderr: {}", out.stderr);
        got
    };
    let disk = |affinity: &str| format!("path={},format=raw{affinity}", img.display());
    let (worker, vcpu) = run(&["--disk", &disk(&format!(",affinity=[{last}]"))]);
    assert_eq!(worker.as_deref(), Some(last.as_str()), "the worker's CPUs");
    assert_eq!(vcpu.as_deref(), Some(mine.as_str()), "the vCPU's CPUs");
    let (worker, vcpu) = run(&["--disk", &disk(""), "--vcpu-affinity", &first]);
    assert_eq!(worker.as_deref(), Some(mine.as_str()), "the worker's CPUs");
    assert_eq!(vcpu.as_deref(), Some(first.as_str()), "the vCPU's CPUs");

    let out = run_keel(
        &["--memory", "128", "--disk", &disk(",affinity=1023")],
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let e = out.stderr.trim();
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("affinity") && e.contains("CPUs 1023 are not all usable here"),
        "{e}"
    );
    let out = run_keel(&["--memory", "128", "--vcpu-affinity", "1000-1023"], LIMIT);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains("--vcpu-affinity: CPUs 1000-1023 are not all usable here"),
        "{}",
        out.stderr
    );
    let out = run_keel(&["--memory", "128", "--vcpu-affinity", "1-0"], LIMIT);
    assert_eq!(out.code(), Some(2), "stderr: {}", out.stderr);
    assert!(out.stderr.contains("expected host CPUs"), "{}", out.stderr);
}

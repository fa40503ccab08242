//! Linux early-boot smoke tests: a Debian cloud kernel, code no one here wrote, checks
//! keel's boot protocols.
//!
//! On the project's machines guest kernel code runs under KVM's instruction emulator
//! (a software nested hypervisor), one instruction at a time, and some instructions the
//! emulator cannot run at all (`lock cmpxchg16b` in SLUB): the kernel gets through early
//! set-up and then stops with a KVM emulation failure. So these tests assert what the
//! kernel prints early, then stop keel. On a host with hardware virtualization the same
//! kernel boots fully:
//!
//!     scripts/fetch-linux
//!     target/release/keel --kernel target/linux/vmlinux --memory 512 \
//!         --cmdline "console=ttyS0 earlyprintk=serial"
//!
//! The kernel comes from `scripts/fetch-linux` (Debian's linux-image-cloud-amd64, cached in
//! target/linux).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keel_memory::{MemoryLayout, MIB};
use keel_testutil::require_kvm;
use support::{keel, repo_root, Running};

const MEMORY_MIB: u64 = 256;
/// Early boot takes a few seconds of emulated kernel code; allow generous headroom for a
/// loaded CI machine.
const LIMIT: Duration = Duration::from_secs(240);

fn kernel_dir() -> PathBuf {
    let script = repo_root().join("scripts/fetch-linux");
    let out = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/fetch-linux failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn start(kernel: &std::path::Path, cmdline: &str) -> Running {
    let mut cmd = keel();
    cmd.args([
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        &MEMORY_MIB.to_string(),
        "--cmdline",
        cmdline,
    ]);
    Running::start(cmd)
}

#[test]
fn pvh_vmlinux_prints_banner_cmdline_and_our_e820() {
    require_kvm!();
    let kernel = kernel_dir().join("vmlinux");
    let cmdline = "console=ttyS0 earlyprintk=serial keel.smoke=pvh-42";
    let expected_e820: Vec<String> = MemoryLayout::new(MEMORY_MIB * MIB)
        .unwrap()
        .e820()
        .iter()
        .map(|e| format!("BIOS-e820: {e}"))
        .collect();
    let mut vm = start(&kernel, cmdline);
    // The e820 dump is complete once the line after it appears.
    vm.wait_for("the kernel's e820 dump", LIMIT, |out| {
        out.contains("printk: bootconsole") || out.contains("NX (Execute Disable)")
    });
    vm.signal(15);
    let out = vm.finish(Duration::from_secs(30));
    let log = out.stdout;
    assert!(log.contains("Linux version "), "no banner:\n{log}");
    // The console ends lines with "\r\n"; compare whole lines.
    let echoed = format!("Command line: {cmdline}");
    assert!(
        log.lines().any(|l| l.trim_end().ends_with(&echoed)),
        "command line not echoed exactly:\n{log}"
    );
    let got: Vec<String> = log
        .lines()
        .filter_map(|l| l.find("BIOS-e820: ").map(|i| l[i..].trim_end().to_string()))
        .collect();
    assert_eq!(
        got, expected_e820,
        "kernel's e820 differs from keel-memory's layout"
    );
    assert_eq!(out.status.code(), Some(128 + 15), "stderr: {}", out.stderr);
}

#[test]
fn bzimage_decompressor_reads_our_boot_params() {
    require_kvm!();
    let kernel = kernel_dir().join("vmlinuz");
    // The decompressor parses the command line from boot_params before it decompresses
    // anything, and reports `nokaslr` on the early serial console it found there too.
    let mut vm = start(&kernel, "console=ttyS0 earlyprintk=serial nokaslr");
    vm.wait_for("the decompressor's nokaslr notice", LIMIT, |out| {
        out.contains("KASLR disabled: 'nokaslr' on cmdline.")
    });
    vm.signal(15);
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(128 + 15), "stderr: {}", out.stderr);
}

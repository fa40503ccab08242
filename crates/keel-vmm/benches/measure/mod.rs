//! What the benchmarks measure, shared by the single-purpose benches (`boot`, `blk`,
//! `density`, `net`) and the report that runs them all in one sitting (`report`): how each VMM is
//! started for a comparison, how a run is timed and its memory read, and medians.
//!
//! Every figure is taken from outside the VMM, where a user would look: wall time from
//! spawning the process to lines on its serial console, `wait4`'s peak RSS,
//! `/proc/PID/smaps_rollup`.
#![allow(dead_code)]

pub mod blk;
pub mod boot;
pub mod density;
pub mod fio;
pub mod net;

use std::process::Command;

/// The `keel` binary this bench was built with.
pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// The project's test guest (crates/keel-test-guest), built by keel-vmm's build script.
pub const TEST_GUEST: &str = env!("KEEL_TEST_GUEST");

/// The peer VMM.
pub const QEMU: &str = "qemu-system-x86_64";

/// The median of `v` (the upper one of an even count); `v` must not be empty.
pub fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    assert!(!v.is_empty(), "the median of no samples");
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable samples"));
    v[v.len() / 2]
}

/// The first line of `qemu-system-x86_64 --version`, named next to QEMU's figures.
pub fn qemu_version() -> String {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 --version");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("unknown QEMU")
        .to_string()
}

/// Whether this process may open /dev/kvm (every comparison needs it).
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// QEMU's options common to every comparison: KVM, the `kvm64` CPU, no display, no
/// default devices, serial on stdout.
fn qemu_base(machine: &str, memory_mib: u32) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-enable-kvm", "-M", machine, "-cpu", "kvm64", "-m"])
        .arg(memory_mib.to_string())
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
    cmd
}

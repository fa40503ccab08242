//! Boot benchmark: keel against QEMU (microvm) on the same guests: the issue's trivial PVH
//! guest (prints a line, exits) and the project's test guest running its `serial` scenario
//! (whose CPL0 set-up runs under KVM's instruction emulator on the project's machines).
//!
//! QEMU runs in the fastest configuration that runs the scenario:
//! `-M microvm,acpi=off,pit=off,pic=off,rtc=off` (its default split irqchip). Measured
//! with QEMU 10.0.2 on the project's machines: with ACPI on (microvm's default) a
//! whole run takes ~2.8 s instead of ~60 ms (the guest then walks QEMU's larger ACPI
//! tables during its CPL0 set-up, where every instruction is emulated; not profiled
//! further); dropping the PIT, PIC and RTC saves another 1-2 ms.
//!
//! keel runs with each of its interrupt controller set-ups (`--irqchip split`, the default,
//! and `--irqchip kernel`), and with the split irqchip once more without seccomp filters
//! (`--seccomp off`: what the filters cost), interleaved with QEMU.
//!
//! `cargo bench -p keel-vmm --bench boot [-- RUNS]` (default 20 runs each)
//!
//! For each run: the wall time from spawning the VMM to the first byte of guest serial
//! output, the time to the VMM's exit, and the VMM's peak resident set size
//! (`ru_maxrss` from `wait4`). Both VMMs get 128 MiB and run the same guest, which
//! touches the same few pages, so the difference in peak RSS is the difference in what
//! each VMM itself keeps resident. Medians are printed.
//!
//! The VMMs are started with `fork` and `exec`, not `posix_spawn`: `ru_maxrss` counts the
//! memory a process had when it called `exec`, and a child that `posix_spawn` starts
//! shares (vfork) its parent's memory until then, so every figure would be at least this
//! bench's whole resident set (a keel run measured 2.6 MiB from a small parent and 6.0 MiB
//! from one holding 4 MiB more). A forked child holds only copies of the parent's anonymous pages, which the
//! bench prints as the floor of its figures.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Sample {
    first_byte: Duration,
    exit: Duration,
    max_rss_kib: i64,
}

// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run(cmd: &mut Command, expect: &str) -> Sample {
    // SAFETY: the hook does nothing; it is there so that std forks rather than
    // posix_spawns (see the module documentation). This bench runs no other threads.
    unsafe {
        cmd.pre_exec(|| Ok(()));
    }
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8];
    out.read_exact(&mut byte).expect("no serial output");
    let first_byte = start.elapsed();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid buffer for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both out-pointers are valid.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let exit = start.elapsed();
    let text = String::from_utf8_lossy(&rest);
    let all = format!("{}{text}", byte[0] as char);
    assert!(all.contains(expect), "guest failed:\n{all}");
    Sample {
        first_byte,
        exit,
        max_rss_kib: usage.ru_maxrss,
    }
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn report(name: &str, samples: Vec<Sample>) {
    let fb = median(samples.iter().map(|s| s.first_byte).collect());
    let ex = median(samples.iter().map(|s| s.exit).collect());
    let rss = median(samples.iter().map(|s| s.max_rss_kib).collect());
    println!(
        "{name:<22} first serial byte {:>7.2} ms   exit {:>7.2} ms   peak RSS {:>6} KiB",
        fb.as_secs_f64() * 1e3,
        ex.as_secs_f64() * 1e3,
        rss
    );
}

/// This process's anonymous resident memory (`RssAnon` in /proc/self/status), what a
/// forked child starts with.
fn anon_rss_kib() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .map(|v| v.trim().trim_end_matches(" kB").to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The first line of `qemu-system-x86_64 --version`, named next to QEMU's figures.
fn qemu_version() -> String {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 --version");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("unknown QEMU")
        .to_string()
}

fn main() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    // `cargo bench` passes `--bench`; a number after it sets the run count.
    let runs: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(20);
    let keel = env!("CARGO_BIN_EXE_keel");
    let test_guest = env!("KEEL_TEST_GUEST");
    let dir = keel_testutil::TempDir::new("keel-boot-bench");
    let trivial = dir.path().join("trivial.elf");
    keel_testutil::assemble_elf(TRIVIAL_GUEST, 0x10_0000, &trivial);
    let trivial = trivial.to_str().unwrap();
    println!("{runs} runs each, medians; 1 vCPU, 128 MiB");
    println!(
        "peak RSS figures include the bench's anonymous memory at fork ({} KiB now)",
        anon_rss_kib()
    );
    println!("peer: {}", qemu_version());
    for (what, kernel, cmdline, expect) in [
        (
            "trivial PVH guest (prints a line, exits)",
            trivial,
            "",
            "OK",
        ),
        (
            "keel-test-guest, scenario serial",
            test_guest,
            "keel.test=serial",
            "keel-test: PASS serial",
        ),
    ] {
        let keel_run = |irqchip: &str, seccomp: &str| {
            run(
                Command::new(keel).args([
                    "--debug-exit",
                    "--irqchip",
                    irqchip,
                    "--seccomp",
                    seccomp,
                    "--memory",
                    "128",
                    "--kernel",
                    kernel,
                    "--cmdline",
                    cmdline,
                ]),
                expect,
            )
        };
        // Interleaved, so that a change in the host's load touches every set-up alike.
        let (mut split, mut in_kernel, mut no_filters, mut qemu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            split.push(keel_run("split", "on"));
            in_kernel.push(keel_run("kernel", "on"));
            no_filters.push(keel_run("split", "off"));
            qemu.push(run(
                Command::new("qemu-system-x86_64").args([
                    "-enable-kvm",
                    "-M",
                    "microvm,acpi=off,pit=off,pic=off,rtc=off",
                    "-cpu",
                    "kvm64",
                    "-m",
                    "128",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-nodefaults",
                    "-serial",
                    "stdio",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=4",
                    "-kernel",
                    kernel,
                    "-append",
                    cmdline,
                ]),
                expect,
            ));
        }
        println!("guest: {what}");
        report("keel --irqchip split", split);
        report("keel --irqchip kernel", in_kernel);
        report("keel --seccomp off", no_filters);
        report("qemu", qemu);
    }
}

/// The issue's trivial guest: a PVH ELF whose 32-bit entry prints "OK" on COM1 and writes
/// 0 to the debug-exit port.
const TRIVIAL_GUEST: &str = r#"
    .section .note.pvh, "a"
    .p2align 2
    .long 4, 4, 18              # namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long _start
    .text
    .code32
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $0x4f, %al
    out %al, %dx
    mov $0x4b, %al
    out %al, %dx
    mov $0x0a, %al
    out %al, %dx
    xor %eax, %eax
    out %eax, $0xf4
1:  hlt
    jmp 1b
"#;

//! Whole-process boot runs: the wall time from spawning the VMM to the first byte of guest
//! serial output, the time to the VMM's exit, and the VMM's peak resident set size
//! (`ru_maxrss` from `wait4`). Both VMMs get 128 MiB and run the same guest, which touches
//! the same few pages, so the difference in peak RSS is the difference in what each VMM
//! itself keeps resident.
//!
//! The VMMs are started with `fork` and `exec`, not `posix_spawn`: `ru_maxrss` counts the
//! memory a process had when it called `exec`, and a child that `posix_spawn` starts
//! shares (vfork) its parent's memory until then, so every figure would be at least the
//! bench's whole resident set (a keel run measured 2.6 MiB from a small parent and 6.0 MiB
//! from one holding 4 MiB more). A forked child holds only copies of the parent's anonymous
//! pages, which [`anon_rss_kib`] reports as the floor of the figures.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{median, qemu_base, KEEL};

/// Guest RAM of every boot run, in MiB.
pub const MEMORY_MIB: u32 = 128;

/// One run.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub first_byte: Duration,
    pub exit: Duration,
    pub max_rss_kib: i64,
}

/// The medians of a set of runs, each figure on its own.
#[derive(Clone, Copy, Debug)]
pub struct Medians {
    pub first_byte: Duration,
    pub exit: Duration,
    pub max_rss_kib: i64,
}

impl Medians {
    pub fn of(samples: &[Sample]) -> Self {
        Medians {
            first_byte: median(samples.iter().map(|s| s.first_byte).collect()),
            exit: median(samples.iter().map(|s| s.exit).collect()),
            max_rss_kib: median(samples.iter().map(|s| s.max_rss_kib).collect()),
        }
    }
}

/// Runs `cmd` to its end; its serial output (stdout) must contain `expect`.
// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub fn run(cmd: &mut Command, expect: &str) -> Sample {
    // SAFETY: the hook does nothing; it is there so that std forks rather than
    // posix_spawns (see the module documentation). The hook runs no allocator or lock.
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

/// keel booting `kernel` with `cmdline`, ended by the guest through the debug-exit port.
pub fn keel(irqchip: &str, seccomp: &str, kernel: &str, cmdline: &str) -> Command {
    let mut cmd = Command::new(KEEL);
    cmd.args([
        "--debug-exit",
        "--irqchip",
        irqchip,
        "--seccomp",
        seccomp,
        "--memory",
        &MEMORY_MIB.to_string(),
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
    ]);
    cmd
}

/// QEMU booting `kernel` with `cmdline` in its fastest configuration that runs the
/// guests: `-M microvm,acpi=off,pit=off,pic=off,rtc=off` (its default split irqchip).
/// Measured with QEMU 10.0.2 on the project's machines: with ACPI on (microvm's default) a
/// whole run takes ~2.8 s instead of ~60 ms (the guest then walks QEMU's larger ACPI
/// tables during its CPL0 set-up, where every instruction is emulated); dropping the PIT,
/// PIC and RTC saves another 1-2 ms.
pub fn qemu(kernel: &str, cmdline: &str) -> Command {
    let mut cmd = qemu_base("microvm,acpi=off,pit=off,pic=off,rtc=off", MEMORY_MIB);
    cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-kernel", kernel, "-append", cmdline]);
    cmd
}

/// Writes the issue's trivial guest into `dir` and returns its path.
pub fn trivial_guest(dir: &Path) -> PathBuf {
    let path = dir.join("trivial.elf");
    keel_testutil::assemble_pvh(TRIVIAL_GUEST, &path);
    path
}

/// What the trivial guest prints.
pub const TRIVIAL_EXPECT: &str = "OK";

/// The issue's trivial guest: a PVH ELF whose 32-bit entry prints "OK" on COM1 and writes
/// 0 to the debug-exit port.
const TRIVIAL_GUEST: &str = r#"
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

/// This process's anonymous resident memory (`RssAnon` in /proc/self/status) in KiB, what
/// a forked child starts with: the floor under every peak RSS figure.
pub fn anon_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

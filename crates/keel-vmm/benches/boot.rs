//! Boot benchmark: keel against QEMU (microvm) on the same guests: the trivial PVH
//! guest (prints a line, exits) and the project's test guest running its `serial` scenario
//! (whose CPL0 set-up runs under KVM's instruction emulator on the project's machines).
//!
//! QEMU runs in the fastest configuration that runs the scenario (see `measure::boot::qemu`):
//! `-M microvm,acpi=off,pit=off,pic=off,rtc=off` (its default split irqchip).
//!
//! keel runs with each of its interrupt controller set-ups (`--irqchip split`, the default,
//! and `--irqchip kernel`), and with the split irqchip once more without seccomp filters
//! (`--seccomp off`: what the filters cost), interleaved with QEMU.
//!
//! `cargo bench -p keel-vmm --bench boot [-- RUNS]` (default 20 runs each)
//!
//! For each run: the wall time from spawning the VMM to the first byte of guest serial
//! output, the time to the VMM's exit, and the VMM's peak resident set size
//! (`ru_maxrss` from `wait4`; the VMM is forked, not posix_spawned, see `measure::boot`).
//! Medians are printed.

mod measure;

use measure::boot::{self, Medians, Sample};

fn report(name: &str, samples: &[Sample]) {
    let m = Medians::of(samples);
    println!(
        "{name:<22} first serial byte {:>7.2} ms   exit {:>7.2} ms   peak RSS {:>6} KiB",
        m.first_byte.as_secs_f64() * 1e3,
        m.exit.as_secs_f64() * 1e3,
        m.max_rss_kib
    );
}

fn main() {
    if !measure::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    // `cargo bench` passes `--bench`; a number after it sets the run count.
    let runs: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(20);
    let dir = keel_testutil::TempDir::new("keel-boot-bench");
    let trivial = boot::trivial_guest(dir.path());
    let trivial = trivial.to_str().unwrap();
    println!("{runs} runs each, medians; 1 vCPU, 128 MiB");
    match boot::anon_rss_kib() {
        Some(k) => {
            println!("peak RSS figures include the bench's anonymous memory at fork ({k} KiB now)")
        }
        None => println!("peak RSS figures include the bench's anonymous memory at fork (unknown)"),
    }
    println!("peer: {}", measure::qemu_version());
    for (what, kernel, cmdline, expect) in [
        (
            "trivial PVH guest (prints a line, exits)",
            trivial,
            "",
            boot::TRIVIAL_EXPECT,
        ),
        (
            "keel-test-guest, scenario serial",
            measure::TEST_GUEST,
            "keel.test=serial",
            "keel-test: PASS serial",
        ),
    ] {
        // Interleaved, so that a change in the host's load touches every set-up alike.
        let (mut split, mut in_kernel, mut no_filters, mut qemu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            split.push(boot::run(
                &mut boot::keel("split", "on", kernel, cmdline),
                expect,
            ));
            in_kernel.push(boot::run(
                &mut boot::keel("kernel", "on", kernel, cmdline),
                expect,
            ));
            no_filters.push(boot::run(
                &mut boot::keel("split", "off", kernel, cmdline),
                expect,
            ));
            qemu.push(boot::run(&mut boot::qemu(kernel, cmdline), expect));
        }
        println!("guest: {what}");
        report("keel --irqchip split", &split);
        report("keel --irqchip kernel", &in_kernel);
        report("keel --seccomp off", &no_filters);
        report("qemu", &qemu);
    }
}

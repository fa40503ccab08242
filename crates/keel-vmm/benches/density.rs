//! Density benchmark: 32 VMs of 128 MiB started at once, each running an idle guest (it
//! prints a line, then halts); keel against QEMU (`-M microvm,acpi=off,...`), interleaved.
//!
//! `cargo bench -p keel-vmm --bench density [-- RUNS]` (default 3 runs; medians)
//!
//! For each run: the time from the first spawn until every guest printed its ready line,
//! and the VMM processes' total RSS and
//! PSS from /proc/PID/smaps_rollup once all run (see `measure::density`). Every VMM is
//! ended with SIGTERM and reaped after each run.

mod measure;

use measure::density::{self, Sample, MEMORY_MIB, VMS};
use measure::median;

fn report(name: &str, samples: &[Sample]) {
    let t = median(samples.iter().map(|s| s.all_running).collect());
    let rss = median(samples.iter().map(|s| s.rss_kib).collect());
    let pss = median(samples.iter().map(|s| s.pss_kib).collect());
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "{name:<6} all running {:>8.1} ms   total RSS {:>7.1} MiB  PSS {:>7.1} MiB   per VM RSS {:>6.2} MiB  PSS {:>6.2} MiB",
        t.as_secs_f64() * 1e3,
        mib(rss),
        mib(pss),
        mib(rss) / VMS as f64,
        mib(pss) / VMS as f64,
    );
}

fn main() {
    if !measure::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    let runs: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(3);
    println!("{VMS} VMs of {MEMORY_MIB} MiB at once, idle guest; {runs} runs, medians");
    println!("peer: {}", measure::qemu_version());
    let dir = keel_testutil::TempDir::new("keel-density-bench");
    let guest = density::idle_guest(dir.path());
    let (mut keel, mut qemu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        keel.push(density::run(VMS, || density::keel(&guest)));
        qemu.push(density::run(VMS, || density::qemu(&guest)));
    }
    report("keel", &keel);
    report("qemu", &qemu);
}

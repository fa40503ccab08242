//! virtio-balloon benchmark: keel against QEMU (`-M microvm,pcie=on`, virtio-balloon-pci),
//! the test guest's `balloon-service` scenario in a 1280 MiB guest that touched all its
//! RAM: the time to release 1 GiB through the balloon (inflate) and to get it back
//! (deflate and touch every page again), host-timed from the target change to the guest's
//! line and as the guest timed it, and the VMM's resident memory at boot (device present,
//! guest RAM untouched), after the touch, inflated and deflated.
//!
//! `cargo bench -p keel-vmm --bench balloon [-- RUNS]` (default 3 runs; medians).
//! keel runs as this binary's child through keel-vmm's library (see
//! tests/balloon_support), QEMU through QMP.

#[path = "../tests/balloon_support/mod.rs"]
mod balloon_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use balloon_support::{BalloonVm, MIB};

const MEMORY_MIB: u64 = 1280;
const RELEASE: u64 = 1 << 30;
const LIMIT: Duration = Duration::from_secs(120);

struct Run {
    release_ms: f64,
    release_guest_ms: f64,
    refault_ms: f64,
    refault_guest_ms: f64,
    rss_boot: u64,
    rss_touched: u64,
    rss_inflated: u64,
    rss_back: u64,
}

fn guest_us(line: &str) -> f64 {
    line.rsplit(" in ")
        .next()
        .and_then(|r| r.strip_suffix(" us"))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn one(mut vm: BalloonVm) -> Run {
    vm.wait_line("balloon-service: negotiated", 1, LIMIT);
    let rss_boot = vm.rss();
    vm.wait_line("balloon-service: touched", 1, LIMIT);
    let rss_touched = vm.rss();
    let pages = RELEASE / 4096;
    let t0 = Instant::now();
    vm.set_target(RELEASE);
    let line = vm.wait_line(&format!("inflated: actual {pages} pages"), 1, LIMIT);
    let release_ms = t0.elapsed().as_secs_f64() * 1e3;
    let release_guest_ms = guest_us(&line) / 1e3;
    let rss_inflated = vm.rss();
    let t0 = Instant::now();
    vm.set_target(0);
    let line = vm.wait_line("deflated and touched: actual 0 pages", 1, LIMIT);
    let refault_ms = t0.elapsed().as_secs_f64() * 1e3;
    let refault_guest_ms = guest_us(&line) / 1e3;
    let rss_back = vm.rss();
    vm.stop();
    Run {
        release_ms,
        release_guest_ms,
        refault_ms,
        refault_guest_ms,
        rss_boot,
        rss_touched,
        rss_inflated,
        rss_back,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn report(what: &str, runs: &[Run]) {
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "| {what} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} |",
        m(&|r| r.release_ms),
        m(&|r| r.release_guest_ms),
        m(&|r| r.refault_ms),
        m(&|r| r.refault_guest_ms),
        m(&|r| mib(r.rss_boot)),
        m(&|r| mib(r.rss_touched)),
        m(&|r| mib(r.rss_inflated)),
        m(&|r| mib(r.rss_back)),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--vmm-child") {
        balloon_support::child(&args[2..]);
        return;
    }
    if !keel_kvm::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    let runs: usize = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let cmdline = "keel.test=balloon-service";
    let keel: Vec<Run> = (0..runs)
        .map(|_| one(BalloonVm::keel("pci", MEMORY_MIB, "", cmdline)))
        .collect();
    let qemu: Vec<Run> = (0..runs)
        .map(|_| one(BalloonVm::qemu(MEMORY_MIB, "", cmdline)))
        .collect();
    println!("\nballoon: release and re-fault 1 GiB of a {MEMORY_MIB} MiB guest, median of {runs}");
    println!("| VMM | release ms (host) | release ms (guest) | re-fault ms (host) | re-fault ms (guest) | RSS at boot MiB | touched | inflated | deflated+touched |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    report("keel", &keel);
    report("QEMU", &qemu);
}

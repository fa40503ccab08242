//! The virtio-balloon end to end, measured from outside the VMM: the test guest's
//! `balloon` self-test under keel over both transports; then `balloon-service` under keel
//! (both transports) and under QEMU's virtio-balloon-pci (the peer), with the VMM's
//! resident memory (VmRSS) read from /proc: after the guest touched all RAM and inflated
//! N MiB, RSS drops by at least 90% of N; after deflating and touching, it comes back;
//! free page reporting lowers it likewise.
//!
//! No libtest harness (`harness = false`): the same binary is the VMM child the tests
//! drive (see `balloon_support`). Arguments: test-name filters, as with libtest.

mod balloon_support;
mod support;

use std::time::Duration;

use balloon_support::{BalloonVm, MIB};

const MEMORY_MIB: u64 = 256;
const INFLATE_MIB: u64 = 192;
const LIMIT: Duration = Duration::from_secs(60);

fn self_test(transport: &str) {
    let out = support::run_keel(
        &[
            "--memory",
            "128",
            "--transport",
            transport,
            "--serial",
            "stdio",
            "--balloon",
            "size=32,stats_period=1,deflate_on_oom=on,free_page_reporting=on",
            "--cmdline",
            "keel.test=balloon",
        ],
        LIMIT,
    );
    support::assert_pass(&out, "balloon", 0);
    for needle in [
        "inflated to the target 8192 pages",
        "actual 8192",
        "DEFLATE_ON_OOM",
        "deflated 8192 pages",
        "reported",
    ] {
        assert!(
            out.stdout.contains(needle),
            "no `{needle}` in:\n{}",
            out.stdout
        );
    }
    // The device asked for statistics again within the guest's 3 s.
    assert!(!out.stdout.contains("did not ask again"), "{}", out.stdout);
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// Touch, inflate INFLATE_MIB, deflate and touch: RSS drops and comes back.
fn inflate_deflate(mut vm: BalloonVm) {
    vm.wait_line("balloon-service: touched", 1, LIMIT);
    let touched = vm.rss();
    assert!(
        touched > MEMORY_MIB * MIB * 8 / 10,
        "{}: RSS {:.0} MiB after the guest touched its {MEMORY_MIB} MiB",
        vm.what,
        mib(touched)
    );
    vm.set_target(INFLATE_MIB * MIB);
    let line = vm.wait_line(
        &format!("inflated: actual {} pages", INFLATE_MIB * 256),
        1,
        LIMIT,
    );
    let inflated = vm.rss();
    let n = INFLATE_MIB * MIB;
    println!(
        "{}: touched {:.0} MiB, after inflating {INFLATE_MIB} MiB {:.0} MiB ({line})",
        vm.what,
        mib(touched),
        mib(inflated)
    );
    assert!(
        touched.saturating_sub(inflated) >= n * 9 / 10,
        "{}: RSS went from {:.0} to {:.0} MiB after inflating {INFLATE_MIB} MiB",
        vm.what,
        mib(touched),
        mib(inflated)
    );
    vm.set_target(0);
    let line = vm.wait_line("deflated and touched: actual 0 pages", 1, LIMIT);
    let back = vm.rss();
    println!(
        "{}: after deflating and touching {:.0} MiB ({line})",
        vm.what,
        mib(back)
    );
    assert!(
        back.saturating_sub(inflated) >= n * 9 / 10,
        "{}: RSS went from {:.0} to {:.0} MiB after deflating and touching {INFLATE_MIB} MiB",
        vm.what,
        mib(inflated),
        mib(back)
    );
    if vm.what == "keel" {
        let c = vm.counters();
        assert!(c.contains(&format!("released={}", n)), "{c}");
        // The guest's statistics came through (every second, stats_period=1).
        let s = vm.stats();
        assert!(
            s.contains("stat-total-memory=") && s.contains("stat-free-memory="),
            "{s}"
        );
    } else {
        let q = vm.query_balloon();
        assert!(
            q.contains(&format!("\"actual\": {}", MEMORY_MIB * MIB)),
            "{q}"
        );
    }
    vm.stop();
}

/// Touch all RAM, then report it free: RSS drops.
fn reporting(vm: BalloonVm) {
    let mut vm = vm;
    vm.wait_line("balloon-service: touched", 1, LIMIT);
    let touched = vm.rss();
    let line = vm.wait_line("balloon-service: reported", 1, LIMIT);
    let reported: u64 = line
        .split("reported ")
        .nth(1)
        .and_then(|r| r.split(" MiB").next())
        .and_then(|n| n.parse().ok())
        .expect("reported N MiB");
    let after = vm.rss();
    println!(
        "{}: touched {:.0} MiB, after reporting {reported} MiB free {:.0} MiB",
        vm.what,
        mib(touched),
        mib(after)
    );
    assert!(reported >= MEMORY_MIB / 2, "{line}");
    assert!(
        touched.saturating_sub(after) >= reported * MIB * 9 / 10,
        "{}: RSS went from {:.0} to {:.0} MiB after reporting {reported} MiB",
        vm.what,
        mib(touched),
        mib(after)
    );
    vm.stop();
}

fn service_keel(transport: &str) {
    let vm = BalloonVm::keel(
        transport,
        MEMORY_MIB,
        "stats_period=1",
        "keel.test=balloon-service",
    );
    inflate_deflate(vm);
}

fn reporting_keel(transport: &str) {
    let vm = BalloonVm::keel(
        transport,
        MEMORY_MIB,
        "free_page_reporting=on",
        "keel.test=balloon-service keel.balloon=report",
    );
    reporting(vm);
}

fn service_qemu() {
    let vm = BalloonVm::qemu(MEMORY_MIB, "", "keel.test=balloon-service");
    inflate_deflate(vm);
}

fn reporting_qemu() {
    let vm = BalloonVm::qemu(
        MEMORY_MIB,
        ",free-page-reporting=on",
        "keel.test=balloon-service keel.balloon=report",
    );
    reporting(vm);
}

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    ("balloon_self_test_passes_over_pci", || self_test("pci")),
    ("balloon_self_test_passes_over_mmio", || self_test("mmio")),
    ("rss_follows_the_balloon_over_pci", || service_keel("pci")),
    ("rss_follows_the_balloon_over_mmio", || service_keel("mmio")),
    ("free_page_reporting_lowers_rss_over_pci", || {
        reporting_keel("pci")
    }),
    ("free_page_reporting_lowers_rss_over_mmio", || {
        reporting_keel("mmio")
    }),
    ("rss_follows_the_balloon_under_qemu", service_qemu),
    ("free_page_reporting_lowers_rss_under_qemu", reporting_qemu),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--vmm-child") {
        balloon_support::child(&args[2..]);
        return;
    }
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&Test> = TESTS
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (n, _) in selected {
            println!("{n}: test");
        }
        return;
    }
    if !keel_kvm::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    println!("running {} tests", selected.len());
    for (name, test) in &selected {
        println!("test {name} ...");
        test();
        println!("test {name} ... ok");
    }
    println!("test result: ok. {} passed", selected.len());
}

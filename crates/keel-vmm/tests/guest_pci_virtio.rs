//! PCI and virtio end to end with the test guest (crates/keel-test-guest): its `pci`
//! scenario against keel's PCI segment and test device.

mod support;

use std::time::Duration;

use keel_testutil::require_kvm;
use support::{run_keel, Outcome};

const LIMIT: Duration = Duration::from_secs(60);

fn verdict(out: &Outcome) -> Vec<&str> {
    out.stdout
        .lines()
        .filter(|l| l.starts_with("keel-test: PASS") || l.starts_with("keel-test: FAIL"))
        .collect()
}

/// Runs the built-in test guest under keel with `scenario` and `extra` arguments.
fn keel_scenario(scenario: &str, extra: &[&str]) -> Outcome {
    let cmdline = format!("keel.test={scenario}");
    let mut args = vec!["--memory", "128", "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    run_keel(&args, LIMIT)
}

fn assert_pass(out: &Outcome, scenario: &str, status: i32) {
    assert_eq!(
        verdict(out),
        vec![format!("keel-test: PASS {scenario}").as_str()],
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code(), Some(status), "stderr: {}", out.stderr);
}

fn assert_lines(out: &Outcome, lines: &[&str]) {
    for l in lines {
        assert!(out.stdout.contains(l), "missing {l:?} in:\n{}", out.stdout);
    }
}

#[test]
fn pci_scenario_passes_with_the_test_device() {
    require_kvm!();
    let out = keel_scenario("pci", &["--device", "pci-test"]);
    assert_pass(&out, "pci", 0);
    assert_lines(
        &out,
        &[
            "pci: MCFG: ECAM at 0xe0000000 for segment 0 bus 0",
            "pci: 00:00.0 1b36:0008 class 060000",
            "pci: 00:01.0 6b65:0001 class ff0000",
            "pci: CF8/CFC and ECAM enumerate the same 2 functions",
            "moved to 0xd0000000",
            "pci: MSI-X vector 0 arrived",
            "pci: masked: no interrupt, PBA bit 0 set",
            "pci: unmasked: the pending interrupt arrived exactly once",
        ],
    );
}

#[test]
fn pci_scenario_fails_without_the_test_device() {
    require_kvm!();
    let out = keel_scenario("pci", &[]);
    assert_eq!(
        verdict(&out),
        vec!["keel-test: FAIL pci: no PCI test device (6b65:0001) on bus 0 (keel: --device pci-test)"],
        "stdout:\n{}",
        out.stdout
    );
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    // The bus itself is still there and enumerates the same both ways.
    assert_lines(
        &out,
        &["pci: CF8/CFC and ECAM enumerate the same 1 functions"],
    );
}

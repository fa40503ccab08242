//! PCI and virtio end to end with the test guest (crates/keel-test-guest): its `pci`
//! scenario against keel's PCI segment and test device; its virtio driver core against
//! keel's virtio echo device over both transports, and against QEMU's virtio-rng (the
//! independent peer).

mod support;

use std::time::Duration;

use keel_testutil::require_kvm;
use support::{assert_pass, run_keel, verdict, Outcome};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs the built-in test guest under keel with `scenario` and `extra` arguments.
fn keel_scenario(scenario: &str, extra: &[&str]) -> Outcome {
    let cmdline = format!("keel.test={scenario}");
    let mut args = vec!["--memory", "128", "--cmdline", &cmdline];
    args.extend_from_slice(extra);
    run_keel(&args, LIMIT)
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

/// Lines both virtio scenarios print whatever the transport.
const VIRTIO_LINES: &[&str] = &[
    "config magic 0x4f484345",
    "FEATURES_OK refused for unoffered features (bits 0 and 40)",
    "FEATURES_OK refused without VERSION_1",
    "negotiated features 0x130000000 (VERSION_1|INDIRECT_DESC|EVENT_IDX)",
    "DRIVER_OK (status 0xf)",
    "echoed 556 requests (195800 bytes), all verified",
    "used_event suppressed the interrupt",
    "used_event requested an interrupt, and it came",
    "the next echo came back XORed with 0x5a",
    "reset: status reads 0, xor back to 0",
];

fn assert_virtio(out: &Outcome, scenario: &str, extra: &[&str]) {
    assert_pass(out, scenario, 0);
    let prefixed: Vec<String> = VIRTIO_LINES
        .iter()
        .chain(extra)
        .map(|l| format!("keel-test: {scenario}: {l}"))
        .collect();
    assert_lines(
        out,
        &prefixed.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn virtio_pci_scenario_passes_with_the_echo_device() {
    require_kvm!();
    let out = keel_scenario("virtio-pci", &["--device", "virtio-echo"]);
    assert_virtio(
        &out,
        "virtio-pci",
        &[
            "found 1af4:107f at 00:01.0 (device type 0x3f)",
            "MSI-X: 2 vectors; entry 0 -> vector 0x50 (configuration), entry 1 -> vector 0x51 (queue 0)",
            "queue interrupt arrived (vector 0x51)",
            "configuration change: interrupt on vector 0x50 (ISR 0x2)",
        ],
    );
}

#[test]
fn virtio_mmio_scenario_passes_with_the_echo_device() {
    require_kvm!();
    let out = keel_scenario(
        "virtio-mmio",
        &["--device", "virtio-echo", "--transport", "mmio"],
    );
    assert_virtio(
        &out,
        "virtio-mmio",
        &[
            "found virtio-mmio version 2 at 0xf0000000 (size 0x1000, IRQ 5, vendor 0x4c45454b, device type 0x3f)",
            "queue interrupt arrived (vector 0x52, InterruptStatus 0x1, acknowledged)",
        ],
    );
}

#[test]
fn virtio_scenarios_fail_clearly_without_the_device() {
    require_kvm!();
    let out = keel_scenario("virtio-pci", &[]);
    assert_eq!(
        verdict(&out),
        vec!["keel-test: FAIL virtio-pci: no virtio-pci device of type 0x3f (1af4:107f) on bus 0 (keel: --device virtio-echo --transport pci)"],
        "stdout:\n{}",
        out.stdout
    );
    assert_eq!(out.code(), Some(1));
    // Over PCI, the echo device is not a virtio-mmio one.
    let out = keel_scenario("virtio-mmio", &["--device", "virtio-echo"]);
    assert_eq!(
        verdict(&out),
        vec!["keel-test: FAIL virtio-mmio: no virtio-mmio device of type 0x3f among the 0 virtio_mmio.device= entries on the command line (keel: --device virtio-echo --transport mmio)"],
        "stdout:\n{}",
        out.stdout
    );
    assert_eq!(out.code(), Some(1));
}

/// The guest's virtio driver core against devices nobody here wrote: QEMU's virtio-rng
/// over virtio-pci and over virtio-mmio (version 2; QEMU adds the command-line word
/// only without ACPI).
#[test]
fn the_virtio_driver_core_drives_qemus_virtio_rng_over_both_transports() {
    require_kvm!();
    let runs: [(&str, &[&str], &str); 2] = [
        (
            "microvm,pcie=on",
            &["-device", "virtio-rng-pci"],
            "keel-test: virtio-rng: found 1af4:1005",
        ),
        (
            "microvm,acpi=off",
            &[
                "-global",
                "virtio-mmio.force-legacy=false",
                "-device",
                "virtio-rng-device",
            ],
            "keel-test: virtio-rng: found virtio-mmio version 2",
        ),
    ];
    for (machine, extra, found) in runs {
        let out = support::qemu_guest("virtio-rng", machine, 1, true, extra, LIMIT);
        assert_pass(&out, "virtio-rng", 1);
        assert_lines(
            &out,
            &[
                found,
                "keel-test: virtio-rng: DRIVER_OK (status 0xf)",
                "keel-test: virtio-rng: read 64 bytes in 1 request(s), not all equal",
                "keel-test: virtio-rng: queue interrupt arrived",
                "keel-test: virtio-rng: reset: status reads 0",
            ],
        );
    }
}

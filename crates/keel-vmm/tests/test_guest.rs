//! The project's bare-metal test guest (crates/keel-test-guest), built by keel-vmm's build
//! script and embedded as keel's default kernel, run under keel and, as a peer, under QEMU.

mod support;

use std::time::Duration;

use keel_testutil::require_kvm;
use support::{assert_pass, run_keel, verdict, Outcome};

const LIMIT: Duration = Duration::from_secs(60);

fn keel_scenario(scenario: &str, cpus: u8) -> Outcome {
    let cmdline = format!("keel.test={scenario}");
    let cpus = cpus.to_string();
    // No --kernel: the built-in test guest.
    run_keel(
        &["--memory", "128", "--cpus", &cpus, "--cmdline", &cmdline],
        LIMIT,
    )
}

#[test]
fn serial_under_keel() {
    require_kvm!();
    let out = keel_scenario("serial", 1);
    assert_pass(&out, "serial", 0);
    assert!(out.stdout.contains("hello from the keel test guest"));
}

#[test]
fn memory_under_keel() {
    require_kvm!();
    let out = keel_scenario("memory", 1);
    assert_pass(&out, "memory", 0);
    // The guest saw the RAM keel's e820 gives: below the EBDA and from 1 MiB to 128 MiB.
    assert!(out.stdout.contains("RAM 0x0-0x9fc00"), "{}", out.stdout);
    assert!(
        out.stdout.contains("RAM 0x100000-0x8000000"),
        "{}",
        out.stdout
    );
}

#[test]
fn irq_under_keel() {
    require_kvm!();
    let out = keel_scenario("irq", 1);
    assert_pass(&out, "irq", 0);
    assert!(out.stdout.contains("device interrupt arrived"));
    assert!(out.stdout.contains("LAPIC timer interrupt arrived"));
}

#[test]
fn smp_under_keel_prints_every_apic_id() {
    require_kvm!();
    for cpus in [2u8, 4] {
        let out = keel_scenario("smp", cpus);
        assert_pass(&out, "smp", 0);
        for id in 1..cpus {
            assert!(
                out.stdout.contains(&format!("keel-test: cpu {id} up")),
                "cpu {id} missing:\n{}",
                out.stdout
            );
        }
        assert!(out.stdout.contains("keel-test: cpu 0 up (BSP)"));
        assert!(out
            .stdout
            .contains(&format!("smp: {cpus} of {cpus} CPUs up")));
    }
}

#[test]
fn an_unknown_scenario_fails_with_status_1() {
    require_kvm!();
    let out = keel_scenario("no-such-thing", 1);
    assert_eq!(
        verdict(&out),
        vec!["keel-test: FAIL no-such-thing: unknown scenario"]
    );
    assert_eq!(out.code(), Some(1));
}

/// The same guest, the same scenarios, under QEMU microvm (the peer). isa-debug-exit at
/// the same port makes QEMU exit with `(value << 1) | 1`: 1 for PASS.
fn qemu_scenario(scenario: &str, cpus: u8) -> Outcome {
    support::qemu_guest(scenario, "microvm", cpus, true, &[], LIMIT)
}

#[test]
fn the_same_scenarios_pass_under_qemu() {
    require_kvm!();
    for (scenario, cpus) in [("serial", 1), ("memory", 1), ("irq", 1), ("smp", 2)] {
        let out = qemu_scenario(scenario, cpus);
        assert_pass(&out, scenario, 1);
    }
}

/// Where no debug-exit port answers, the guest ends the VM itself: ACPI S5 through the
/// FADT (microvm: the hardware-reduced sleep control register), else an i8042 reset (`-M pc`
/// without ACPI; `-no-reboot` turns it into an exit). QEMU exits 0 either way.
#[test]
fn without_debug_exit_the_guest_ends_through_acpi_or_i8042() {
    require_kvm!();
    for (machine, how) in [
        ("microvm", "ACPI S5 (SLP_TYP 5"),
        ("pc,acpi=off", "trying an i8042 reset"),
    ] {
        let out = support::qemu_guest("serial", machine, 1, false, &[], LIMIT);
        assert_eq!(
            verdict(&out),
            vec!["keel-test: PASS serial"],
            "{machine}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains(how),
            "{machine}: no {how:?} in:\n{}",
            out.stdout
        );
        assert_eq!(out.code(), Some(0), "{machine}: {}", out.stderr);
    }
}

/// The issue's own command: the guest given as a file with --kernel, as any other kernel.
#[test]
fn the_guest_file_boots_with_kernel() {
    require_kvm!();
    let out = run_keel(
        &[
            "--kernel",
            support::GUEST,
            "--cmdline",
            "keel.test=smp",
            "--cpus",
            "2",
        ],
        LIMIT,
    );
    assert_pass(&out, "smp", 0);
    assert!(
        out.stdout.contains("keel-test: cpu 0 up (BSP)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("keel-test: cpu 1 up"), "{}", out.stdout);
}

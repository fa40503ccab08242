//! keel's two interrupt controller set-ups, `--irqchip split` (the default, under which
//! every other test file runs) and `--irqchip kernel`.
//!
//! Here a representative subset of the test guest's scenarios runs again with
//! `--irqchip kernel`: everything interrupt- or timer-related (IOAPIC pins from the UART and
//! from virtio-mmio, MSI-X from PCI devices, IPIs between vCPUs, the LAPIC timer, TSC
//! calibration on the PIT, the ACPI SCI through a QMP-free power-off, virtio-blk on both
//! transports). The split irqchip's PIT is checked against KVM's in-kernel one: the test
//! guest calibrates its TSC on each and both must agree.

mod support;

use std::time::Duration;

use keel_testutil::require_kvm;
use support::{assert_pass, keel, run_keel, Outcome, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(90);

fn scenario(irqchip: &str, scenario: &str, extra: &[&str]) -> Outcome {
    let cmdline = format!("keel.test={scenario}");
    let mut args = vec![
        "--irqchip",
        irqchip,
        "--memory",
        "128",
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    run_keel(&args, LIMIT)
}

#[test]
fn interrupt_scenarios_pass_with_the_in_kernel_irqchip() {
    require_kvm!();
    for (name, extra) in [
        ("serial", &[][..]),
        ("irq", &[][..]),
        ("smp", &["--cpus", "2"][..]),
        ("pci", &["--device", "pci-test"][..]),
        ("virtio-pci", &["--device", "virtio-echo"][..]),
        (
            "virtio-mmio",
            &["--device", "virtio-echo", "--transport", "mmio"][..],
        ),
    ] {
        let out = scenario("kernel", name, extra);
        assert_pass(&out, name, 0);
    }
}

#[test]
fn irq_scenario_takes_ioapic_and_lapic_timer_interrupts_in_both_modes() {
    require_kvm!();
    for mode in ["split", "kernel"] {
        let out = scenario(mode, "irq", &[]);
        assert_pass(&out, "irq", 0);
        assert!(
            out.stdout.contains("device interrupt arrived"),
            "{mode}: {}",
            out.stdout
        );
        assert!(
            out.stdout.contains("LAPIC timer interrupt arrived"),
            "{mode}: {}",
            out.stdout
        );
    }
}

#[test]
fn blk_passes_with_the_in_kernel_irqchip_over_both_transports() {
    require_kvm!();
    let dir = TempDir::new("keel-irqchip-blk");
    for transport in ["pci", "mmio"] {
        // As guest_blk.rs: 16 MiB whose 4 KiB block b holds 0xfc | (b & 3).
        let disk = dir.path().join(format!("disk-{transport}.img"));
        let image: Vec<u8> = (0..16 << 20)
            .map(|i: usize| 0xfc | ((i / 4096) & 3) as u8)
            .collect();
        std::fs::write(&disk, image).unwrap();
        let opt = format!("path={}", disk.display());
        let out = scenario("kernel", "blk", &["--disk", &opt, "--transport", transport]);
        assert_pass(&out, "blk", 0);
        // The guest's pattern: block 0 holds 1, block 16 was zeroed.
        let data = std::fs::read(&disk).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 1), "{transport}: block 0");
        assert!(
            data[16 * 4096..17 * 4096].iter().all(|&b| b == 0),
            "{transport}: block 16"
        );
    }
}

/// The TSC frequency the test guest's `idle` scenario measured against the PIT.
fn calibrated_tsc_khz(irqchip: &str) -> u64 {
    let mut cmd = keel();
    cmd.args([
        "--irqchip",
        irqchip,
        "--memory",
        "128",
        "--cmdline",
        "keel.test=idle",
    ]);
    let mut vm = Running::start(cmd);
    vm.wait_for("the TSC calibration", LIMIT, |out| out.contains("tick 0"));
    vm.signal(15);
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.code(), Some(128 + 15), "stderr: {}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("idle: TSC "))
        .unwrap_or_else(|| panic!("no calibration line:\n{}", out.stdout));
    line.split_whitespace()
        .skip_while(|w| *w != "TSC")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line:?}"))
}

#[test]
fn keels_pit_calibrates_the_tsc_as_kvms_does() {
    require_kvm!();
    let split = calibrated_tsc_khz("split");
    let kernel = calibrated_tsc_khz("kernel");
    // The guest itself requires three measurements within 2 %; the two PITs agree to 1 %.
    let diff = split.abs_diff(kernel);
    assert!(
        diff * 100 <= kernel,
        "split irqchip PIT: {split} kHz, in-kernel PIT: {kernel} kHz"
    );
}

#[test]
fn a_bad_irqchip_mode_is_refused() {
    let out = run_keel(&["--irqchip", "userspace"], LIMIT);
    assert_eq!(out.code(), Some(2), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("--irqchip") && out.stderr.contains("kernel, split"),
        "{}",
        out.stderr
    );
}

/// A PVH guest (32-bit, paging off) that routes IOAPIC pin 0 (ISA IRQ 0, the PIT) to
/// vector 0x40, runs PIT channel 0 as a 100 Hz rate generator, counts 50 interrupts
/// (waiting in `hlt`) and ends keel with status 42.
const PIT_GUEST: &str = r#"
    mov $0x80000, %esp          # PVH leaves ESP undefined; interrupts need a stack
    mov $0xff, %al              # mask both 8259s: IRQ 0 goes through the IOAPIC only
    out %al, $0x21
    out %al, $0xa1
    mov %cs, %eax
    mov $handler, %edx
    mov $idt + 0x40 * 8, %edi
    mov %dx, (%edi)
    mov %ax, 2(%edi)
    movw $0x8e00, 4(%edi)       # present, DPL 0, 32-bit interrupt gate
    shr $16, %edx
    mov %dx, 6(%edi)
    lidt idtr
    movl $0x1ff, 0xfee000f0     # LAPIC on
    movl $0x11, 0xfec00000      # pin 0, high half: destination APIC 0
    movl $0, 0xfec00010
    movl $0x10, 0xfec00000      # pin 0, low half: vector 0x40, edge, unmasked
    movl $0x40, 0xfec00010
    mov $0x34, %al              # channel 0, LSB then MSB, mode 2
    out %al, $0x43
    mov $0x9c, %al              # 11932 = 1193182 / 100
    out %al, $0x40
    mov $0x2e, %al
    out %al, $0x40
1:  sti
    hlt
    jmp 1b

# KVM's instruction emulator, which runs this CPL0 code on the project's machines, has no
# protected-mode `iret`: the handler drops the frame and goes back to the loop instead.
handler:
    mov $0x80000, %esp
    incl count
    movl $0, 0xfee000b0         # EOI
    cmpl $50, count
    jb 1b
    mov $42, %eax
    out %eax, $0xf4
2:  hlt
    jmp 2b

    .p2align 3
count:
    .long 0
idtr:
    .word 0x41 * 8 - 1
    .long idt
    .p2align 3
idt:
    .fill 0x41 * 8, 1, 0
"#;

#[test]
fn pit_irq0_reaches_the_guest_through_the_ioapic_in_both_modes() {
    require_kvm!();
    let dir = TempDir::new("keel-irqchip-pit");
    let guest = support::pvh_guest(&dir, PIT_GUEST);
    for mode in ["split", "kernel"] {
        let start = std::time::Instant::now();
        let out = run_keel(
            &[
                "--irqchip",
                mode,
                "--kernel",
                guest.to_str().unwrap(),
                "--memory",
                "64",
            ],
            LIMIT,
        );
        let took = start.elapsed();
        assert_eq!(out.code(), Some(42), "{mode}: stderr: {}", out.stderr);
        // 50 periods of 10 ms: interrupts came at the programmed rate, not faster.
        assert!(
            took >= Duration::from_millis(450),
            "{mode}: 50 PIT interrupts at 100 Hz in {took:?}"
        );
    }
}

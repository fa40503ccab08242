//! keel-test-guest: a bare-metal x86_64 test guest for KVM VMMs.
//!
//! Booted through PVH (see `boot.s`), it runs a small CPL0 set-up and then
//! does all real work at CPL3, because on the machines this project runs on
//! guest CPL0 code is emulated one instruction at a time while CPL3 code
//! runs natively. It reads `keel.test=NAME` from its command line, runs that
//! scenario, prints one verdict line (`keel-test: PASS NAME` or
//! `keel-test: FAIL NAME: REASON`) on the 16550 at 0x3f8 and ends the VM
//! (debug-exit port 0xf4, else ACPI S5, else i8042 reset).

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Failure reasons are small fixed-size strings returned by value: no heap.
#![allow(clippy::result_large_err)]

#[macro_use]
mod serial;
mod acpi;
mod arch;
mod balloon;
mod balloon_scenarios;
mod blk;
mod blk_scenarios;
mod exit;
mod idle;
mod idt;
mod irq;
mod memory;
mod net;
mod net_scenarios;
mod pci;
mod pit;
mod power;
mod pvh;
mod smp;
mod text;
mod virtio;
mod virtio_scenarios;

use text::Text;

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

/// What a scenario returns: `Err(reason)` is reported as FAIL.
pub type Outcome = Result<(), Text<160>>;

/// Build a failure reason with `format!`-like syntax.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {{
        let mut t = $crate::text::Text::<160>::new();
        // Text truncates instead of failing, so this cannot error.
        let _ = core::fmt::Write::write_fmt(&mut t, format_args!($($arg)*));
        return Err(t);
    }};
}

/// Entry from `bsp_user_entry` (CPL3, .bss zeroed). `start_info` is the
/// physical address of the PVH `hvm_start_info` the VMM passed in EBX.
#[no_mangle]
extern "C" fn keel_bsp_main(start_info: u32) -> ! {
    idt::init();
    serial::init();

    let boot = match pvh::BootInfo::parse(u64::from(start_info)) {
        Ok(b) => b,
        Err(e) => {
            exit::set_scenario("boot");
            exit::finish(Err(e));
        }
    };
    let scenario = match boot.scenario() {
        Some(s) => s,
        None => {
            println!("keel-test: no keel.test=NAME on the command line; running `serial`");
            "serial"
        }
    };
    exit::set_scenario(scenario);
    println!(
        "keel-test: scenario {scenario} (hvm_start_info v{}, {} memory map entries)",
        boot.version,
        boot.memmap().len()
    );

    let acpi = acpi::Acpi::discover(boot.rsdp);
    exit::set_acpi_shutdown(&acpi);

    let outcome = match scenario {
        "serial" => serial::scenario(),
        "memory" => memory::scenario(&boot),
        "irq" => irq::scenario(&acpi),
        "smp" => smp::scenario(&acpi),
        "pci" => pci::scenario(&acpi),
        "virtio-pci" => virtio_scenarios::scenario_pci(&acpi),
        "virtio-mmio" => virtio_scenarios::scenario_mmio(&boot, &acpi),
        "virtio-rng" => virtio_scenarios::scenario_rng(&boot, &acpi),
        "blk" => blk_scenarios::scenario_blk(&boot, &acpi),
        "blk-ro" => blk_scenarios::scenario_blk_ro(&boot, &acpi),
        "blk-bench" => blk_scenarios::scenario_blk_bench(&boot, &acpi),
        "blk-qcow2-header" => blk_scenarios::scenario_blk_qcow2_header(&boot, &acpi),
        "blk-mq" => blk_scenarios::scenario_blk_mq(&boot, &acpi),
        "net" => net_scenarios::scenario_net(&boot, &acpi),
        "net-serve" => net_scenarios::scenario_serve(&boot, &acpi),
        "net-bench" => net_scenarios::scenario_bench(&boot, &acpi),
        "net-ping" => net_scenarios::scenario_ping(&boot, &acpi),
        "idle" => idle::scenario(&boot, &acpi),
        "balloon" => balloon_scenarios::scenario_balloon(&boot, &acpi),
        "balloon-service" => balloon_scenarios::scenario_balloon_service(&boot, &acpi),
        _ => {
            let mut t = Text::new();
            t.push_str("unknown scenario");
            Err(t)
        }
    };
    exit::finish(outcome)
}

/// The precompiled `core` of the host target refers to this symbol from its
/// unwind tables; without LTO (dev profile) the linker wants it. With
/// `panic = "abort"` nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::force_unlock();
    let mut t = Text::<160>::new();
    let _ = core::fmt::Write::write_fmt(&mut t, format_args!("panic: {}", info.message()));
    if let Some(loc) = info.location() {
        let _ =
            core::fmt::Write::write_fmt(&mut t, format_args!(" at {}:{}", loc.file(), loc.line()));
    }
    exit::finish(Err(t))
}

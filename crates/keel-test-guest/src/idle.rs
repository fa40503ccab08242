//! Scenario `idle`: a guest that does nothing for as long as the VMM lets it,
//! for control-plane tests (pause/resume, reset, power-down). It prints
//! `keel-test: tick N` every 100 ms (N from 0, timed by the TSC calibrated
//! against the PIT), waits for interrupts in between (a 10 ms LAPIC timer
//! bounds each wait), and powers off through ACPI S5 when the ACPI power
//! button is pressed. With a virtio-blk device it also writes each tick's
//! line to the disk's block 0 (so the host can see the guest's writes stand
//! still while the VM is stopped). It never passes or fails on its own.

use crate::acpi::Acpi;
use crate::arch::{self, rdtsc};
use crate::blk_scenarios::{with_tick_disk, TickDisk};
use crate::idt::VEC_TIMER;
use crate::irq::{lapic_enable, lapic_write};
use crate::power::PowerButton;
use crate::pvh::BootInfo;
use crate::{exit, pit, Outcome};

const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const LVT_PERIODIC: u32 = 1 << 17;
/// 10 ms at KVM's 1 GHz APIC bus, divide by 1 (a different bus rate only
/// changes how often the guest wakes, not the tick period).
const WAKE_COUNT: u32 = 10_000_000;

pub fn scenario(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    with_tick_disk("idle", boot, acpi, |disk| run(acpi, disk))
}

fn run(acpi: &Acpi, mut disk: Option<&mut TickDisk>) -> Outcome {
    lapic_enable();
    // The calibration wants three measurements that agree; a busy host can spoil one.
    let Some(hz) = pit::tsc_hz_tries() else {
        crate::fail!("cannot calibrate the TSC against the PIT (5 tries)");
    };
    let mut button = PowerButton::try_arm(acpi);
    lapic_write(LAPIC_TIMER_DIV, 0b1011);
    lapic_write(LAPIC_LVT_TIMER, u32::from(VEC_TIMER) | LVT_PERIODIC);
    lapic_write(LAPIC_TIMER_INIT, WAKE_COUNT);
    println!("keel-test: idle: TSC {} kHz; tick every 100 ms", hz / 1000);
    let period = hz / 10;
    let start = rdtsc();
    let mut n = 0u64;
    loop {
        if button.as_mut().is_some_and(PowerButton::pressed) {
            println!("keel-test: idle: power button pressed; powering off (S5)");
            exit::power_off();
        }
        if rdtsc().wrapping_sub(start) >= n * period {
            println!("keel-test: tick {n}");
            if let Some(d) = disk.as_deref_mut() {
                d.write_tick(n)?;
            }
            n += 1;
        }
        if let Some(cap) = disk
            .as_deref_mut()
            .map(TickDisk::capacity_changed)
            .transpose()?
            .flatten()
        {
            println!(
                "keel-test: idle: configuration change: capacity {cap} sectors ({} MiB)",
                cap >> 11
            );
        }
        arch::idle_wait();
    }
}

//! Scenarios of the virtio-balloon driver (balloon.rs), over virtio-pci or
//! virtio-mmio, whichever the VMM offers:
//!
//! - `balloon`: a self-test. Inflate to the configured target (the pages
//!   written first), read `actual` back, send statistics (and refill the
//!   buffer when the device asks again), deflate everything and check the
//!   deflated pages are usable, report free pages.
//! - `balloon-service`: a long-running guest for host-side measurements.
//!   Touch all RAM once, then follow every target change (inflating, or
//!   deflating and touching the deflated pages), refill the statistics
//!   buffer whenever the device gives it back, until powered off. With
//!   `keel.balloon=report` on the command line it first reports all its
//!   RAM as free (2 s after touching it, so the host can measure both).
//!
//! Progress lines (`keel-test: balloon-service: ...`) tell the host where
//! the guest is; the host waits for them.

use crate::acpi::Acpi;
use crate::balloon::{self, Balloon, Ram, BALLOON_TYPE, F_PAGE_REPORTING, F_STATS_VQ};
use crate::power::PowerButton;
use crate::pvh::BootInfo;
use crate::virtio::{self, Transport};
use crate::virtio_scenarios as vs;
use crate::Outcome;

macro_rules! say {
    ($name:expr, $($arg:tt)*) => {
        println!("keel-test: {}: {}", $name, format_args!($($arg)*))
    };
}

/// A value written into touched pages (xor their address).
const TOUCH: u64 = 0x6b65_656c_6261_6c6c;

fn with_balloon(
    name: &'static str,
    boot: &BootInfo,
    acpi: &Acpi,
    body: impl FnOnce(&mut Balloon) -> Outcome,
) -> Outcome {
    let t = if let Some(f) = virtio::find_pci(acpi, BALLOON_TYPE) {
        Transport::Pci(vs::open_pci(name, f)?)
    } else {
        let s = virtio::find_mmio(name, boot.cmdline(), u32::from(BALLOON_TYPE))?;
        let Some(m) = s.found else {
            crate::fail!(
                "no virtio-balloon device: none on PCI bus 0 (1af4:1045, 1af4:1002) nor among the {} virtio_mmio.device= entries (keel: --balloon)",
                s.words
            );
        };
        vs::describe_mmio(name, &m);
        Transport::Mmio(m)
    };
    let ram = Ram::from_boot(boot);
    let mut b = Balloon::open(&t, ram)?;
    say!(
        name,
        "negotiated features {:#x} ({}); device offers {:#x}; {} MiB of RAM balloonable",
        b.features,
        balloon::feature_names(b.features),
        b.offered,
        b.ram.pages >> 8
    );
    body(&mut b)
}

fn hz() -> u64 {
    crate::pit::tsc_hz_tries().unwrap_or(2_000_000_000)
}

fn us(cycles: u64, hz: u64) -> u64 {
    cycles / (hz / 1_000_000).max(1)
}

pub fn scenario_balloon(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    with_balloon("balloon", boot, acpi, balloon_steps)
}

fn balloon_steps(b: &mut Balloon) -> Outcome {
    let name = "balloon";
    let hz = hz();
    let target = u64::from(b.target());
    if target == 0 {
        crate::fail!("the target (num_pages) is 0: nothing to inflate (keel: --balloon size=MiB)");
    }
    if target > b.ram.pages {
        crate::fail!(
            "the target {target} pages is more than the {} balloonable",
            b.ram.pages
        );
    }
    b.ram.touch(0, target, TOUCH);
    let c = b.inflate_by(target)?;
    let actual = b.actual();
    if u64::from(actual) != target {
        crate::fail!("inflated {target} pages, actual reads back {actual}");
    }
    say!(
        name,
        "inflated to the target {target} pages in {} us; actual {actual}",
        us(c, hz)
    );
    if b.has(F_STATS_VQ) {
        // The first statistics went at start; wait (up to ~10 s: the device's
        // timer thread may wait for a CPU) for the device to ask again, when
        // it polls.
        let asked = crate::arch::wait_for(10 * hz, || b.poll_stats().unwrap_or(false));
        say!(
            name,
            "statistics sent {} times{}",
            b.stats_sent,
            if asked {
                ""
            } else {
                " (the device did not ask again within 10 s)"
            }
        );
    }
    let c = b.deflate_by(target)?;
    b.ram.touch(0, target, !TOUCH);
    if let Some(a) = b.ram.check(0, target, !TOUCH) {
        crate::fail!("deflated page {a:#x} does not keep what was written to it");
    }
    let actual = b.actual();
    if actual != 0 {
        crate::fail!("deflated everything, actual reads back {actual}");
    }
    say!(
        name,
        "deflated {target} pages in {} us, touched them again; actual 0",
        us(c, hz)
    );
    if b.has(F_PAGE_REPORTING) {
        let top = b.ram.page_from_top(0) + 4096;
        let bytes = b.report_free(top - (target * 4096).min(16 << 20), top)?;
        say!(name, "reported {} KiB of free pages", bytes >> 10);
    }
    Ok(())
}

pub fn scenario_balloon_service(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let report = balloon::cmdline_has(boot, "report");
    with_balloon("balloon-service", boot, acpi, |b| service(b, acpi, report))
}

fn service(b: &mut Balloon, acpi: &Acpi, report: bool) -> Outcome {
    let name = "balloon-service";
    crate::irq::lapic_enable();
    let mut button = PowerButton::try_arm(acpi);
    let hz = hz();
    let t0 = crate::arch::rdtsc();
    b.ram.touch(0, b.ram.pages, TOUCH);
    say!(
        name,
        "touched {} MiB in {} ms",
        b.ram.pages >> 8,
        us(crate::arch::rdtsc() - t0, hz) / 1000
    );
    if report {
        if !b.has(F_PAGE_REPORTING) {
            crate::fail!("keel.balloon=report, but free page reporting was not negotiated");
        }
        balloon::spin_us(hz, 2_000_000);
        let t0 = crate::arch::rdtsc();
        let bytes = b.report_all_free()?;
        say!(
            name,
            "reported {} MiB free in {} us",
            bytes >> 20,
            us(crate::arch::rdtsc() - t0, hz)
        );
    }
    let mut last: Option<u64> = None;
    loop {
        let target = u64::from(b.target()).min(b.ram.pages);
        if last != Some(target) {
            let (what, c) = if target > b.held {
                ("inflated", b.inflate_by(target - b.held)?)
            } else if target < b.held {
                let from = target;
                let to = b.held;
                let c = b.deflate_by(to - from)?;
                // Touch the pages given back: the host backs them again.
                let t1 = crate::arch::rdtsc();
                b.ram.touch(from, to, TOUCH);
                ("deflated and touched", c + (crate::arch::rdtsc() - t1))
            } else {
                ("kept", 0)
            };
            say!(
                name,
                "{what}: actual {} pages ({} MiB) in {} us",
                b.held,
                b.held >> 8,
                us(c, hz)
            );
            last = Some(target);
        }
        if button.as_mut().is_some_and(PowerButton::pressed) {
            say!(name, "power button pressed; powering off (S5)");
            crate::exit::power_off();
        }
        b.poll_stats()?;
        balloon::spin_us(hz, 1000);
    }
}

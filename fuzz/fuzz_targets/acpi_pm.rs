//! keel's ACPI PM1a control and event blocks under arbitrary port accesses (any offset
//! in the 8 ports, 1 to 4 bytes, byte-aligned or not) and power button presses.
//!
//! Checks, against a model of the three 16-bit registers (PM1_CNT with SLP_EN
//! write-only, PM1_STS write-1-to-clear, PM1_EN): every read returns the model's bytes;
//! the SCI is asserted exactly while PWRBTN_STS and PWRBTN_EN are both set; the VM
//! powers off exactly when a write sets SLP_EN with SLP_TYP 5, and never asks for
//! anything else; nothing panics.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keel_bus::interrupt::{InterruptLine, Result as IrqResult};
use keel_bus::PioDevice;
use keel_vmm::devices::{AcpiPm, SLP_TYP_S5};
use keel_vmm::exit::{ExitSignal, VmExit};
use libfuzzer_sys::fuzz_target;

const SLP_EN: u16 = 1 << 13;
const PWRBTN: u16 = 1 << 8;

/// The SCI's level as the device last set it.
#[derive(Default)]
struct Level(AtomicBool);
impl InterruptLine for Level {
    fn trigger(&self) -> IrqResult<()> {
        panic!("the SCI is level-driven, never edge-triggered");
    }
    fn set_level(&self, asserted: bool) -> IrqResult<()> {
        self.0.store(asserted, Ordering::SeqCst);
        Ok(())
    }
}

/// Which model register an offset addresses.
fn reg(offset: u64) -> Option<usize> {
    match offset {
        0..=1 => Some(0),
        4..=5 => Some(1),
        6..=7 => Some(2),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let exit = Arc::new(ExitSignal::new().unwrap());
    let sci = Arc::new(Level::default());
    let pm = AcpiPm::new(exit.clone(), sci.clone());
    let mut regs = [1u16, 0, 0];
    let mut off_requested = false;
    for op in data.chunks_exact(3) {
        let off = u64::from(op[0] & 7);
        let len = [1usize, 2, 4, 1][usize::from(op[0] >> 3 & 3)];
        let bytes = [op[1], op[2], op[1], op[2]];
        let shift = (off & 1) as usize;
        match op[0] >> 5 {
            0..=2 => {
                pm.pio_write(off, &bytes[..len]);
                if let Some(i) = reg(off) {
                    let mut b = regs[i].to_le_bytes();
                    for (k, v) in bytes[..len].iter().enumerate() {
                        if let Some(slot) = b.get_mut(shift + k) {
                            *slot = *v;
                        }
                    }
                    let v = u16::from_le_bytes(b);
                    match i {
                        0 => {
                            regs[0] = v & !SLP_EN;
                            off_requested |= v & SLP_EN != 0 && (v >> 10) & 7 == SLP_TYP_S5;
                        }
                        1 => regs[1] &= !v,
                        _ => regs[2] = v,
                    }
                }
            }
            3..=5 => {
                let mut buf = [0xaau8; 4];
                pm.pio_read(off, &mut buf[..len]);
                let v = reg(off).map_or(0, |i| regs[i]).to_le_bytes();
                for (k, got) in buf[..len].iter().enumerate() {
                    let want = v.get(shift + k).copied().unwrap_or(0);
                    assert_eq!(*got, want, "byte {k} of a {len}-byte read at {off}");
                }
            }
            _ => {
                pm.press_power_button();
                regs[1] |= PWRBTN;
            }
        }
        assert_eq!(
            sci.0.load(Ordering::SeqCst),
            regs[1] & regs[2] & PWRBTN != 0,
            "SCI level"
        );
        match exit.reason() {
            None => assert!(!off_requested, "S5 with SLP_EN powers off"),
            Some(VmExit::PowerOff) => assert!(off_requested, "power-off without S5"),
            Some(other) => panic!("ACPI PM asked for {other:?}"),
        }
    }
});

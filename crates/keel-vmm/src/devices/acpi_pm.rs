//! The ACPI PM1a control and event blocks: enough for the guest to power off, and the
//! fixed-feature power button, which raises the SCI.

use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::interrupt::InterruptLine;
use keel_bus::PioDevice;

use crate::exit::{ExitSignal, VmExit};

/// PM1a control block port (2 bytes), published in the FADT.
pub const PM1A_CNT_PORT: u16 = 0x600;
/// PM1a event block port (4 bytes: status, enable), published in the FADT.
pub const PM1A_EVT_PORT: u16 = 0x604;
/// The SLP_TYP value for S5 (soft off), published in the DSDT's `\_S5` object.
pub const SLP_TYP_S5: u16 = 5;
const SLP_EN: u16 = 1 << 13;
/// PM1_STS/PM1_EN bit 8: the power button (ACPI 6.5 section 4.8.3.1, fixed feature: the
/// FADT's PWR_BUTTON flag is clear).
const PWRBTN: u16 = 1 << 8;

/// PM1a control (at [`PM1A_CNT_PORT`]) plus event (at [`PM1A_EVT_PORT`]) registers.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    /// The SCI: asserted while a status bit and its enable bit are both set.
    sci: Arc<dyn InterruptLine>,
    /// PM1_CNT, then PM1_STS and PM1_EN.
    regs: Mutex<[u16; 3]>,
}

impl AcpiPm {
    /// A PM block that reports power-off to `exit` and raises events on `sci`.
    pub fn new(exit: Arc<ExitSignal>, sci: Arc<dyn InterruptLine>) -> Self {
        AcpiPm {
            exit,
            sci,
            // SCI_EN set: ACPI mode is always on (the FADT has no SMI command port).
            regs: Mutex::new([1, 0, 0]),
        }
    }

    /// Presses the power button: PWRBTN_STS is set, and the SCI asserted if the guest
    /// enabled the button (PWRBTN_EN).
    pub fn press_power_button(&self) {
        let mut regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        regs[1] |= PWRBTN;
        self.update_sci(&regs);
    }

    fn update_sci(&self, regs: &[u16; 3]) {
        let asserted = regs[1] & regs[2] & PWRBTN != 0;
        if let Err(e) = self.sci.set_level(asserted) {
            log::warn!("ACPI PM: cannot set the SCI: {}", keel_bus::ErrorChain(&e));
        }
    }

    /// The device for the event block range; control and event blocks share state.
    fn reg_index(offset: u64) -> Option<usize> {
        match offset {
            0..=1 => Some(0),
            // The event block is mapped right behind the control block's range; see
            // `Vmm`: the bus range covers 0x600..0x608.
            4..=5 => Some(1),
            6..=7 => Some(2),
            _ => None,
        }
    }
}

impl PioDevice for AcpiPm {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        let regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        let v = Self::reg_index(offset).map_or(0, |i| regs[i]);
        let bytes = v.to_le_bytes();
        let shift = (offset & 1) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn pio_write(&self, offset: u64, data: &[u8]) {
        let Some(i) = Self::reg_index(offset) else {
            return;
        };
        let mut regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut bytes = regs[i].to_le_bytes();
        let shift = (offset & 1) as usize;
        for (k, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(shift + k) {
                *slot = *b;
            }
        }
        let v = u16::from_le_bytes(bytes);
        match i {
            0 => {
                regs[0] = v & !SLP_EN;
                if v & SLP_EN != 0 && (v >> 10) & 7 == SLP_TYP_S5 {
                    self.exit.request(VmExit::PowerOff);
                }
            }
            // PM1_STS bits are write-1-to-clear.
            1 => {
                regs[1] &= !v;
                self.update_sci(&regs);
            }
            _ => {
                regs[2] = v;
                self.update_sci(&regs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The SCI's level, as the device last set it.
    #[derive(Default)]
    struct Level(AtomicBool);
    impl InterruptLine for Level {
        fn trigger(&self) -> keel_bus::interrupt::Result<()> {
            unreachable!("the SCI is level-driven")
        }
        fn set_level(&self, asserted: bool) -> keel_bus::interrupt::Result<()> {
            self.0.store(asserted, Ordering::SeqCst);
            Ok(())
        }
    }

    fn pm() -> (Arc<ExitSignal>, Arc<Level>, AcpiPm) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let sci = Arc::new(Level::default());
        let pm = AcpiPm::new(exit.clone(), sci.clone());
        (exit, sci, pm)
    }

    #[test]
    fn power_button_raises_the_sci_while_enabled_and_unacknowledged() {
        let (exit, sci, pm) = pm();
        let read = |off| {
            let mut v = [0u8; 2];
            pm.pio_read(off, &mut v);
            u16::from_le_bytes(v)
        };
        // Not enabled: the status latches, the SCI stays low.
        pm.press_power_button();
        assert_eq!(read(4), PWRBTN);
        assert!(!sci.0.load(Ordering::SeqCst));
        pm.pio_write(4, &PWRBTN.to_le_bytes());
        assert_eq!(read(4), 0);
        // Enabled: the press asserts the SCI until the guest clears the status.
        pm.pio_write(6, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        assert!(sci.0.load(Ordering::SeqCst));
        pm.pio_write(4, &0u16.to_le_bytes()); // writing 0 clears nothing
        assert!(sci.0.load(Ordering::SeqCst));
        pm.pio_write(4, &PWRBTN.to_le_bytes());
        assert!(!sci.0.load(Ordering::SeqCst));
        assert!(exit.reason().is_none(), "the button only informs the guest");
    }

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let (exit, _, pm) = pm();
        pm.pio_write(0, &((3u16 << 10) | SLP_EN).to_le_bytes()); // S3: not supported
        assert!(exit.reason().is_none());
        pm.pio_write(0, &(5u16 << 10).to_le_bytes()); // S5 without SLP_EN
        assert!(exit.reason().is_none());
        let mut v = [0u8; 2];
        pm.pio_read(0, &mut v);
        assert_eq!(u16::from_le_bytes(v), 5 << 10);
        pm.pio_write(0, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert!(matches!(exit.reason(), Some(VmExit::PowerOff)));
    }

    #[test]
    fn byte_writes_compose() {
        let (exit, _, pm) = pm();
        let v = (5u16 << 10) | SLP_EN;
        pm.pio_write(1, &[(v >> 8) as u8]);
        assert!(matches!(exit.reason(), Some(VmExit::PowerOff)));
    }
}

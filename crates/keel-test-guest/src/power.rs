//! The ACPI fixed-feature power button, as an OS handles it: ACPI mode on
//! (SMI_CMD <- ACPI_ENABLE where the FADT has an SMI port), PWRBTN_EN set in
//! PM1_EN, the SCI routed through the IOAPIC, and on each SCI PM1_STS read
//! and PWRBTN_STS acknowledged (write 1 to clear). Any long-running scenario
//! can arm it and poll [`PowerButton::pressed`] after it wakes.

use crate::acpi::Acpi;
use crate::arch::{self, inw, outb, outw};
use crate::idt::VEC_COUNTED;
use crate::irq;
use crate::text::Text;

/// PM1_STS / PM1_EN bit 8: the power button (ACPI 6.5 section 4.8.3.1).
const PWRBTN: u16 = 1 << 8;
/// PM1_CNT bit 0: SCI_EN, ACPI mode is on.
const SCI_EN: u16 = 1;
/// Counted vector slot for the SCI (`irq::vec_count`); 0-3 are virtio's.
const SCI_COUNTER: usize = 7;

pub struct PowerButton {
    sts: u16,
    seen: u64,
}

impl PowerButton {
    /// Arms the button. Fails where the FADT has no PM1 event block.
    pub fn arm(acpi: &Acpi) -> Result<PowerButton, Text<160>> {
        let mut t = Text::new();
        if acpi.pm1a_evt == 0 || acpi.pm1_evt_len < 4 || acpi.pm1a_cnt == 0 {
            let _ = core::fmt::Write::write_fmt(
                &mut t,
                format_args!(
                    "no ACPI PM1a event block in the FADT (PM1a_EVT {:#x}, length {})",
                    acpi.pm1a_evt, acpi.pm1_evt_len
                ),
            );
            return Err(t);
        }
        // SAFETY: PM1a_CNT from the FADT; reading it has no side effect.
        let on = unsafe { inw(acpi.pm1a_cnt) } & SCI_EN != 0;
        if !on && acpi.smi_cmd != 0 && acpi.acpi_enable != 0 {
            // SAFETY: the FADT's SMI command port and its ACPI_ENABLE value.
            unsafe { outb(acpi.smi_cmd, acpi.acpi_enable) };
            // SAFETY: as above.
            arch::wait_for(
                arch::TIMEOUT_CYCLES,
                || unsafe { inw(acpi.pm1a_cnt) } & SCI_EN != 0,
            );
        }
        let sts = acpi.pm1a_evt;
        let en = sts + u16::from(acpi.pm1_evt_len / 2);
        // Edge-triggered whatever the MADT says: the status bit is acknowledged at
        // CPL3, after the CPL0 stub's EOI, so a level-triggered line would fire again
        // until then. One edge per press is all this needs.
        let (gsi, active_low, _level) = acpi.isa_irq(acpi.sci_int as u8);
        irq::route_gsi(
            acpi,
            gsi,
            VEC_COUNTED + SCI_COUNTER as u8,
            active_low,
            false,
        )?;
        // SAFETY: PM1_STS is write-1-to-clear; PM1_EN bit 8 enables the button.
        unsafe {
            outw(sts, PWRBTN);
            let en_now = inw(en);
            outw(en, en_now | PWRBTN);
        }
        println!(
            "keel-test: power button armed (PM1a_EVT {sts:#x}, SCI IRQ {} -> GSI {gsi})",
            acpi.sci_int
        );
        Ok(PowerButton {
            sts,
            seen: irq::vec_count(SCI_COUNTER),
        })
    }

    /// [`PowerButton::arm`], or `None` (saying why) where the platform has
    /// no fixed-feature power button (hardware-reduced ACPI, no ACPI).
    pub fn try_arm(acpi: &Acpi) -> Option<PowerButton> {
        match Self::arm(acpi) {
            Ok(b) => Some(b),
            Err(why) => {
                println!("keel-test: no ACPI power button: {why}");
                None
            }
        }
    }

    /// Whether the button was pressed since the last call: looks only after an
    /// SCI, and acknowledges the status.
    pub fn pressed(&mut self) -> bool {
        let n = irq::vec_count(SCI_COUNTER);
        if n == self.seen {
            return false;
        }
        self.seen = n;
        // SAFETY: PM1_STS from the FADT; bits are write-1-to-clear.
        let s = unsafe { inw(self.sts) };
        if s & PWRBTN == 0 {
            return false;
        }
        // SAFETY: as above.
        unsafe { outw(self.sts, PWRBTN) };
        true
    }
}

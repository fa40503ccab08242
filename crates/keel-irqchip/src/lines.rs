//! ISA interrupt lines wired to both interrupt controllers.

use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::interrupt::{EoiSink, InterruptLine, Result};

use crate::ioapic::Ioapic;
use crate::pic::Pic;

/// The PC's interrupt wiring: ISA IRQ n reaches the PIC's input n and the IOAPIC's pin n
/// (the identity map, with no interrupt source overrides); pins 16-23 reach the IOAPIC
/// only. Cheap to clone.
#[derive(Clone, Debug)]
pub struct IrqLines {
    ioapic: Arc<Mutex<Ioapic>>,
    pic: Option<Arc<Mutex<Pic>>>,
}

impl IrqLines {
    /// Lines into `ioapic` and, for ISA IRQs, `pic` when there is one.
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pic: Option<Arc<Mutex<Pic>>>) -> Self {
        IrqLines { ioapic, pic }
    }

    /// The line of GSI `gsi`, as a device's [`InterruptLine`].
    pub fn line(&self, gsi: u8) -> IsaLine {
        IsaLine {
            lines: self.clone(),
            gsi,
        }
    }

    /// The IOAPIC behind these lines.
    pub fn ioapic(&self) -> &Arc<Mutex<Ioapic>> {
        &self.ioapic
    }

    /// Drives GSI `gsi` to `level`.
    pub fn set_level(&self, gsi: u8, level: bool) {
        // One controller at a time: no lock is held while taking the other.
        if let Some(pic) = self.pic.as_ref().filter(|_| gsi < 16) {
            pic.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set_irq(gsi, level);
        }
        self.ioapic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set_level(usize::from(gsi), level);
    }

    /// An edge on GSI `gsi`.
    pub fn pulse(&self, gsi: u8) {
        if let Some(pic) = self.pic.as_ref().filter(|_| gsi < 16) {
            pic.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pulse(gsi);
        }
        self.ioapic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pulse(usize::from(gsi));
    }
}

/// The local APICs' EOIs go to the IOAPIC (see [`Ioapic::end_of_interrupt`]).
impl EoiSink for IrqLines {
    fn end_of_interrupt(&self, vector: u8) {
        self.ioapic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .end_of_interrupt(vector);
    }
}

/// One GSI of [`IrqLines`].
#[derive(Clone, Debug)]
pub struct IsaLine {
    lines: IrqLines,
    gsi: u8,
}

impl IsaLine {
    /// The GSI this line drives.
    pub fn gsi(&self) -> u8 {
        self.gsi
    }
}

impl InterruptLine for IsaLine {
    fn trigger(&self) -> Result<()> {
        self.lines.pulse(self.gsi);
        Ok(())
    }

    fn set_level(&self, asserted: bool) -> Result<()> {
        self.lines.set_level(self.gsi, asserted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ioapic::MsiDelivery;
    use keel_bus::interrupt::MsiMessage;
    use keel_bus::MutMmioDevice;

    #[derive(Default)]
    struct Count(Mutex<u32>);
    impl MsiDelivery for Count {
        fn route(&self, _: usize, _: Option<MsiMessage>) -> Result<()> {
            Ok(())
        }
        fn deliver(&self, _: usize, _: MsiMessage) -> Result<()> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[test]
    fn a_line_reaches_both_controllers() {
        let count = Arc::new(Count::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(count.clone())));
        let pic = Arc::new(Mutex::new(Pic::new()));
        {
            let mut io = ioapic.lock().unwrap();
            io.mmio_write(0, &[0x10 + 2 * 4]);
            io.mmio_write(0x10, &0x30u32.to_le_bytes());
        }
        for (port, v) in [(0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01)] {
            pic.lock().unwrap().port_write(port, v);
        }
        pic.lock().unwrap().port_write(0x21, 0);
        let lines = IrqLines::new(ioapic, Some(pic.clone()));
        let line = lines.line(4);
        assert_eq!(line.gsi(), 4);
        line.trigger().unwrap();
        assert_eq!(*count.0.lock().unwrap(), 1);
        assert_eq!(pic.lock().unwrap().acknowledge(), 0x0c);
        // GSI 20 is the IOAPIC's only (masked here): nothing, and no panic.
        lines.line(20).set_level(true).unwrap();
        assert_eq!(*count.0.lock().unwrap(), 1);
    }
}

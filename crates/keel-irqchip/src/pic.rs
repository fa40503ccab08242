//! The PC's cascaded 8259A programmable interrupt controllers.
//!
//! The master answers ports 0x20-0x21 and takes ISA IRQs 0-7; the slave answers 0xa0-0xa1,
//! takes IRQs 8-15 and is cascaded into the master's IRQ 2. The edge/level control
//! registers (ELCR, ports 0x4d0-0x4d1) choose level-sensitive inputs. Modelled: the
//! initialisation sequence (ICW1-ICW4), the mask (OCW1), non-specific, specific and
//! rotating EOIs (OCW2), reading IRR or ISR and polling (OCW3), special mask mode,
//! automatic EOI and the fixed and rotating priorities.
//!
//! [`Pic::output`] is the master's INT pin and [`Pic::acknowledge`] the CPU's interrupt
//! acknowledge cycle, which returns the vector. (With KVM's split irqchip a VMM injects that
//! vector as an ExtINT; keel's guests run with the PIC masked and take interrupts through the
//! IOAPIC, so keel-vmm does not wire the output to a vCPU.)

use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::PioDevice;

/// Master command and data ports.
pub const MASTER_PORT: u16 = 0x20;
/// Slave command and data ports.
pub const SLAVE_PORT: u16 = 0xa0;
/// The ELCR pair (master, slave).
pub const ELCR_PORT: u16 = 0x4d0;

/// One 8259A.
#[derive(Clone, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels, for edge detection.
    last_irr: u8,
    elcr: u8,
    elcr_mask: u8,
    /// 0: operational; 1, 2, 3: expecting ICW2, ICW3, ICW4.
    init_state: u8,
    init4: bool,
    single: bool,
    vector_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    /// The input with the lowest priority is `priority_add - 1` (mod 8).
    priority_add: u8,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Chip {
            elcr_mask,
            ..Default::default()
        }
    }

    fn reset(&mut self) {
        *self = Chip {
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
            irr: self.irr & self.elcr,
            ..Default::default()
        };
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    /// Priority (0 highest) of the best request in `mask`, or 8 when none.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The input that would interrupt now, if any.
    fn pending(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let in_service = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        (p < self.priority(in_service)).then_some((p + self.priority_add) & 7)
    }

    fn ack(&mut self, irq: u8) {
        let mask = 1u8 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        if self.elcr & mask == 0 {
            self.irr &= !mask;
        }
    }

    fn write(&mut self, command: bool, val: u8) {
        if command {
            if val & 0x10 != 0 {
                // ICW1.
                self.reset();
                self.init_state = 1;
                self.init4 = val & 0x01 != 0;
                self.single = val & 0x02 != 0;
                if val & 0x08 != 0 {
                    log::debug!(
                        "8259: level-triggered mode in ICW1 is not supported (use the ELCR)"
                    );
                }
            } else if val & 0x08 != 0 {
                // OCW3.
                if val & 0x04 != 0 {
                    self.poll = true;
                }
                if val & 0x02 != 0 {
                    self.read_isr = val & 0x01 != 0;
                }
                if val & 0x40 != 0 {
                    self.special_mask = val & 0x20 != 0;
                }
            } else {
                // OCW2.
                match val >> 5 {
                    0 => self.rotate_on_auto_eoi = false,
                    4 => self.rotate_on_auto_eoi = true,
                    cmd @ (1 | 5) => {
                        let p = self.priority(self.isr);
                        if p != 8 {
                            let irq = (p + self.priority_add) & 7;
                            self.isr &= !(1 << irq);
                            if cmd == 5 {
                                self.priority_add = (irq + 1) & 7;
                            }
                        }
                    }
                    3 => self.isr &= !(1 << (val & 7)),
                    6 => self.priority_add = (val + 1) & 7,
                    7 => {
                        let irq = val & 7;
                        self.isr &= !(1 << irq);
                        self.priority_add = (irq + 1) & 7;
                    }
                    _ => {}
                }
            }
        } else {
            match self.init_state {
                0 => self.imr = val,
                1 => {
                    self.vector_base = val & 0xf8;
                    self.init_state = match (self.single, self.init4) {
                        (false, _) => 2,
                        (true, true) => 3,
                        (true, false) => 0,
                    };
                }
                2 => self.init_state = if self.init4 { 3 } else { 0 },
                _ => {
                    self.auto_eoi = val & 0x02 != 0;
                    self.init_state = 0;
                }
            }
        }
    }

    fn read(&mut self, command: bool) -> u8 {
        if self.poll {
            self.poll = false;
            return match self.pending() {
                Some(irq) => {
                    self.ack(irq);
                    0x80 | irq
                }
                None => 0,
            };
        }
        match (command, self.read_isr) {
            (true, true) => self.isr,
            (true, false) => self.irr,
            (false, _) => self.imr,
        }
    }
}

/// The master/slave 8259A pair (see the module documentation).
#[derive(Clone, Debug)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips uninitialised, as at power-on: no mask, no vector base, edge-triggered.
    pub fn new() -> Self {
        // ELCR bits that exist: IRQs 0, 1, 2, 8 and 13 are always edge-triggered.
        Pic {
            chips: [Chip::new(0xf8), Chip::new(0xde)],
        }
    }

    /// Drives ISA IRQ `irq` (0-15) to `level`; others are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        if irq >= 16 {
            return;
        }
        self.chips[usize::from(irq / 8)].set_irq(irq % 8, level);
        self.cascade();
    }

    /// An edge on ISA IRQ `irq`: raised, then lowered.
    pub fn pulse(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    fn cascade(&mut self) {
        let slave = self.chips[1].pending().is_some();
        self.chips[0].set_irq(2, slave);
    }

    /// Whether the master's INT output is raised: an unmasked request of higher priority
    /// than any in service.
    pub fn output(&self) -> bool {
        self.chips[0].pending().is_some()
    }

    /// The CPU's interrupt acknowledge: the vector to take, with the request moved to
    /// in-service. With nothing pending it is the spurious IRQ 7 of the master.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.chips[0].pending() {
            Some(2) => {
                self.chips[0].ack(2);
                match self.chips[1].pending() {
                    Some(irq) => {
                        self.chips[1].ack(irq);
                        self.chips[1].vector_base + irq
                    }
                    None => self.chips[1].vector_base + 7,
                }
            }
            Some(irq) => {
                self.chips[0].ack(irq);
                self.chips[0].vector_base + irq
            }
            None => self.chips[0].vector_base + 7,
        };
        self.cascade();
        vector
    }

    /// A guest read of `port` (0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1); other ports read 0xff.
    pub fn port_read(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 | 0x21 => self.chips[0].read(port == 0x20),
            0xa0 | 0xa1 => self.chips[1].read(port == 0xa0),
            0x4d0 | 0x4d1 => self.chips[usize::from(port - ELCR_PORT)].elcr,
            _ => 0xff,
        };
        self.cascade();
        v
    }

    /// A guest write of `val` to `port` (see [`Pic::port_read`]); others are ignored.
    pub fn port_write(&mut self, port: u16, val: u8) {
        match port {
            0x20 | 0x21 => self.chips[0].write(port == 0x20, val),
            0xa0 | 0xa1 => self.chips[1].write(port == 0xa0, val),
            0x4d0 | 0x4d1 => {
                let c = &mut self.chips[usize::from(port - ELCR_PORT)];
                c.elcr = val & c.elcr_mask;
            }
            _ => {}
        }
        self.cascade();
    }

    /// The interrupt mask register of the master (`false`) or the slave (`true`).
    pub fn mask(&self, slave: bool) -> u8 {
        self.chips[usize::from(slave)].imr
    }
}

/// The PIC on a port bus: insert one at each of [`MASTER_PORT`], [`SLAVE_PORT`] and
/// [`ELCR_PORT`] (2 ports each), all sharing one [`Pic`].
#[derive(Clone, Debug)]
pub struct PicPorts {
    pic: Arc<Mutex<Pic>>,
    base: u16,
}

impl PicPorts {
    /// The ports from `base` of `pic`.
    pub fn new(pic: Arc<Mutex<Pic>>, base: u16) -> Self {
        PicPorts { pic, base }
    }

    fn pic(&self) -> std::sync::MutexGuard<'_, Pic> {
        self.pic.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PioDevice for PicPorts {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        let port = self.base.wrapping_add(offset as u16);
        let v = self.pic().port_read(port);
        data.fill(0xff);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn pio_write(&self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let port = self.base.wrapping_add(offset as u16);
            self.pic().port_write(port, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence Linux and the BIOS use: ICW1 edge + ICW4, bases 0x20 and 0x28, the
    /// slave on IRQ 2, 8086 mode.
    fn initialised() -> Pic {
        let mut p = Pic::new();
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
        ] {
            p.port_write(port, v);
        }
        p
    }

    #[test]
    fn the_mask_reads_back_and_masks() {
        let mut p = initialised();
        p.port_write(0x21, 0xff);
        p.port_write(0xa1, 0xff);
        assert_eq!(p.port_read(0x21), 0xff);
        assert_eq!(p.port_read(0xa1), 0xff);
        p.pulse(4);
        assert!(!p.output(), "masked");
        // Unmasking a latched edge raises the output.
        p.port_write(0x21, 0xef);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x24);
        assert!(!p.output());
    }

    #[test]
    fn priorities_in_service_and_eoi() {
        let mut p = initialised();
        p.port_write(0x21, 0);
        p.pulse(3);
        p.pulse(1);
        assert_eq!(p.acknowledge(), 0x21, "IRQ 1 has the higher priority");
        // IRQ 3 waits while 1 is in service.
        assert!(!p.output());
        p.port_write(0x20, 0x0b); // OCW3: read ISR
        assert_eq!(p.port_read(0x20), 0b10);
        p.port_write(0x20, 0x0a); // read IRR
        assert_eq!(p.port_read(0x20), 0b1000);
        p.port_write(0x20, 0x20); // non-specific EOI
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x23);
        p.port_write(0x20, 0x63); // specific EOI of IRQ 3
        p.port_write(0x20, 0x0b);
        assert_eq!(p.port_read(0x20), 0);
        // Nothing pending: spurious IRQ 7.
        assert_eq!(p.acknowledge(), 0x27);
    }

    #[test]
    fn the_slave_cascades_through_irq2() {
        let mut p = initialised();
        p.port_write(0x21, 0xfb);
        p.port_write(0xa1, 0xff);
        p.pulse(12);
        assert!(!p.output(), "masked on the slave");
        p.port_write(0xa1, 0xef);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x2c);
        // EOI to the slave, then the master.
        p.port_write(0xa0, 0x20);
        p.port_write(0x20, 0x20);
        p.port_write(0x20, 0x0b);
        assert_eq!(p.port_read(0x20), 0);
        p.port_write(0xa0, 0x0b);
        assert_eq!(p.port_read(0xa0), 0);
    }

    #[test]
    fn level_inputs_through_the_elcr() {
        let mut p = initialised();
        p.port_write(0x21, 0);
        p.port_write(0x4d0, 0xff);
        assert_eq!(p.port_read(0x4d0), 0xf8, "IRQs 0-2 are always edge");
        p.port_write(0x4d0, 0x20);
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25);
        p.port_write(0x20, 0x20);
        // Still asserted: requests again.
        assert!(p.output());
        p.set_irq(5, false);
        assert!(!p.output(), "a level request goes when the line does");
        // Edge inputs need a new rising edge.
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x24);
        p.port_write(0x20, 0x20);
        p.set_irq(4, true);
        assert!(!p.output());
    }

    #[test]
    fn poll_auto_eoi_and_rotation() {
        let mut p = initialised();
        p.port_write(0x21, 0);
        p.pulse(6);
        p.port_write(0x20, 0x0c); // OCW3 poll
        assert_eq!(p.port_read(0x20), 0x86);
        p.port_write(0x20, 0x0c);
        assert_eq!(p.port_read(0x20), 0, "nothing left after the poll took it");
        p.port_write(0x20, 0x20);
        // Rotate priorities: IRQ 4 becomes the lowest.
        p.port_write(0x20, 0xc4);
        p.pulse(4);
        p.pulse(5);
        assert_eq!(p.acknowledge(), 0x25);
        // Automatic EOI: nothing stays in service.
        let mut q = Pic::new();
        for (port, v) in [(0x20, 0x13), (0x21, 0x40), (0x21, 0x03), (0x21, 0x00)] {
            q.port_write(port, v);
        }
        q.pulse(0);
        assert_eq!(q.acknowledge(), 0x40);
        q.pulse(0);
        assert!(q.output(), "no in-service bit blocks the next one");
    }

    #[test]
    fn ports_on_a_bus() {
        use keel_bus::{BusRange, PioBus};
        let pic = Arc::new(Mutex::new(Pic::new()));
        let bus = PioBus::new();
        for base in [MASTER_PORT, SLAVE_PORT, ELCR_PORT] {
            bus.insert(
                BusRange::new(u64::from(base), 2).unwrap(),
                Arc::new(PicPorts::new(pic.clone(), base)),
            )
            .unwrap();
        }
        bus.write(0xa1, &[0x5a]).unwrap();
        let mut b = [0u8];
        bus.read(0xa1, &mut b).unwrap();
        assert_eq!(b[0], 0x5a);
        assert_eq!(pic.lock().unwrap().mask(true), 0x5a);
        let mut w = [0u8; 2];
        bus.read(0xa0, &mut w).unwrap();
        assert_eq!(w, [0, 0xff], "the IRR, then all ones");
    }
}

//! An 82093AA I/O APIC that delivers through MSI messages.
//!
//! The guest reaches it through two MMIO registers: IOREGSEL (offset 0x00) selects an
//! indirect register, IOWIN (offset 0x10) reads or writes it. Indirect registers: 0x00 ID,
//! 0x01 version, 0x02 arbitration ID, 0x10 + 2n / 0x11 + 2n the low and high halves of
//! pin n's redirection entry.
//!
//! An unmasked entry is an MSI message (the destination APIC ID and mode in the address;
//! vector, delivery mode and trigger mode in the data), which is how KVM's split irqchip
//! takes IOAPIC interrupts. Level-triggered pins follow the 82093AA: delivery sets the
//! entry's remote IRR, and no further interrupt is sent for it until the local APIC's EOI
//! of that vector clears it ([`Ioapic::end_of_interrupt`]); if the line is still asserted
//! then, the interrupt is sent again. Edges on a masked pin are lost, as the datasheet says.

use std::sync::Arc;

use keel_bus::interrupt::{MsiMessage, Result};
use keel_bus::MutMmioDevice;

/// Number of input pins (GSIs 0-23), as on the 82093AA and KVM's in-kernel IOAPIC.
pub const NUM_PINS: usize = 24;
/// The version register's version field (an 82093AA).
pub const VERSION: u32 = 0x11;
/// Size of the MMIO window the IOAPIC decodes.
pub const MMIO_SIZE: u64 = 0x20;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDTBL: u8 = 0x10;

const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u32 = 56;
/// Bits the guest cannot write: delivery status and remote IRR.
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;

/// The x86 MSI address window and the bits of an MSI address and data (Intel SDM 10.11).
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u32 = 12;
const MSI_ADDRESS_DEST_LOGICAL: u64 = 1 << 2;
const MSI_DATA_LEVEL: u32 = 1 << 15;

/// Where the IOAPIC's interrupts go: the VMM's side of the seam.
pub trait MsiDelivery: Send + Sync {
    /// Pin `pin`'s redirection entry changed: `Some(msg)` is the message it sends from now
    /// on, `None` means it is masked. A VMM on KVM's split irqchip keeps a route per pin
    /// from this (KVM takes level-triggered vectors' EOIs from those routes).
    fn route(&self, pin: usize, msg: Option<MsiMessage>) -> Result<()>;
    /// Sends pin `pin`'s interrupt, `msg` (the message last given to
    /// [`MsiDelivery::route`]).
    fn deliver(&self, pin: usize, msg: MsiMessage) -> Result<()>;
}

/// The redirection entry's MSI message, as KVM and the x86 MSI format read it.
pub fn entry_message(entry: u64) -> MsiMessage {
    let dest = (entry >> DEST_SHIFT) & 0xff;
    let mut address = MSI_ADDRESS_BASE | (dest << MSI_ADDRESS_DEST_SHIFT);
    if entry & DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDRESS_DEST_LOGICAL;
    }
    let mut data = (entry & VECTOR_MASK) as u32;
    data |= (((entry >> DELIVERY_MODE_SHIFT) & 0x7) as u32) << 8;
    if entry & TRIGGER_LEVEL != 0 {
        data |= MSI_DATA_LEVEL;
    }
    MsiMessage { address, data }
}

/// An 82093AA I/O APIC (see the module documentation). Wrap it in a `Mutex` to put it on
/// an MMIO bus.
pub struct Ioapic {
    id: u32,
    select: u8,
    entries: [u64; NUM_PINS],
    /// Current input levels (bit n: pin n asserted), for level-triggered pins.
    levels: u32,
    delivery: Arc<dyn MsiDelivery>,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("id", &self.id)
            .field("levels", &self.levels)
            .finish_non_exhaustive()
    }
}

impl Ioapic {
    /// An IOAPIC at reset: ID 0, every pin masked, delivering through `delivery`.
    pub fn new(delivery: Arc<dyn MsiDelivery>) -> Self {
        Ioapic {
            id: 0,
            select: 0,
            entries: [MASKED; NUM_PINS],
            levels: 0,
            delivery,
        }
    }

    /// Pin `pin`'s redirection entry (with its read-only bits), or `None` past the last pin.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    /// An edge on `pin` (an edge-triggered device's interrupt). On a level-triggered pin it
    /// is an assertion immediately followed by a deassertion.
    pub fn pulse(&mut self, pin: usize) {
        if pin >= NUM_PINS {
            return;
        }
        if self.entries[pin] & TRIGGER_LEVEL != 0 {
            self.set_level(pin, true);
            self.set_level(pin, false);
        } else {
            self.fire(pin);
        }
    }

    /// Drives `pin`'s input to `asserted`. A level-triggered pin interrupts while asserted
    /// (once per EOI); an edge-triggered one on each rising edge.
    pub fn set_level(&mut self, pin: usize, asserted: bool) {
        if pin >= NUM_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was = self.levels & bit != 0;
        if asserted {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
        if self.entries[pin] & TRIGGER_LEVEL != 0 {
            if asserted {
                self.fire(pin);
            }
        } else if asserted && !was {
            self.fire(pin);
        }
    }

    /// The local APIC's EOI of `vector` (with KVM's split irqchip, `KVM_EXIT_IOAPIC_EOI`):
    /// clears the remote IRR of every level-triggered pin with that vector, and sends the
    /// interrupt again for each that is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..NUM_PINS {
            let e = self.entries[pin];
            if e & VECTOR_MASK != u64::from(vector) || e & REMOTE_IRR == 0 {
                continue;
            }
            self.entries[pin] &= !REMOTE_IRR;
            if self.levels & (1 << pin) != 0 {
                self.fire(pin);
            }
        }
    }

    /// Sends pin's interrupt if its entry lets it through.
    fn fire(&mut self, pin: usize) {
        let e = self.entries[pin];
        if e & MASKED != 0 {
            return;
        }
        if e & TRIGGER_LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return;
            }
            self.entries[pin] |= REMOTE_IRR;
        }
        if let Err(e) = self.delivery.deliver(pin, entry_message(e)) {
            log::warn!("IOAPIC pin {pin}: cannot deliver its interrupt: {e}");
        }
    }

    fn read_register(&self, reg: u8) -> u32 {
        match reg {
            REG_ID | REG_ARB => self.id << 24,
            REG_VERSION => ((NUM_PINS as u32 - 1) << 16) | VERSION,
            r if r >= REG_REDTBL => {
                let index = usize::from(r - REG_REDTBL);
                match self.entries.get(index / 2) {
                    Some(&e) if index % 2 == 0 => e as u32,
                    Some(&e) => (e >> 32) as u32,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, reg: u8, value: u32) {
        match reg {
            REG_ID => self.id = (value >> 24) & 0xf,
            r if r >= REG_REDTBL => {
                let index = usize::from(r - REG_REDTBL);
                let pin = index / 2;
                let Some(&old) = self.entries.get(pin) else {
                    return;
                };
                let mut new = if index % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                new = (new & !READ_ONLY) | (old & READ_ONLY);
                if new & TRIGGER_LEVEL == 0 {
                    // An edge-triggered pin has no remote IRR.
                    new &= !REMOTE_IRR;
                }
                self.entries[pin] = new;
                self.update_route(pin);
                // Unmasking (or switching to level) an asserted level pin interrupts.
                if new & TRIGGER_LEVEL != 0 && self.levels & (1 << pin) != 0 {
                    self.fire(pin);
                }
            }
            _ => {}
        }
    }

    fn update_route(&self, pin: usize) {
        let e = self.entries[pin];
        let msg = (e & MASKED == 0).then(|| entry_message(e));
        if let Err(err) = self.delivery.route(pin, msg) {
            log::warn!("IOAPIC pin {pin}: cannot update its route: {err}");
        }
    }
}

impl MutMmioDevice for Ioapic {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => u32::from(self.select),
            IOWIN => self.read_register(self.select),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_register(self.select, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record {
        sent: Mutex<Vec<(usize, MsiMessage)>>,
        routes: Mutex<Vec<(usize, Option<MsiMessage>)>>,
    }

    impl MsiDelivery for Record {
        fn route(&self, pin: usize, msg: Option<MsiMessage>) -> Result<()> {
            self.routes.lock().unwrap().push((pin, msg));
            Ok(())
        }
        fn deliver(&self, pin: usize, msg: MsiMessage) -> Result<()> {
            self.sent.lock().unwrap().push((pin, msg));
            Ok(())
        }
    }

    impl Record {
        fn take(&self) -> Vec<(usize, MsiMessage)> {
            std::mem::take(&mut *self.sent.lock().unwrap())
        }
    }

    fn ioapic() -> (Ioapic, Arc<Record>) {
        let r = Arc::new(Record::default());
        (Ioapic::new(r.clone()), r)
    }

    fn write(io: &mut Ioapic, reg: u32, value: u32) {
        io.mmio_write(IOREGSEL, &reg.to_le_bytes());
        io.mmio_write(IOWIN, &value.to_le_bytes());
    }

    fn read(io: &mut Ioapic, reg: u32) -> u32 {
        io.mmio_write(IOREGSEL, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.mmio_read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    fn program(io: &mut Ioapic, pin: u32, low: u32, dest: u8) {
        write(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        write(io, 0x10 + 2 * pin, low);
    }

    #[test]
    fn registers_read_back_as_an_82093aa() {
        let (mut io, _) = ioapic();
        assert_eq!(read(&mut io, 1), 0x0017_0011, "24 pins, version 0x11");
        write(&mut io, 0, 0x0a00_0000);
        assert_eq!(read(&mut io, 0), 0x0a00_0000);
        assert_eq!(
            read(&mut io, 2),
            0x0a00_0000,
            "arbitration ID follows the ID"
        );
        // Every pin starts masked.
        for pin in 0..24 {
            assert_eq!(read(&mut io, 0x10 + 2 * pin), 1 << 16);
            assert_eq!(read(&mut io, 0x11 + 2 * pin), 0);
        }
        // Past the last pin: reads 0, writes ignored.
        write(&mut io, 0x10 + 2 * 24, 0x31);
        assert_eq!(read(&mut io, 0x10 + 2 * 24), 0);
        // IOREGSEL reads back.
        io.mmio_write(IOREGSEL, &[0x13]);
        let mut b = [0u8; 4];
        io.mmio_read(IOREGSEL, &mut b);
        assert_eq!(b, [0x13, 0, 0, 0]);
    }

    #[test]
    fn an_entry_becomes_an_msi_message_and_a_route() {
        let (mut io, r) = ioapic();
        // Vector 0x41, fixed, logical destination 0x3, level, active low.
        program(&mut io, 9, 0x41 | (1 << 11) | (1 << 13) | (1 << 15), 3);
        let want = MsiMessage {
            address: 0xfee0_3004,
            data: 0x41 | (1 << 15),
        };
        assert_eq!(r.routes.lock().unwrap().last(), Some(&(9, Some(want))));
        // Lowest priority delivery (1) and physical mode, edge.
        assert_eq!(
            entry_message(0x0200_0000_0000_0000 | 0x0130),
            MsiMessage {
                address: 0xfee0_2000,
                data: 0x130
            }
        );
        // Masking withdraws the route.
        write(&mut io, 0x10 + 2 * 9, 0x41 | (1 << 16));
        assert_eq!(r.routes.lock().unwrap().last(), Some(&(9, None)));
    }

    #[test]
    fn edges_deliver_once_each_and_are_lost_while_masked() {
        let (mut io, r) = ioapic();
        io.pulse(4);
        assert!(r.take().is_empty(), "masked at reset");
        program(&mut io, 4, 0x31, 0);
        io.pulse(4);
        io.pulse(4);
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(r.take(), vec![(4, msg), (4, msg)]);
        // A held level on an edge pin interrupts once, on the rising edge.
        io.set_level(4, true);
        io.set_level(4, true);
        io.set_level(4, false);
        assert_eq!(r.take(), vec![(4, msg)]);
        // Masked: the edge is dropped and not delivered on unmask.
        write(&mut io, 0x10 + 2 * 4, 0x31 | (1 << 16));
        io.pulse(4);
        write(&mut io, 0x10 + 2 * 4, 0x31);
        assert!(r.take().is_empty());
        // Edge entries have no remote IRR.
        assert_eq!(io.entry(4).unwrap() & REMOTE_IRR, 0);
        // Pins past the last are ignored.
        io.pulse(24);
        io.set_level(99, true);
        assert!(r.take().is_empty());
    }

    #[test]
    fn level_pins_hold_remote_irr_until_eoi_and_resend_while_asserted() {
        let (mut io, r) = ioapic();
        let low = 0x52 | (1 << 15);
        program(&mut io, 10, low, 0);
        io.set_level(10, true);
        let sent = r.take();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.data, 0x52 | (1 << 15));
        assert_ne!(io.entry(10).unwrap() & REMOTE_IRR, 0);
        assert_ne!(
            read(&mut io, 0x10 + 2 * 10) & (1 << 14),
            0,
            "remote IRR reads back"
        );
        // Still asserted, remote IRR set: nothing more.
        io.set_level(10, true);
        assert!(r.take().is_empty());
        // The guest cannot clear remote IRR by writing the entry.
        write(&mut io, 0x10 + 2 * 10, low);
        assert!(r.take().is_empty());
        assert_ne!(io.entry(10).unwrap() & REMOTE_IRR, 0);
        // EOI of another vector: nothing.
        io.end_of_interrupt(0x53);
        assert!(r.take().is_empty());
        // EOI while still asserted: sent again.
        io.end_of_interrupt(0x52);
        assert_eq!(r.take().len(), 1);
        // The device deasserts, then the EOI: remote IRR clears, nothing is sent.
        io.set_level(10, false);
        io.end_of_interrupt(0x52);
        assert!(r.take().is_empty());
        assert_eq!(io.entry(10).unwrap() & REMOTE_IRR, 0);
        // Asserted while masked: sent on unmask.
        write(&mut io, 0x10 + 2 * 10, low | (1 << 16));
        io.set_level(10, true);
        assert!(r.take().is_empty());
        write(&mut io, 0x10 + 2 * 10, low);
        assert_eq!(r.take().len(), 1);
        // Switching the pin to edge clears its remote IRR.
        write(&mut io, 0x10 + 2 * 10, 0x52);
        assert_eq!(io.entry(10).unwrap() & REMOTE_IRR, 0);
    }

    #[test]
    fn a_pulse_on_a_level_pin_interrupts_once() {
        let (mut io, r) = ioapic();
        program(&mut io, 9, 0x60 | (1 << 15), 0);
        io.pulse(9);
        assert_eq!(r.take().len(), 1);
        io.end_of_interrupt(0x60);
        assert!(r.take().is_empty(), "the line is low again");
    }

    #[test]
    fn partial_and_odd_accesses_do_not_panic() {
        let (mut io, _) = ioapic();
        io.mmio_write(IOREGSEL, &[]);
        io.mmio_write(IOREGSEL, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b = [0u8; 8];
        io.mmio_read(IOWIN, &mut b);
        io.mmio_read(0x04, &mut b);
        io.mmio_write(0x18, &[1]);
        let mut one = [0u8];
        io.mmio_read(IOWIN, &mut one);
    }
}

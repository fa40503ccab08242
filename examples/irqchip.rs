//! keel-irqchip's device models without a VM: the guest programs the IOAPIC's pin 10 as a
//! level-triggered interrupt to vector 0x32, the device raises its line, and the IOAPIC
//! sends the MSI once, holds remote IRR until the guest's EOI, and sends again while the
//! line stays up; then the PIT, against a simulated clock, says when its channel 0 next
//! raises IRQ 0 in rate-generator mode.
//!
//! `cargo run -p keel-examples --example irqchip`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::interrupt::{MsiMessage, Result};
use keel_bus::MutMmioDevice;
use keel_irqchip::ioapic::{Ioapic, MsiDelivery};
use keel_irqchip::pit::{Clock, Pit};

/// Records the messages the IOAPIC sends (keel-vmm hands them to KVM_SIGNAL_MSI).
#[derive(Default)]
struct Sent(Mutex<Vec<MsiMessage>>);

impl MsiDelivery for Sent {
    fn route(&self, _pin: usize, _msg: Option<MsiMessage>) -> Result<()> {
        Ok(())
    }
    fn deliver(&self, _pin: usize, msg: MsiMessage) -> Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(msg);
        Ok(())
    }
}

impl Sent {
    fn messages(&self) -> Vec<MsiMessage> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn count(&self) -> usize {
        self.messages().len()
    }
}

/// A clock the example moves by hand.
struct Manual(Arc<AtomicU64>);

impl Clock for Manual {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn main() {
    let sent = Arc::new(Sent::default());
    let mut ioapic = Ioapic::new(sent.clone());
    // Redirection entry 10: APIC ID 0 (high word), vector 0x32, level-triggered (bit 15).
    let remote_irr = 1 << 14;
    for (reg, value) in [(0x11u32 + 2 * 10, 0u32), (0x10 + 2 * 10, 0x32 | 1 << 15)] {
        ioapic.mmio_write(0x00, &reg.to_le_bytes());
        ioapic.mmio_write(0x10, &value.to_le_bytes());
    }
    ioapic.set_level(10, true);
    assert_eq!(sent.count(), 1);
    assert_ne!(ioapic.entry(10).unwrap() & remote_irr, 0);
    println!(
        "pin 10 up: one MSI {:x?}, remote IRR set",
        sent.messages()[0]
    );
    // The guest's EOI for vector 0x32 (KVM_EXIT_IOAPIC_EOI in keel-vmm): the line is
    // still up, so the IOAPIC sends again.
    ioapic.end_of_interrupt(0x32);
    assert_eq!(sent.count(), 2);
    println!(
        "EOI with the line still up: sent again ({} MSIs)",
        sent.count()
    );
    ioapic.set_level(10, false);
    ioapic.end_of_interrupt(0x32);
    assert_eq!(sent.count(), 2);
    assert_eq!(ioapic.entry(10).unwrap() & remote_irr, 0);
    println!("line down, EOI: nothing more, remote IRR clear");

    // The PIT: channel 0, mode 2 (rate generator), binary, lobyte/hibyte, count 1193
    // (1.193182 MHz / 1193: about 1 kHz).
    let now = Arc::new(AtomicU64::new(0));
    let mut pit = Pit::new(Manual(now.clone()));
    pit.port_write(0x43, 0b0011_0100);
    pit.port_write(0x40, (1193u16 & 0xff) as u8);
    pit.port_write(0x40, (1193u16 >> 8) as u8);
    let first = pit.next_irq().expect("channel 0 counts");
    now.store(first + 1, Ordering::SeqCst);
    let second = pit.next_irq().expect("and goes on");
    println!(
        "PIT channel 0 at count 1193: IRQ 0 at {first} ns, then every {} ns",
        second - first
    );
    assert!((999_000..=1_001_000).contains(&(second - first)));
}

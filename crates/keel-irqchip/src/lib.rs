//! Userspace x86 interrupt controllers and the PC timer, as reusable device models.
//!
//! With KVM's split irqchip (`KVM_CAP_SPLIT_IRQCHIP`) the local APICs stay in the kernel and
//! the rest of the PC's interrupt hardware lives in the VMM. This crate models it with no
//! hypervisor types, on keel-bus's traits:
//!
//! * [`ioapic::Ioapic`]: an 82093AA I/O APIC. Each unmasked redirection entry becomes an
//!   MSI message, handed to an [`ioapic::MsiDelivery`] the VMM supplies (keel-vmm keeps a KVM
//!   MSI route per pin, so that irqfds on the pin's GSI and the LAPIC's EOI exits work, and
//!   sends with `KVM_SIGNAL_MSI`). Level-triggered pins keep their remote IRR until the
//!   guest's EOI, which the VMM passes to [`ioapic::Ioapic::end_of_interrupt`].
//! * [`pic::Pic`]: the cascaded 8259A pair (ports 0x20/0x21 and 0xa0/0xa1, ELCR at 0x4d0).
//! * [`pit::Pit`]: the 8254 timer (ports 0x40-0x43) and port 0x61's channel 2 gate and
//!   output, counting against a [`pit::Clock`].
//!
//! [`IrqLines`] fans an ISA interrupt line out to both controllers, as the PC wires them.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use keel_bus::interrupt::{InterruptLine, MsiMessage};
//! use keel_bus::MutMmioDevice;
//! use keel_irqchip::ioapic::{Ioapic, MsiDelivery};
//!
//! #[derive(Default)]
//! struct Sent(Mutex<Vec<MsiMessage>>);
//! impl MsiDelivery for Sent {
//!     fn route(&self, _pin: usize, _msg: Option<MsiMessage>) -> keel_bus::interrupt::Result<()> {
//!         Ok(())
//!     }
//!     fn deliver(&self, _pin: usize, msg: MsiMessage) -> keel_bus::interrupt::Result<()> {
//!         self.0.lock().unwrap().push(msg);
//!         Ok(())
//!     }
//! }
//!
//! let sent = Arc::new(Sent::default());
//! let mut ioapic = Ioapic::new(sent.clone());
//! // The guest routes pin 4 to vector 0x31 on APIC ID 0, edge-triggered, unmasked.
//! for (reg, value) in [(0x11u32 + 2 * 4, 0u32), (0x10 + 2 * 4, 0x31)] {
//!     ioapic.mmio_write(0x00, &reg.to_le_bytes());
//!     ioapic.mmio_write(0x10, &value.to_le_bytes());
//! }
//! ioapic.pulse(4);
//! assert_eq!(sent.0.lock().unwrap()[0], MsiMessage { address: 0xfee0_0000, data: 0x31 });
//! ```
#![deny(missing_docs)]

pub mod ioapic;
pub mod pic;
pub mod pit;

mod lines;

pub use lines::{IrqLines, IsaLine};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! PIO and MMIO buses, device traits and interrupt traits for virtual machine monitors.
//!
//! `keel-bus` is the seam between device models and the hypervisor. It knows nothing about
//! KVM: a device model implements [`PioDevice`] or [`MmioDevice`] (or their `&mut self`
//! twins [`MutPioDevice`] and [`MutMmioDevice`], wrapped in a [`std::sync::Mutex`]) and raises
//! interrupts through the traits in [`interrupt`]. A VMM places devices on a [`PioBus`] or
//! [`MmioBus`], and its vCPU loop hands every port or MMIO exit to [`Bus::read`] or
//! [`Bus::write`].
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use keel_bus::{BusRange, MutPioDevice, PioBus};
//!
//! #[derive(Default)]
//! struct Scratch(u8);
//! impl MutPioDevice for Scratch {
//!     fn pio_read(&mut self, _offset: u64, data: &mut [u8]) { data.fill(self.0) }
//!     fn pio_write(&mut self, _offset: u64, data: &[u8]) { self.0 = data[0] }
//! }
//!
//! let bus = PioBus::new();
//! bus.insert(BusRange::new(0x80, 1)?, Arc::new(Mutex::new(Scratch::default())))?;
//! bus.write(0x80, &[0x42])?;
//! let mut byte = [0u8];
//! bus.read(0x80, &mut byte)?;
//! assert_eq!(byte[0], 0x42);
//! # Ok::<(), keel_bus::Error>(())
//! ```
#![deny(missing_docs)]

mod bus;
mod device;
pub mod interrupt;
mod report;

pub use bus::{Bus, BusRange, BusTxn, Dispatch, Error, MmioBus, PioBus, Result};
pub use device::{MmioDevice, MutMmioDevice, MutPioDevice, PioDevice};
pub use report::ErrorChain;

//! PCI for virtual machine monitors: a segment with a host bridge, configuration access
//! through CF8/CFC and ECAM, type-0 configuration space with per-bit access masks, BARs
//! with the sizing protocol and atomic relocation, MSI, MSI-X and INTx.
//!
//! It builds on keel-bus only: BARs become ranges on a keel-bus [`keel_bus::MmioBus`] or
//! [`keel_bus::PioBus`], interrupts go out through keel-bus's [`keel_bus::interrupt`] traits,
//! and BAR addresses come from keel-memory's allocator. No hypervisor types appear.
//!
//! ```
//! use std::sync::Arc;
//! use keel_bus::{MmioBus, PioBus};
//! use keel_memory::{MemoryLayout, SystemAllocator, GIB};
//! use keel_pci::{BarSpec, ConfigSpace, PciDevice, PciFunction, PciSegment};
//!
//! struct Scratch([u8; 16]);
//! impl PciDevice for Scratch {
//!     fn bar_read(&mut self, _bar: u8, off: u64, data: &mut [u8]) {
//!         let o = off as usize;
//!         data.copy_from_slice(&self.0[o..o + data.len()]);
//!     }
//!     fn bar_write(&mut self, _bar: u8, off: u64, data: &[u8]) {
//!         let o = off as usize;
//!         self.0[o..o + data.len()].copy_from_slice(data);
//!     }
//! }
//!
//! let layout = MemoryLayout::new(GIB)?;
//! let mut alloc = SystemAllocator::new(&layout, 5)?;
//! let (mmio, pio) = (Arc::new(MmioBus::new()), Arc::new(PioBus::new()));
//! let segment = Arc::new(PciSegment::new(mmio.clone(), pio.clone(), 0xe000_0000));
//! PciSegment::attach_config_access(&segment)?;
//! let function = PciFunction::new(ConfigSpace::new(0x1234, 0x5678, 0xff, 0, 0), Box::new(Scratch([0; 16])))
//!     .with_bar(0, BarSpec::mem32(0x1000, false)?)?;
//! let slot = segment.add_device(function, &mut alloc)?;
//! // The guest finds it through ECAM: vendor and device ID of bus 0, device `slot`.
//! let mut id = [0u8; 4];
//! mmio.read(0xe000_0000 + (u64::from(slot) << 15), &mut id)?;
//! assert_eq!(u32::from_le_bytes(id), 0x5678_1234);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod bar;
pub mod config;
pub mod function;
pub mod msi;
pub mod msix;
pub mod segment;

pub use bar::{BarKind, BarSpec};
pub use config::ConfigSpace;
pub use function::{BarChange, PciDevice, PciFunction};
pub use msix::MsixLayout;
pub use segment::{McfgEntry, PciSegment};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

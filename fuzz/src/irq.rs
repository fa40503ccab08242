//! Interrupt stand-ins for targets that build devices: they check what a device asks of
//! them and deliver nothing.

use keel_bus::interrupt::{Error, InterruptLine, MsiGroup, MsiMessage, Result};
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line that accepts every edge and level.
pub struct NullLine;

impl InterruptLine for NullLine {
    fn trigger(&self) -> Result<()> {
        Ok(())
    }
    fn set_level(&self, _: bool) -> Result<()> {
        Ok(())
    }
}

/// What a [`Group`] does with a trigger of a vector outside it.
#[derive(Clone, Copy)]
pub enum OutOfRange {
    /// Refuse it as keel-kvm's group does: for devices that pass on a vector the guest
    /// names (the PCI test device's doorbell).
    Refuse,
    /// Panic: the device should never ask (transports check vectors themselves).
    Panic,
}

/// An MSI group of `len` vectors; configuring or querying a vector outside it panics.
pub struct Group {
    /// Number of vectors.
    pub len: usize,
    /// What a trigger outside the group does.
    pub out_of_range: OutOfRange,
}

impl Group {
    /// A group of `len` vectors whose out-of-range triggers panic.
    pub fn strict(len: usize) -> Self {
        Group {
            len,
            out_of_range: OutOfRange::Panic,
        }
    }
}

impl MsiGroup for Group {
    fn len(&self) -> usize {
        self.len
    }
    fn configure(&self, i: usize, _: MsiMessage, _: bool) -> Result<()> {
        assert!(i < self.len);
        Ok(())
    }
    fn trigger(&self, i: usize) -> Result<()> {
        match (i < self.len, self.out_of_range) {
            (true, _) => Ok(()),
            (false, OutOfRange::Refuse) => Err(Error::InvalidVector {
                index: i,
                len: self.len,
            }),
            (false, OutOfRange::Panic) => panic!("vector {i} outside a table of {}", self.len),
        }
    }
    fn is_pending(&self, i: usize) -> Result<bool> {
        assert!(i < self.len);
        Ok(false)
    }
    fn notifier(&self, _: usize) -> Option<&EventFd> {
        None
    }
}

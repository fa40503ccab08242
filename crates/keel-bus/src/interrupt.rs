//! Interrupt traits, free of hypervisor types.
//!
//! A device model raises interrupts through these traits; the VMM supplies implementations
//! (keel-kvm implements them over irqfd, `KVM_IRQ_LINE` and MSI routes). Test code can
//! implement them with counters.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// Errors raised by interrupt implementations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vector index is outside the group.
    #[error("interrupt vector {index} out of range (group has {len})")]
    InvalidVector {
        /// Requested vector.
        index: usize,
        /// Vectors in the group.
        len: usize,
    },
    /// The underlying notification mechanism failed.
    #[error("interrupt delivery failed")]
    Io(#[source] io::Error),
    /// The hypervisor refused an operation (a route, an irqfd, an ioeventfd, a line level).
    #[error("the hypervisor could not {op}")]
    Hypervisor {
        /// What was being done, as a verb phrase ("add an MSI route").
        op: &'static str,
        /// The hypervisor's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// A [`Error::Hypervisor`] for `op` caused by `source`.
    pub fn hypervisor(
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Hypervisor {
            op,
            source: Box::new(source),
        }
    }
}

/// Result alias for interrupt operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A wired interrupt line (legacy INTx / IOAPIC pin).
pub trait InterruptLine: Send + Sync {
    /// Signals an edge: the line pulses once.
    fn trigger(&self) -> Result<()>;
    /// Drives a level-triggered line high (`true`) or low (`false`).
    fn set_level(&self, asserted: bool) -> Result<()>;
}

/// An MSI message: what a device writes, and where, to interrupt the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address (for x86, 0xfeeX_XXXX with the destination APIC ID in bits 12-19).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// Hears the local APICs' end-of-interrupt for level-triggered vectors an IOAPIC in the
/// VMM delivered (KVM's split irqchip reports them as `KVM_EXIT_IOAPIC_EOI`), so that the
/// IOAPIC can clear the pin's remote IRR and interrupt again if the line is still asserted.
pub trait EoiSink: Send + Sync {
    /// The guest ended the interrupt on `vector`.
    fn end_of_interrupt(&self, vector: u8);
}

impl<T: EoiSink + ?Sized> EoiSink for std::sync::Arc<T> {
    fn end_of_interrupt(&self, vector: u8) {
        (**self).end_of_interrupt(vector)
    }
}

/// Sends one-off MSI messages (for example `KVM_SIGNAL_MSI`).
pub trait MsiSender: Send + Sync {
    /// Delivers `msg`.
    fn send(&self, msg: MsiMessage) -> Result<()>;
}

/// A group of MSI vectors owned by one device (an MSI or MSI-X capability).
///
/// The transport programs each vector's message and mask as the guest writes them; the device
/// model only calls [`MsiGroup::trigger`] (or writes the vector's [`MsiGroup::notifier`] from
/// its worker thread, which avoids a lock on the hot path).
pub trait MsiGroup: Send + Sync {
    /// Number of vectors.
    fn len(&self) -> usize;
    /// Whether the group has no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Sets vector `index`'s message and whether it is masked. A masked vector does not
    /// deliver; the caller (the MSI-X model) tracks pending bits.
    fn configure(&self, index: usize, msg: MsiMessage, masked: bool) -> Result<()>;
    /// Raises vector `index`. While it is masked, the signal is held as pending.
    fn trigger(&self, index: usize) -> Result<()>;
    /// Whether vector `index` holds a signal raised while it was masked (its pending bit).
    fn is_pending(&self, index: usize) -> Result<bool>;
    /// An event that raises vector `index` when signalled, if the implementation has one.
    fn notifier(&self, index: usize) -> Option<&EventFd>;
}

/// Something a driver-side write can signal without a VM exit to the device's code path:
/// the device's worker waits on it (an ioeventfd for a virtqueue kick, for example).
pub trait Notifier: Send + Sync {
    /// Signals the notifier.
    fn notify(&self) -> io::Result<()>;
    /// Consumes pending notifications; returns how many were pending (0 when none).
    fn consume(&self) -> io::Result<u64>;
    /// A file descriptor that becomes readable when notified, for epoll.
    fn raw_fd(&self) -> RawFd;
}

impl Notifier for EventFd {
    fn notify(&self) -> io::Result<()> {
        self.write(1)
    }
    fn consume(&self) -> io::Result<u64> {
        match self.read() {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}

impl<T: InterruptLine + ?Sized> InterruptLine for std::sync::Arc<T> {
    fn trigger(&self) -> Result<()> {
        (**self).trigger()
    }
    fn set_level(&self, asserted: bool) -> Result<()> {
        (**self).set_level(asserted)
    }
}

impl<T: MsiSender + ?Sized> MsiSender for std::sync::Arc<T> {
    fn send(&self, msg: MsiMessage) -> Result<()> {
        (**self).send(msg)
    }
}

/// Where a guest write can be caught by an ioeventfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoEventAddress {
    /// An I/O port.
    Pio(u64),
    /// A guest physical address.
    Mmio(u64),
}

/// Which writes an ioeventfd matches: any write, or writes of one value of one width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataMatch {
    /// Any value, any width.
    Any,
    /// A 1-byte write of this value.
    U8(u8),
    /// A 2-byte write of this value.
    U16(u16),
    /// A 4-byte write of this value.
    U32(u32),
    /// An 8-byte write of this value.
    U64(u64),
}

/// Registers eventfds that the hypervisor signals on guest writes, with no exit to the
/// VMM (KVM's ioeventfd). Devices use it for doorbells such as virtqueue notifications;
/// PCI uses it to move a device's doorbells when the guest relocates a BAR.
pub trait IoEventRegistrar: Send + Sync {
    /// Makes writes at `addr` that match `datamatch` signal `evt`.
    fn register(&self, evt: &EventFd, addr: IoEventAddress, datamatch: DataMatch) -> Result<()>;
    /// Undoes [`IoEventRegistrar::register`] with the same arguments.
    fn unregister(&self, evt: &EventFd, addr: IoEventAddress, datamatch: DataMatch) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_errors_name_the_step_and_keep_the_cause() {
        let cause = io::Error::from(io::ErrorKind::InvalidInput);
        let cause_text = cause.to_string();
        let e = Error::hypervisor("add an MSI route", cause);
        assert_eq!(e.to_string(), "the hypervisor could not add an MSI route");
        let source = std::error::Error::source(&e).expect("the cause is the source");
        assert_eq!(source.to_string(), cause_text);
    }
}

//! Device traits: what a bus dispatches to.

use std::sync::{Arc, Mutex, PoisonError};

/// A device on the port I/O bus.
///
/// `offset` is relative to the base of the range the device was inserted at; `data.len()` is
/// the access size (1, 2 or 4 bytes for `in`/`out`, longer for string I/O split by the VMM).
/// Methods take `&self` so that several vCPUs can reach one device at once; a device with
/// mutable state either synchronises internally or implements [`MutPioDevice`] and is wrapped
/// in a [`Mutex`].
pub trait PioDevice: Send + Sync {
    /// Handles a guest read of `data.len()` bytes at `offset`. Fill all of `data`.
    fn pio_read(&self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn pio_write(&self, offset: u64, data: &[u8]);
}

/// A device on the MMIO bus. See [`PioDevice`] for the conventions.
pub trait MmioDevice: Send + Sync {
    /// Handles a guest read of `data.len()` bytes at `offset`. Fill all of `data`.
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn mmio_write(&self, offset: u64, data: &[u8]);
}

/// A port I/O device whose handlers need `&mut self`; `Mutex<T>` is then a [`PioDevice`].
pub trait MutPioDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset`. Fill all of `data`.
    fn pio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn pio_write(&mut self, offset: u64, data: &[u8]);
}

/// An MMIO device whose handlers need `&mut self`; `Mutex<T>` is then an [`MmioDevice`].
pub trait MutMmioDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset`. Fill all of `data`.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

// A device that panicked while holding its lock has already failed loudly; later accesses
// keep using its state rather than cascading the panic into every vCPU thread.
fn locked<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: MutPioDevice> PioDevice for Mutex<T> {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        locked(self).pio_read(offset, data)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        locked(self).pio_write(offset, data)
    }
}

impl<T: MutMmioDevice> MmioDevice for Mutex<T> {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        locked(self).mmio_read(offset, data)
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        locked(self).mmio_write(offset, data)
    }
}

impl<T: PioDevice + ?Sized> PioDevice for Arc<T> {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        (**self).pio_read(offset, data)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        (**self).pio_write(offset, data)
    }
}

impl<T: MmioDevice + ?Sized> MmioDevice for Arc<T> {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        (**self).mmio_read(offset, data)
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        (**self).mmio_write(offset, data)
    }
}

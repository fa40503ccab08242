//! An in-memory backend, for tests, fuzzing and scratch images.

use std::io::{IoSlice, IoSliceMut};
use std::sync::RwLock;

use crate::backend::{check_range, BlockBackend, Limits, WriteFlags};
use crate::error::{Error, Result};
use crate::iov::Iov;

/// A growable byte vector behind the [`BlockBackend`] trait.
#[derive(Default)]
pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    read_only: bool,
    /// Largest size the backend may grow to.
    max_size: u64,
}

impl MemBackend {
    /// A writable backend holding `data`, which may grow up to 1 GiB.
    pub fn new(data: Vec<u8>) -> MemBackend {
        MemBackend {
            data: RwLock::new(data),
            read_only: false,
            max_size: 1 << 30,
        }
    }

    /// Sets the largest size writes may grow the backend to.
    pub fn with_max_size(mut self, max: u64) -> MemBackend {
        self.max_size = max;
        self
    }

    /// A read-only backend holding `data`.
    pub fn read_only(data: Vec<u8>) -> MemBackend {
        MemBackend {
            read_only: true,
            ..MemBackend::new(data)
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn grow_for(&self, data: &mut Vec<u8>, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(offset, len, self.max_size)?;
        let end = (offset + len) as usize;
        if data.len() < end {
            data.resize(end, 0);
        }
        Ok(())
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
    fn limits(&self) -> Limits {
        Limits::default()
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|p| p.into_inner());
        let mut iov = Iov::from_io_slices_mut(bufs);
        let len = iov.len() as u64;
        check_range(offset, len, self.max_size)?;
        let avail = (data.len() as u64).saturating_sub(offset).min(len) as usize;
        if avail > 0 {
            iov.copy_from_slice(0, &data[offset as usize..offset as usize + avail]);
        }
        iov.fill_zero(avail, len as usize - avail);
        Ok(())
    }
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64, _: WriteFlags) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        let iov = Iov::from_io_slices(bufs);
        let len = iov.len() as u64;
        self.grow_for(&mut data, offset, len)?;
        iov.copy_to_slice(0, &mut data[offset as usize..(offset + len) as usize]);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|p| p.into_inner());
        self.grow_for(&mut data, offset, len)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

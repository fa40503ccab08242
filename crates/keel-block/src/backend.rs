//! The [`BlockBackend`] trait and helpers shared by its implementations.

use std::io::{IoSlice, IoSliceMut};
use std::os::unix::io::RawFd;

use crate::error::{Error, Result};
use crate::mapping::Mapping;

/// Alignment and size limits a backend imposes on requests.
///
/// Requests that do not meet `request_alignment` or `memory_alignment` are
/// still accepted by every backend in this crate (they are bounced), but cost
/// more; devices should advertise these values to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths that are multiples of this are served without a
    /// read-modify-write cycle.
    pub request_alignment: u32,
    /// Buffers whose address and length are multiples of this are used
    /// directly instead of being copied through a bounce buffer.
    pub memory_alignment: u32,
    /// Granularity at which discard can actually release space (0 if unknown).
    pub discard_granularity: u32,
    /// Largest request a single call should carry, in bytes.
    pub max_transfer: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_alignment: 1,
            memory_alignment: 1,
            discard_granularity: 0,
            max_transfer: 1 << 30,
        }
    }
}

/// Flags modifying a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is on stable storage when the call returns.
    pub fua: bool,
}

impl WriteFlags {
    /// No flags.
    pub const NONE: WriteFlags = WriteFlags { fua: false };
    /// Force unit access.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// A block device: an array of bytes addressed by offset.
///
/// Every method takes `&self` and implementations are `Send + Sync`, so a
/// single backend can be shared (for example in an `Arc`) by all the queues
/// of a multi-queue device; implementations serialise internally only what
/// must be serialised (metadata updates, read-modify-write of partial
/// sectors).
///
/// The methods here are synchronous: each returns when the request has
/// completed. Asynchronous completion is provided by the queue types in
/// [`crate::aio`], which take the same requests, return immediately and
/// report completions later tagged with a caller-chosen `user_data`, the shape
/// of io_uring. The synchronous methods are the baseline every backend has.
///
/// Reads and writes are all-or-nothing from the caller's point of view: a
/// successful call transferred every byte; there are no short transfers.
/// Buffers are ordinary slices of host memory; requests over guest memory go
/// through [`crate::aio`], whose engines copy them with volatile accesses (or
/// hand them to io_uring), never forming slices over memory a guest may change.
pub trait BlockBackend: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;

    /// Alignment requirements and limits.
    fn limits(&self) -> Limits;

    /// Whether write-type requests are refused with [`Error::ReadOnly`].
    fn is_read_only(&self) -> bool;

    /// Reads `sum(bufs.len())` bytes starting at `offset` into `bufs`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()>;

    /// Writes `bufs` starting at `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64, flags: WriteFlags)
        -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Tells the backend that a range is no longer needed. Afterwards the range
    /// reads as unspecified data (zeroes for every backend in this crate that
    /// actually released the space). Backends that cannot release space
    /// succeed without doing anything; discard is advisory.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes a range read as zeroes. With `unmap`, the backend may release the
    /// space instead of writing zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;

    /// Where `[offset, offset + len)` can be read straight from files, for an engine that
    /// reads them itself (io_uring): `None` if a part of it needs this backend's own
    /// read path (compressed data, memory, a backend without files). The default.
    fn map_file_read(&self, offset: u64, len: u64) -> Result<Option<FileRead>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_vectored_at(&mut [IoSliceMut::new(buf)], offset)
    }

    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_vectored_at(&[IoSlice::new(buf)], offset, WriteFlags::NONE)
    }
}

/// A range of a backend as reads from files ([`BlockBackend::map_file_read`]).
#[derive(Debug, Default)]
pub struct FileRead {
    /// The range's pieces, in order.
    pub extents: Vec<FileExtent>,
    /// Keeps the host ranges read from theirs (qcow2 pins them) until dropped: keep it
    /// until the reads have completed.
    pub pins: Vec<Mapping>,
}

/// One piece of a [`FileRead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    /// Length in bytes.
    pub len: u64,
    /// Where its bytes are.
    pub source: FileSource,
}

/// Where the bytes of a [`FileExtent`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSource {
    /// In this file, from this offset.
    File {
        /// The file.
        fd: RawFd,
        /// Byte offset in it.
        offset: u64,
        /// Alignment its offsets, lengths and buffers need (`O_DIRECT`), 1 if none.
        align: u64,
    },
    /// Zeroes.
    Zero,
}

impl<T: BlockBackend + ?Sized> BlockBackend for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn limits(&self) -> Limits {
        (**self).limits()
    }
    fn is_read_only(&self) -> bool {
        (**self).is_read_only()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        (**self).read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        (**self).write_vectored_at(bufs, offset, flags)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        (**self).write_zeroes(offset, len, unmap)
    }
    fn map_file_read(&self, offset: u64, len: u64) -> Result<Option<FileRead>> {
        (**self).map_file_read(offset, len)
    }
}

/// Checks that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_rejects_overflow() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}

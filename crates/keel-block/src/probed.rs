//! [`ProbedRaw`]: a raw image whose format was guessed, protected from the guest turning it
//! into another format.
//!
//! A raw image holds whatever its guest writes. If its format is probed rather than given,
//! a guest that writes a qcow2 header into sector 0 decides, at the next start, how the
//! host reads the file: its virtual size, its metadata, its backing file. QEMU therefore
//! refuses, on a raw image it probed, any write that would make the first sector probe as
//! another format (`EPERM`, the guest sees an I/O error); [`ProbedRaw`] does the same for
//! any backend. An image opened with an explicit raw format needs no guard: whoever gave
//! the format will not probe it later.
//!
//! Every request that can change the first [`PROBE_BYTES`] bytes (writes, write-zeroes,
//! discards) is checked against the sector as it would be afterwards, the existing bytes
//! merged with the new ones, under one lock, so that two partial writes cannot each
//! pass and together write the magic. Through [`UringQueue`](crate::aio::UringQueue),
//! such writes are served synchronously ([`UringTarget::inspects_write`]); all others go
//! to the inner backend untouched.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, PoisonError};

use crate::backend::{BlockBackend, Limits, WriteFlags};
use crate::error::{Error, Result};
use crate::image::{Format, PROBE_BYTES};

/// A raw image opened by probing: writes that would make its first sector probe as
/// another format fail with [`Error::ProbedFormatChange`]; everything else passes to the
/// inner backend.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use keel_block::probed::ProbedRaw;
/// use keel_block::{BlockBackend, Error, MemBackend};
///
/// let disk = ProbedRaw::new(Arc::new(MemBackend::new(vec![0; 1 << 20])));
/// // An ordinary boot sector is fine.
/// disk.write_at(&[0x55; 512], 0)?;
/// // A qcow2 header is not: the image would open as qcow2 next time.
/// let err = disk.write_at(b"QFI\xfb\0\0\0\x03", 0).unwrap_err();
/// assert!(matches!(err, Error::ProbedFormatChange { .. }));
/// let mut sector = [0u8; 512];
/// disk.read_at(&mut sector, 0)?;
/// assert_eq!(sector, [0x55; 512]);
/// # Ok::<(), keel_block::Error>(())
/// ```
pub struct ProbedRaw<B> {
    inner: Arc<B>,
    /// Held while a request that may change the first sector is checked and done.
    first_sector: Mutex<()>,
}

impl<B: BlockBackend> ProbedRaw<B> {
    /// Guards `inner`, a raw image whose format was probed.
    pub fn new(inner: Arc<B>) -> Self {
        ProbedRaw {
            inner,
            first_sector: Mutex::new(()),
        }
    }

    /// The guarded backend.
    pub fn inner(&self) -> &Arc<B> {
        &self.inner
    }

    /// Runs `op`, a request changing `[offset, offset+len)`, if the first sector still
    /// probes as raw once `fill` has put the new bytes (those of the sector in the
    /// range, starting at `offset`) over the current ones.
    fn checked<T>(
        &self,
        offset: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]),
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if len == 0 || offset >= PROBE_BYTES as u64 || self.inner.is_read_only() {
            return op();
        }
        let _held = self
            .first_sector
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A device smaller than the probe buffer probes on what it has.
        let n = (PROBE_BYTES as u64).min(self.inner.size()) as usize;
        let mut sector = vec![0u8; n];
        self.inner.read_at(&mut sector, 0)?;
        let start = offset as usize;
        let end = offset.saturating_add(len).min(n as u64) as usize;
        if start < end {
            fill(&mut sector[start..end]);
        }
        match Format::detect(&sector) {
            Format::Raw => op(),
            format => Err(Error::ProbedFormatChange { format }),
        }
    }
}

impl<B: BlockBackend> BlockBackend for ProbedRaw<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        self.checked(
            offset,
            len,
            |dst| {
                let mut at = 0;
                for b in bufs {
                    if at == dst.len() {
                        break;
                    }
                    let k = b.len().min(dst.len() - at);
                    dst[at..at + k].copy_from_slice(&b[..k]);
                    at += k;
                }
            },
            || self.inner.write_vectored_at(bufs, offset, flags),
        )
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discarded bytes read as zeroes or as before; zeroes are the new content that
        // can differ from what is checked already.
        self.checked(
            offset,
            len,
            |dst| dst.fill(0),
            || self.inner.discard(offset, len),
        )
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.checked(
            offset,
            len,
            |dst| dst.fill(0),
            || self.inner.write_zeroes(offset, len, unmap),
        )
    }
}

#[cfg(feature = "io_uring")]
mod uring {
    use std::os::unix::io::RawFd;

    use super::ProbedRaw;
    use crate::aio::{CopyLink, UringTarget, WriteMap};
    use crate::error::{InvalidArgument, Result};
    use crate::image::PROBE_BYTES;
    use crate::mapping::Mapping;
    use crate::raw::RawFile;

    impl<T: UringTarget> UringTarget for ProbedRaw<T> {
        fn data_fd(&self) -> RawFd {
            self.inner.data_fd()
        }
        fn data_alignment(&self) -> u64 {
            self.inner.data_alignment()
        }
        fn data_file(&self) -> Option<&RawFile> {
            self.inner.data_file()
        }
        fn inspects_write(&self, offset: u64, len: u64) -> bool {
            (len != 0 && offset < PROBE_BYTES as u64) || self.inner.inspects_write(offset, len)
        }
        fn map(&self, write: bool, offset: u64, len: u64) -> Result<Mapping> {
            if write && self.inspects_write(offset, len) {
                // Writing here without the data would skip the check.
                return Err(InvalidArgument::UninspectedWrite { offset, len }.into());
            }
            self.inner.map(write, offset, len)
        }
        fn map_write_or_copy(&self, offset: u64, len: u64) -> Result<WriteMap> {
            if self.inspects_write(offset, len) {
                return Err(InvalidArgument::UninspectedWrite { offset, len }.into());
            }
            self.inner.map_write_or_copy(offset, len)
        }
        fn finish_copy(&self, link: CopyLink, written: bool) -> Result<()> {
            self.inner.finish_copy(link, written)
        }
        fn wait_copies(&self, offset: u64, len: u64) {
            self.inner.wait_copies(offset, len)
        }
    }
}

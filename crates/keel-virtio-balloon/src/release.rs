//! Giving guest memory back to the host: the [`MemoryReleaser`] trait the device calls, and
//! [`HostReleaser`], which releases keel-memory's mappings (`MADV_DONTNEED` for anonymous
//! memory, `FALLOC_FL_PUNCH_HOLE` for file- or memfd-backed memory). A VMM whose memory
//! lives elsewhere plugs in its own.

use std::io;
use std::os::fd::AsRawFd;

use keel_memory::GuestMemoryMmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Errors from releasing guest memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// The range is not inside one region of guest memory.
    #[error("releasing {len:#x} bytes at guest address {gpa:#x}: not inside one memory region")]
    OutsideMemory {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `madvise(MADV_DONTNEED)` failed.
    #[error("releasing {len:#x} bytes at guest address {gpa:#x} with MADV_DONTNEED")]
    Madvise {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` failed.
    #[error("punching a hole of {len:#x} bytes at guest address {gpa:#x} in the backing file")]
    PunchHole {
        /// Guest-physical start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How the balloon gives memory back to the host.
pub trait MemoryReleaser: Send + Sync {
    /// The smallest unit the backing of the region holding `gpa` can release, in bytes (a
    /// power of two, at least 4096): the host page size, or the huge page size. Called
    /// once per region when the device starts.
    fn page_size(&self, mem: &GuestMemoryMmap, gpa: GuestAddress) -> u64;

    /// Releases `[gpa, gpa + len)`, a whole number of [`page_size`](Self::page_size)
    /// pages inside one region: the host may take the memory back, and the guest reads
    /// zeroes there until it writes again.
    fn release(
        &self,
        mem: &GuestMemoryMmap,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<(), ReleaseError>;
}

/// Releases keel-memory's mappings: anonymous memory with `MADV_DONTNEED`, file- or
/// memfd-backed memory by punching a hole in the file (and dropping private copies with
/// `MADV_DONTNEED`). The page size of file-backed memory on hugetlbfs is the file
/// system's block size; otherwise it is the host page size, unless set with
/// [`HostReleaser::with_page_size`]. Released ranges are marked dirty in the region's
/// bitmap (their content changed to zeroes outside vm-memory).
///
/// # Examples
///
/// ```
/// use keel_memory::GuestMemoryMmap;
/// use keel_virtio_balloon::{HostReleaser, MemoryReleaser};
/// use vm_memory::{Bytes, GuestAddress};
///
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// mem.write_obj(0xaau8, GuestAddress(0x4000)).unwrap();
/// HostReleaser::new().release(&mem, GuestAddress(0x4000), 0x1000).unwrap();
/// assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 0);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct HostReleaser {
    page_size: Option<u64>,
}

const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;

impl HostReleaser {
    /// A releaser that finds each region's page size itself.
    pub fn new() -> Self {
        Self::default()
    }

    /// A releaser that treats every region as backed by pages of `size` bytes (a VMM
    /// that mapped its memory with `MAP_HUGETLB` knows what it asked for).
    pub fn with_page_size(size: u64) -> Self {
        HostReleaser {
            page_size: Some(size.max(crate::spec::BALLOON_PAGE).next_power_of_two()),
        }
    }
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(4096).max(4096)
}

impl MemoryReleaser for HostReleaser {
    fn page_size(&self, mem: &GuestMemoryMmap, gpa: GuestAddress) -> u64 {
        if let Some(s) = self.page_size {
            return s;
        }
        let file = mem
            .find_region(gpa)
            .and_then(|r| r.file_offset())
            .map(|f| f.file().as_raw_fd());
        if let Some(fd) = file {
            // SAFETY: an all-zero statfs is a valid value to overwrite.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: `fd` is open (the region holds the file) and `st` is a valid
            // statfs for the kernel to fill.
            if unsafe { libc::fstatfs(fd, &mut st) } == 0 && st.f_type == HUGETLBFS_MAGIC {
                return u64::try_from(st.f_bsize).unwrap_or(4096).max(4096);
            }
        }
        host_page_size()
    }

    fn release(
        &self,
        mem: &GuestMemoryMmap,
        gpa: GuestAddress,
        len: u64,
    ) -> Result<(), ReleaseError> {
        let outside = || ReleaseError::OutsideMemory { gpa: gpa.0, len };
        let (region, off) = mem.to_region_addr(gpa).ok_or_else(outside)?;
        let end = off.0.checked_add(len).ok_or_else(outside)?;
        if end > region.len() || len == 0 {
            return Err(outside());
        }
        let ulen = usize::try_from(len).map_err(|_| outside())?;
        let host = region
            .get_host_address(MemoryRegionAddress(off.0))
            .map_err(|_| outside())?;
        if let Some(f) = region.file_offset() {
            let start = f.start().checked_add(off.0).ok_or_else(outside)?;
            // SAFETY: fallocate on an open file descriptor the region holds; it changes
            // only that file's blocks in the range, which back this guest range.
            let r = unsafe {
                libc::fallocate(
                    f.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r != 0 {
                return Err(ReleaseError::PunchHole {
                    gpa: gpa.0,
                    len,
                    source: io::Error::last_os_error(),
                });
            }
        }
        // SAFETY: `[host, host + len)` lies inside the region's mapping (checked above),
        // which the region keeps mapped; MADV_DONTNEED only drops its pages, which the
        // guest then reads as zeroes (or the file's content): no Rust reference points
        // into guest memory, so nothing observes the change unsoundly.
        let r = unsafe { libc::madvise(host.cast(), ulen, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(ReleaseError::Madvise {
                gpa: gpa.0,
                len,
                source: io::Error::last_os_error(),
            });
        }
        region.bitmap().mark_dirty(off.0 as usize, ulen);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, FileOffset, GuestRegionMmap, MmapRegion};

    #[test]
    fn anonymous_memory_reads_zero_after_release() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(&[0x5a; 0x3000], GuestAddress(0x1000))
            .unwrap();
        HostReleaser::new()
            .release(&mem, GuestAddress(0x2000), 0x1000)
            .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 0x5a);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x5a);
        assert!(matches!(
            HostReleaser::new().release(&mem, GuestAddress(0xff000), 0x2000),
            Err(ReleaseError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn file_backed_memory_gets_a_hole() {
        let mut file = tempfile_in_tmp();
        file.write_all(&[0x77; 0x4000]).unwrap();
        let region: MmapRegion<keel_memory::DirtyBitmap> =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), 0x4000).unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0x10000)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        HostReleaser::new()
            .release(&mem, GuestAddress(0x11000), 0x1000)
            .unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(), 0x77);
        let mut st: libc::stat = unsafe_zeroed_stat();
        // SAFETY: fstat on an open file into a valid buffer.
        assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }, 0);
        assert_eq!(st.st_size, 0x4000, "the file keeps its size");
        assert!(st.st_blocks * 512 <= 0x3000, "the hole freed blocks");
    }

    fn unsafe_zeroed_stat() -> libc::stat {
        // SAFETY: all-zero is a valid libc::stat.
        unsafe { std::mem::zeroed() }
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "keel-balloon-release-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}

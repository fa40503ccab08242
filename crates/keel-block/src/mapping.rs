//! Guest ranges mapped to host extents, shared by every format.
//!
//! An engine that moves data itself (io_uring submits reads and writes straight to the
//! image file) asks the format where a guest range lives, then transfers to those host
//! offsets. [`MapExtents`] is that question, split like imago's `get_mapping` and
//! `ensure_data_mapping`: [`MapExtents::map_read`] only looks (it never allocates, and
//! may answer zeroes, a backing image or compressed data, which the format itself must
//! serve), [`MapExtents::map_write`] allocates as needed and answers host data only.
//!
//! A raw file maps every guest offset to itself. A qcow2 image pins the host clusters of
//! a [`Mapping`] until it is dropped, so keep the mapping until the transfers to its
//! extents have completed (see [`crate::qcow2::inflight`]).

use crate::backend::{check_range, BlockBackend};
use crate::error::{Error, Result};
use crate::qcow2::inflight::Pin;
use crate::raw::RawFile;

/// How a guest range is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data at this host offset.
    Data(u64),
    /// Reads as zeroes.
    Zero,
    /// Not allocated in this image, which has no backing file: reads as
    /// zeroes.
    Unallocated,
    /// Not allocated in this image: reads from the backing file at the same
    /// guest offset (zeroes past its end).
    Backing,
    /// Compressed: the cluster's compressed data is `len` bytes at host
    /// offset `host`; reads must go through the driver, which decompresses.
    Compressed {
        /// Host byte offset of the compressed data.
        host: u64,
        /// Length of the compressed data in bytes.
        len: u64,
    },
}

/// A contiguous guest range with one storage kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// How it is stored.
    pub kind: ExtentKind,
}

/// Appends `n` bytes of `kind` to `out`, merging with the last extent when
/// contiguous.
pub(crate) fn push_extent(out: &mut Vec<Extent>, n: u64, kind: ExtentKind) {
    if let Some(last) = out.last_mut() {
        let merge = match (last.kind, kind) {
            (ExtentKind::Data(a), ExtentKind::Data(b)) => a + last.len == b,
            // One extent per compressed cluster.
            (ExtentKind::Compressed { .. }, _) => false,
            (a, b) => a == b,
        };
        if merge {
            last.len += n;
            return;
        }
    }
    out.push(Extent { len: n, kind });
}

/// A guest range mapped to host extents.
///
/// For qcow2 the host clusters holding the data are pinned until this value
/// is dropped: however the guest range is discarded or rewritten meanwhile,
/// they are not allocated to anything else. Keep the mapping alive until the
/// data transfer to or from its extents has completed.
#[must_use = "dropping a Mapping unpins its host clusters before the transfer is done"]
pub struct Mapping {
    extents: Vec<Extent>,
    pin: Option<Pin>,
}

impl Mapping {
    /// A mapping that pins nothing, for backends whose host offsets never
    /// change owner (a raw file maps every guest offset to itself).
    pub fn unpinned(extents: Vec<Extent>) -> Mapping {
        Mapping { extents, pin: None }
    }

    /// A mapping holding `pin` until it is dropped.
    pub(crate) fn with_pin(extents: Vec<Extent>, pin: Pin) -> Mapping {
        Mapping {
            extents,
            pin: Some(pin),
        }
    }

    /// The extents, in guest order, covering the mapped range.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Moves the extents out, keeping the pin.
    #[cfg_attr(not(feature = "io_uring"), allow(dead_code))]
    pub(crate) fn take_extents(&mut self) -> Vec<Extent> {
        std::mem::take(&mut self.extents)
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("extents", &self.extents)
            .field("pinned", &self.pin)
            .finish()
    }
}

/// A backend that maps guest ranges to host extents, so that an engine can
/// transfer the data to or from the host file itself.
///
/// # Examples
///
/// ```
/// use keel_block::mapping::{ExtentKind, MapExtents};
/// use keel_block::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
/// use keel_block::MemBackend;
///
/// let file = MemBackend::new(Vec::new());
/// qcow2::create(&file, &CreateOptions { size: 1 << 20, ..Default::default() })?;
/// let img = Qcow2::open(file, Qcow2Options::default())?;
/// // Nothing is allocated yet: a read mapping says so, and allocates nothing.
/// let read = img.map_read(0, 4096)?;
/// assert_eq!(read.extents()[0].kind, ExtentKind::Unallocated);
/// drop(read);
/// // A write mapping allocates a cluster and says where to write.
/// let write = img.map_write(0, 4096)?;
/// assert!(matches!(write.extents()[0].kind, ExtentKind::Data(_)));
/// # Ok::<(), keel_block::Error>(())
/// ```
pub trait MapExtents {
    /// Maps `[offset, offset + len)` for reading, allocating nothing. Data
    /// extents can be read from the host file directly;
    /// [`ExtentKind::Backing`] and [`ExtentKind::Compressed`] extents cannot
    /// (the backend's [`BlockBackend::read_vectored_at`] serves them), and
    /// [`ExtentKind::Zero`] and [`ExtentKind::Unallocated`] read as zeroes.
    fn map_read(&self, offset: u64, len: u64) -> Result<Mapping>;

    /// Maps `[offset, offset + len)` for writing, allocating host space as
    /// needed: every extent is [`ExtentKind::Data`], and the caller writes the
    /// data there.
    fn map_write(&self, offset: u64, len: u64) -> Result<Mapping>;
}

impl MapExtents for RawFile {
    fn map_read(&self, offset: u64, len: u64) -> Result<Mapping> {
        check_range(offset, len, self.size())?;
        Ok(Mapping::unpinned(vec![Extent {
            len,
            kind: ExtentKind::Data(offset),
        }]))
    }

    fn map_write(&self, offset: u64, len: u64) -> Result<Mapping> {
        if self.is_read_only() {
            return Err(Error::ReadOnly);
        }
        self.map_read(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::RawOptions;

    #[test]
    fn raw_maps_every_offset_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        RawFile::create(&path, 1 << 20).unwrap();
        let rw = RawFile::open(&path, RawOptions::default()).unwrap();
        for m in [rw.map_read(4096, 8192), rw.map_write(4096, 8192)] {
            let m = m.unwrap();
            assert_eq!(
                m.extents(),
                [Extent {
                    len: 8192,
                    kind: ExtentKind::Data(4096)
                }]
            );
        }
        assert!(matches!(
            rw.map_read(1 << 20, 1),
            Err(Error::OutOfRange { .. })
        ));
        let ro = RawFile::open(
            &path,
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ro.map_read(0, 512).is_ok());
        assert!(matches!(ro.map_write(0, 512), Err(Error::ReadOnly)));
    }

    #[test]
    fn adjacent_extents_merge() {
        let mut v = Vec::new();
        push_extent(&mut v, 512, ExtentKind::Data(0));
        push_extent(&mut v, 512, ExtentKind::Data(512));
        push_extent(&mut v, 512, ExtentKind::Data(4096));
        push_extent(&mut v, 512, ExtentKind::Zero);
        push_extent(&mut v, 512, ExtentKind::Zero);
        let c = ExtentKind::Compressed { host: 0, len: 9 };
        push_extent(&mut v, 512, c);
        push_extent(&mut v, 512, c);
        let lens: Vec<u64> = v.iter().map(|e| e.len).collect();
        assert_eq!(lens, [1024, 512, 1024, 512, 512]);
    }
}

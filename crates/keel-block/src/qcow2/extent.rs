//! How guest ranges are stored: the extents a [`super::Mapping`] lists.

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
pub(super) fn push_extent(out: &mut Vec<Extent>, n: u64, kind: ExtentKind) {
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

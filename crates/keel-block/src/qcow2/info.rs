//! A summary of an image ([`ImageInfo`]), for `keel-img info`.

use super::compress::CompressionType;
use super::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};

/// Summary of an image, for `keel-img info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// qcow2 version.
    pub version: u32,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts feature.
    pub lazy_refcounts: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit.
    pub dirty: bool,
    /// Compression type.
    pub compression_type: CompressionType,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format, from the backing-format extension.
    pub backing_format: Option<String>,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
}

/// Builds an [`ImageInfo`] from a header.
pub fn info_from_header(h: &Header) -> ImageInfo {
    ImageInfo {
        virtual_size: h.size,
        cluster_size: h.cluster_size(),
        version: h.version,
        refcount_bits: 1 << h.refcount_order,
        lazy_refcounts: h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
        corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
        dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
        compression_type: CompressionType::from_raw(h.compression_type).unwrap_or_default(),
        snapshots: h.nb_snapshots,
        backing_file: h
            .backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        backing_format: h.backing_format(),
        extended_l2: h.incompatible_features & header::INCOMPAT_EXTL2 != 0,
    }
}

//! Options for opening ([`Qcow2Options`]) and creating ([`CreateOptions`])
//! qcow2 images.

use super::compress::CompressionType;
use crate::image::Format;

/// Sizes of the metadata caches, QEMU's `l2-cache-size` and
/// `refcount-cache-size` (rounded down to whole clusters, at least 2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSizes {
    /// L2 cache size in bytes. Default: enough to map the whole image, at
    /// most 32 MiB.
    pub l2: Option<u64>,
    /// Refcount cache size in bytes. Default: 4 clusters, at least 256 KiB.
    pub refcount: Option<u64>,
}

/// Options for [`Qcow2::open`](super::Qcow2::open).
///
/// [`ImageOptions`](crate::image::ImageOptions) holds one of these for the
/// qcow2 images it opens; the file under the image has its own
/// [`RawOptions`](crate::RawOptions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Open read-only. An image whose file is read-only is opened read-only
    /// whatever this says.
    pub read_only: bool,
    /// Write metadata back after every write (the `writethrough` cache modes).
    pub write_through: bool,
    /// Metadata cache sizes.
    pub cache_sizes: CacheSizes,
    /// Follow a backing file whose format the image does not state (no
    /// backing-format header extension), probing its format. Off by
    /// default: a guest-written raw image can hold a qcow2 header naming any
    /// host file (`/etc/shadow`), which probing would then expose to the
    /// guest. Used by [`backing::open_path`](super::backing::open_path).
    pub allow_probed_backing: bool,
}

/// Options for [`Qcow2::create`](super::Qcow2::create).
///
/// The defaults are `qemu-img create -f qcow2`'s: version 3 (compat=1.1),
/// 64 KiB clusters, 16-bit refcounts, deflate compression.
///
/// # Examples
///
/// ```
/// use keel_block::qcow2::{self, CreateOptions};
/// use keel_block::{Format, MemBackend};
///
/// // An overlay over `base.qcow2`, like
/// // `qemu-img create -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2`.
/// let opts = CreateOptions {
///     size: 10 << 30,
///     cluster_size: 4096,
///     backing_file: Some("base.qcow2".into()),
///     backing_format: Some(Format::Qcow2),
///     ..Default::default()
/// };
/// let file = MemBackend::new(Vec::new());
/// qcow2::create(&file, &opts)?;
/// let hdr = qcow2::read_header(&file)?;
/// assert_eq!(hdr.backing_format().as_deref(), Some("qcow2"));
/// # Ok::<(), keel_block::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Backing file name, stored as given (relative names are resolved
    /// against the image's directory when it is opened).
    pub backing_file: Option<String>,
    /// Backing file format, stored in the backing-format header extension.
    pub backing_format: Option<Format>,
    /// Compression type for compressed clusters (zstd needs version 3).
    pub compression_type: CompressionType,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.
    pub refcount_bits: u32,
    /// Set the lazy refcounts compatible feature (version 3 only).
    pub lazy_refcounts: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            backing_file: None,
            backing_format: None,
            compression_type: CompressionType::Deflate,
            extended_l2: false,
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
        }
    }
}

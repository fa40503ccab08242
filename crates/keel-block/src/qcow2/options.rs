//! Options for opening ([`Qcow2Options`]) and creating ([`CreateOptions`])
//! qcow2 images.

/// Options for [`Qcow2::open`](super::Qcow2::open).
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Options {
    /// Follow a backing file whose format the image does not state (no
    /// backing-format header extension), probing its format. Off by
    /// default: a guest-written raw image can hold a qcow2 header naming any
    /// host file (`/etc/shadow`), which probing would then expose to the
    /// guest. Used by [`backing::open_path`](super::backing::open_path).
    pub allow_probed_backing: bool,
    /// Open read-only.
    pub read_only: bool,
    /// L2 cache size in bytes. Default: enough to map the whole image, at
    /// most 32 MiB.
    pub l2_cache_size: Option<u64>,
    /// Refcount cache size in bytes. Default: 4 clusters, at least 256 KiB.
    pub refcount_cache_size: Option<u64>,
    /// Write metadata back after every write (the `writethrough` cache modes).
    pub write_through: bool,
}

/// Options for [`Qcow2::create`](super::Qcow2::create).
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Backing file name, stored as given (relative names are resolved
    /// against the image's directory when it is opened).
    pub backing_file: Option<String>,
    /// Backing file format (`raw` or `qcow2`), stored in the backing-format
    /// header extension.
    pub backing_format: Option<String>,
    /// Compression type for compressed clusters: 0 deflate, 1 zstd.
    pub compression_type: u8,
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
            compression_type: 0,
            extended_l2: false,
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
        }
    }
}

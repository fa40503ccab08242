//! Error type shared by every backend.
//!
//! [`Error`] says which class of failure happened (and so which errno it maps to); the
//! classes that used to carry a free-form message carry a matchable kind instead:
//! [`Unsupported`], [`InvalidImage`], [`Corruption`], [`InvalidArgument`] and
//! [`ChainProblem`]. The kinds hold the values involved (the field and its limit, the
//! table, index and offset of a bad entry) and display as a message naming them. Causes
//! (an OS error, a decompressor's error, a backing image's error) are only ever
//! [`std::error::Error::source`]s, never part of a message.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::qcow2::compress::CompressionType;

/// Result alias used throughout `keel-block`.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors returned by block backends and image formats.
///
/// Use [`Error::errno`] to map an error to a POSIX errno, for example to turn
/// it into a virtio-blk status: `EIO` becomes `VIRTIO_BLK_S_IOERR`, `ENOTSUP`
/// becomes `VIRTIO_BLK_S_UNSUPP`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O call failed.
    #[error("I/O error while {context}")]
    Io {
        /// What the backend was doing.
        context: String,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// A request reaches past the end of the device.
    #[error("request at offset {offset} of {len} bytes is beyond the device size {size}")]
    OutOfRange {
        /// Start of the request in bytes.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },
    /// A write-type request was sent to a read-only backend.
    #[error("the backend is read-only")]
    ReadOnly,
    /// The image or request needs a feature this implementation lacks.
    #[error("unsupported: {0}")]
    Unsupported(Unsupported),
    /// The image could not be opened because its metadata is invalid.
    #[error("invalid image: {0}")]
    InvalidImage(InvalidImage),
    /// Corruption was detected while serving a request. The image has been
    /// marked corrupt if it was writable.
    #[error("image corruption detected: {0}")]
    Corrupt(Corruption),
    /// The data of a compressed cluster does not decompress to one cluster.
    /// The image is not marked corrupt (as QEMU, which fails the read).
    #[error("image corruption detected: compressed cluster at host offset {host:#x}")]
    CompressedData {
        /// Host byte offset of the compressed data.
        host: u64,
        /// What the decompressor found.
        #[source]
        source: DecompressError,
    },
    /// A caller passed an invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(InvalidArgument),
    /// A backing file of an image could not be opened or used.
    #[error("backing file {}", path.display())]
    Backing {
        /// The backing file, as resolved.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// An image's backing chain is refused (missing format, loop, too deep).
    #[error("backing chain of {}: {reason}", image.display())]
    BackingChain {
        /// The image naming the backing file.
        image: PathBuf,
        /// What is wrong.
        reason: ChainProblem,
    },
    /// A write to a raw image whose format was probed would make its first sector probe
    /// as another format, and was refused (see [`crate::probed`]). Nothing was written.
    #[error(
        "write refused: the image's format was probed as raw and the write would make it \
         probe as {format}; open it with an explicit raw format to allow such writes"
    )]
    ProbedFormatChange {
        /// The format the first sector would have probed as.
        format: crate::image::Format,
    },
    /// A request's buffer names guest memory that cannot be accessed.
    #[error("guest memory at {addr:#x} ({len} bytes) cannot be accessed")]
    GuestMemory {
        /// Guest-physical address of the range.
        addr: u64,
        /// Length of the range in bytes.
        len: usize,
        /// Why vm-memory refused it.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl Error {
    /// Wraps an [`io::Error`] with a description of the failing operation.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Builds an `Io` error from the calling thread's `errno`.
    pub fn last_os(context: impl Into<String>) -> Self {
        Self::io(context, io::Error::last_os_error())
    }

    /// The POSIX errno that best describes this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::ReadOnly => libc::EROFS,
            // As QEMU answers such writes.
            Error::ProbedFormatChange { .. } => libc::EPERM,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidImage(_)
            | Error::Corrupt(_)
            | Error::CompressedData { .. }
            | Error::BackingChain { .. } => libc::EIO,
            Error::Backing { source, .. } => source.errno(),
            Error::GuestMemory { .. } => libc::EFAULT,
        }
    }
}

impl From<Unsupported> for Error {
    fn from(k: Unsupported) -> Self {
        Error::Unsupported(k)
    }
}

impl From<InvalidImage> for Error {
    fn from(k: InvalidImage) -> Self {
        Error::InvalidImage(k)
    }
}

impl From<InvalidArgument> for Error {
    fn from(k: InvalidArgument) -> Self {
        Error::InvalidArgument(k)
    }
}

/// A qcow2 metadata structure, as named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Metadata {
    /// The header (cluster 0).
    Header,
    /// The active L1 table.
    L1Table,
    /// The refcount table.
    RefcountTable,
    /// An L2 table of the active L1 table.
    L2Table,
    /// A refcount block.
    RefcountBlock,
    /// The internal snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    SnapshotL1Table,
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metadata::Header => "header",
            Metadata::L1Table => "active L1 table",
            Metadata::RefcountTable => "refcount table",
            Metadata::L2Table => "active L2 table",
            Metadata::RefcountBlock => "refcount block",
            Metadata::SnapshotTable => "snapshot table",
            Metadata::SnapshotL1Table => "snapshot L1 table",
        })
    }
}

/// What an image or request needs that this implementation lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// An image format other than raw and qcow2 (the name given).
    Format(String),
    /// A qcow2 version other than 2 and 3.
    Version(u32),
    /// Encrypted images (the header's `crypt_method`: 1 AES, 2 LUKS).
    Encryption {
        /// The header's `crypt_method`.
        method: u32,
    },
    /// Incompatible features this implementation does not know.
    IncompatibleFeatures {
        /// The unknown bits of the header's `incompatible_features`.
        bits: u64,
        /// Their names, from the image's feature-name table where it has one.
        names: Vec<String>,
    },
    /// An external data file.
    ExternalDataFile,
    /// A compression type other than deflate (0) and zstd (1).
    CompressionType(u8),
    /// Reading an unallocated cluster of an image whose backing file was not
    /// opened.
    UnopenedBacking {
        /// The backing file name the image states.
        name: String,
    },
    /// Compressed data placed beyond the host offsets a compressed L2 entry can hold.
    CompressedOffset {
        /// Host byte offset allocated for the data.
        host: u64,
    },
    /// A refcount would exceed what the image's refcount width holds.
    RefcountOverflow {
        /// Host cluster index.
        cluster: u64,
        /// Refcount width in bits.
        bits: u32,
    },
    /// Growing the refcount table would take it past its size limit.
    RefcountTableGrowth {
        /// Bytes the table would need.
        bytes: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The refcount table rebuilt by a repair would exceed its size limit.
    RebuiltRefcountTable {
        /// Bytes the table would need.
        bytes: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file that is neither a regular file nor a block device (a FIFO, a socket, a
    /// character device): an image, or a backing file an image names, must be one of
    /// those.
    FileType {
        /// What the file is, as `ls -l` would describe it.
        kind: &'static str,
        /// The file, when it was opened by path.
        path: Option<PathBuf>,
    },
    /// An image file with more clusters than `check` walks.
    CheckSize {
        /// Clusters in the file.
        clusters: u64,
        /// The most `check` walks.
        limit: u64,
    },
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unsupported::Format(name) => write!(f, "image format '{name}'"),
            Unsupported::Version(v) => write!(f, "qcow2 version {v}"),
            Unsupported::Encryption { method } => {
                let what = match method {
                    1 => "AES",
                    2 => "LUKS",
                    _ => "unknown",
                };
                write!(f, "encryption ({what}, crypt_method {method})")
            }
            Unsupported::IncompatibleFeatures { names, .. } => {
                write!(f, "incompatible feature(s): {}", names.join(", "))
            }
            Unsupported::ExternalDataFile => f.write_str("external data file"),
            Unsupported::CompressionType(t) => write!(f, "compression type {t}"),
            Unsupported::UnopenedBacking { name } => write!(
                f,
                "reading an unallocated cluster: the backing file '{name}' was not opened"
            ),
            Unsupported::CompressedOffset { host } => write!(
                f,
                "compressed data at {host:#x}, beyond the offsets a compressed L2 entry can hold"
            ),
            Unsupported::RefcountOverflow { cluster, bits } => {
                write!(f, "refcount overflow on cluster {cluster} ({bits}-bit refcounts)")
            }
            Unsupported::FileType { kind, path } => {
                if let Some(p) = path {
                    write!(f, "{}: ", p.display())?;
                }
                write!(
                    f,
                    "a {kind} as a disk image (only regular files and block devices)"
                )
            }
            Unsupported::RefcountTableGrowth { bytes, limit } => write!(
                f,
                "the refcount table would need {bytes} bytes, above {} MiB; use a larger cluster size",
                limit >> 20
            ),
            Unsupported::RebuiltRefcountTable { bytes, limit } => write!(
                f,
                "the rebuilt refcount table would need {bytes} bytes, above {} MiB",
                limit >> 20
            ),
            Unsupported::CheckSize { clusters, limit } => write!(
                f,
                "image too large to check ({clusters} clusters, at most {limit})"
            ),
        }
    }
}

/// A qcow2 header field, as named in errors (the specification's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderField {
    /// `cluster_bits`.
    ClusterBits,
    /// `header_length` (version 3).
    HeaderLength,
    /// `refcount_order` (version 3).
    RefcountOrder,
    /// `refcount_table_clusters`.
    RefcountTableClusters,
    /// `l1_size`.
    L1Size,
    /// `size`.
    Size,
    /// `nb_snapshots`.
    NbSnapshots,
}

impl fmt::Display for HeaderField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderField::ClusterBits => "cluster_bits",
            HeaderField::HeaderLength => "header_length",
            HeaderField::RefcountOrder => "refcount_order",
            HeaderField::RefcountTableClusters => "refcount_table_clusters",
            HeaderField::L1Size => "l1_size",
            HeaderField::Size => "size",
            HeaderField::NbSnapshots => "nb_snapshots",
        })
    }
}

/// Why an image's metadata cannot be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidImage {
    /// The file is shorter than the header.
    TooShort {
        /// Bytes in the file.
        len: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// The file does not start with the qcow2 magic.
    BadMagic {
        /// The first four bytes.
        magic: u32,
    },
    /// A header field is outside the range allowed (by the format or by this
    /// implementation's limits).
    HeaderField {
        /// The field.
        field: HeaderField,
        /// Its value.
        value: u64,
        /// The smallest value allowed.
        min: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// The header extensions run past the first cluster.
    ExtensionPastCluster {
        /// The extension's type, `None` when even its type and length do not fit.
        kind: Option<u32>,
        /// Its stated length in bytes.
        len: u64,
    },
    /// The backing file name is not inside the first cluster.
    BackingNamePastCluster {
        /// The header's `backing_file_offset`.
        offset: u64,
        /// The header's `backing_file_size`.
        len: u32,
    },
    /// The compression type field and the compression feature bit disagree.
    CompressionTypeMismatch {
        /// The header's `compression_type`.
        compression_type: u8,
        /// Whether the compression incompatible feature bit is set.
        feature_bit: bool,
    },
    /// Extended L2 entries with clusters below 16 KiB.
    ExtendedL2ClusterSize {
        /// The header's `cluster_bits`.
        cluster_bits: u32,
    },
    /// A table that must start on a cluster boundary does not.
    Misaligned {
        /// The table.
        table: Metadata,
        /// Its offset in the file.
        offset: u64,
    },
    /// A table that must exist is placed at offset 0 (the header).
    AtOffsetZero {
        /// The table.
        table: Metadata,
    },
    /// A table extends past the end of the file.
    PastEnd {
        /// The table.
        table: Metadata,
        /// Its offset in the file.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The file size in bytes.
        file_size: u64,
    },
    /// The L1 table cannot map the whole virtual disk.
    L1TooSmall {
        /// The header's `l1_size`.
        l1_size: u32,
        /// The virtual disk size in bytes.
        size: u64,
    },
    /// An entry of the internal snapshot table is invalid.
    Snapshot {
        /// Index of the entry.
        index: u32,
        /// What is wrong with it.
        problem: SnapshotProblem,
    },
}

impl fmt::Display for InvalidImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidImage::TooShort { len, needed } => write!(
                f,
                "file too short for a qcow2 header ({len} bytes, the header needs {needed})"
            ),
            InvalidImage::BadMagic { magic } => {
                write!(f, "not a qcow2 image (bad magic {magic:#010x})")
            }
            InvalidImage::HeaderField {
                field,
                value,
                min,
                max,
            } => write!(f, "{field} {value} outside {min}..={max}"),
            InvalidImage::ExtensionPastCluster { kind: None, .. } => {
                f.write_str("header extensions run past the first cluster")
            }
            InvalidImage::ExtensionPastCluster {
                kind: Some(kind),
                len,
            } => write!(
                f,
                "header extension {kind:#x} of {len} bytes runs past the first cluster"
            ),
            InvalidImage::BackingNamePastCluster { offset, len } => write!(
                f,
                "backing file name ({len} bytes at {offset}) is not inside the first cluster"
            ),
            InvalidImage::CompressionTypeMismatch {
                compression_type,
                feature_bit,
            } => write!(
                f,
                "compression type {compression_type} does not match the compression feature bit ({})",
                if *feature_bit { "set" } else { "clear" }
            ),
            InvalidImage::ExtendedL2ClusterSize { cluster_bits } => write!(
                f,
                "extended L2 entries need clusters of at least 16 KiB (cluster_bits {cluster_bits})"
            ),
            InvalidImage::Misaligned { table, offset } => {
                write!(f, "{table} offset {offset:#x} not cluster aligned")
            }
            InvalidImage::AtOffsetZero { table } => write!(f, "{table} at offset 0"),
            InvalidImage::PastEnd {
                table,
                offset,
                len,
                file_size,
            } => write!(
                f,
                "{table} ({len} bytes at {offset:#x}) extends past the end of the file ({file_size} bytes)"
            ),
            InvalidImage::L1TooSmall { l1_size, size } => write!(
                f,
                "L1 table of {l1_size} entries too small for the disk size {size}"
            ),
            InvalidImage::Snapshot { index, problem } => write!(f, "snapshot {index}: {problem}"),
        }
    }
}

/// What is wrong with an internal snapshot table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotProblem {
    /// The table grows past its size limit before this entry.
    TableTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The entry extends past the end of the file.
    PastEnd,
    /// The entry's extra data is longer than allowed.
    ExtraData {
        /// Its length in bytes.
        len: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The snapshot's L1 table offset or size is invalid.
    L1Table {
        /// The L1 table offset.
        offset: u64,
        /// The L1 table size in entries.
        size: u32,
    },
}

impl fmt::Display for SnapshotProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotProblem::TableTooLarge { limit } => {
                write!(f, "the snapshot table is larger than {} MiB", limit >> 20)
            }
            SnapshotProblem::PastEnd => f.write_str("entry past the end of the file"),
            SnapshotProblem::ExtraData { len, limit } => {
                write!(f, "too much extra data ({len} bytes, at most {limit})")
            }
            SnapshotProblem::L1Table { offset, size } => write!(
                f,
                "invalid L1 table offset or size ({size} entries at {offset:#x})"
            ),
        }
    }
}

/// What is wrong with an L2 entry (and, with extended L2 entries, its
/// subcluster bitmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum L2Problem {
    /// The bitmap marks subclusters both allocated and zero.
    AllocatedAndZero {
        /// The subcluster bitmap.
        bitmap: u64,
    },
    /// The bitmap allocates subclusters of a cluster without a host offset.
    AllocatedUnmapped {
        /// The subcluster bitmap.
        bitmap: u64,
    },
    /// Reserved bits are set.
    ReservedBits {
        /// The entry.
        entry: u64,
    },
    /// The host offset is not cluster aligned.
    Misaligned {
        /// The entry.
        entry: u64,
    },
}

impl fmt::Display for L2Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            L2Problem::AllocatedAndZero { bitmap } => write!(
                f,
                "L2 bitmap {bitmap:#018x} marks subclusters both allocated and zero"
            ),
            L2Problem::AllocatedUnmapped { bitmap } => write!(
                f,
                "L2 bitmap {bitmap:#018x} allocates subclusters of an unallocated cluster"
            ),
            L2Problem::ReservedBits { entry } => {
                write!(f, "L2 entry {entry:#018x} has reserved bits set")
            }
            L2Problem::Misaligned { entry } => {
                write!(f, "L2 entry {entry:#018x} is not cluster aligned")
            }
        }
    }
}

/// Corruption found in qcow2 metadata while serving a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// The image is marked corrupt (the corrupt bit), so it opens read-only only.
    MarkedCorrupt,
    /// Corruption was found earlier in this session, so writes are refused.
    WritesRefused,
    /// Rebuilding the refcounts of an image left dirty did not leave it clean.
    DirtyRepair {
        /// Corruptions the check still found.
        corruptions: u64,
        /// Errors the check met.
        check_errors: u64,
    },
    /// An L1 entry has reserved bits set or an unaligned L2 table offset.
    L1Entry {
        /// Index in the L1 table.
        index: usize,
        /// The entry.
        entry: u64,
    },
    /// An L2 table lies (partly) past the end of the file.
    L2TablePastEnd {
        /// Host offset of the table.
        offset: u64,
        /// Index of the L1 entry naming it.
        l1_index: usize,
    },
    /// An L2 table overlaps other metadata.
    L2TableOverlap {
        /// Host offset of the table.
        offset: u64,
        /// Index of the L1 entry naming it.
        l1_index: usize,
    },
    /// An L2 table in use has refcount 0.
    L2TableRefcountZero {
        /// Host offset of the table.
        offset: u64,
    },
    /// An invalid L2 entry.
    L2Entry {
        /// Guest offset the entry maps.
        guest: u64,
        /// What is wrong with it.
        problem: L2Problem,
    },
    /// A data cluster in use has refcount 0.
    DataRefcountZero {
        /// Host offset of the cluster.
        offset: u64,
    },
    /// A data cluster about to be written overlaps metadata.
    DataOverlap {
        /// Host offset of the cluster.
        offset: u64,
        /// The metadata it overlaps.
        metadata: Metadata,
    },
    /// Compressed data about to be written overlaps metadata.
    CompressedOverlap {
        /// Host offset of the data.
        offset: u64,
        /// The metadata it overlaps.
        metadata: Metadata,
    },
    /// A compressed cluster's data lies outside the file.
    CompressedOutsideFile {
        /// Host offset of the data.
        host: u64,
        /// Guest offset mapped to it.
        guest: u64,
    },
    /// A refcount table entry has reserved bits set or points outside the file.
    RefcountTableEntry {
        /// Index in the refcount table.
        index: usize,
        /// The entry.
        entry: u64,
    },
    /// A cluster in use is not covered by any refcount block.
    NoRefcountBlock {
        /// Host cluster index.
        cluster: u64,
    },
    /// The refcounts say a cluster is free, and the allocator was about to hand it out,
    /// but it holds metadata.
    FreeMetadata {
        /// Host offset of the cluster.
        offset: u64,
        /// The metadata it holds.
        metadata: Metadata,
    },
    /// Freeing a cluster would take its refcount below 0.
    RefcountUnderflow {
        /// Host cluster index.
        cluster: u64,
    },
    /// Two entries of one table name the same cluster (two refcount table entries the
    /// same refcount block, two active L1 entries the same L2 table). No image writer
    /// does this, and following the aliases would repeat work per alias.
    Aliased {
        /// The table.
        table: Metadata,
        /// The entry found second.
        index: usize,
        /// The entry naming the cluster first.
        other: usize,
        /// Host offset of the cluster both name.
        offset: u64,
    },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::MarkedCorrupt => f.write_str(
                "the image is marked corrupt; open it read-only or repair it with `check -r all`",
            ),
            Corruption::WritesRefused => {
                f.write_str("the image is marked corrupt; writes are refused")
            }
            Corruption::DirtyRepair {
                corruptions,
                check_errors,
            } => write!(
                f,
                "repairing the refcounts of a dirty image left {corruptions} corruptions \
                 ({check_errors} check errors)"
            ),
            Corruption::L1Entry { index, entry } => {
                write!(f, "L1 entry {index} ({entry:#x}) is invalid")
            }
            Corruption::L2TablePastEnd { offset, l1_index } => write!(
                f,
                "L2 table at {offset:#x} (L1 entry {l1_index}) is past the end of the file"
            ),
            Corruption::L2TableOverlap { offset, l1_index } => write!(
                f,
                "L2 table at {offset:#x} (L1 entry {l1_index}) overlaps other metadata"
            ),
            Corruption::L2TableRefcountZero { offset } => {
                write!(f, "L2 table at {offset:#x} has refcount 0")
            }
            Corruption::L2Entry { guest, problem } => {
                write!(f, "{problem} (guest offset {guest:#x})")
            }
            Corruption::DataRefcountZero { offset } => {
                write!(f, "data cluster {offset:#x} has refcount 0")
            }
            Corruption::DataOverlap { offset, metadata } => write!(
                f,
                "data cluster at {offset:#x} would overwrite the {metadata}"
            ),
            Corruption::CompressedOverlap { offset, metadata } => write!(
                f,
                "compressed data at {offset:#x} would overwrite the {metadata}"
            ),
            Corruption::CompressedOutsideFile { host, guest } => write!(
                f,
                "compressed cluster at {host:#x} (guest {guest:#x}) is outside the file"
            ),
            Corruption::RefcountTableEntry { index, entry } => {
                write!(f, "refcount table entry {index} ({entry:#x}) is invalid")
            }
            Corruption::NoRefcountBlock { cluster } => {
                write!(f, "cluster {cluster} has no refcount block")
            }
            Corruption::RefcountUnderflow { cluster } => {
                write!(f, "refcount underflow on cluster {cluster}")
            }
            Corruption::FreeMetadata { offset, metadata } => write!(
                f,
                "cluster {offset:#x} holds the {metadata}, yet its refcount says it is free"
            ),
            Corruption::Aliased {
                table,
                index,
                other,
                offset,
            } => write!(
                f,
                "{table} entries {other} and {index} both name the cluster at {offset:#x}"
            ),
        }
    }
}

/// Why a compressed cluster's data did not decompress to one cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// The deflate stream ends before a whole cluster.
    #[error("deflate data is shorter than a cluster")]
    ShortDeflate,
    /// The deflate stream is invalid.
    #[error("invalid deflate data")]
    Deflate(#[source] flate2::DecompressError),
    /// The zstd decoder could not be set up.
    #[error("setting up the zstd decoder")]
    ZstdDecoder(#[source] io::Error),
    /// The zstd frame is invalid or shorter than a cluster.
    #[error("invalid or short zstd data")]
    Zstd(#[source] io::Error),
    /// The zstd frame is invalid past the first cluster of output.
    #[error("invalid zstd data after a cluster")]
    ZstdTail(#[source] io::Error),
    /// The zstd frame holds more than a cluster.
    #[error("zstd frame larger than a cluster")]
    ZstdTooLarge,
}

/// An invalid argument from the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidArgument {
    /// A cluster size that is not a power of two from 512 to 2 MiB.
    ClusterSize(u64),
    /// A refcount width that is not a power of two up to 64.
    RefcountBits(u32),
    /// A qcow2 version other than 2 and 3.
    Version(u32),
    /// compat=0.10 (version 2) with refcounts other than 16 bits, or lazy refcounts.
    Version2Features {
        /// Refcount width asked for.
        refcount_bits: u32,
        /// Whether lazy refcounts were asked for.
        lazy_refcounts: bool,
    },
    /// Extended L2 entries with version 2 or clusters below 16 KiB.
    ExtendedL2 {
        /// The version asked for.
        version: u32,
        /// The cluster size asked for.
        cluster_size: u64,
    },
    /// A compression type the version does not have (zstd with version 2).
    CompressionType {
        /// The compression type asked for.
        compression_type: CompressionType,
        /// The version asked for.
        version: u32,
    },
    /// A virtual size whose L1 table would exceed its size limit for the cluster size.
    ImageSize {
        /// The virtual size asked for.
        size: u64,
        /// The cluster size asked for.
        cluster_size: u64,
    },
    /// A backing file name that is empty or longer than 1023 bytes.
    BackingNameLength(usize),
    /// The header, its extensions and the backing file name do not fit in one cluster.
    HeaderSize {
        /// Bytes they need.
        bytes: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// Compressed data of a length that is not 1 byte to one cluster.
    CompressedLength {
        /// Its length.
        len: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A compressed write that is not one whole cluster (or the image's tail).
    CompressedWrite {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Opening read-write an image whose backing file was not opened.
    UnopenedBacking {
        /// The backing file name the image states.
        name: String,
    },
    /// An unknown cache mode name.
    CacheMode(String),
    /// A write mapped for a transfer without its data, to a range whose target must see
    /// the data ([`crate::aio::UringTarget::inspects_write`]).
    UninspectedWrite {
        /// Device offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidArgument::ClusterSize(cs) => {
                write!(f, "cluster size {cs} must be a power of two from 512 to 2M")
            }
            InvalidArgument::RefcountBits(b) => {
                write!(f, "refcount_bits {b} must be a power of two up to 64")
            }
            InvalidArgument::Version(v) => write!(f, "qcow2 version {v}"),
            InvalidArgument::Version2Features {
                refcount_bits,
                lazy_refcounts,
            } => write!(
                f,
                "compat=0.10 images need refcount_bits=16 and no lazy refcounts \
                 (refcount_bits={refcount_bits}, lazy_refcounts={lazy_refcounts})"
            ),
            InvalidArgument::ExtendedL2 {
                version,
                cluster_size,
            } => write!(
                f,
                "extended_l2 needs compat=1.1 and clusters of at least 16 KiB \
                 (version {version}, cluster size {cluster_size})"
            ),
            InvalidArgument::CompressionType {
                compression_type,
                version,
            } => write!(
                f,
                "compression type {compression_type} with version {version} \
                 (zstd needs compat=1.1)"
            ),
            InvalidArgument::ImageSize { size, cluster_size } => write!(
                f,
                "image of {size} bytes too large for {cluster_size}-byte clusters \
                 (L1 table above 32 MiB)"
            ),
            InvalidArgument::BackingNameLength(n) => {
                write!(f, "backing file name of {n} bytes (1 to 1023)")
            }
            InvalidArgument::HeaderSize {
                bytes,
                cluster_size,
            } => write!(
                f,
                "header, extensions and backing file name take {bytes} bytes, \
                 more than one {cluster_size}-byte cluster"
            ),
            InvalidArgument::CompressedLength { len, cluster_size } => write!(
                f,
                "compressed data of {len} bytes for {cluster_size}-byte clusters"
            ),
            InvalidArgument::CompressedWrite { offset, len } => write!(
                f,
                "compressed writes take one whole cluster ({len} bytes at {offset})"
            ),
            InvalidArgument::UnopenedBacking { name } => write!(
                f,
                "the image has backing file '{name}', which was not opened; \
                 open the image with its backing chain or read-only"
            ),
            InvalidArgument::UninspectedWrite { offset, len } => write!(
                f,
                "a write of {len} bytes at {offset} mapped without its data, \
                 which the target must inspect (write it through write_vectored_at)"
            ),
            InvalidArgument::CacheMode(name) => write!(
                f,
                "unknown cache mode '{name}' \
                 (expected none, writeback, writethrough, directsync or unsafe)"
            ),
        }
    }
}

/// Why a backing chain is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainProblem {
    /// The image is already in the chain above it.
    Loop,
    /// The chain would be deeper than allowed.
    TooDeep {
        /// The backing file name the image states.
        name: String,
        /// The most backing images allowed below the top image.
        max: usize,
    },
    /// The image does not state its backing file's format, and probing it is
    /// not allowed.
    UnstatedFormat {
        /// The backing file name the image states.
        name: String,
    },
    /// The image states a backing format other than raw and qcow2.
    UnsupportedFormat {
        /// The backing file name the image states.
        name: String,
        /// The format it states.
        format: String,
    },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainProblem::Loop => {
                f.write_str("the backing chain contains a loop (this file is already in it)")
            }
            ChainProblem::TooDeep { name, max } => write!(
                f,
                "backing file '{name}' would make the chain deeper than {max} images"
            ),
            ChainProblem::UnstatedFormat { name } => write!(
                f,
                "the image does not state the format of its backing file '{name}'; refusing to \
                 probe it (a guest could name any host file). Set the backing format \
                 (qemu-img rebase -u -F FMT, keel-img create -F) or allow probing explicitly \
                 (allow_probed_backing, keel-img --allow-probed-backing)"
            ),
            ChainProblem::UnsupportedFormat { name, format } => {
                write!(f, "backing file '{name}' has unsupported format '{format}'")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn errno_mapping_and_source_chain() {
        let e = Error::io("reading", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(e.source().is_some());
        assert_eq!(
            Error::Unsupported(Unsupported::ExternalDataFile).errno(),
            libc::ENOTSUP
        );
        assert_eq!(
            Error::Corrupt(Corruption::NoRefcountBlock { cluster: 1 }).errno(),
            libc::EIO
        );
        assert_eq!(Error::ReadOnly.errno(), libc::EROFS);
        let oor = Error::OutOfRange {
            offset: 1,
            len: 2,
            size: 0,
        };
        assert_eq!(oor.errno(), libc::EINVAL);
        assert_eq!(
            Error::InvalidArgument(InvalidArgument::ClusterSize(3)).errno(),
            libc::EINVAL
        );
        assert_eq!(
            Error::InvalidImage(InvalidImage::BadMagic { magic: 0 }).errno(),
            libc::EIO
        );
        let chain = Error::BackingChain {
            image: "a.qcow2".into(),
            reason: ChainProblem::Loop,
        };
        assert_eq!(chain.errno(), libc::EIO);
        let backing = Error::Backing {
            path: "b.qcow2".into(),
            source: Box::new(Error::Unsupported(Unsupported::Version(4))),
        };
        assert_eq!(backing.errno(), libc::ENOTSUP);
    }

    #[test]
    fn causes_are_sources_not_message_text() {
        let mut out = [0u8; 16];
        let bad = flate2::Decompress::new(false)
            .decompress(&[0xff; 8], &mut out, flate2::FlushDecompress::Finish)
            .unwrap_err();
        let cause = bad.to_string();
        let e = Error::CompressedData {
            host: 0x10000,
            source: DecompressError::Deflate(bad),
        };
        assert_eq!(e.errno(), libc::EIO);
        assert!(!e.to_string().contains(&cause), "{e}");
        let step = e.source().expect("what the decompressor found");
        assert!(!step.to_string().contains(&cause), "{step}");
        assert_eq!(step.source().map(|c| c.to_string()), Some(cause));
    }
}

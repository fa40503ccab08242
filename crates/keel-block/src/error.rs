//! Error type shared by every backend.

use std::io;

/// Result alias used throughout `keel-block`.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors returned by block backends and image formats.
///
/// Use [`Error::errno`] to map an error to a POSIX errno, for example to turn
/// it into a virtio-blk status: `EIO` becomes `VIRTIO_BLK_S_IOERR`, `ENOTSUP`
/// becomes `VIRTIO_BLK_S_UNSUPP`.
#[derive(Debug, thiserror::Error)]
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
    Unsupported(String),
    /// The image could not be opened because its metadata is invalid.
    #[error("invalid image: {0}")]
    InvalidImage(String),
    /// Corruption was detected while serving a request. The image has been
    /// marked corrupt if it was writable.
    #[error("image corruption detected: {0}")]
    Corrupt(String),
    /// A caller passed an invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A backing file of an image could not be opened or used.
    #[error("backing file {path}")]
    Backing {
        /// The backing file, as resolved.
        path: String,
        /// Why it failed.
        #[source]
        source: Box<Error>,
    },
    /// An image's backing chain is refused (missing format, loop, too deep).
    #[error("backing chain of {image}: {reason}")]
    BackingChain {
        /// The image naming the backing file.
        image: String,
        /// What is wrong.
        reason: String,
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
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::InvalidImage(_) | Error::Corrupt(_) | Error::BackingChain { .. } => libc::EIO,
            Error::Backing { source, .. } => source.errno(),
            Error::GuestMemory { .. } => libc::EFAULT,
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
        assert_eq!(Error::Unsupported("x".into()).errno(), libc::ENOTSUP);
        assert_eq!(Error::Corrupt("x".into()).errno(), libc::EIO);
        assert_eq!(Error::ReadOnly.errno(), libc::EROFS);
        let oor = Error::OutOfRange {
            offset: 1,
            len: 2,
            size: 0,
        };
        assert_eq!(oor.errno(), libc::EINVAL);
    }
}

//! Requests that failed on the host: what the device tells its owner (a VMM turns them
//! into QMP's `BLOCK_IO_ERROR`). The guest gets VIRTIO_BLK_S_IOERR either way; requests
//! the device refuses itself (malformed, out of range, a read-only disk) are the guest's
//! doing and are not reported.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// The kind of request that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoOp {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT (a write the device follows with a flush included).
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
}

impl IoOp {
    /// Whether the request reads the disk (QMP's `IoOperationType` is `read` for these
    /// and `write` for everything else, as QEMU reports them).
    pub fn is_read(self) -> bool {
        self == IoOp::Read
    }
}

/// One request the host failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError {
    /// What the guest asked for.
    pub op: IoOp,
    /// Why it failed, as a POSIX errno (`keel_block::Error::errno`).
    pub errno: i32,
}

impl IoError {
    /// Whether the host ran out of space (ENOSPC): the error a management tool can fix by
    /// growing the storage under the image.
    pub fn nospace(&self) -> bool {
        self.errno == libc::ENOSPC
    }

    /// The errno as an [`io::Error`] (its `kind()` and the OS's description).
    pub fn os_error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// Where a device reports the requests the host failed.
///
/// Called on the queue's worker thread as each failed request completes, so it must not
/// block: hand the report to another thread, bounded (a guest can make thousands of
/// requests fail per second). Any `Fn(&IoError) + Send + Sync` is a sink.
pub trait IoErrorSink: Send + Sync {
    /// A request failed with `error`; the guest gets VIRTIO_BLK_S_IOERR.
    fn io_error(&self, error: &IoError);
}

impl<F: Fn(&IoError) + Send + Sync> IoErrorSink for F {
    fn io_error(&self, error: &IoError) {
        self(error)
    }
}

/// The device's current sink, shared by its workers and its handles.
#[derive(Default)]
pub(crate) struct Reporter {
    sink: Mutex<Option<Arc<dyn IoErrorSink>>>,
}

impl Reporter {
    pub(crate) fn set(&self, sink: Option<Arc<dyn IoErrorSink>>) {
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = sink;
    }

    /// Tells the sink, if there is one (called outside the lock, so a sink may replace
    /// itself).
    pub(crate) fn report(&self, error: IoError) {
        let sink = self
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(s) = sink {
            s.io_error(&error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_reach_the_sink_in_force() {
        let r = Reporter::default();
        r.report(IoError {
            op: IoOp::Read,
            errno: libc::EIO,
        }); // no sink: dropped
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        r.set(Some(Arc::new(move |e: &IoError| {
            s.lock().unwrap().push(*e)
        })));
        let full = IoError {
            op: IoOp::Write,
            errno: libc::ENOSPC,
        };
        r.report(full);
        r.set(None);
        r.report(full);
        assert_eq!(*seen.lock().unwrap(), [full]);
        assert!(full.nospace() && !full.op.is_read());
        assert_eq!(full.os_error().kind(), io::ErrorKind::StorageFull);
    }
}

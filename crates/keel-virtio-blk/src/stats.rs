//! The device's own I/O accounting, kept by the queue workers as requests complete: what a
//! VMM reports as block statistics (QMP `query-blockstats`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of one kind of request.
#[derive(Default, Debug)]
struct Counters {
    ops: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    time_ns: AtomicU64,
}

impl Counters {
    fn record(&self, bytes: u64, ok: bool, took: Duration) {
        if ok {
            self.ops.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.time_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> OpStats {
        OpStats {
            operations: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            total_time_ns: self.time_ns.load(Ordering::Relaxed),
        }
    }
}

/// The kinds of request the device accounts for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
}

/// Shared by a device's workers.
#[derive(Default, Debug)]
pub(crate) struct Stats {
    read: Counters,
    write: Counters,
    flush: Counters,
}

impl Stats {
    /// A request of `kind` moving `bytes` completed (`ok`: with VIRTIO_BLK_S_OK) after
    /// `took` from the moment the device took it off the ring.
    pub(crate) fn record(&self, kind: Kind, bytes: u64, ok: bool, took: Duration) {
        match kind {
            Kind::Read => &self.read,
            Kind::Write => &self.write,
            Kind::Flush => &self.flush,
        }
        .record(bytes, ok, took)
    }

    pub(crate) fn snapshot(&self) -> BlockStats {
        BlockStats {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
        }
    }
}

/// Totals for one kind of request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Requests that completed with VIRTIO_BLK_S_OK.
    pub operations: u64,
    /// Bytes those requests moved (0 for flushes).
    pub bytes: u64,
    /// Requests that completed with an error.
    pub failed: u64,
    /// Time from taking each request off the ring to completing it, summed, in
    /// nanoseconds (failed requests included).
    pub total_time_ns: u64,
}

/// A device's I/O totals since it was created (across resets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Reads (VIRTIO_BLK_T_IN).
    pub read: OpStats,
    /// Writes (VIRTIO_BLK_T_OUT).
    pub write: OpStats,
    /// Flushes (VIRTIO_BLK_T_FLUSH, and those the device adds after writes with the
    /// write cache off are not counted).
    pub flush: OpStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_by_kind() {
        let s = Stats::default();
        s.record(Kind::Write, 4096, true, Duration::from_micros(10));
        s.record(Kind::Write, 512, true, Duration::from_micros(5));
        s.record(Kind::Read, 4096, false, Duration::from_micros(1));
        s.record(Kind::Flush, 0, true, Duration::from_micros(100));
        let t = s.snapshot();
        assert_eq!(
            t.write,
            OpStats {
                operations: 2,
                bytes: 4608,
                failed: 0,
                total_time_ns: 15_000
            }
        );
        assert_eq!((t.read.operations, t.read.failed, t.read.bytes), (0, 1, 0));
        assert_eq!((t.flush.operations, t.flush.total_time_ns), (1, 100_000));
    }
}

//! The device's own counters, kept by the queue workers: per queue pair, frames and bytes
//! moved each way, frames dropped (no room, filtered, link down, refused by the backend)
//! and frames the guest got wrong (malformed chains and headers); and the control
//! queue's commands.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one direction of one queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    /// Frames moved.
    pub frames: u64,
    /// Their bytes (Ethernet frames, without the virtio-net header).
    pub bytes: u64,
    /// Frames dropped although nothing was wrong with them: RX frames that did not fit the
    /// guest's buffers or that the receive filter refused; TX frames sent with the link
    /// down or that the backend refused.
    pub drops: u64,
    /// Malformed input from the guest: TX chains shorter than the header, frames longer
    /// than 65550 bytes, unknown GSO types, `hdr_len` past the frame, unusable buffers.
    pub errors: u64,
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Host to guest.
    pub rx: DirStats,
    /// Guest to host.
    pub tx: DirStats,
}

/// The control queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlStats {
    /// Commands answered VIRTIO_NET_OK.
    pub ok: u64,
    /// Commands answered VIRTIO_NET_ERR (unknown, not negotiated, malformed) or that had
    /// no room for the answer.
    pub errors: u64,
}

/// A snapshot of a device's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Per queue pair, in order.
    pub queues: Vec<QueueStats>,
    /// The control queue.
    pub ctrl: CtrlStats,
}

impl NetStats {
    /// The counters of all queue pairs added up.
    pub fn total(&self) -> QueueStats {
        let mut t = QueueStats::default();
        for q in &self.queues {
            for (a, b) in [(&mut t.rx, &q.rx), (&mut t.tx, &q.tx)] {
                a.frames += b.frames;
                a.bytes += b.bytes;
                a.drops += b.drops;
                a.errors += b.errors;
            }
        }
        t
    }
}

#[derive(Default, Debug)]
pub(crate) struct DirCounters {
    frames: AtomicU64,
    bytes: AtomicU64,
    drops: AtomicU64,
    errors: AtomicU64,
}

impl DirCounters {
    pub(crate) fn frame(&self, bytes: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn drop(&self) {
        self.drops.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> DirStats {
        DirStats {
            frames: self.frames.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            drops: self.drops.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default, Debug)]
pub(crate) struct PairCounters {
    pub(crate) rx: DirCounters,
    pub(crate) tx: DirCounters,
}

#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) pairs: Vec<PairCounters>,
    pub(crate) ctrl_ok: AtomicU64,
    pub(crate) ctrl_err: AtomicU64,
}

impl Stats {
    pub(crate) fn new(pairs: usize) -> Stats {
        Stats {
            pairs: (0..pairs).map(|_| PairCounters::default()).collect(),
            ctrl_ok: AtomicU64::new(0),
            ctrl_err: AtomicU64::new(0),
        }
    }

    pub(crate) fn snapshot(&self) -> NetStats {
        NetStats {
            queues: self
                .pairs
                .iter()
                .map(|p| QueueStats {
                    rx: p.rx.snapshot(),
                    tx: p.tx.snapshot(),
                })
                .collect(),
            ctrl: CtrlStats {
                ok: self.ctrl_ok.load(Ordering::Relaxed),
                errors: self.ctrl_err.load(Ordering::Relaxed),
            },
        }
    }
}

//! The virtio-blk device model (virtio 1.2 section 5.2) over any keel-block backend.
//!
//! - Requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES (with UNMAP), parsed from
//!   the byte streams of a chain, so any split of header, data and status across
//!   descriptors works ([`request`]); every guest value is checked before the disk is
//!   touched, and malformed requests get VIRTIO_BLK_S_IOERR or UNSUPP. A ring the driver
//!   broke sets DEVICE_NEEDS_RESET. Nothing the guest sends can panic the device or make
//!   it write outside the request's own buffers.
//! - Configuration: capacity, size_max, seg_max, blk_size, topology, num_queues, discard
//!   and write-zeroes limits, and the CONFIG_WCE write-cache toggle; read-only disks offer
//!   VIRTIO_BLK_F_RO and fail writes with IOERR.
//! - One worker thread per queue, each with its own asynchronous engine (io_uring for raw
//!   and qcow2 files, worker threads or inline execution for any backend); completions in
//!   any order, straight into guest memory; optional ops/s and bytes/s limits. A queue's
//!   data goes to the host in pieces of [`PIECE_BYTES`], at most [`BUDGET_BYTES`] at once,
//!   so a reset or pause waits for that much I/O, whatever the driver asked for.
//! - Requests that fail on the host (I/O errors, ENOSPC) get IOERR and are reported to
//!   the owner through [`BlockHandle::set_io_error_sink`] (QMP's `BLOCK_IO_ERROR`).
//!
//! The device sits on any keel-virtio transport. With the `test-utils` feature,
//! `SyncServer` serves one queue on the calling thread, for tests and fuzzers.
#![deny(missing_docs)]

pub mod device;
mod errors;
pub mod request;
mod stats;
mod worker;

pub use device::{
    Block, BlockHandle, BlockOptions, DataBuf, Disk, Error, GuestMemoryAccess, BLOCK_DEVICE_TYPE,
};
pub use errors::{IoError, IoErrorSink, IoOp};
pub use stats::{BlockStats, OpStats};
#[cfg(feature = "test-utils")]
pub use worker::SyncServer;
pub use worker::{BUDGET_BYTES, PIECE_BYTES};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

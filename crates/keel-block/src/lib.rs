//! Block backends for virtual machines, usable with no VM at all.
//!
//! * [`BlockBackend`]: the trait every backend implements: vectored reads and
//!   writes at byte offsets, flush, discard, write-zeroes, size, alignment and
//!   read-only state. Methods take `&self`; backends are `Send + Sync` and can
//!   be shared by all queues of a multi-queue device.
//! * [`RawFile`]: raw images with QEMU's cache modes.
//! * [`Qcow2`]: qcow2 versions 2 and 3, over any [`BlockBackend`].
//! * [`aio`]: completion-based asynchronous queues, including an io_uring
//!   engine.
//! * [`MemBackend`]: an in-memory backend.
#![deny(missing_docs)]

pub mod aio;
pub mod backend;
pub mod buf;
pub mod error;
pub mod mem;
pub mod qcow2;
pub mod raw;

pub use backend::{BlockBackend, Limits, WriteFlags};
pub use error::{Error, Result};
pub use mem::MemBackend;
pub use qcow2::{Qcow2, Qcow2Options};
pub use raw::{CacheMode, RawFile, RawOptions};

//! The virtio-balloon device model (virtio 1.2 section 5.5), on any keel-virtio transport.
//!
//! - Inflate and deflate queues: le32 PFNs of 4 KiB pages, whatever the host page size,
//!   each checked against guest RAM; PFNs outside RAM (in the MMIO hole, past its end) or
//!   repeated, and arrays of an odd or huge size, are ignored and counted, never an error
//!   that stops the device. Inflated pages are released through a [`MemoryReleaser`]:
//!   [`HostReleaser`] uses `MADV_DONTNEED` for anonymous memory and
//!   `FALLOC_FL_PUNCH_HOLE` for file- or memfd-backed memory; with huge pages only whole
//!   huge pages are released, partial ones are tracked until complete ([`pages`]).
//! - Configuration: `num_pages` (the target, set through a [`BalloonHandle`]; a change
//!   raises a configuration interrupt) and `actual` (written by the driver).
//! - Statistics (VIRTIO_BALLOON_F_STATS_VQ): every tag of virtio 1.2 and the ones Linux
//!   added since ([`stats::StatTag`]), requested every polling period; the last report,
//!   with its time, through [`BalloonHandle::stats`].
//! - VIRTIO_BALLOON_F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_PAGE_REPORTING (reported free
//!   ranges released like inflated pages) and F_PAGE_POISON (reported pages are kept when
//!   the guest poisons free pages with a non-zero value).
#![deny(missing_docs)]

pub mod device;
pub mod pages;
pub mod release;
pub mod spec;
pub mod stats;

pub use device::{Balloon, BalloonHandle, BalloonOptions, BALLOON_DEVICE_TYPE};
pub use pages::BalloonCounters;
pub use release::{HostReleaser, MemoryReleaser, ReleaseError};
pub use stats::{StatTag, StatsReport};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

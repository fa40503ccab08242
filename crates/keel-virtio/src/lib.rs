//! Virtio for virtual machine monitors: the [`VirtioDevice`] trait device models implement,
//! device status and feature negotiation as virtio 1.2 specifies them, the virtio-pci
//! (modern) and virtio-mmio (version 2) transports, and queue plumbing on virtio-queue:
//! rings validated against guest memory at DRIVER_OK, per-device worker threads woken by
//! ioeventfds, notification suppression both ways (EVENT_IDX, NO_INTERRUPT, NO_NOTIFY),
//! interrupts through keel-bus traits (MSI-X via irqfd, or a wired line).
//!
//! A device model sees neither KVM nor the transport: it gets its queues, guest memory and
//! an interrupt handle when the driver sets DRIVER_OK, and is told to stop on reset.
//! [`shared::SharedDevice`] lets the VMM keep a handle on a device its transport drives,
//! to pause and resume it.
//!
//! The `test-utils` feature adds what tests of transports and devices need: `echo::Echo`,
//! a complete small device (a model for writing others), and `testing`, a driver-side
//! harness over both transports.
#![deny(missing_docs)]

pub mod affinity;
pub mod device;
#[cfg(feature = "test-utils")]
pub mod echo;
pub mod mmio;
pub mod pci;
pub mod shared;
pub mod state;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod worker;

pub use device::{
    ActivateContext, ActivateError, ActiveQueue, InterruptKind, NeedsReset, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
pub use mmio::VirtioMmio;
pub use pci::virtio_pci_function;
pub use state::VirtioState;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

//! The virtio-net device model (virtio 1.2 section 5.1) over pluggable backends.
//!
//! - Features: MAC, STATUS (link up and down from the host, with a configuration
//!   interrupt), MTU, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, CTRL_VQ with CTRL_RX
//!   (promiscuous, all-multicast, the MAC filter tables) and CTRL_MAC_ADDR, MQ with
//!   VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; with a backend that carries the virtio-net header (a
//!   tap) also CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6, HOST_ECN and GUEST_ECN, handed
//!   to the tap with `TUNSETOFFLOAD` exactly as negotiated.
//! - One worker thread per queue pair, the backend's descriptor and the queues'
//!   notifiers in one poll set, a short polling window; frames move straight between
//!   the backend and guest memory (one `readv` into the guest's merged buffers, one
//!   `writev` of a TX chain). With no RX buffers posted frames stay in the backend.
//! - Frames-per-second and bytes-per-second limits per direction (keel-ratelimit).
//! - Malformed input (a TX chain shorter than the header, a frame longer than 65550
//!   bytes, an unknown GSO type, `hdr_len` past the frame, garbage on the control queue)
//!   is dropped or answered VIRTIO_NET_ERR and counted; the device goes on. A broken ring
//!   sets DEVICE_NEEDS_RESET.
//! - Per queue pair counters through [`NetHandle::stats`].
//!
//! Backends: [`backend::Tap`] (by name, or an already-open descriptor) and
//! [`backend::SocketBackend`] (a Unix datagram socket, one frame per datagram), or any
//! [`backend::Backend`].
#![deny(missing_docs)]

pub mod backend;
pub mod device;
mod stats;
mod worker;

pub use device::{
    Error, MacAddr, MacParseError, Net, NetHandle, NetOptions, RateLimit, MAX_FRAME,
    NET_DEVICE_TYPE,
};
pub use stats::{CtrlStats, DirStats, NetStats, QueueStats};
#[cfg(feature = "test-utils")]
pub use worker::SyncServer;

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

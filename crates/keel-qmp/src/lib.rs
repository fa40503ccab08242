//! keel-qmp: the server side of the QEMU Machine Protocol (QMP, QEMU's
//! docs/interop/qmp-spec), for any VMM that wants existing QMP clients (libvirt,
//! `qmp-shell`, Python's `qemu.qmp`) to drive it.
//!
//! - [`stream`] cuts the client's byte stream into JSON values, bounded in size;
//! - [`message`] parses commands and builds the greeting, replies and events, with
//!   QEMU's checks and messages;
//! - [`server`] serves a Unix socket: many clients at once, each with its own
//!   capabilities negotiation, commands dispatched to the VMM's [`Handler`], events sent
//!   to every negotiated client through [`Events`].
//!
//! The protocol's own commands (`qmp_capabilities`, `query-version`, `query-commands`)
//! are answered here; everything else is the VMM's. No capability (such as `oob`) is
//! offered.

#![deny(missing_docs)]

pub mod error;
pub mod message;
pub mod server;
pub mod stream;

pub use error::{CommandError, ErrorClass};
pub use message::{VersionInfo, VersionTriple};
pub use server::{Arguments, Events, Handler, Options, Server};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

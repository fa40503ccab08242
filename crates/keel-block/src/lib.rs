#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod aio;
pub mod backend;
pub mod buf;
pub mod chain;
pub mod compare;
pub mod convert;
pub mod error;
pub mod image;
pub mod iov;
pub mod mapping;
pub mod measure;
pub mod mem;
pub mod probed;
pub mod qcow2;
pub mod raw;
pub mod throttle;
pub mod volume;

pub use backend::{BlockBackend, Limits, WriteFlags};
pub use error::{Error, Result};
pub use image::{Format, Image, ImageOptions};
pub use mem::MemBackend;
pub use probed::ProbedRaw;
pub use qcow2::{Qcow2, Qcow2Options};
pub use raw::{CacheMode, RawFile, RawOptions};

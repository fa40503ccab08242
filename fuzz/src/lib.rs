//! Helpers shared by the fuzz targets: exercises that are too long for a target file, and
//! that unit tests elsewhere do not need.

pub mod irq;
pub mod qcow2;

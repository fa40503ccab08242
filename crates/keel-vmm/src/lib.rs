//! keel's VMM as a library, for its binary and for tests and benchmarks that drive a VM in
//! their own process: [`vmm::run_with`] hands out a [`vmm::VmHandle`] (the balloon's
//! target and statistics, power-off) while the VM runs. keel's control socket will sit on
//! the same handle.

pub mod balloon;
mod boot;
mod devices;
pub mod disk;
pub mod exit;
mod signals;
mod tty;
pub mod vmm;

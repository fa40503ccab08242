//! keel's VMM as a library, for its binary and for tests and benchmarks that drive a VM in
//! their own process: [`vmm::run_with`] hands out a [`vmm::VmHandle`] (the balloon's
//! target and statistics, power-off) while the VM runs; [`qmp`] is keel's control socket
//! (`--qmp`).

pub mod balloon;
mod boot;
pub mod devices;
pub mod disk;
pub mod exit;
pub mod irqchip;
pub mod net;
pub mod qmp;
pub mod seccomp;
mod shared_device;
mod signals;
mod tty;
pub mod vmm;

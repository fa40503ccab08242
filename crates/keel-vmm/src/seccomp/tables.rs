//! The lists: which system calls each kind of thread may make, found by running every
//! keel-vmm test and benchmark under `strace -f` (see CONTRIBUTING.md, "seccomp"), and
//! why each is there.

use kvm_bindings::{
    kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd, kvm_msi, kvm_regs, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

use super::{Allow, ThreadKind};

// The vCPU threads' ioctls, numbered as the kernel's <linux/kvm.h> does.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
// <linux/fs.h>: _IOR(0x12, 114, size_t).
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);

/// Any arguments.
fn any(nr: libc::c_long) -> Allow {
    Allow {
        nr,
        args: Vec::new(),
    }
}

/// Only with argument `index` equal to one of `values`.
fn with_arg(nr: libc::c_long, index: u8, values: &[u64]) -> Allow {
    Allow {
        nr,
        args: values
            .iter()
            .map(|&v| super::ArgMatch {
                index,
                mask: u64::MAX,
                value: v,
            })
            .collect(),
    }
}

/// `ioctl` with one of these request numbers.
fn ioctls(requests: &[u64]) -> Allow {
    with_arg(libc::SYS_ioctl, 1, requests)
}

/// What every thread does: allocate and free memory, wait on locks and channels, write
/// an error to stderr, close descriptors, end itself, return from a signal handler, and
/// what the SIGSYS handler does (`write`, `exit_group`).
fn common() -> Vec<Allow> {
    [
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_gettid,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .into_iter()
    .map(any)
    // Whether a descriptor is open before closing it (Rust's debug assertion).
    .chain([with_arg(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])])
    .collect()
}

/// What creating a thread takes, in the creator and in the new thread before it runs
/// keel's code (glibc's `pthread_create`, Rust's thread start: name, stack guard,
/// signal stack).
fn thread_creation() -> Vec<Allow> {
    vec![
        any(libc::SYS_clone3),
        // glibc's fallback where clone3 is refused (ENOSYS from a container's filter).
        any(libc::SYS_clone),
        any(libc::SYS_set_robust_list),
        any(libc::SYS_rseq),
        any(libc::SYS_sched_getaffinity),
        with_arg(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]),
    ]
}

/// Kicking a vCPU (or a thread) with a signal: `pthread_kill`.
fn kick() -> Vec<Allow> {
    vec![any(libc::SYS_getpid), any(libc::SYS_tgkill)]
}

/// Creating eventfds and duplicating descriptors (`try_clone`).
fn eventfds() -> Vec<Allow> {
    vec![
        any(libc::SYS_eventfd2),
        with_arg(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64]),
    ]
}

/// Event loops: epoll and timerfds.
fn event_loop() -> Vec<Allow> {
    [
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
    ]
    .into_iter()
    .map(any)
    .collect()
}

/// Reading, writing, flushing, growing and punching disk images that are already open,
/// and asking their size.
fn file_io() -> Vec<Allow> {
    [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
    ]
    .into_iter()
    .map(any)
    .collect()
}

/// Network devices' backends while a device starts: a tap's offloads as negotiated, its
/// queues attached or detached as the driver uses them.
fn tap_runtime() -> Allow {
    ioctls(&[libc::TUNSETOFFLOAD, libc::TUNSETQUEUE])
}

/// Opening network devices' backends: attaching to a tap (whether it exists: an
/// interface index), checking an inherited tap descriptor, making a socket.
fn net_setup() -> Vec<Allow> {
    vec![
        ioctls(&[
            libc::TUNSETIFF,
            libc::TUNGETIFF,
            libc::TUNSETVNETHDRSZ,
            libc::TUNSETOFFLOAD,
            libc::SIOCGIFINDEX,
            libc::FIONBIO,
        ]),
        with_arg(
            libc::SYS_socket,
            0,
            &[libc::AF_UNIX as u64, libc::AF_INET as u64],
        ),
        any(libc::SYS_bind),
        any(libc::SYS_connect),
        with_arg(
            libc::SYS_fcntl,
            1,
            &[libc::F_GETFL as u64, libc::F_SETFL as u64],
        ),
    ]
}

/// The vCPU thread: `KVM_RUN` and its exits. Device registers write eventfds (interrupts,
/// the exit request), stdout or the serial file; MSI-X programming changes GSI routes
/// and irqfds; a virtio reset stops the device's threads; a shutdown request kicks the
/// other vCPUs.
fn vcpu() -> Vec<Allow> {
    let mut v = common();
    v.extend(kick());
    v.extend([
        ioctls(&[
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_SET_GSI_ROUTING(),
            KVM_IRQFD(),
            KVM_IOEVENTFD(),
            KVM_SIGNAL_MSI(),
            // The ACPI SCI, a level-triggered line.
            KVM_IRQ_LINE(),
        ]),
        // The kick signal's handler is installed by the first vCPU to run.
        any(libc::SYS_rt_sigaction),
        // Whether a masked MSI-X vector is pending (its irqfd is readable).
        any(libc::SYS_poll),
        // `--vcpu-affinity`: the thread moves itself (pid 0), under its own filter.
        with_arg(libc::SYS_sched_setaffinity, 0, &[0]),
    ]);
    v
}

/// The main thread: builds the VM (again on `system_reset`: KVM, memory, disks, vCPU
/// threads, whose list it must include), runs the event loop, and tears down (flushes
/// and closes the disks, removes the control socket).
fn main() -> Vec<Allow> {
    let mut v = vcpu();
    v.extend(thread_creation());
    v.extend(eventfds());
    v.extend(event_loop());
    v.extend(file_io());
    v.extend(net_setup());
    v.extend([
        // Any KVM ioctl (type KVMIO): creating the VM, its memory, irqchip and vCPUs.
        Allow {
            nr: libc::SYS_ioctl,
            args: vec![super::ArgMatch {
                index: 1,
                mask: 0xff00,
                value: u64::from(KVMIO) << 8,
            }],
        },
        // The terminal in raw mode (and back), the size of a disk on a block device.
        ioctls(&[libc::TCGETS, libc::TCSETS, BLKGETSIZE64()]),
        // /dev/kvm and the disk images, at every boot; probing an image's format.
        any(libc::SYS_openat),
        any(libc::SYS_lseek),
        any(libc::SYS_signalfd4),
        // The control socket: events, closing the clients, removing the socket file.
        any(libc::SYS_sendto),
        any(libc::SYS_shutdown),
        any(libc::SYS_unlink),
        // A vCPU thread installs its own filter under this one.
        with_arg(libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]),
        with_arg(
            libc::SYS_seccomp,
            0,
            &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
        ),
    ]);
    v
}

/// Device threads: `keel-devices` starts devices (threads, eventfds, epoll; a tap's
/// offloads and queues), queue workers serve requests (io_uring, a thread pool, plain
/// file I/O, the throttle's timer; `keel-net-qN` moves frames with readv/writev or
/// recvmsg/sendmsg), the balloon gives pages back (`madvise`), virtio-mmio devices
/// interrupt.
fn device() -> Vec<Allow> {
    let mut v = common();
    v.extend(thread_creation());
    v.extend(eventfds());
    v.extend(event_loop());
    v.extend(file_io());
    v.extend([
        any(libc::SYS_io_uring_setup),
        any(libc::SYS_io_uring_enter),
        any(libc::SYS_io_uring_register),
        // A disk's queue worker moves itself (pid 0) onto the CPUs of `affinity=`.
        with_arg(libc::SYS_sched_setaffinity, 0, &[0]),
        // The balloon: whether guest memory is on hugetlbfs.
        any(libc::SYS_fstatfs),
        // virtio-net queue workers: frames between guest memory and the backend.
        any(libc::SYS_readv),
        any(libc::SYS_writev),
        any(libc::SYS_recvmsg),
        any(libc::SYS_sendmsg),
        // A bound socket backend peeks at who sent the first datagram.
        any(libc::SYS_recvfrom),
        tap_runtime(),
        // A virtio-mmio device's interrupt on the split irqchip: keel's IOAPIC sends its
        // MSI.
        ioctls(&[KVM_SIGNAL_MSI()]),
    ]);
    v
}

/// Control socket threads: accept clients, read commands and write replies and events,
/// and act on the VM (pause and resume vCPUs and devices, resize a disk, set the
/// balloon's target, request the end). The thread that starts the server creates its
/// socket.
fn control() -> Vec<Allow> {
    let mut v = common();
    v.extend(thread_creation());
    v.extend(kick());
    v.extend(eventfds());
    v.extend(file_io());
    v.extend([
        // Starting the server: its socket (mode 0600 before bind).
        with_arg(libc::SYS_socket, 0, &[libc::AF_UNIX as u64]),
        any(libc::SYS_fchmod),
        any(libc::SYS_bind),
        any(libc::SYS_listen),
        // Serving: the acceptor polls its socket and stop eventfd.
        any(libc::SYS_poll),
        any(libc::SYS_accept4),
        any(libc::SYS_recvfrom),
        any(libc::SYS_sendto),
        any(libc::SYS_setsockopt),
        any(libc::SYS_shutdown),
        // Non-blocking sockets; the power button (the ACPI SCI line: KVM's IOAPIC pin,
        // or on the split irqchip keel's IOAPIC sending its MSI).
        ioctls(&[libc::FIONBIO, KVM_IRQ_LINE(), KVM_SIGNAL_MSI()]),
    ]);
    v
}

/// The system calls a thread of `kind` may make.
pub fn allowed(kind: ThreadKind) -> Vec<Allow> {
    match kind {
        ThreadKind::Main => main(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Device => device(),
        ThreadKind::Control => control(),
    }
}

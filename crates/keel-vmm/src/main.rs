//! `keel`: the reference VMM built from the Keel crates.
//!
//! It boots a Linux kernel (PVH vmlinux or bzImage) or a bare-metal ELF64 payload with a
//! 16550 console, an i8042 (reset), ACPI power-off and, with `--debug-exit`, a debug-exit
//! port, on KVM's split irqchip with keel-irqchip's IOAPIC, PIC and PIT (`--irqchip kernel`:
//! KVM's in-kernel ones), one thread per vCPU.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use keel_vmm::irqchip::Irqchip;
use keel_vmm::seccomp::{SeccompMode, SeccompOptions, ThreadKind};
use keel_vmm::vmm::{self, QmpListen, SerialFile, SerialMode, VmConfig};
use keel_vmm::{balloon, disk, net};

/// Boot a kernel in a KVM virtual machine.
///
/// Exit status: 0 after a guest reset or ACPI power-off; with --debug-exit, the value the
/// guest writes to the debug-exit port (0xf4); 1 with a message when the VM cannot be set
/// up (a kernel, initrd, disk, network or socket path that cannot be used, a KVM error) or
/// after a triple fault; 2 for bad command-line arguments (a value that does not parse);
/// 128+N after signal N; 159 (128+SIGSYS)
/// when a thread made a system call its seccomp filter forbids.
#[derive(Parser, Debug)]
#[command(name = "keel", version)]
struct Cli {
    /// Kernel to boot: an ELF with a PVH note, a bzImage, or an ELF64 payload. Without it,
    /// keel boots its built-in test guest (scenario chosen with --cmdline keel.test=NAME).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,

    /// Guest RAM in MiB (at least 2).
    #[arg(long, value_name = "MiB", default_value_t = 512, value_parser = clap::value_parser!(u64).range(2..=524288))]
    memory: u64,

    /// Number of vCPUs (1-255).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=255))]
    cpus: u8,

    /// Host CPUs every vCPU thread runs on, as `1`, `0-3` or `0,2-3` (default: where the
    /// scheduler puts them); with a disk's `affinity=`, keeps vCPUs and I/O apart.
    #[arg(long, value_name = "CPUS")]
    vcpu_affinity: Option<keel_virtio::affinity::CpuSet>,

    /// Add a device (repeatable): `pci-test`, the PCI test device; `virtio-echo`, the
    /// virtio transport test device (on --transport).
    #[arg(long = "device", value_name = "KIND", value_enum)]
    devices: Vec<vmm::DeviceKind>,

    /// A virtio-blk disk (repeatable):
    /// `path=FILE[,format=raw|qcow2][,backing=follow|refuse][,readonly=on][,cache=none|writeback|writethrough|directsync|unsafe][,queues=N][,iops=N][,bps=N][,poll=US][,memory=per-request|registered][,affinity=CPUS]`.
    /// `backing=refuse`: refuse a qcow2 image that names a backing file (for images from
    /// elsewhere: the name may be any host file); default `follow`.
    /// `poll`: microseconds each queue keeps polling after its last request (default 64, 0: off).
    /// `memory=registered`: guest memory is pinned and registered with io_uring once, not per
    /// request (not with `--balloon`).
    /// `affinity`: the host CPUs the disk's queue workers run on, as `1`, `0-3` or `[0,2-3]`
    /// (e.g. the CPU that takes the host disk's interrupts, away from the vCPUs).
    /// Without `format` the image is probed (qcow2 magic, else raw).
    #[arg(long = "disk", value_name = "OPTIONS", value_parser = disk::parse_disk)]
    disks: Vec<disk::DiskSpec>,

    /// A virtio-net device (repeatable):
    /// `tap=NAME|fd=N|socket=PATH[,mac=MAC][,mtu=N][,queues=N][,bps=N][,pps=N]`.
    /// `tap`: an existing tap (`ip tuntap add NAME mode tap`, `multi_queue` for
    /// queues > 1); `fd`: an inherited tap descriptor opened with IFF_TAP, IFF_NO_PI and
    /// IFF_VNET_HDR; `socket`: a Unix datagram socket, one frame per datagram (bound at
    /// PATH, or connected to the VM already bound there). `bps`/`pps`: bytes and frames
    /// per second each way. Without `mac` one is made up from the VM's name and the
    /// device's index.
    #[arg(long = "net", value_name = "OPTIONS", value_parser = net::parse_net)]
    nets: Vec<net::NetSpec>,

    /// A virtio-balloon device:
    /// `[size=MiB][,deflate_on_oom=on][,free_page_reporting=on][,stats_period=S]`.
    /// `size`: the initial target (memory the guest should give back); `stats_period`:
    /// seconds between statistics requests (0 or absent: none).
    #[arg(long, value_name = "OPTIONS", value_parser = balloon::parse_balloon, num_args = 0..=1, default_missing_value = "")]
    balloon: Option<keel_virtio_balloon::BalloonOptions>,

    /// How virtio devices are attached: `pci` (virtio-pci with MSI-X) or `mmio` (virtio-mmio,
    /// announced on the kernel command line).
    #[arg(long, value_name = "KIND", value_enum, default_value_t = vmm::Transport::Pci)]
    transport: vmm::Transport,

    /// Serial console: `stdio` (output to stdout, stdin to the guest),
    /// `file=PATH[,limit=SIZE]`, or `none`. `limit`: the most bytes the guest may write to
    /// the file (a number with an optional K, M or G suffix; default 8M); output past it is
    /// dropped, and keel says so on stderr.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialMode,

    /// QMP control socket: a Unix socket created at PATH (mode 0600, removed at exit) that
    /// serves QEMU Machine Protocol clients (qmp-shell, libvirt, Python's qemu.qmp).
    #[arg(long, value_name = "PATH", conflicts_with = "qmp_fd")]
    qmp: Option<PathBuf>,

    /// QMP control socket on an inherited, listening Unix socket descriptor.
    #[arg(long, value_name = "N")]
    qmp_fd: Option<RawFd>,

    /// The VM's name, as `query-name` reports it.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Add the debug-exit port (0xf4, as QEMU's isa-debug-exit): the value the guest
    /// writes there ends the VM and becomes keel's exit status. For test guests: without
    /// it, a guest cannot choose keel's exit status.
    #[arg(long)]
    debug_exit: bool,

    /// seccomp-bpf filters, one per kind of thread (main, vcpu, device, control): `on`, a
    /// system call outside a thread's list ends keel with a message naming the call and
    /// the thread kind (exit status 159); `log`, such calls are allowed and the kernel
    /// logs them; `off`, no filters.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::On)]
    seccomp: SeccompMode,

    /// Test aid: a thread of this kind makes one system call outside its list (getppid)
    /// right after installing its filter.
    #[arg(long, value_name = "KIND", value_enum, hide = true)]
    seccomp_selftest: Option<ThreadKind>,

    /// Where the interrupt controllers run: `split` (the default), KVM's split irqchip
    /// with the local APICs in KVM and the IOAPIC, PIC and PIT in keel, or `kernel`, KVM's
    /// in-kernel PIC, IOAPIC and PIT. The split irqchip ends a VM up to ~20 ms sooner.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = Irqchip::default())]
    irqchip: Irqchip,
}

/// A `--qmp-fd` that is not a listening Unix stream socket.
#[derive(Debug, thiserror::Error)]
#[error("--qmp-fd {fd}: not an open, listening Unix stream socket")]
struct BadQmpFd {
    fd: RawFd,
}

/// Takes ownership of the inherited descriptor `fd` after checking that it is a
/// listening Unix stream socket. Runs before keel opens anything, so the number cannot
/// be one of keel's own descriptors.
fn inherited_listener(fd: RawFd) -> Result<UnixListener, BadQmpFd> {
    let bad = BadQmpFd { fd };
    let int_opt = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`; a bad descriptor fails.
        let r =
            unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut len) };
        (r == 0).then_some(v)
    };
    if fd < 3
        || int_opt(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || int_opt(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || int_opt(libc::SO_ACCEPTCONN) != Some(1)
    {
        return Err(bad);
    }
    // SAFETY: `fd` is an open socket (getsockopt succeeded) that keel inherited and that
    // nothing else in this process owns (keel has opened nothing yet).
    Ok(UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A `--serial` value that keel cannot use.
#[derive(Debug, thiserror::Error)]
enum BadSerialMode {
    /// None of its forms.
    #[error("expected stdio, file=PATH or none")]
    Form,
    /// `file=PATH,limit=SIZE` with a SIZE that is not one.
    #[error("limit: expected a number of bytes, with an optional K, M or G suffix")]
    Limit,
    /// A key other than `limit` after the path, or `limit` twice.
    #[error("'{0}': unknown or repeated serial option (file=PATH[,limit=SIZE])")]
    Option(String),
}

/// A size: a number of bytes with an optional K, M or G (binary) suffix.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_serial(s: &str) -> Result<SerialMode, BadSerialMode> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" => Ok(SerialMode::None),
        _ => {
            let rest = s.strip_prefix("file=").ok_or(BadSerialMode::Form)?;
            // Options are comma-separated, as --disk's (a path cannot hold a comma).
            let mut parts = rest.split(',');
            let path = parts.next().unwrap_or_default();
            let mut limit = None;
            for opt in parts {
                match opt.strip_prefix("limit=") {
                    Some(size) if limit.is_none() => {
                        limit = Some(parse_size(size).ok_or(BadSerialMode::Limit)?);
                    }
                    _ => return Err(BadSerialMode::Option(opt.to_string())),
                }
            }
            let limit = limit.unwrap_or(SerialFile::DEFAULT_LIMIT);
            if path.is_empty() {
                return Err(BadSerialMode::Form);
            }
            Ok(SerialMode::File(SerialFile {
                path: PathBuf::from(path),
                limit,
            }))
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // One line, not clap's usage block: the message up to the first blank line.
            let text = e.to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("keel: {}", msg.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let qmp = match (cli.qmp, cli.qmp_fd) {
        (Some(p), _) => Some(QmpListen::Path(p)),
        (None, Some(fd)) => match inherited_listener(fd) {
            Ok(l) => Some(QmpListen::Listener(Arc::new(l))),
            Err(e) => {
                eprintln!("keel: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => None,
    };
    let cfg = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        memory_mib: cli.memory,
        vcpus: cli.cpus,
        serial: cli.serial,
        devices: cli.devices,
        transport: cli.transport,
        disks: cli.disks,
        balloon: cli.balloon,
        nets: cli.nets,
        name: cli.name,
        qmp,
        debug_exit: cli.debug_exit,
        seccomp: SeccompOptions {
            mode: cli.seccomp,
            selftest: cli.seccomp_selftest,
        },
        irqchip: cli.irqchip,
        vcpu_affinity: cli.vcpu_affinity,
    };
    match vmm::run(&cfg) {
        Ok(why) => {
            if let Some(msg) = why.message() {
                eprintln!("{msg}");
            }
            ExitCode::from(why.status() as u8)
        }
        Err(e) => {
            eprintln!("keel: {}", keel_bus::ErrorChain(&e));
            ExitCode::from(1)
        }
    }
}

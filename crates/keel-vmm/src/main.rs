//! `keel`: the reference VMM built from the Keel crates.
//!
//! It boots a Linux kernel (PVH vmlinux or bzImage) or a bare-metal ELF64 payload with a
//! 16550 console, an i8042 (reset), ACPI power-off and a debug-exit port, on the in-kernel
//! irqchip, one thread per vCPU.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use keel_vmm::vmm::{self, SerialMode, VmConfig};
use keel_vmm::{balloon, disk};

/// Boot a kernel in a KVM virtual machine.
///
/// Exit status: the value the guest writes to the debug-exit port (0xf4); 0 after a guest
/// reset or ACPI power-off; 1 with a message after a triple fault or a KVM error; 2 for bad
/// command-line arguments; 128+N after signal N.
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

    /// Add a device (repeatable): `pci-test`, the PCI test device; `virtio-echo`, the
    /// virtio transport test device (on --transport).
    #[arg(long = "device", value_name = "KIND", value_enum)]
    devices: Vec<vmm::DeviceKind>,

    /// A virtio-blk disk (repeatable):
    /// `path=FILE[,format=raw|qcow2][,readonly=on][,cache=none|writeback|writethrough|directsync|unsafe][,queues=N][,iops=N][,bps=N][,poll=US]`.
    /// `poll`: microseconds each queue keeps polling after its last request (default 64, 0: off).
    /// Without `format` the image is probed (qcow2 magic, else raw).
    #[arg(long = "disk", value_name = "OPTIONS", value_parser = disk::parse_disk)]
    disks: Vec<disk::DiskSpec>,

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

    /// Serial console: `stdio` (output to stdout, stdin to the guest), `file=PATH`, or `none`.
    #[arg(long, value_name = "MODE", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialMode,
}

/// A `--serial` value that is none of its forms.
#[derive(Debug, thiserror::Error)]
#[error("expected stdio, file=PATH or none")]
struct BadSerialMode;

fn parse_serial(s: &str) -> Result<SerialMode, BadSerialMode> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "none" => Ok(SerialMode::None),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(BadSerialMode),
        },
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

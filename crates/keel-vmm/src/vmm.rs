//! Assembling and running a VM: memory, KVM, devices, boot, vCPU threads, event loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::time::Duration;
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use keel_bus::interrupt::{InterruptLine, IoEventRegistrar};
use keel_bus::BusRange;
use keel_kvm::interrupt::MsiIrqfdGroup;
use keel_kvm::x86::boot::{BootTables, Cpl};
use keel_kvm::{Buses, DirtyLog, Vcpu, VcpuExitReason, VcpuHandle, Vm};
use keel_memory::{x86, GuestMemoryMmap, MemoryLayout, MemoryOptions, SystemAllocator, MIB};
use keel_pci::PciSegment;
use keel_virtio::mmio::MMIO_SIZE;
use keel_virtio::{virtio_pci_function, VirtioDevice, VirtioMmio};

use crate::boot::acpi::SCI_IRQ;
use crate::boot::{self, BootSpec, Entry, KernelSource, BOOT_STACK};
use crate::devices::{
    legacy_ports, pci_test_function, AcpiPm, CappedFile, DebugExit, Serial, SerialOutput, COM1_IRQ,
    I8042, PCI_TEST_VECTORS,
};
use crate::disk::DiskSpec;
use crate::exit::{ExitSignal, VmExit};
use crate::irqchip::{Interrupts, Irqchip};
use crate::qmp::{Boot, GuestBalloon, IoErrorEvents, Machine};
use crate::seccomp::{Filters, SeccompOptions, ThreadKind};
use crate::shared_device::{share, Activator};
use crate::signals::SignalFd;
use crate::tty::RawTerminal;
use keel_bus::ErrorChain;
use keel_virtio::affinity::{AffinityError, CpuSet};
use keel_virtio_balloon::{Balloon, BalloonHandle, BalloonOptions};

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The memory layout or its mapping failed.
    #[error(transparent)]
    Memory(#[from] keel_memory::Error),
    /// A KVM VM operation failed.
    #[error(transparent)]
    Kvm(#[from] keel_kvm::Error),
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] keel_kvm::VcpuError),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// A device could not be placed on a bus.
    #[error("cannot place a device on a bus")]
    Bus(#[from] keel_bus::Error),
    /// Writing boot tables failed.
    #[error("cannot write boot tables")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// An OS resource (eventfd, thread, signal, file) could not be set up.
    #[error("{what}")]
    Os {
        /// What was being set up.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An address pool ran out.
    #[error(transparent)]
    Allocator(keel_memory::AllocatorError),
    /// The PCI segment refused a device.
    #[error(transparent)]
    Pci(keel_pci::segment::SegmentError),
    /// A PCI function could not be built.
    #[error(transparent)]
    PciFunction(keel_pci::function::FunctionError),
    /// A virtio-pci device could not be built.
    #[error(transparent)]
    VirtioPci(#[from] keel_virtio::pci::PciTransportError),
    /// A virtio-mmio device could not be built.
    #[error(transparent)]
    VirtioMmio(#[from] keel_virtio::state::StateError),
    /// A virtio device's doorbells could not be registered.
    #[error("cannot register virtio doorbells")]
    Doorbell(#[source] keel_bus::interrupt::Error),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] crate::disk::Error),
    /// A network device's backend could not be opened.
    #[error(transparent)]
    Net(#[from] crate::net::Error),
    /// `--vcpu-affinity` names CPUs this process may not run on.
    #[error("--vcpu-affinity")]
    VcpuAffinity(#[source] AffinityError),
    /// The control socket could not be set up.
    #[error("cannot set up the QMP socket")]
    Qmp(#[source] keel_qmp::server::Error),
    /// A seccomp filter could not be set up.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    /// The event loop failed.
    #[error("{op} failed")]
    EventLoop {
        /// The step: creating the loop, or running it.
        op: &'static str,
        /// event-manager's error.
        #[source]
        source: event_manager::Error,
    },
}

impl Error {
    /// An [`Error::Os`]: setting up `what` failed with `source`.
    pub(crate) fn os(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Os {
            what: what.into(),
            source,
        }
    }
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Os { what, source }
}

/// The project's bare-metal test guest (crates/keel-test-guest), built by build.rs: what
/// keel boots when no kernel is given.
pub const TEST_GUEST: &[u8] = include_bytes!(env!("KEEL_TEST_GUEST"));

/// Where serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// keel's stdout, and stdin feeds the guest.
    Stdio,
    /// A file, up to a size limit.
    File(SerialFile),
    /// Nowhere.
    None,
}

/// Serial output to a file: the file, and how much of it the guest may write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialFile {
    /// The file (created, or truncated, at start).
    pub path: PathBuf,
    /// The most bytes written to it over the VM's life (reboots included); output past
    /// it is dropped and counted, and keel says so once on stderr.
    pub limit: u64,
}

impl SerialFile {
    /// [`SerialFile::limit`] unless given: 8 MiB (a Linux boot log is ~100 KiB).
    pub const DEFAULT_LIMIT: u64 = 8 * MIB;

    /// Output to `path`, up to [`SerialFile::DEFAULT_LIMIT`] bytes.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SerialFile {
            path: path.into(),
            limit: Self::DEFAULT_LIMIT,
        }
    }
}

/// Everything needed to start a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image; `None` boots the built-in test guest.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Serial console.
    pub serial: SerialMode,
    /// Extra devices.
    pub devices: Vec<DeviceKind>,
    /// How virtio devices are attached.
    pub transport: Transport,
    /// virtio-blk disks.
    pub disks: Vec<DiskSpec>,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonOptions>,
    /// virtio-net devices.
    pub nets: Vec<crate::net::NetSpec>,
    /// The VM's name (`query-name`).
    pub name: Option<String>,
    /// Where the QMP control socket listens, if anywhere.
    pub qmp: Option<QmpListen>,
    /// Whether the VM has the debug-exit port (0xf4), through which the guest ends the VM
    /// with a status of its choosing ([`VmExit::DebugExit`]). For test guests only: off,
    /// a guest cannot choose keel's exit status.
    pub debug_exit: bool,
    /// The threads' seccomp filters (`--seccomp`; see [`crate::seccomp`]).
    pub seccomp: SeccompOptions,
    /// Where the interrupt controllers run.
    pub irqchip: Irqchip,
    /// The host CPUs every vCPU thread runs on (`--vcpu-affinity`); `None`: where the
    /// scheduler puts them.
    pub vcpu_affinity: Option<CpuSet>,
}

/// Where the QMP control socket listens.
#[derive(Clone, Debug)]
pub enum QmpListen {
    /// A socket keel creates at this path (mode 0600) and removes at exit.
    Path(PathBuf),
    /// A listening socket keel inherited (`--qmp-fd`).
    Listener(Arc<UnixListener>),
}

/// A running VM, as [`run_with`] hands it out: what the host can do while the guest runs.
#[derive(Clone)]
pub struct VmHandle {
    balloon: Option<BalloonHandle>,
    exit: Arc<ExitSignal>,
}

impl VmHandle {
    /// The balloon's target, `actual` and statistics, if the VM has a balloon.
    pub fn balloon(&self) -> Option<&BalloonHandle> {
        self.balloon.as_ref()
    }

    /// Ends the VM as an ACPI power-off would: [`run_with`] returns `VmExit::PowerOff`.
    pub fn power_off(&self) {
        self.exit.request(VmExit::PowerOff);
    }
}

/// The transport that carries virtio devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// virtio-pci (modern), on the PCI segment, with MSI-X.
    #[default]
    Pci,
    /// virtio-mmio version 2 in the platform MMIO window, announced on the kernel command
    /// line (`virtio_mmio.device=4K@BASE:IRQ`), interrupting on an IOAPIC pin.
    Mmio,
}

/// Devices added with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The PCI test device (one MMIO BAR, MSI-X): see `devices::pci_test`.
    PciTest,
    /// The virtio echo device (keel-virtio's transport test device), on `--transport`.
    VirtioEcho,
}

/// Feeds stdin to the UART; ends the event loop when an exit is requested or a signal
/// arrives.
/// Polls the balloon's `actual` for the control socket's `BALLOON_CHANGE` event (the
/// device has no callback; QEMU also rate-limits the event).
struct BalloonWatch {
    timer: TimerFd,
    machine: Arc<Machine>,
}

/// How often [`BalloonWatch`] looks.
const BALLOON_POLL: Duration = Duration::from_millis(100);

impl MutEventSubscriber for BalloonWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.timer.wait();
        self.machine.poll_balloon();
    }
}

/// Sends the disks' `BLOCK_IO_ERROR` events when one reports an error, and those held
/// back by the throttle when they are due (a one-shot timer).
struct IoErrorWatch {
    events: Arc<IoErrorEvents>,
    timer: TimerFd,
    machine: Arc<Machine>,
}

impl MutEventSubscriber for IoErrorWatch {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.events.event_fd(), EventSet::IN));
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
        }
        let now = std::time::Instant::now();
        if let Some(due) = self.events.deliver(&self.machine, now) {
            // At least 1 ns: a zero duration would disarm the timer.
            let wait = due
                .saturating_duration_since(now)
                .max(Duration::from_nanos(1));
            if let Err(e) = self.timer.reset(wait, None) {
                eprintln!("keel: cannot arm the BLOCK_IO_ERROR timer: {e}");
            }
        }
    }
}

struct Control {
    exit: Arc<ExitSignal>,
    serial: Arc<Serial>,
    stdin: Option<std::io::Stdin>,
    signals: SignalFd,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.exit.event(), EventSet::IN));
        let _ = ops.add(Events::new(&self.signals, EventSet::IN));
        if let Some(stdin) = &self.stdin {
            let _ = ops.add(Events::new(stdin, EventSet::IN));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signals.as_raw_fd() {
            if let Ok(Some(sig)) = self.signals.read() {
                self.exit.request(VmExit::Signal(sig));
            }
        } else if self.stdin.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            let room = self.serial.input_room();
            let mut buf = [0u8; 64];
            let want = room.clamp(1, buf.len());
            match std::io::stdin().read(&mut buf[..want]) {
                Ok(0) | Err(_) => {
                    // End of input: stop watching stdin.
                    let _ = ops.remove(events);
                    self.stdin = None;
                }
                Ok(n) => {
                    self.serial.enqueue_input(&buf[..n]);
                }
            }
        }
    }
}

/// A vCPU thread's body (its seccomp filter is already in place).
fn run_vcpu(mut vcpu: Vcpu, buses: Buses, exit: Arc<ExitSignal>) {
    let id = vcpu.id();
    let why = match vcpu.run(&buses) {
        Ok(VcpuExitReason::Stopped) => return,
        Ok(VcpuExitReason::Reset) => VmExit::Reset,
        Ok(VcpuExitReason::PowerOff) => VmExit::PowerOff,
        Ok(VcpuExitReason::TripleFault) => VmExit::TripleFault {
            vcpu: id,
            rip: vcpu.regs().map(|r| r.rip).unwrap_or(u64::MAX),
        },
        Ok(reason) => VmExit::VcpuStopped { vcpu: id, reason },
        Err(e) => VmExit::VcpuFailed(Arc::new(e)),
    };
    exit.request(why);
}

/// An MSI-X vector group of `vectors` vectors, each on its own MSI route and irqfd.
fn msi_group(
    vm: &Arc<Vm>,
    alloc: &mut SystemAllocator,
    vectors: usize,
) -> Result<Arc<MsiIrqfdGroup>, Error> {
    let gsis = (0..vectors)
        .map(|_| alloc.allocate_msi_gsi())
        .collect::<Result<Vec<u32>, _>>()
        .map_err(Error::Allocator)?;
    Ok(Arc::new(MsiIrqfdGroup::new(vm.clone(), &gsis)?))
}

/// Puts `device` on the PCI segment over virtio-pci: one MSI-X vector per queue plus one
/// for configuration changes, doorbells through ioeventfds.
fn add_virtio_pci(
    vm: &Arc<Vm>,
    pci: &PciSegment,
    alloc: &mut SystemAllocator,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
) -> Result<(), Error> {
    let group = msi_group(vm, alloc, device.queue_max_sizes().len() + 1)?;
    let registrar: Arc<dyn IoEventRegistrar> = vm.clone();
    let function = virtio_pci_function(device, mem.clone(), group, Some(registrar))?;
    pci.add_device(function, alloc).map_err(Error::Pci)?;
    Ok(())
}

/// Puts `device` in the platform MMIO window over virtio-mmio on a fresh IOAPIC pin, with
/// doorbells through ioeventfds. Returns the command-line fragment that announces it.
fn add_virtio_mmio(
    vm: &Arc<Vm>,
    irqs: &Interrupts,
    buses: &Buses,
    alloc: &mut SystemAllocator,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
) -> Result<String, Error> {
    let base = alloc
        .allocate_platform_mmio(MMIO_SIZE, MMIO_SIZE)
        .map_err(Error::Allocator)?
        .0;
    let mut irq = alloc.allocate_legacy_irq().map_err(Error::Allocator)?;
    if irq == u32::from(SCI_IRQ) {
        // The ACPI SCI (the power button) has this line.
        irq = alloc.allocate_legacy_irq().map_err(Error::Allocator)?;
    }
    let line = irqs.line(irq)?;
    let transport = Arc::new(VirtioMmio::new(device, mem.clone(), base, irq, line)?);
    transport
        .register_ioeventfds(vm.as_ref())
        .map_err(Error::Doorbell)?;
    buses
        .mmio
        .insert(BusRange::new(base, MMIO_SIZE)?, transport.clone())?;
    Ok(transport.cmdline_fragment())
}

/// Builds the VM described by `cfg`, runs it to the end, and returns why it ended. With a
/// control socket, `system_reset` builds the VM again and boots it again.
///
/// Every thread runs under its seccomp filter ([`VmConfig::seccomp`]), the calling thread
/// too: it gets the main thread's filter for good, so call this from `main` (keel's
/// binary does); [`run_with`] leaves the calling thread alone.
pub fn run(cfg: &VmConfig) -> Result<VmExit, Error> {
    run_filtered(cfg, true, |_| {})
}

/// [`run`], calling `started` with a handle to the VM once its vCPUs run (from the calling
/// thread; keep the handle to act on the VM from another thread). The threads keel starts
/// run under their seccomp filters; the calling thread is not filtered (it may go on to
/// do anything), so this suits tests and benchmarks that run a VM in their own process.
///
/// # Examples
///
/// ```no_run
/// use keel_vmm::irqchip::Irqchip;
/// use keel_vmm::vmm::{run_with, SerialMode, Transport, VmConfig};
/// use keel_virtio_balloon::BalloonOptions;
///
/// let cfg = VmConfig {
///     kernel: None,
///     initrd: None,
///     cmdline: "keel.test=balloon-service".into(),
///     memory_mib: 256,
///     vcpus: 1,
///     serial: SerialMode::None,
///     devices: vec![],
///     transport: Transport::Pci,
///     disks: vec![],
///     nets: vec![],
///     balloon: Some(BalloonOptions::default()),
///     name: None,
///     qmp: None,
///     debug_exit: false,
///     seccomp: Default::default(),
///     irqchip: Irqchip::default(),
///     vcpu_affinity: None,
/// };
/// let exit = run_with(&cfg, |vm| {
///     let vm = vm.clone();
///     std::thread::spawn(move || {
///         vm.balloon().unwrap().set_target_bytes(64 << 20);
///         std::thread::sleep(std::time::Duration::from_secs(2));
///         vm.power_off();
///     });
/// })
/// .unwrap();
/// ```
pub fn run_with(cfg: &VmConfig, started: impl FnOnce(&VmHandle)) -> Result<VmExit, Error> {
    run_filtered(cfg, false, started)
}

/// [`run_with`], putting the calling thread under the main thread's filter if
/// `filter_caller`.
fn run_filtered(
    cfg: &VmConfig,
    filter_caller: bool,
    started: impl FnOnce(&VmHandle),
) -> Result<VmExit, Error> {
    let mut started = Some(started);
    if let Some(a) = cfg.vcpu_affinity {
        a.check().map_err(Error::VcpuAffinity)?;
    }
    // Signals are handled by the event loop through a signalfd; blocking them here, before
    // any thread is spawned, keeps them away from vCPU threads.
    let signalfd =
        SignalFd::new(&[libc::SIGINT, libc::SIGTERM]).map_err(os("cannot create a signalfd"))?;
    let filters = Filters::new(cfg.seccomp)?;
    // The device thread (its filter is the one device threads inherit), after the signal
    // mask: no thread keel starts takes SIGINT or SIGTERM.
    let activator = Activator::start(&filters)?;
    // Opened once: output goes on across reboots, under one limit.
    let serial_file = match &cfg.serial {
        SerialMode::File(f) => {
            let file =
                File::create(&f.path).map_err(os(format!("cannot create {}", f.path.display())))?;
            Some(Arc::new(CappedFile::new(file, f.path.clone(), f.limit)))
        }
        _ => None,
    };
    let machine = Arc::new(Machine::new(cfg.name.clone()));
    let mut server = None;
    // Once the first VM is attached and before its vCPUs run: the control socket starts
    // (its first client finds the VM), then the main thread takes its filter, under
    // which it builds every later VM.
    let mut first_boot = |machine: &Arc<Machine>| -> Result<(), Error> {
        server = start_qmp(cfg, machine, &filters)?;
        if filter_caller {
            filters.apply(ThreadKind::Main)?;
        }
        Ok(())
    };
    let mut env = BootEnv {
        machine: &machine,
        signalfd: &signalfd,
        serial_file: serial_file.as_ref(),
        filters: &filters,
        activator: &activator,
        first_boot: Some(&mut first_boot),
    };
    let result = loop {
        match boot_once(cfg, &mut env, &mut started) {
            Ok(VmExit::ResetRequested) => machine.emit(
                "RESET",
                Some(serde_json::json!({"guest": false, "reason": "host-qmp-system-reset"})),
            ),
            other => break other,
        }
    };
    if let Some(dropped) = serial_file.map(|f| f.dropped()).filter(|&n| n > 0) {
        eprintln!("keel: {dropped} bytes of serial output dropped over the limit");
    }
    if let Some(mut server) = server.take() {
        // Every command in progress is answered (`quit` gets its reply), then SHUTDOWN:
        // by now the disks are flushed and closed.
        server.finish_commands();
        if let Some(data) = result.as_ref().ok().and_then(Machine::shutdown_event) {
            machine.emit("SHUTDOWN", Some(data));
        }
        server.close();
        if let Some(QmpListen::Path(p)) = &cfg.qmp {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Starts the control socket of `cfg`, if any, under the control threads' filter (which
/// its threads inherit), sending `machine`'s events to it.
fn start_qmp(
    cfg: &VmConfig,
    machine: &Arc<Machine>,
    filters: &Arc<Filters>,
) -> Result<Option<keel_qmp::Server>, Error> {
    let Some(listen) = &cfg.qmp else {
        return Ok(None);
    };
    let handler: Arc<dyn keel_qmp::Handler> = machine.clone();
    let options = keel_qmp::Options {
        version: keel_qmp::VersionInfo {
            qemu: keel_qmp::VersionTriple {
                major: 0,
                minor: 1,
                micro: 0,
            },
            package: format!("keel {}", env!("CARGO_PKG_VERSION")),
        },
        ..Default::default()
    };
    let server = match listen {
        QmpListen::Path(p) => {
            let p = p.clone();
            filters.run_as(ThreadKind::Control, move || {
                keel_qmp::Server::bind(&p, handler, options)
            })?
        }
        QmpListen::Listener(l) => {
            let l = l
                .try_clone()
                .map_err(os("cannot use the --qmp-fd socket"))?;
            filters.run_as(ThreadKind::Control, move || {
                keel_qmp::Server::serve(l, handler, options)
            })?
        }
    }
    .map_err(Error::Qmp)?;
    machine.set_events(server.events());
    Ok(Some(server))
}

/// What every boot of a [`run_with`] shares.
struct BootEnv<'a> {
    machine: &'a Arc<Machine>,
    signalfd: &'a SignalFd,
    serial_file: Option<&'a Arc<CappedFile>>,
    filters: &'a Arc<Filters>,
    activator: &'a Arc<Activator>,
    /// Run once, by the first boot, after it attached the machine and before its vCPUs
    /// run.
    first_boot: Option<FirstBoot<'a>>,
}

/// See [`BootEnv::first_boot`].
type FirstBoot<'a> = &'a mut dyn FnMut(&Arc<Machine>) -> Result<(), Error>;

/// Builds the VM, runs it until something ends it, and tears it down. `started` is called
/// on the first boot.
fn boot_once(
    cfg: &VmConfig,
    env: &mut BootEnv<'_>,
    started: &mut Option<impl FnOnce(&VmHandle)>,
) -> Result<VmExit, Error> {
    let (machine, signalfd, serial_file, filters, activator) = (
        env.machine,
        env.signalfd,
        env.serial_file,
        env.filters,
        env.activator,
    );
    let signalfd = signalfd
        .try_clone()
        .map_err(os("cannot duplicate the signalfd"))?;
    let layout = MemoryLayout::new(cfg.memory_mib * MIB)?;
    let mem = layout.create_guest_memory(&MemoryOptions::default())?;
    let vm = Arc::new(Vm::new()?);
    // Memory slots before the irqchip: the faster order (about 6 ms less to start a VM).
    vm.register_memory(&mem, DirtyLog::Off)?;
    vm.set_identity_map_address(GuestAddress(x86::IDENTITY_MAP_START))?;
    vm.set_tss_address(GuestAddress(x86::TSS_START))?;
    let mut buses = Buses::default();
    let irqs = Interrupts::new(&vm, cfg.irqchip, &mut buses)?;

    let exit = Arc::new(ExitSignal::new().map_err(os("cannot create an eventfd"))?);
    // An IOAPIC pin through keel's IOAPIC with the split irqchip: no irqfd, whose teardown
    // would wait for an SRCU grace period when the VM closes.
    let serial_irq = irqs.line(COM1_IRQ)?;
    let out = match (&cfg.serial, serial_file) {
        (SerialMode::Stdio, _) => SerialOutput::Stdout,
        (SerialMode::File(_), Some(f)) => SerialOutput::File(f.clone()),
        _ => SerialOutput::Sink,
    };
    let serial = Arc::new(Serial::new(serial_irq, out));
    let sci: Arc<dyn InterruptLine> = irqs.line(u32::from(SCI_IRQ))?;
    let pm = Arc::new(AcpiPm::new(exit.clone(), sci));
    let i8042 = Arc::new(I8042::new(exit.clone()));
    let debug_exit = cfg.debug_exit.then(|| Arc::new(DebugExit(exit.clone())));
    for (port, len, dev) in legacy_ports(serial.clone(), i8042, pm.clone(), debug_exit) {
        buses
            .pio
            .insert(BusRange::new(u64::from(port), len)?, dev)?;
    }

    // PCI: the host bridge is in every VM; devices are added to it.
    let mut alloc = SystemAllocator::new(&layout, 5).map_err(Error::Allocator)?;
    let pci = Arc::new(PciSegment::new(
        buses.mmio.clone(),
        buses.pio.clone(),
        x86::ECAM_START,
    ));
    PciSegment::attach_config_access(&pci).map_err(Error::Pci)?;
    let mut cmdline = cfg.cmdline.clone();
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for dev in &cfg.devices {
        match dev {
            DeviceKind::PciTest => {
                let group = msi_group(&vm, &mut alloc, usize::from(PCI_TEST_VECTORS))?;
                let function = pci_test_function(group).map_err(Error::PciFunction)?;
                pci.add_device(function, &mut alloc).map_err(Error::Pci)?;
            }
            DeviceKind::VirtioEcho => virtio.push(Box::new(keel_virtio::echo::Echo::new())),
        }
    }
    let mut images = Vec::new();
    let mut disks = Vec::new();
    // With a control socket, failed disk requests become BLOCK_IO_ERROR events.
    let io_errors = match cfg.qmp {
        Some(_) => Some(IoErrorEvents::new().map_err(os("cannot create an eventfd"))?),
        None => None,
    };
    for (i, spec) in cfg.disks.iter().enumerate() {
        if cfg.balloon.is_some() && spec.memory == keel_virtio_blk::GuestMemoryAccess::Registered {
            return Err(crate::disk::Error::RegisteredWithBalloon {
                path: spec.path.display().to_string(),
            }
            .into());
        }
        let (block, image) = crate::disk::open(spec, i)?;
        let name = format!("disk{i}");
        if let Some(q) = &io_errors {
            block.handle().set_io_error_sink(Some(q.sink(&name)));
        }
        disks.push(crate::qmp::DiskInfo {
            name,
            spec: spec.clone(),
            format: image.format(),
            size: image.backend().size(),
            raw: match &image {
                keel_block::image::Image::Raw(r) => Some(r.clone()),
                keel_block::image::Image::Qcow2(_) => None,
            },
            handle: block.handle(),
        });
        virtio.push(block);
        images.push(image);
    }
    // The balloon after the disks: disks keep their places whether it is there or not.
    let balloon = cfg.balloon.map(Balloon::new);
    let balloon_handle = balloon.as_ref().map(Balloon::handle);
    if let Some(b) = balloon {
        virtio.push(Box::new(b));
    }
    // Network devices last: the others keep their places.
    let mut nets = Vec::new();
    for (i, spec) in cfg.nets.iter().enumerate() {
        let net = crate::net::open(spec, i, cfg.name.as_deref())?;
        nets.push((format!("net{i}"), net.handle()));
        virtio.push(net);
    }
    let mut devices = Vec::new();
    for device in virtio {
        // Shared, so that a QMP `stop` can park it.
        let shared = share(device, activator);
        devices.push(shared.clone());
        let device: Box<dyn VirtioDevice> = Box::new(shared);
        match cfg.transport {
            Transport::Pci => add_virtio_pci(&vm, &pci, &mut alloc, &mem, device)?,
            Transport::Mmio => {
                let fragment = add_virtio_mmio(&vm, &irqs, &buses, &mut alloc, &mem, device)?;
                if !cmdline.is_empty() {
                    cmdline.push(' ');
                }
                cmdline.push_str(&fragment);
            }
        }
    }

    let entry = boot::load(
        &mem,
        &layout,
        cfg.vcpus,
        &BootSpec {
            kernel: match &cfg.kernel {
                Some(p) => KernelSource::Path(p),
                None => KernelSource::Bytes(TEST_GUEST),
            },
            initrd: cfg.initrd.as_deref(),
            cmdline: &cmdline,
            pci: Some(pci.mcfg()),
        },
    )?;
    let tables = BootTables::default();
    tables.write(&mem, 0, false)?;

    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        let vcpu = vm.create_vcpu(id)?;
        vcpu.configure(&vm, cfg.vcpus, true)?;
        if id == 0 {
            match entry {
                Entry::Pvh { entry, start_info } => vcpu.setup_pvh(&tables, entry, start_info)?,
                Entry::Linux64 { entry, boot_params } => {
                    vcpu.setup_long_mode(&tables, Cpl::Kernel, entry, BOOT_STACK, boot_params)?
                }
            }
        }
        // Application processors wait for INIT-SIPI-SIPI (KVM's default with an irqchip).
        vcpus.push(vcpu);
    }

    let handles: Vec<VcpuHandle> = vcpus.iter().map(Vcpu::handle).collect();
    let thread_ids: Arc<[AtomicI32]> = vcpus.iter().map(|_| AtomicI32::new(0)).collect();
    // Before the threads start: an exit a vCPU requests (a debug-exit write, say) stops
    // every vCPU, itself included, at once.
    exit.set_vcpus(handles.clone());
    // Each vCPU thread installs its filter and records its ID, then waits for `go`: the
    // machine is attached with every thread known (QMP names them) and before any runs
    // (a stopped machine boots with its vCPUs parked).
    let mut threads = Vec::new();
    let mut go = Vec::new();
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let (buses, exit, ids) = (buses.clone(), exit.clone(), thread_ids.clone());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let name = format!("keel-vcpu{}", vcpu.id());
        let affinity = cfg.vcpu_affinity;
        let spawned = filters.spawn(ThreadKind::Vcpu, name, move || {
            if let Some(Err(e)) = affinity.map(|a| a.apply()) {
                // Checked at start; only a change of the process's CPUs since then.
                log::warn!("vCPU {i}: {}", keel_bus::ErrorChain(&e));
            }
            // SAFETY: gettid has no preconditions.
            ids[i].store(unsafe { libc::gettid() }, Ordering::SeqCst);
            if rx.recv().is_ok() {
                run_vcpu(vcpu, buses, exit);
            }
        });
        match spawned {
            Ok(t) => {
                threads.push(t);
                go.push(tx);
            }
            Err(e) => {
                // The threads already started end without running.
                drop(go);
                threads.into_iter().for_each(|t| drop(t.join()));
                return Err(e.into());
            }
        }
    }
    machine.attach(Boot {
        vcpus: handles.clone(),
        thread_ids: thread_ids.clone(),
        exit: exit.clone(),
        pm,
        devices,
        disks,
        nets,
        balloon: balloon_handle.clone().map(|handle| {
            Arc::new(GuestBalloon {
                handle,
                ram_bytes: cfg.memory_mib * MIB,
            }) as Arc<dyn crate::qmp::Balloon>
        }),
    });
    if let Some(first_boot) = env.first_boot.take() {
        if let Err(e) = first_boot(machine) {
            // The vCPU threads end without running.
            machine.detach();
            drop(go);
            threads.into_iter().for_each(|t| drop(t.join()));
            return Err(e);
        }
    }
    for tx in go {
        // A thread that is gone cannot have run.
        let _ = tx.send(());
    }

    if exit.reason().is_some() {
        // An exit was requested before the handles were set; stop everything now.
        handles.iter().for_each(VcpuHandle::stop);
    }
    if let Some(started) = started.take() {
        started(&VmHandle {
            balloon: balloon_handle.clone(),
            exit: exit.clone(),
        });
    }
    let stdin = (cfg.serial == SerialMode::Stdio).then(std::io::stdin);
    // Restored when this function returns, whatever the outcome.
    let _raw = match stdin {
        Some(_) => RawTerminal::enable().map_err(os("cannot put the terminal in raw mode"))?,
        None => None,
    };
    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
        .map_err(|source| Error::EventLoop {
            op: "creating the event loop",
            source,
        })?;
    if balloon_handle.is_some() && cfg.qmp.is_some() {
        let errno = |what: &'static str| {
            move |e: vmm_sys_util::errno::Error| {
                os(what)(std::io::Error::from_raw_os_error(e.errno()))
            }
        };
        let mut timer = TimerFd::new().map_err(errno("cannot create a timerfd"))?;
        timer
            .reset(BALLOON_POLL, Some(BALLOON_POLL))
            .map_err(errno("cannot arm a timerfd"))?;
        events.add_subscriber(Box::new(BalloonWatch {
            timer,
            machine: machine.clone(),
        }));
    }
    if let Some(io_events) = io_errors.clone() {
        let timer = TimerFd::new().map_err(|e| {
            os("cannot create a timerfd")(std::io::Error::from_raw_os_error(e.errno()))
        })?;
        events.add_subscriber(Box::new(IoErrorWatch {
            events: io_events,
            timer,
            machine: machine.clone(),
        }));
    }
    if let Some(pit) = irqs.pit_timer()? {
        events.add_subscriber(Box::new(pit));
    }
    events.add_subscriber(Box::new(Control {
        exit: exit.clone(),
        serial: serial.clone(),
        stdin,
        signals: signalfd,
    }));
    while exit.reason().is_none() {
        events.run().map_err(|source| Error::EventLoop {
            op: "running the event loop",
            source,
        })?;
    }

    machine.detach();
    // Orderly shutdown: stop every vCPU, wait for the threads, flush output.
    for h in &handles {
        h.stop();
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = serial.flush();
    // Devices go before their disks: dropping the buses and the PCI segment drops every
    // device, and a virtio device's drop stops its workers after the requests they have
    // in flight (a guest stopped by a signal may have been in the middle of I/O).
    drop(events);
    drop(pci);
    drop(buses);
    // What the disks reported before they stopped (the throttle aside: last words).
    if let Some(q) = &io_errors {
        let _ = q.deliver(
            machine,
            std::time::Instant::now() + crate::qmp::IO_ERROR_PERIOD,
        );
    }
    // Disks: data flushed, qcow2 images marked clean.
    for image in &images {
        if let Err(e) = image.close() {
            eprintln!("keel: closing a disk: {}", ErrorChain(&e));
        }
    }
    Ok(exit.reason().expect("the loop ends only on a request"))
}

//! vCPUs: x86 configuration, the run loop and cross-thread control.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_regs, kvm_run, kvm_sregs, Msrs, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use keel_bus::interrupt::EoiSink;
use keel_bus::{MmioBus, PioBus};

use crate::vm::Vm;
use crate::x86::boot::{self, BootTables, Cpl};
use crate::x86::cpuid::{self, Topology};
use crate::x86::msr;

/// Errors from vCPU set-up and running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM vCPU ioctl failed.
    #[error("{op} failed on vCPU {vcpu}")]
    Ioctl {
        /// vCPU index.
        vcpu: u8,
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only part of the boot MSRs.
    #[error("KVM_SET_MSRS on vCPU {vcpu} rejected MSR {msr:#x}")]
    MsrRejected {
        /// vCPU index.
        vcpu: u8,
        /// The first MSR KVM did not take.
        msr: u32,
    },
    /// KVM could not run the guest (`KVM_EXIT_INTERNAL_ERROR`), typically an instruction
    /// its emulator does not handle.
    #[error("KVM internal error on vCPU {vcpu} (suberror {suberror}) at RIP {rip:#x}")]
    Internal {
        /// vCPU index.
        vcpu: u8,
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
        /// Guest RIP.
        rip: u64,
    },
    /// VM entry failed (`KVM_EXIT_FAIL_ENTRY`).
    #[error("VM entry failed on vCPU {vcpu} (hardware reason {reason:#x}) at RIP {rip:#x}")]
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
        /// Guest RIP.
        rip: u64,
    },
    /// An exit this loop does not handle.
    #[error("unexpected exit {reason} on vCPU {vcpu} at RIP {rip:#x}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u8,
        /// Exit name.
        reason: String,
        /// Guest RIP.
        rip: u64,
    },
    /// More MSRs were asked for at once than one KVM call takes.
    #[error("cannot build a list of {count} MSRs for vCPU {vcpu}")]
    MsrList {
        /// vCPU index.
        vcpu: u8,
        /// MSRs asked for.
        count: usize,
        /// vmm-sys-util's error.
        #[source]
        source: vmm_sys_util::fam::Error,
    },
    /// Reading the CPUID KVM supports, which vCPU set-up starts from, failed.
    #[error("cannot read the supported CPUID for vCPU {vcpu}")]
    SupportedCpuid {
        /// vCPU index.
        vcpu: u8,
        /// The VM's error.
        #[source]
        source: Box<crate::vm::Error>,
    },
    /// Registering the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Spawning the vCPU thread failed.
    #[error("cannot spawn the vCPU thread")]
    Spawn(#[source] std::io::Error),
}

/// Result alias for vCPU operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// `hlt` with no in-kernel irqchip to wait for an interrupt.
    Halted,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The guest asked for power-off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    PowerOff,
    /// The guest asked for a reset (`KVM_SYSTEM_EVENT_RESET`).
    Reset,
    /// The guest reported a crash (`KVM_SYSTEM_EVENT_CRASH`).
    Crash,
    /// Another thread called [`VcpuHandle::stop`].
    Stopped,
}

/// The buses a vCPU's exits are dispatched to.
#[derive(Clone, Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Arc<PioBus>,
    /// Memory-mapped I/O.
    pub mmio: Arc<MmioBus>,
    /// With the split irqchip ([`crate::IrqchipMode::Split`]): the userspace IOAPIC, told
    /// of every `KVM_EXIT_IOAPIC_EOI`. Such an exit with no sink is an error.
    pub eoi: Option<Arc<dyn EoiSink>>,
}

impl std::fmt::Debug for Buses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buses")
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .field("eoi", &self.eoi.is_some())
            .finish()
    }
}

/// A guest access that a vCPU exit hands to the VMM: what [`Vcpu::run`] passes to
/// [`Buses::dispatch`] for `KVM_EXIT_IO` and `KVM_EXIT_MMIO`.
#[derive(Debug)]
pub enum IoAccess<'a> {
    /// `in`, or a string `ins`: `data` holds elements of `size` bytes, each one read of the
    /// port (a `size` of 0 or larger than `data` means one element: all of `data`).
    PioIn {
        /// The port.
        port: u16,
        /// Bytes per element.
        size: usize,
        /// Where the values go.
        data: &'a mut [u8],
    },
    /// `out`, or a string `outs`: elements of `size` bytes, as for [`IoAccess::PioIn`].
    PioOut {
        /// The port.
        port: u16,
        /// Bytes per element.
        size: usize,
        /// The values written.
        data: &'a [u8],
    },
    /// A read of `data.len()` bytes at `addr`.
    MmioRead {
        /// The guest physical address.
        addr: u64,
        /// Where the value goes.
        data: &'a mut [u8],
    },
    /// A write of `data` at `addr`.
    MmioWrite {
        /// The guest physical address.
        addr: u64,
        /// The value written.
        data: &'a [u8],
    },
}

impl Buses {
    /// Performs `access` on the bus it targets, as a vCPU exit asks. A read no device
    /// claims returns all ones (as a floating bus does), a write no device claims is
    /// dropped; either way the guest goes on, and the error of the first unclaimed
    /// element is returned for the caller to log.
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_kvm::{Buses, IoAccess};
    ///
    /// let buses = Buses::default();
    /// let mut data = [0u8; 4];
    /// // `rep insw` of two words from a port nobody decodes.
    /// let r = buses.dispatch(IoAccess::PioIn { port: 0x80, size: 2, data: &mut data });
    /// assert!(r.is_err());
    /// assert_eq!(data, [0xff; 4]);
    /// ```
    pub fn dispatch(&self, access: IoAccess<'_>) -> keel_bus::Result<()> {
        let mut first = Ok(());
        let mut note = |r: keel_bus::Result<()>| {
            if first.is_ok() {
                first = r;
            }
        };
        match access {
            IoAccess::PioIn { port, size, data } => {
                let size = element_size(size, data.len());
                for element in data.chunks_mut(size) {
                    let r = self.pio.read(u64::from(port), element);
                    if r.is_err() {
                        element.fill(0xff);
                    }
                    note(r);
                }
            }
            IoAccess::PioOut { port, size, data } => {
                let size = element_size(size, data.len());
                for element in data.chunks(size) {
                    note(self.pio.write(u64::from(port), element));
                }
            }
            IoAccess::MmioRead { addr, data } => {
                let r = self.mmio.read(addr, data);
                if r.is_err() {
                    data.fill(0xff);
                }
                note(r);
            }
            IoAccess::MmioWrite { addr, data } => note(self.mmio.write(addr, data)),
        }
        first
    }
}

/// The element size of a (string) port access: `size` bytes, or all of `len` when `size`
/// is 0 or larger.
fn element_size(size: usize, len: usize) -> usize {
    match size {
        0 => len.max(1),
        n => n.min(len.max(1)),
    }
}

/// What another thread asked the vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// What the vCPU thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Not inside [`Vcpu::run`].
    Idle,
    /// Running guest code or handling an exit.
    Running,
    /// Parked by [`VcpuHandle::pause`].
    Paused,
    /// [`Vcpu::run`] has returned.
    Exited,
}

struct Control {
    request: Request,
    state: VcpuState,
    /// The vCPU thread, while it is inside `run`.
    thread: Option<libc::pthread_t>,
    /// `&kvm_run.immediate_exit`, while the vCPU thread is inside `run`.
    immediate_exit: Option<ImmediateExit>,
}

/// A pointer to a vCPU's `kvm_run.immediate_exit`, written by kicking threads.
#[derive(Clone, Copy)]
struct ImmediateExit(*const AtomicU8);
// SAFETY: the pointer targets the vCPU's kvm_run mapping, which lives as long as the `Vcpu`.
// It is published in `Control` only while the owning thread is inside `run` (which borrows
// the `Vcpu`), is withdrawn under the same lock before `run` returns, and is only used for
// atomic byte stores.
unsafe impl Send for ImmediateExit {}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A handle to pause, resume or stop a vCPU from another thread. Cheap to clone.
#[derive(Clone)]
pub struct VcpuHandle {
    id: u8,
    shared: Arc<Shared>,
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivery alone makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno()))
        .map_err(|errno| Error::Signal(vmm_sys_util::errno::Error::new(errno)))
}

impl VcpuHandle {
    /// The vCPU's index (APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// What the vCPU thread is doing now.
    pub fn state(&self) -> VcpuState {
        self.shared.lock().state
    }

    fn kick(c: &Control) {
        if let Some(ImmediateExit(p)) = c.immediate_exit {
            // SAFETY: see `ImmediateExit`: the mapping is live while the pointer is published
            // and we hold the lock that guards its withdrawal.
            unsafe { (*p).store(1, Ordering::SeqCst) };
        }
        if let Some(t) = c.thread {
            // SAFETY: `t` is the live vCPU thread (withdrawn under this lock before it exits).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Asks the vCPU to pause and waits until it has (or has exited).
    pub fn pause(&self) {
        self.request_pause();
        self.wait_paused();
    }

    /// Asks the vCPU to pause and returns at once. To pause several vCPUs, ask each
    /// first and then wait for each ([`VcpuHandle::wait_paused`]): one busy finishing an
    /// exit then does not keep the others running meanwhile.
    pub fn request_pause(&self) {
        let mut c = self.shared.lock();
        if c.request == Request::Stop {
            return;
        }
        c.request = Request::Pause;
        Self::kick(&c);
    }

    /// Waits until the vCPU is no longer running: it has paused, or exited (after
    /// [`VcpuHandle::request_pause`]).
    pub fn wait_paused(&self) {
        let mut c = self.shared.lock();
        // A resume meanwhile (request back to Run) ends the wait too.
        while c.state == VcpuState::Running && c.request != Request::Run {
            c = self
                .shared
                .changed
                .wait(c)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut c = self.shared.lock();
        if c.request == Request::Pause {
            c.request = Request::Run;
            self.shared.changed.notify_all();
        }
    }

    /// Asks the vCPU to stop: [`Vcpu::run`] returns [`VcpuExitReason::Stopped`] as soon as
    /// the current exit (if any) is handled, or at once if it is called later. The request
    /// is consumed by that return, so the vCPU can be run again afterwards. Returns at once;
    /// join the thread to wait.
    pub fn stop(&self) {
        let mut c = self.shared.lock();
        c.request = Request::Stop;
        Self::kick(&c);
        self.shared.changed.notify_all();
    }
}

/// The element size of the port I/O exit in `run`, clamped to `len` (the data length).
fn io_size(run: *const kvm_run) -> usize {
    // SAFETY: `run` is the vCPU's live kvm_run mapping and the current exit is
    // KVM_EXIT_IO, so the `io` union member is the valid one. Only that field is read,
    // through a raw pointer, so no reference overlaps the data slice kvm-ioctls handed out.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() };
    usize::from(size)
}

/// A KVM vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, id: u8) -> Self {
        Vcpu {
            id,
            fd,
            shared: Arc::new(Shared {
                control: Mutex::new(Control {
                    request: Request::Run,
                    state: VcpuState::Idle,
                    thread: None,
                    immediate_exit: None,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// The vCPU index, which is also its APIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The raw vCPU file descriptor, for operations this wrapper does not cover.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The raw vCPU file descriptor, mutably (for `KVM_RUN` outside [`Vcpu::run`], e.g. to
    /// compare against a bare loop).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// A handle for controlling this vCPU from other threads.
    pub fn handle(&self) -> VcpuHandle {
        VcpuHandle {
            id: self.id,
            shared: Arc::clone(&self.shared),
        }
    }

    fn ioctl(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        let vcpu = self.id;
        move |source| Error::Ioctl { vcpu, op, source }
    }

    /// Applies the x86 configuration every vCPU needs: normalised CPUID for a VM of
    /// `vcpu_count` vCPUs, the boot MSRs, a reset FPU, and (with an in-kernel irqchip) LINT0
    /// as ExtINT and LINT1 as NMI.
    pub fn configure(&self, vm: &Vm, vcpu_count: u8, irqchip: bool) -> Result<()> {
        let mut cpuid = vm.supported_cpuid().map_err(|e| Error::SupportedCpuid {
            vcpu: self.id,
            source: Box::new(e),
        })?;
        cpuid::normalize(
            cpuid.as_mut_slice(),
            Topology {
                apic_id: self.id,
                vcpu_count,
            },
        );
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.ioctl("KVM_SET_CPUID2"))?;
        self.set_msrs(&msr::boot_msrs())?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.ioctl("KVM_SET_FPU"))?;
        if irqchip {
            self.setup_lints()?;
        }
        Ok(())
    }

    /// Writes MSRs; fails naming the first one KVM refuses.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> = values
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|source| Error::MsrList {
            vcpu: self.id,
            count: entries.len(),
            source,
        })?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl("KVM_SET_MSRS"))?;
        match values.get(set) {
            Some(&(msr, _)) => Err(Error::MsrRejected { vcpu: self.id, msr }),
            None => Ok(()),
        }
    }

    /// Reads MSRs by index.
    pub fn get_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<_> = indices
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|source| Error::MsrList {
            vcpu: self.id,
            count: entries.len(),
            source,
        })?;
        let got = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.ioctl("KVM_GET_MSRS"))?;
        Ok(msrs.as_slice()[..got]
            .iter()
            .map(|e| (e.index, e.data))
            .collect())
    }

    fn setup_lints(&self) -> Result<()> {
        const LVT_LINT0: usize = 0x350;
        const LVT_LINT1: usize = 0x360;
        const DELIVERY_MODE_MASK: u32 = 0x700;
        const EXTINT: u32 = 0x700;
        const NMI: u32 = 0x400;
        let mut lapic = self.fd.get_lapic().map_err(self.ioctl("KVM_GET_LAPIC"))?;
        for (off, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
            let reg = &mut lapic.regs[off..off + 4];
            let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
            let v = (u32::from_le_bytes(bytes) & !DELIVERY_MODE_MASK) | mode;
            for (dst, b) in reg.iter_mut().zip(v.to_le_bytes()) {
                *dst = b as libc::c_char;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.ioctl("KVM_SET_LAPIC"))
    }

    /// General-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(self.ioctl("KVM_GET_REGS"))
    }

    /// Sets general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(self.ioctl("KVM_SET_REGS"))
    }

    /// Special registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(self.ioctl("KVM_GET_SREGS"))
    }

    /// Sets special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd
            .set_sregs(sregs)
            .map_err(self.ioctl("KVM_SET_SREGS"))
    }

    /// Starts in real mode at linear address `entry` (below 1 MiB).
    pub fn setup_real_mode(&self, entry: u64) -> Result<()> {
        let mut sregs = self.sregs()?;
        let mut regs = kvm_regs::default();
        boot::real_mode(&mut sregs, &mut regs, entry);
        self.set_sregs(&sregs)?;
        self.set_regs(&regs)
    }

    /// Starts in 64-bit mode as the Linux 64-bit boot protocol requires (or at CPL3 for
    /// test guests), using `tables` (written beforehand with [`BootTables::write`]; with
    /// `user = true` for [`Cpl::User`]). Sets RIP, RSP and RSI (the boot_params address
    /// for Linux).
    pub fn setup_long_mode(
        &self,
        tables: &BootTables,
        cpl: Cpl,
        entry: u64,
        stack: u64,
        rsi: u64,
    ) -> Result<()> {
        let mut sregs = self.sregs()?;
        let mut regs = kvm_regs::default();
        boot::long_mode(&mut sregs, &mut regs, tables, cpl, entry, stack, rsi);
        self.set_sregs(&sregs)?;
        self.set_regs(&regs)
    }

    /// Starts at a PVH 32-bit entry point with EBX = `start_info`, using `tables` (written
    /// beforehand with [`BootTables::write`]).
    pub fn setup_pvh(&self, tables: &BootTables, entry: u64, start_info: u64) -> Result<()> {
        let mut sregs = self.sregs()?;
        let mut regs = kvm_regs::default();
        boot::pvh(&mut sregs, &mut regs, tables, entry, start_info);
        self.set_sregs(&sregs)?;
        self.set_regs(&regs)
    }

    /// Makes the vCPU runnable at once. With an in-kernel irqchip KVM parks every vCPU but
    /// the first until INIT-SIPI-SIPI; call this to start one directly at the state set up.
    pub fn set_runnable(&self) -> Result<()> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.ioctl("KVM_SET_MP_STATE"))
    }

    /// Parks an application processor until the guest sends it INIT-SIPI-SIPI.
    pub fn set_wait_for_sipi(&self) -> Result<()> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(self.ioctl("KVM_SET_MP_STATE"))
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    fn immediate_exit_ptr(&mut self) -> *const AtomicU8 {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: `run` points at this vCPU's live kvm_run mapping; we only take the address
        // of one u8 field. AtomicU8 has the same layout as u8.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).cast::<AtomicU8>() }
    }

    /// Runs the guest until it halts (with no irqchip), shuts down, resets, or another
    /// thread stops it. PIO and MMIO exits go to `buses`; an access no device claims reads
    /// as all ones and writes are dropped (as on real hardware). Pausing parks the thread
    /// inside this call.
    ///
    /// # Examples
    ///
    /// Real-mode code that writes a byte to port 0x10, where a device records it, then
    /// halts.
    ///
    /// ```no_run
    /// use std::sync::{Arc, Mutex};
    ///
    /// use keel_bus::{BusRange, PioDevice};
    /// use keel_kvm::{Buses, DirtyLog, VcpuExitReason, Vm};
    /// use keel_memory::{MemoryLayout, MemoryOptions, MIB};
    /// use vm_memory::{Bytes, GuestAddress};
    ///
    /// #[derive(Default)]
    /// struct Port(Mutex<Vec<u8>>);
    /// impl PioDevice for Port {
    ///     fn pio_read(&self, _offset: u64, data: &mut [u8]) {
    ///         data.fill(0);
    ///     }
    ///     fn pio_write(&self, _offset: u64, data: &[u8]) {
    ///         self.0.lock().unwrap().extend_from_slice(data);
    ///     }
    /// }
    ///
    /// let mem = MemoryLayout::new(2 * MIB)?.create_guest_memory(&MemoryOptions::default())?;
    /// // mov $0x2a, %al; out %al, $0x10; hlt
    /// mem.write_slice(&[0xb0, 0x2a, 0xe6, 0x10, 0xf4], GuestAddress(0x1000))?;
    /// let vm = Vm::new()?;
    /// vm.register_memory(&mem, DirtyLog::Off)?;
    /// let mut vcpu = vm.create_vcpu(0)?;
    /// vcpu.setup_real_mode(0x1000)?;
    ///
    /// let port = Arc::new(Port::default());
    /// let buses = Buses::default();
    /// buses.pio.insert(BusRange::new(0x10, 1)?, port.clone())?;
    /// assert_eq!(vcpu.run(&buses)?, VcpuExitReason::Halted);
    /// assert_eq!(*port.0.lock().unwrap(), [0x2a]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn run(&mut self, buses: &Buses) -> Result<VcpuExitReason> {
        install_kick_handler()?;
        let ie = self.immediate_exit_ptr();
        {
            let mut c = self.shared.lock();
            // SAFETY: pthread_self has no preconditions.
            c.thread = Some(unsafe { libc::pthread_self() });
            c.immediate_exit = Some(ImmediateExit(ie));
        }
        let result = self.run_loop(buses, ie);
        let mut c = self.shared.lock();
        // A kick that arrived after the last KVM_RUN must not cut the next `run` short.
        // SAFETY: `ie` points into our own live kvm_run mapping.
        unsafe { (*ie).store(0, Ordering::SeqCst) };
        c.thread = None;
        c.immediate_exit = None;
        c.state = VcpuState::Exited;
        self.shared.changed.notify_all();
        result
    }

    /// Honours pause and stop requests. Returns false when the vCPU must stop.
    fn check_control(&self) -> bool {
        let mut c = self.shared.lock();
        loop {
            match c.request {
                Request::Run => {
                    c.state = VcpuState::Running;
                    return true;
                }
                Request::Stop => {
                    // The request is consumed: a later `run` starts the vCPU again.
                    c.request = Request::Run;
                    return false;
                }
                Request::Pause => {
                    if c.state != VcpuState::Paused {
                        c.state = VcpuState::Paused;
                        self.shared.changed.notify_all();
                    }
                    c = self
                        .shared
                        .changed
                        .wait(c)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    fn run_loop(&mut self, buses: &Buses, ie: *const AtomicU8) -> Result<VcpuExitReason> {
        let id = self.id;
        let run: *const kvm_run = self.fd.get_kvm_run();
        loop {
            if !self.check_control() {
                return Ok(VcpuExitReason::Stopped);
            }
            let reason = match self.fd.run() {
                // String I/O (`rep insb`/`rep outsw`, ...) arrives as `count` elements of
                // `size` bytes; each is one access to the port.
                Ok(VcpuExit::IoIn(port, data)) => {
                    let size = io_size(run);
                    if buses
                        .dispatch(IoAccess::PioIn { port, size, data })
                        .is_err()
                    {
                        log::debug!("vCPU {id}: unclaimed in from port {port:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    let size = io_size(run);
                    if buses
                        .dispatch(IoAccess::PioOut { port, size, data })
                        .is_err()
                    {
                        log::debug!("vCPU {id}: unclaimed out to port {port:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if buses.dispatch(IoAccess::MmioRead { addr, data }).is_err() {
                        log::debug!("vCPU {id}: unclaimed MMIO read at {addr:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if buses.dispatch(IoAccess::MmioWrite { addr, data }).is_err() {
                        log::debug!("vCPU {id}: unclaimed MMIO write at {addr:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::IoapicEoi(vector)) if buses.eoi.is_some() => {
                    if let Some(eoi) = &buses.eoi {
                        eoi.end_of_interrupt(vector);
                    }
                    continue;
                }
                Ok(VcpuExit::Hlt) => return Ok(VcpuExitReason::Halted),
                Ok(VcpuExit::Shutdown) => return Ok(VcpuExitReason::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Ok(VcpuExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => return Ok(VcpuExitReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => return Ok(VcpuExitReason::Crash),
                    other => format!("SystemEvent({other})"),
                },
                Ok(VcpuExit::Intr) => continue,
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
                    // exit union is the one KVM filled.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Err(Error::Internal {
                        vcpu: id,
                        suberror,
                        rip: self.rip(),
                    });
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(Error::FailEntry {
                        vcpu: id,
                        reason,
                        rip: self.rip(),
                    })
                }
                Ok(other) => format!("{other:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked: clear the request flag and look at what was asked.
                    // SAFETY: `ie` points into our own live kvm_run mapping.
                    unsafe { (*ie).store(0, Ordering::SeqCst) };
                    continue;
                }
                Err(source) => {
                    return Err(Error::Ioctl {
                        vcpu: id,
                        op: "KVM_RUN",
                        source,
                    })
                }
            };
            return Err(Error::UnexpectedExit {
                vcpu: id,
                reason,
                rip: self.rip(),
            });
        }
    }

    /// Moves the vCPU to its own thread, named `keel-vcpu<N>`, running [`Vcpu::run`].
    pub fn spawn(mut self, buses: Buses) -> Result<VcpuThread> {
        install_kick_handler()?;
        let handle = self.handle();
        let join = std::thread::Builder::new()
            .name(format!("keel-vcpu{}", self.id))
            .spawn(move || self.run(&buses))
            .map_err(Error::Spawn)?;
        Ok(VcpuThread { handle, join })
    }
}

/// A vCPU running on its own thread.
pub struct VcpuThread {
    /// Controls the vCPU.
    pub handle: VcpuHandle,
    /// The thread; its result is what [`Vcpu::run`] returned.
    pub join: JoinHandle<Result<VcpuExitReason>>,
}

impl VcpuThread {
    /// Waits for the vCPU to exit. A panic on the vCPU thread is propagated.
    pub fn wait(self) -> Result<VcpuExitReason> {
        match self.join.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_bus::{BusRange, PioDevice};

    /// Records each access: (offset, length).
    #[derive(Default)]
    struct Log(Mutex<Vec<(u64, usize)>>);
    impl PioDevice for Log {
        fn pio_read(&self, offset: u64, data: &mut [u8]) {
            self.0.lock().unwrap().push((offset, data.len()));
            data.fill(0x11);
        }
        fn pio_write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.len()));
        }
    }

    #[test]
    fn string_io_is_one_access_per_element_and_kvm_sizes_are_clamped() {
        let buses = Buses::default();
        let dev = Arc::new(Log::default());
        buses
            .pio
            .insert(BusRange::new(0x10, 4).unwrap(), dev.clone())
            .unwrap();
        let data = [0u8; 6];
        // `rep outsw` of three words, then KVM saying 0 or more than the data: one access.
        for (size, len) in [(2, 6), (0, 4), (8, 4)] {
            buses
                .dispatch(IoAccess::PioOut {
                    port: 0x10,
                    size,
                    data: &data[..len],
                })
                .unwrap();
        }
        assert_eq!(
            *dev.0.lock().unwrap(),
            [(0, 2), (0, 2), (0, 2), (0, 4), (0, 4)]
        );
        // An `in` straddling the end of the device's range is unclaimed: all ones.
        let mut buf = [0u8; 4];
        let r = buses.dispatch(IoAccess::PioIn {
            port: 0x12,
            size: 4,
            data: &mut buf,
        });
        assert!(matches!(r, Err(keel_bus::Error::Straddle { .. })), "{r:?}");
        assert_eq!(buf, [0xff; 4]);
        // Unclaimed MMIO: reads float, writes vanish, both say so.
        let mut buf = [0u8; 8];
        assert!(buses
            .dispatch(IoAccess::MmioRead {
                addr: 0x1000,
                data: &mut buf
            })
            .is_err());
        assert_eq!(buf, [0xff; 8]);
        assert!(buses
            .dispatch(IoAccess::MmioWrite {
                addr: 0x1000,
                data: &buf
            })
            .is_err());
    }
}

//! seccomp-bpf filters, one per kind of thread keel runs ([`ThreadKind`]).
//!
//! Each kind has a list of the system calls it may make ([`allowed`], the tables below),
//! compiled with rust-vmm's `seccompiler` into a BPF program and installed by the thread
//! on itself before it looks at guest or socket input:
//!
//! | kind | threads | installed |
//! |------|---------|-----------|
//! | [`ThreadKind::Main`] | the thread that calls [`crate::vmm::run`]: builds VMs (again on `system_reset`), runs the event loop (signals, stdin, timers), tears down | by `run`, once the first VM is built and the control socket listens, before any vCPU runs |
//! | [`ThreadKind::Vcpu`] | `keel-vcpuN`: `KVM_RUN` and the exits (device registers) | first thing in the thread, before `KVM_RUN` |
//! | [`ThreadKind::Device`] | `keel-devices`, which starts virtio devices for the vCPU that asked (so their threads inherit this filter), and what it starts: `keel-blk-qN` (io_uring or a thread pool `keel-aio-N`, the throttle's timerfd), `keel-net-qN` (readv/writev, recvmsg/sendmsg, a tap's offloads and queues), `keel-virtio-balloon`, `keel-balloon-stats`, `keel-virtio-echo` | first thing in `keel-devices` |
//! | [`ThreadKind::Control`] | `keel-qmp` and its `keel-qmp-client` threads | by the thread that starts the QMP server (once the first VM is built), before it starts it |
//!
//! A thread inherits the filters of the thread that created it and may only add to them
//! (the kernel applies the most restrictive answer). The main thread's list therefore
//! includes the vCPU list (it creates vCPU threads at every boot); the other kinds are
//! created by threads that are not under the main filter yet (the device thread, the
//! thread that starts the control socket), or by threads of their own kind.
//!
//! With [`SeccompMode::On`] a call outside the list traps: a `SIGSYS` handler (async-
//! signal-safe: it formats into a stack buffer, `write`s and `_exit`s) prints
//! `keel: seccomp: a vcpu thread made a forbidden system call: getppid (110); stopping` on
//! stderr and ends keel with status [`KILLED_STATUS`]. The kind comes from the filter
//! itself (its trap carries the kind as `SECCOMP_RET_DATA`, which arrives in `si_errno`),
//! so threads that inherited a filter are named too. The one exception: glibc's own
//! one-time `openat`s of a few /proc and /sys files from malloc fail with `EACCES`
//! instead (see `GLIBC_PROBES`). With [`SeccompMode::Log`] such calls are allowed and
//! logged by the kernel (`SECCOMP_RET_LOG`); with [`SeccompMode::Off`] nothing is
//! installed.

use std::collections::BTreeMap;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

mod names;
mod tables;

pub use tables::allowed;

/// keel's exit status when a thread made a forbidden system call: 128 + `SIGSYS`, what a
/// shell reports for a process killed by that signal.
pub const KILLED_STATUS: i32 = 128 + libc::SIGSYS;

/// What the filters do (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// A system call outside its thread's list ends keel with a message naming the call
    /// and the thread kind.
    #[default]
    On,
    /// Such calls are allowed and the kernel logs them (`SECCOMP_RET_LOG`, in the audit
    /// log or the kernel log): for finding what a list lacks.
    Log,
    /// No filter.
    Off,
}

/// The kinds of threads keel runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ThreadKind {
    /// The thread that builds VMs and runs the event loop.
    Main,
    /// A vCPU thread.
    Vcpu,
    /// A device thread: virtio queue workers, their I/O threads and timers.
    Device,
    /// A control socket (QMP) thread.
    Control,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Control,
    ];

    /// The name in messages and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Control => "control",
        }
    }

    /// The number the kind's trap carries (`SECCOMP_RET_DATA`); never 0.
    fn id(self) -> u32 {
        self as u32 + 1
    }

    fn from_id(id: i32) -> Option<ThreadKind> {
        Self::ALL.into_iter().find(|k| k.id() as i32 == id)
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How keel filters its threads: `--seccomp`, and the hidden test aid
/// `--seccomp-selftest`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeccompOptions {
    /// What the filters do.
    pub mode: SeccompMode,
    /// A test aid: a thread of this kind makes one system call outside its list
    /// (`getppid`) right after installing its filter, so tests can see what a forbidden
    /// call does. `None` in normal use.
    pub selftest: Option<ThreadKind>,
}

/// Errors setting up the filters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A kind's list did not compile into a BPF program.
    #[error("cannot compile the seccomp filter of {kind} threads")]
    Compile {
        /// The kind.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of a {kind} thread")]
    Install {
        /// The kind.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// A filtered thread ended (panicked) before it reported.
    #[error("a {kind} thread ended before it reported")]
    Ended {
        /// The kind.
        kind: ThreadKind,
    },
    /// A filtered thread could not be created.
    #[error("cannot start a {kind} thread")]
    Spawn {
        /// The kind.
        kind: ThreadKind,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The compiled filters of every kind, and the options they were built with.
pub struct Filters {
    options: SeccompOptions,
    /// Indexed by `ThreadKind as usize`; empty with [`SeccompMode::Off`].
    programs: Vec<BpfProgram>,
}

impl std::fmt::Debug for Filters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filters")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Filters {
    /// Compiles the filters for `options` and, with [`SeccompMode::On`], installs the
    /// process's `SIGSYS` handler. Installs no filter.
    pub fn new(options: SeccompOptions) -> Result<Arc<Filters>, Error> {
        let mismatch = match options.mode {
            SeccompMode::On => SeccompAction::Trap,
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::Off => {
                return Ok(Arc::new(Filters {
                    options,
                    programs: Vec::new(),
                }))
            }
        };
        let programs = ThreadKind::ALL
            .into_iter()
            .map(|kind| compile(kind, mismatch.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        if options.mode == SeccompMode::On {
            install_sigsys_handler().map_err(Error::Handler)?;
        }
        Ok(Arc::new(Filters { options, programs }))
    }

    /// The options the filters were built with.
    pub fn options(&self) -> SeccompOptions {
        self.options
    }

    /// Installs the filter of `kind` on the calling thread (for good: a filter cannot be
    /// removed) and, if asked, makes the self-test call.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), Error> {
        if let Some(program) = self.programs.get(kind as usize) {
            seccompiler::apply_filter(program).map_err(|source| Error::Install { kind, source })?;
        }
        if self.options.selftest == Some(kind) {
            // SAFETY: getppid takes no arguments and touches no memory; it is outside
            // every list, which is the point.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        Ok(())
    }

    /// Starts a thread named `name` that installs the filter of `kind` and then runs `f`;
    /// returns once the filter is in place (an error if it could not be, and then `f`
    /// never runs). Threads that `f` creates inherit the filter.
    pub fn spawn<T: Send + 'static>(
        self: &Arc<Self>,
        kind: ThreadKind,
        name: String,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Option<T>>, Error> {
        let (tx, rx) = mpsc::sync_channel(1);
        let filters = self.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let installed = filters.apply(kind);
                let ok = installed.is_ok();
                let _ = tx.send(installed);
                ok.then(f)
            })
            .map_err(|source| Error::Spawn { kind, source })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(e),
            // The thread died before it reported: it panicked.
            Err(_) => Err(Error::Ended { kind }),
        }
    }

    /// Runs `f` on a new thread under the filter of `kind` and returns what it returns:
    /// for starting threads (a server's) that should inherit that filter.
    pub fn run_as<T: Send + 'static>(
        self: &Arc<Self>,
        kind: ThreadKind,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let thread = self.spawn(kind, format!("keel-{kind}-start"), f)?;
        match thread.join() {
            Ok(Some(v)) => Ok(v),
            Ok(None) | Err(_) => Err(Error::Ended { kind }),
        }
    }
}

/// Compiles the list of `kind`: its calls allowed, anything else gets `mismatch`, and a
/// trap carries the kind.
fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
    let compile_error = |source| Error::Compile { kind, source };
    // Per call: `None` if allowed with any arguments, else the alternatives.
    let mut calls: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for allow in allowed(kind) {
        let entry = calls.entry(allow.nr).or_insert_with(|| Some(Vec::new()));
        if allow.args.is_empty() {
            *entry = None;
        }
        let Some(rules) = entry else { continue };
        for arg in &allow.args {
            // Dword: the kernel reads these arguments (ioctl requests, prctl options,
            // fcntl commands, socket domains) as 32-bit values, whatever the register's
            // upper half holds.
            let op = match arg.mask {
                u64::MAX => SeccompCmpOp::Eq,
                mask => SeccompCmpOp::MaskedEq(mask),
            };
            let cond = SeccompCondition::new(arg.index, SeccompCmpArgLen::Dword, op, arg.value)
                .map_err(compile_error)?;
            rules.push(SeccompRule::new(vec![cond]).map_err(compile_error)?);
        }
    }
    let rules = calls
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(compile_error)?;
    let mut program: BpfProgram = filter.try_into().map_err(compile_error)?;
    // The trap carries the kind (SECCOMP_RET_DATA, which the kernel puts in si_errno).
    let ret_k = (libc::BPF_RET | libc::BPF_K) as u16;
    for insn in &mut program {
        if insn.code == ret_k && insn.k == libc::SECCOMP_RET_TRAP {
            insn.k |= kind.id();
        }
    }
    Ok(program)
}

/// One system call of a kind's list: with any arguments (`args` empty), or only with
/// arguments that one of `args` matches.
#[derive(Clone, Debug)]
pub struct Allow {
    /// The system call number (`libc::SYS_*`).
    pub nr: i64,
    /// Alternative conditions on one argument each; empty: any arguments.
    pub args: Vec<ArgMatch>,
}

/// A condition on a system call argument: `(arg[index] & mask) == value` (32 bits).
#[derive(Clone, Copy, Debug)]
pub struct ArgMatch {
    /// The argument (0-5).
    pub index: u8,
    /// The bits compared (`u64::MAX`: the whole argument).
    pub mask: u64,
    /// What they must equal.
    pub value: u64,
}

/// The fields of a `SIGSYS` siginfo that seccomp fills (`struct { void *_call_addr; int
/// _syscall; unsigned int _arch; } _sigsys` after the three-int header and its padding).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer that async-signal-safe code formats into.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The message for a forbidden call `nr` by a thread under the filter `kind_id`.
fn message(nr: i32, kind_id: i32) -> Line {
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    let kind = ThreadKind::from_id(kind_id).map_or("keel", ThreadKind::name);
    line.push(b"keel: seccomp: a ");
    line.push(kind.as_bytes());
    line.push(b" thread made a forbidden system call: ");
    let name = usize::try_from(nr)
        .ok()
        .and_then(|i| names::NAMES.get(i))
        .filter(|n| !n.is_empty());
    match name {
        Some(n) => line.push(n.as_bytes()),
        None => line.push(b"unknown"),
    }
    line.push(b" (");
    line.number(nr as u32);
    line.push(b"); stopping\n");
    line
}

/// The forbidden calls the handler answers (with `EACCES`) instead of ending keel: files
/// glibc's malloc opens once per process, from whichever thread first needs them, and
/// does without (no list but the main thread's allows `openat`): whether a heap may
/// shrink, and the number of CPUs for the arena limit (with its fallbacks).
const GLIBC_PROBES: [&[u8]; 3] = [
    b"/proc/sys/vm/overcommit_memory\0",
    b"/sys/devices/system/cpu/online\0",
    b"/proc/stat\0",
];

/// Whether the trapped call in `ctx` is one of [`GLIBC_PROBES`]: `openat` of that path.
///
/// # Safety
///
/// `ctx` must be the `ucontext_t` the kernel handed a `SIGSYS` handler for an `openat`,
/// whose path argument points to a NUL-terminated string.
unsafe fn is_glibc_probe(ctx: *const libc::ucontext_t) -> bool {
    // SAFETY: per the contract, `ctx` is valid; RSI holds openat's path argument.
    let path = unsafe { (*ctx).uc_mcontext.gregs[libc::REG_RSI as usize] } as *const u8;
    if path.is_null() {
        return false;
    }
    GLIBC_PROBES.iter().any(|probe| {
        probe.iter().enumerate().all(|(i, &want)| {
            // SAFETY: the path is NUL-terminated and `all` stops at the first byte that
            // differs (a NUL at the latest), so it never reads past the terminator.
            unsafe { path.add(i).read() == want }
        })
    })
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a SA_SIGINFO handler a valid siginfo_t (128 bytes), whose
    // start for SIGSYS is laid out as `SigsysInfo` (32 bytes).
    let info = unsafe { info.cast::<SigsysInfo>().read() };
    let ctx = ctx.cast::<libc::ucontext_t>();
    // SAFETY: `ctx` is this handler's ucontext_t and the call is an openat, whose path
    // argument the C library made.
    if info.syscall == libc::SYS_openat as i32 && unsafe { is_glibc_probe(ctx) } {
        // The call did not happen: make it return EACCES.
        // SAFETY: `ctx` is valid and ours to change; sigreturn restores it.
        unsafe {
            (*ctx).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EACCES);
        }
        return;
    }
    let line = message(info.syscall, info.errno);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours. Both calls
    // are on every list.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(KILLED_STATUS);
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigsys;
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is initialised and the handler is async-signal-safe; the old action is
    // not requested.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_and_traps_with_its_kind() {
        for kind in ThreadKind::ALL {
            let program = compile(kind, SeccompAction::Trap).unwrap();
            let traps: Vec<u32> = program
                .iter()
                .filter(|i| i.code == (libc::BPF_RET | libc::BPF_K) as u16)
                .filter(|i| i.k & !libc::SECCOMP_RET_DATA == libc::SECCOMP_RET_TRAP)
                .map(|i| i.k & libc::SECCOMP_RET_DATA)
                .collect();
            assert!(!traps.is_empty(), "{kind}: no trap");
            assert!(traps.iter().all(|&d| d == kind.id()), "{kind}: {traps:?}");
        }
    }

    #[test]
    fn no_list_allows_the_selftest_call_or_process_creation() {
        for kind in ThreadKind::ALL {
            for nr in [
                libc::SYS_getppid,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
            ] {
                assert!(
                    allowed(kind).iter().all(|a| a.nr != nr),
                    "{kind} allows {}",
                    names::NAMES[nr as usize]
                );
            }
        }
    }

    #[test]
    fn the_message_names_the_call_and_the_kind() {
        let line = message(libc::SYS_getppid as i32, ThreadKind::Vcpu.id() as i32);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "keel: seccomp: a vcpu thread made a forbidden system call: getppid (110); stopping\n"
        );
        let line = message(100_000, 0);
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "keel: seccomp: a keel thread made a forbidden system call: unknown (100000); stopping\n"
        );
    }

    #[test]
    fn the_name_table_matches_libc() {
        assert_eq!(names::NAMES[libc::SYS_read as usize], "read");
        assert_eq!(names::NAMES[libc::SYS_ioctl as usize], "ioctl");
        assert_eq!(
            names::NAMES[libc::SYS_io_uring_enter as usize],
            "io_uring_enter"
        );
        assert_eq!(names::NAMES[libc::SYS_getppid as usize], "getppid");
    }
}

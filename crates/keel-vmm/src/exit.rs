//! How the VM ends: devices and vCPU threads request an exit; the main thread acts on the
//! first request.

use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::ErrorChain;
use keel_kvm::{VcpuError, VcpuExitReason, VcpuHandle};
use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug)]
pub enum VmExit {
    /// The guest wrote `value` to the debug-exit port.
    DebugExit(u32),
    /// The guest reset the machine (i8042 or ACPI reset register, or KVM reset event).
    Reset,
    /// The guest powered off (ACPI S5, or KVM shutdown event).
    PowerOff,
    /// A vCPU triple-faulted.
    TripleFault {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP when it happened.
        rip: u64,
    },
    /// A vCPU stopped with an error (KVM internal error, failed entry, ...), which names
    /// the vCPU. Shared: the exit is cloned for whoever asks.
    VcpuFailed(Arc<VcpuError>),
    /// A vCPU stopped for a reason keel does not act on (a crash the guest reported, say).
    VcpuStopped {
        /// vCPU index.
        vcpu: u8,
        /// Why it stopped.
        reason: VcpuExitReason,
    },
    /// keel received a termination signal.
    Signal(i32),
    /// `quit` on the control socket.
    Quit,
    /// `system_reset` on the control socket: the VM is built again and boots again
    /// (never the final outcome).
    ResetRequested,
}

impl VmExit {
    /// keel's exit status for this outcome.
    pub fn status(&self) -> i32 {
        match self {
            // Exit statuses are 8 bits: larger values saturate rather than wrap to success.
            VmExit::DebugExit(v) => (*v).min(255) as i32,
            VmExit::Reset | VmExit::PowerOff | VmExit::Quit | VmExit::ResetRequested => 0,
            VmExit::TripleFault { .. } | VmExit::VcpuFailed(_) | VmExit::VcpuStopped { .. } => 1,
            VmExit::Signal(sig) => 128 + sig,
        }
    }

    /// A one-line description for the user, or `None` for a clean end.
    pub fn message(&self) -> Option<String> {
        match self {
            VmExit::DebugExit(_)
            | VmExit::Reset
            | VmExit::PowerOff
            | VmExit::Quit
            | VmExit::ResetRequested => None,
            VmExit::TripleFault { vcpu, rip } => Some(format!(
                "keel: vCPU {vcpu} triple fault (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"
            )),
            VmExit::VcpuFailed(e) => Some(format!("keel: {}", ErrorChain(&**e))),
            VmExit::VcpuStopped { vcpu, reason } => {
                Some(format!("keel: vCPU {vcpu} stopped: {reason:?}"))
            }
            VmExit::Signal(sig) => Some(format!("keel: stopped by signal {sig}")),
        }
    }
}

/// A one-shot exit request shared by devices and vCPU threads. The first request wins and
/// stops every vCPU at once, so the guest runs no further than the instruction that asked
/// (a debug-exit write, say); the main thread waits on [`ExitSignal::event`] to clean up.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
    vcpus: Mutex<Vec<VcpuHandle>>,
}

impl ExitSignal {
    /// Creates the signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            vcpus: Mutex::new(Vec::new()),
        })
    }

    /// The vCPUs to stop when an exit is requested.
    pub fn set_vcpus(&self, handles: Vec<VcpuHandle>) {
        *self.vcpus.lock().unwrap_or_else(PoisonError::into_inner) = handles;
    }

    /// Requests that the VM stop for `why`. Later requests are ignored.
    pub fn request(&self, why: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(why);
            drop(r);
            for h in self
                .vcpus
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                h.stop();
            }
            // Writing an eventfd only fails on counter overflow, which one write cannot cause.
            let _ = self.event.write(1);
        }
    }

    /// The request, if one was made.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Readable once an exit was requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

//! keel-bus interrupt traits implemented over KVM: irqfd, `KVM_IRQ_LINE`, MSI routes and
//! `KVM_SIGNAL_MSI`.

use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use keel_bus::interrupt::{
    DataMatch, Error as IrqError, InterruptLine, IoEventAddress, IoEventRegistrar, MsiGroup,
    MsiMessage, MsiSender, Result as IrqResult,
};

use crate::vm::{self, Vm};

/// Maps a VM error to keel-bus's, naming the step `op`; the VM error stays the source.
fn hypervisor(op: &'static str) -> impl FnOnce(vm::Error) -> IrqError {
    move |e| IrqError::hypervisor(op, e)
}

/// An IOAPIC/PIC input: edges through an irqfd (no ioctl on the hot path), levels through
/// `KVM_IRQ_LINE`.
pub struct IrqLine {
    vm: Arc<Vm>,
    gsi: u32,
    irqfd: EventFd,
}

impl IrqLine {
    /// Connects to `gsi` (0-23) of the in-kernel irqchip.
    pub fn new(vm: Arc<Vm>, gsi: u32) -> vm::Result<Self> {
        let irqfd = Vm::new_eventfd()?;
        vm.register_irqfd(&irqfd, gsi)?;
        Ok(IrqLine { vm, gsi, irqfd })
    }

    /// The GSI this line drives.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The irqfd: writing it raises an edge on the line (useful from another process or an
    /// epoll loop).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

impl Drop for IrqLine {
    fn drop(&mut self) {
        if let Err(e) = self.vm.unregister_irqfd(&self.irqfd, self.gsi) {
            log::warn!("cannot unregister irqfd for GSI {}: {e}", self.gsi);
        }
    }
}

impl InterruptLine for IrqLine {
    fn trigger(&self) -> IrqResult<()> {
        self.irqfd.write(1).map_err(IrqError::Io)
    }
    fn set_level(&self, asserted: bool) -> IrqResult<()> {
        self.vm
            .set_irq_line(self.gsi, asserted)
            .map_err(hypervisor("set an interrupt line's level"))
    }
}

impl IoEventRegistrar for Vm {
    fn register(&self, evt: &EventFd, addr: IoEventAddress, datamatch: DataMatch) -> IrqResult<()> {
        self.register_ioevent(evt, addr, datamatch)
            .map_err(hypervisor("register an ioeventfd"))
    }
    fn unregister(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> IrqResult<()> {
        self.unregister_ioevent(evt, addr, datamatch)
            .map_err(hypervisor("unregister an ioeventfd"))
    }
}

impl MsiSender for Vm {
    fn send(&self, msg: MsiMessage) -> IrqResult<()> {
        self.signal_msi(msg).map_err(hypervisor("send an MSI"))
    }
}

/// A vector's routing state; its irqfd lives outside the lock because it never changes.
struct Route {
    gsi: u32,
    msg: MsiMessage,
    masked: bool,
    routed: bool,
}

struct Vector {
    irqfd: EventFd,
    route: Mutex<Route>,
}

/// MSI vectors backed by irqfds on MSI routes, one GSI each.
///
/// A masked vector's irqfd is detached from its GSI, so signals accumulate in the eventfd
/// counter: that is the pending bit. Unmasking re-attaches it and KVM delivers at once if a
/// signal is pending, so no interrupt is lost or duplicated across a mask/unmask.
pub struct MsiIrqfdGroup {
    vm: Arc<Vm>,
    vectors: Vec<Vector>,
}

impl MsiIrqfdGroup {
    /// Creates a group with one vector per GSI in `gsis` (allocate them from
    /// `keel_memory::SystemAllocator::allocate_msi_gsi`). Every vector starts masked.
    pub fn new(vm: Arc<Vm>, gsis: &[u32]) -> vm::Result<Self> {
        let vectors = gsis
            .iter()
            .map(|&gsi| {
                Ok(Vector {
                    irqfd: Vm::new_eventfd()?,
                    route: Mutex::new(Route {
                        gsi,
                        msg: MsiMessage::default(),
                        masked: true,
                        routed: false,
                    }),
                })
            })
            .collect::<vm::Result<_>>()?;
        Ok(MsiIrqfdGroup { vm, vectors })
    }

    fn vector(&self, index: usize) -> IrqResult<&Vector> {
        self.vectors.get(index).ok_or(IrqError::InvalidVector {
            index,
            len: self.vectors.len(),
        })
    }
}

impl Vector {
    fn route(&self) -> std::sync::MutexGuard<'_, Route> {
        self.route.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for MsiIrqfdGroup {
    fn drop(&mut self) {
        for v in &self.vectors {
            let r = v.route();
            if r.routed {
                if !r.masked {
                    let _ = self.vm.unregister_irqfd(&v.irqfd, r.gsi);
                }
                let _ = self.vm.remove_msi_route(r.gsi);
            }
        }
    }
}

impl MsiGroup for MsiIrqfdGroup {
    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn configure(&self, index: usize, msg: MsiMessage, masked: bool) -> IrqResult<()> {
        let v = self.vector(index)?;
        let mut r = v.route();
        if !r.routed {
            self.vm
                .add_msi_route(r.gsi, msg)
                .map_err(hypervisor("add an MSI route"))?;
            r.routed = true;
        } else if r.msg != msg {
            self.vm
                .update_msi_route(r.gsi, msg)
                .map_err(hypervisor("update an MSI route"))?;
        }
        r.msg = msg;
        match (r.masked, masked) {
            (true, false) => self
                .vm
                .register_irqfd(&v.irqfd, r.gsi)
                .map_err(hypervisor("attach an unmasked vector's irqfd"))?,
            (false, true) => self
                .vm
                .unregister_irqfd(&v.irqfd, r.gsi)
                .map_err(hypervisor("detach a masked vector's irqfd"))?,
            _ => {}
        }
        r.masked = masked;
        Ok(())
    }

    fn trigger(&self, index: usize) -> IrqResult<()> {
        self.vector(index)?.irqfd.write(1).map_err(IrqError::Io)
    }

    fn is_pending(&self, index: usize) -> IrqResult<bool> {
        let v = self.vector(index)?;
        if !v.route().masked {
            return Ok(false);
        }
        // Peek without consuming: poll the eventfd for readability.
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&v.irqfd),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        Ok(n == 1 && pfd.revents & libc::POLLIN != 0)
    }

    fn notifier(&self, index: usize) -> Option<&EventFd> {
        self.vectors.get(index).map(|v| &v.irqfd)
    }
}

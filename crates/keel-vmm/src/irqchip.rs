//! The VM's interrupt controllers: KVM's in-kernel PIC, IOAPIC and PIT, or the split
//! irqchip with keel-irqchip's models in keel and the local APICs in KVM.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use keel_bus::interrupt::{Error as IrqError, InterruptLine, MsiMessage, Result as IrqResult};
use keel_bus::{BusRange, PioDevice};
use keel_irqchip::ioapic::{Ioapic, MsiDelivery};
use keel_irqchip::pic::{Pic, PicPorts, ELCR_PORT, MASTER_PORT, SLAVE_PORT};
use keel_irqchip::pit::{Clock, Pit, PitPorts, PIT_PORT, PORT_61};
use keel_irqchip::IrqLines;
use keel_kvm::interrupt::IrqLine;
use keel_kvm::{Buses, IrqchipMode, Vm};
use keel_memory::x86;

/// Where the interrupt controllers run (`--irqchip`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Irqchip {
    /// KVM's in-kernel PIC, IOAPIC and PIT.
    Kernel,
    /// KVM's split irqchip: local APICs in KVM; IOAPIC, PIC and PIT in keel. The default:
    /// a VM closes in well under a millisecond instead of ~20 ms.
    #[default]
    Split,
}

impl From<Irqchip> for IrqchipMode {
    fn from(i: Irqchip) -> Self {
        match i {
            Irqchip::Kernel => IrqchipMode::Kernel,
            Irqchip::Split => IrqchipMode::Split,
        }
    }
}

/// The userspace IOAPIC's way out: a KVM MSI route per pin on the GSI of that number
/// (reserved by the split irqchip; irqfds on the GSI deliver through it, and KVM takes
/// level-triggered vectors' EOIs from it), sends through `KVM_SIGNAL_MSI`.
struct KvmIoapicRoutes(Arc<Vm>);

impl MsiDelivery for KvmIoapicRoutes {
    fn route(&self, pin: usize, msg: Option<MsiMessage>) -> IrqResult<()> {
        self.0
            .set_msi_route(pin as u32, msg)
            .map_err(|e| IrqError::hypervisor("update an IOAPIC pin's MSI route", e))
    }

    fn deliver(&self, _pin: usize, msg: MsiMessage) -> IrqResult<()> {
        self.0
            .signal_msi(msg)
            .map_err(|e| IrqError::hypervisor("send an IOAPIC interrupt", e))
    }
}

/// keel's controllers under the split irqchip.
pub struct SplitChips {
    lines: IrqLines,
    pit: Arc<Mutex<Pit>>,
    /// Written whenever the guest programs the PIT, so that [`PitTimer`] looks again.
    pit_programmed: Arc<EventFd>,
}

/// The VM's legacy interrupt wiring, whichever controllers it has.
pub enum Interrupts {
    /// KVM's controllers: lines are irqfds and `KVM_IRQ_LINE`.
    Kernel(Arc<Vm>),
    /// keel's controllers.
    Split(SplitChips),
}

/// The PIT's ports, telling [`PitTimer`] when the guest programs a channel.
struct ProgrammedPit {
    ports: PitPorts,
    programmed: Arc<EventFd>,
}

impl PioDevice for ProgrammedPit {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        self.ports.pio_read(offset, data)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        self.ports.pio_write(offset, data);
        // Writing an eventfd fails only on counter overflow: a wake-up is pending then.
        let _ = self.programmed.write(1);
    }
}

/// The shortest wait between two IRQ 0 edges, as KVM's in-kernel PIT bounds its period: a
/// guest programming a tiny count gets interrupts no faster than this.
const MIN_PIT_PERIOD: Duration = Duration::from_micros(200);

/// Raises IRQ 0 at the PIT's channel 0 output edges: an event-loop subscriber with a host
/// timer armed for [`Pit::next_irq`], re-armed whenever the guest programs the PIT.
pub struct PitTimer {
    pit: Arc<Mutex<Pit>>,
    programmed: Arc<EventFd>,
    timer: TimerFd,
    lines: IrqLines,
    /// The edge the timer is armed for, in the PIT clock's nanoseconds.
    due: Option<u64>,
}

impl PitTimer {
    fn rearm(&mut self) {
        let (next, now) = {
            let pit = self.pit.lock().unwrap_or_else(PoisonError::into_inner);
            (pit.next_irq(), pit.clock().now_ns())
        };
        self.due = next;
        let result = match next {
            Some(at) => {
                let wait = Duration::from_nanos(at.saturating_sub(now)).max(MIN_PIT_PERIOD);
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::warn!("cannot arm the PIT's host timer: {e}");
        }
    }
}

impl MutEventSubscriber for PitTimer {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.programmed.as_ref(), EventSet::IN));
        let _ = ops.add(Events::new(&self.timer, EventSet::IN));
        self.rearm();
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            self.expired();
        } else {
            let _ = self.programmed.read();
        }
        self.rearm();
    }
}

impl PitTimer {
    /// A subscriber for `lines`' IRQ 0 driven by `pit`, re-armed when `programmed` fires.
    fn new(
        pit: Arc<Mutex<Pit>>,
        programmed: Arc<EventFd>,
        lines: IrqLines,
    ) -> Result<Self, crate::vmm::Error> {
        // Non-blocking: the guest may reprogram the PIT between the timer becoming readable
        // and this subscriber reading it (both events in one epoll batch, the programming
        // handled first), and re-arming drops the expiration, so a blocking read would
        // stop the event loop for good.
        // SAFETY: timerfd_create takes no pointers; the result is checked below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(crate::vmm::Error::os(
                "cannot create a timerfd",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a timerfd this function just created and owns alone.
        let timer = unsafe { TimerFd::from_raw_fd(fd) };
        Ok(PitTimer {
            pit,
            programmed,
            timer,
            lines,
            due: None,
        })
    }

    /// The host timer fired (or was readable a moment ago): raises IRQ 0 if the edge it
    /// was armed for has come. Never waits.
    fn expired(&mut self) {
        // Consumes the expiration count; EAGAIN when a re-arm dropped it already.
        let _ = self.timer.wait();
        let now = self
            .pit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clock()
            .now_ns();
        if self.due.is_some_and(|due| now >= due) {
            self.lines.pulse(0);
        }
    }
}

impl Interrupts {
    /// Sets up `mode`'s controllers in `vm` (before any vCPU is created) and, for the split
    /// irqchip, puts keel's IOAPIC, PIC and PIT on `buses` and makes the IOAPIC hear EOIs.
    pub fn new(vm: &Arc<Vm>, mode: Irqchip, buses: &mut Buses) -> Result<Self, crate::vmm::Error> {
        vm.setup_irqchip_mode(mode.into())?;
        if mode == Irqchip::Kernel {
            return Ok(Interrupts::Kernel(vm.clone()));
        }
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Arc::new(KvmIoapicRoutes(
            vm.clone(),
        )))));
        buses.mmio.insert(
            BusRange::new(x86::IOAPIC_START, keel_irqchip::ioapic::MMIO_SIZE)?,
            ioapic.clone(),
        )?;
        let pic = Arc::new(Mutex::new(Pic::new()));
        let pit = Arc::new(Mutex::new(Pit::default()));
        let pit_programmed = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| crate::vmm::Error::os("cannot create an eventfd", source))?,
        );
        let ports: [(u16, u64, Arc<dyn PioDevice>); 5] = [
            (
                MASTER_PORT,
                2,
                Arc::new(PicPorts::new(pic.clone(), MASTER_PORT)),
            ),
            (
                SLAVE_PORT,
                2,
                Arc::new(PicPorts::new(pic.clone(), SLAVE_PORT)),
            ),
            (
                ELCR_PORT,
                2,
                Arc::new(PicPorts::new(pic.clone(), ELCR_PORT)),
            ),
            (
                PIT_PORT,
                4,
                Arc::new(ProgrammedPit {
                    ports: PitPorts::new(pit.clone(), PIT_PORT),
                    programmed: pit_programmed.clone(),
                }),
            ),
            (PORT_61, 1, Arc::new(PitPorts::new(pit.clone(), PORT_61))),
        ];
        for (port, len, dev) in ports {
            buses
                .pio
                .insert(BusRange::new(u64::from(port), len)?, dev)?;
        }
        let lines = IrqLines::new(ioapic, Some(pic));
        buses.eoi = Some(Arc::new(lines.clone()));
        Ok(Interrupts::Split(SplitChips {
            lines,
            pit,
            pit_programmed,
        }))
    }

    /// With keel's PIT, the event-loop subscriber that raises its IRQ 0.
    pub fn pit_timer(&self) -> Result<Option<PitTimer>, crate::vmm::Error> {
        let Interrupts::Split(chips) = self else {
            return Ok(None);
        };
        PitTimer::new(
            chips.pit.clone(),
            chips.pit_programmed.clone(),
            chips.lines.clone(),
        )
        .map(Some)
    }

    /// The interrupt line of GSI `gsi` (an IOAPIC pin; ISA IRQs also reach the PIC).
    pub fn line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, crate::vmm::Error> {
        Ok(match self {
            Interrupts::Kernel(vm) => Arc::new(IrqLine::new(vm.clone(), gsi)?),
            Interrupts::Split(SplitChips { lines, .. }) => {
                let pin = u8::try_from(gsi)
                    .ok()
                    .filter(|&p| usize::from(p) < keel_irqchip::ioapic::NUM_PINS)
                    .ok_or(keel_kvm::Error::BadGsi(gsi))?;
                Arc::new(lines.line(pin))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An IOAPIC delivery that goes nowhere (the test looks at the timer, not the vector).
    struct Nowhere;

    impl MsiDelivery for Nowhere {
        fn route(&self, _: usize, _: Option<MsiMessage>) -> IrqResult<()> {
            Ok(())
        }
        fn deliver(&self, _: usize, _: MsiMessage) -> IrqResult<()> {
            Ok(())
        }
    }

    /// The timer became readable, then the guest reprogrammed the PIT and the re-arm
    /// dropped the expiration before the timer's event was handled: handling it must not
    /// wait (a blocking read here stopped keel's event loop for good).
    #[test]
    fn a_timer_event_after_a_rearm_does_not_wait() {
        let ioapic = Arc::new(Mutex::new(Ioapic::new(Arc::new(Nowhere))));
        let lines = IrqLines::new(ioapic, Some(Arc::new(Mutex::new(Pic::new()))));
        let programmed = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut timer = PitTimer::new(Arc::new(Mutex::new(Pit::default())), programmed, lines)
            .expect("PIT timer");
        timer.timer.reset(Duration::from_millis(1), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // The guest's programming handled first: the PIT is not counting, the timer clears.
        timer.rearm();
        assert!(!timer.timer.is_armed().unwrap());
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            timer.expired();
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the timer's event handler waited on a timer that will not fire");
    }
}

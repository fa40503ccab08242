//! The VM's interrupt controllers: KVM's in-kernel PIC, IOAPIC and PIT, or the split
//! irqchip with keel-irqchip's models in keel and the local APICs in KVM.

use std::sync::{Arc, Mutex};

use keel_bus::interrupt::{Error as IrqError, InterruptLine, MsiMessage, Result as IrqResult};
use keel_bus::{BusRange, PioDevice};
use keel_irqchip::ioapic::{Ioapic, MsiDelivery};
use keel_irqchip::pic::{Pic, PicPorts, ELCR_PORT, MASTER_PORT, SLAVE_PORT};
use keel_irqchip::pit::{Pit, PitPorts, PIT_PORT, PORT_61};
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

/// The VM's legacy interrupt wiring, whichever controllers it has.
pub enum Interrupts {
    /// KVM's controllers: lines are irqfds and `KVM_IRQ_LINE`.
    Kernel(Arc<Vm>),
    /// keel's controllers.
    Split(IrqLines),
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
        let ports: [(u16, u64, Arc<dyn PioDevice>); 5] = [
            (MASTER_PORT, 2, Arc::new(PicPorts::new(pic.clone(), MASTER_PORT))),
            (SLAVE_PORT, 2, Arc::new(PicPorts::new(pic.clone(), SLAVE_PORT))),
            (ELCR_PORT, 2, Arc::new(PicPorts::new(pic.clone(), ELCR_PORT))),
            (PIT_PORT, 4, Arc::new(PitPorts::new(pit.clone(), PIT_PORT))),
            (PORT_61, 1, Arc::new(PitPorts::new(pit, PORT_61))),
        ];
        for (port, len, dev) in ports {
            buses
                .pio
                .insert(BusRange::new(u64::from(port), len)?, dev)?;
        }
        let lines = IrqLines::new(ioapic, Some(pic));
        buses.eoi = Some(Arc::new(lines.clone()));
        Ok(Interrupts::Split(lines))
    }

    /// The interrupt line of GSI `gsi` (an IOAPIC pin; ISA IRQs also reach the PIC).
    pub fn line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, crate::vmm::Error> {
        Ok(match self {
            Interrupts::Kernel(vm) => Arc::new(IrqLine::new(vm.clone(), gsi)?),
            Interrupts::Split(lines) => {
                let pin = u8::try_from(gsi)
                    .ok()
                    .filter(|&p| usize::from(p) < keel_irqchip::ioapic::NUM_PINS)
                    .ok_or(keel_kvm::Error::BadGsi(gsi))?;
                Arc::new(lines.line(pin))
            }
        })
    }
}

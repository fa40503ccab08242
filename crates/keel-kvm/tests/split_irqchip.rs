//! The split irqchip: KVM's local APIC with keel-irqchip's userspace IOAPIC, delivering
//! through MSI routes on the reserved GSIs (irqfds on them too), and level-triggered pins
//! whose EOIs come back as `KVM_EXIT_IOAPIC_EOI`; and, with the in-kernel irqchip, the
//! resampling irqfd that does the same for a level-triggered pin inside KVM.

mod support;

use keel_testutil::require_kvm;

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_bus::interrupt::{MsiMessage, Result as IrqResult};
use keel_bus::MutMmioDevice;
use keel_irqchip::ioapic::{Ioapic, MsiDelivery};
use keel_irqchip::IrqLines;
use keel_kvm::{IrqchipMode, VcpuExitReason, Vm};
use support::{irq_guest_vcpu, port_recorder, vm_with_irqchip_mode, Access, IRQ_HANDLER};

const HANDLER: u64 = IRQ_HANDLER;
const EDGE_VECTOR: u8 = 0x30;
const LEVEL_VECTOR: u8 = 0x31;
const WAIT: Duration = Duration::from_secs(20);

/// The IOAPIC's pins as MSI routes on their GSIs, sent with KVM_SIGNAL_MSI.
struct Routes(Arc<Vm>);

impl MsiDelivery for Routes {
    fn route(&self, pin: usize, msg: Option<MsiMessage>) -> IrqResult<()> {
        self.0
            .set_msi_route(pin as u32, msg)
            .map_err(|e| keel_bus::interrupt::Error::hypervisor("route a pin", e))
    }
    fn deliver(&self, _pin: usize, msg: MsiMessage) -> IrqResult<()> {
        self.0
            .signal_msi(msg)
            .map_err(|e| keel_bus::interrupt::Error::hypervisor("send", e))
    }
}

fn program(ioapic: &Mutex<Ioapic>, pin: u32, low: u32) {
    let mut io = ioapic.lock().unwrap();
    io.mmio_write(0, &(0x11 + 2 * pin).to_le_bytes());
    io.mmio_write(0x10, &0u32.to_le_bytes());
    io.mmio_write(0, &(0x10 + 2 * pin).to_le_bytes());
    io.mmio_write(0x10, &low.to_le_bytes());
}

fn next(events: &Receiver<Access>) -> Option<Access> {
    events.recv_timeout(WAIT).ok()
}

fn handled(vector: u8) -> Option<Access> {
    Some(Access::Write {
        offset: 1,
        data: vec![vector],
    })
}

#[test]
fn userspace_ioapic_edges_levels_and_eoi_exits() {
    require_kvm!();
    let (vm, mem, _) = vm_with_irqchip_mode(4, IrqchipMode::Split);
    assert_eq!(vm.irqchip_mode(), Some(IrqchipMode::Split));
    // No in-kernel IOAPIC: KVM_IRQ_LINE has no pin to drive (GSI 10 has no route yet).
    assert!(vm.fd().get_irqchip(&mut Default::default()).is_err());

    let vcpu = irq_guest_vcpu(
        &vm,
        &mem,
        &[(EDGE_VECTOR, HANDLER), (LEVEL_VECTOR, HANDLER + 0x80)],
    );

    let ioapic = Arc::new(Mutex::new(Ioapic::new(Arc::new(Routes(vm.clone())))));
    let lines = IrqLines::new(ioapic.clone(), None);
    let (mut buses, events) = port_recorder(2);
    buses.eoi = Some(Arc::new(lines.clone()));
    let thread = vcpu.spawn(buses).unwrap();
    assert_eq!(
        next(&events),
        Some(Access::Write {
            offset: 0,
            data: vec![0]
        })
    );

    // Pin 4, edge: an irqfd on GSI 4 delivers through the pin's MSI route in the kernel.
    let irqfd = Vm::new_eventfd().unwrap();
    vm.register_irqfd(&irqfd, 4).unwrap();
    program(&ioapic, 4, u32::from(EDGE_VECTOR));
    irqfd.write(1).unwrap();
    assert_eq!(next(&events), handled(EDGE_VECTOR));
    // And through the IOAPIC model itself.
    lines.pulse(4);
    assert_eq!(next(&events), handled(EDGE_VECTOR));
    // Masked: the route is gone and the irqfd's edge is lost.
    program(&ioapic, 4, u32::from(EDGE_VECTOR) | (1 << 16));
    irqfd.write(1).unwrap();
    lines.pulse(4);
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err());

    // Pin 10, level: delivered while asserted, once per EOI. The second delivery needs
    // the guest's EOI to reach the IOAPIC (KVM_EXIT_IOAPIC_EOI) and clear remote IRR.
    program(&ioapic, 10, u32::from(LEVEL_VECTOR) | (1 << 15));
    lines.set_level(10, true);
    assert_eq!(next(&events), handled(LEVEL_VECTOR));
    assert_eq!(next(&events), handled(LEVEL_VECTOR));
    lines.set_level(10, false);
    // The delivery in flight ends with the guest's EOI, which clears remote IRR (the
    // guest reports an interrupt before its EOI); then drain what it reported.
    let remote_irr = 1 << 14;
    let deadline = std::time::Instant::now() + WAIT;
    while ioapic.lock().unwrap().entry(10).unwrap() & remote_irr != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "remote IRR still set {WAIT:?} after the line went low"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    while events.try_recv().is_ok() {}
    // A pulse on the level pin: exactly one interrupt.
    lines.pulse(10);
    assert_eq!(next(&events), handled(LEVEL_VECTOR));
    assert!(events.recv_timeout(Duration::from_millis(300)).is_err());

    // KVM resamples level irqfds only for its own IOAPIC.
    let resample = Vm::new_eventfd().unwrap();
    assert!(vm
        .register_irqfd_with_resample(&Vm::new_eventfd().unwrap(), &resample, 10)
        .is_err());

    thread.handle.stop();
    assert_eq!(thread.wait().unwrap(), VcpuExitReason::Stopped);
    vm.unregister_irqfd(&irqfd, 4).unwrap();
}

/// Polls the non-blocking `evt` until it has been signalled, for up to [`WAIT`].
fn signalled(evt: &vmm_sys_util::eventfd::EventFd) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        if evt.read().is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn resampling_irqfd_on_a_level_pin_with_the_in_kernel_irqchip() {
    require_kvm!();
    let (vm, mem, _) = support::vm_with_memory(4, true);
    assert_eq!(vm.irqchip_mode(), Some(IrqchipMode::Kernel));
    let vcpu = irq_guest_vcpu(&vm, &mem, &[(LEVEL_VECTOR, HANDLER + 0x80)]);
    // Pin 20 (above the 8259's inputs) -> vector 0x31, level-triggered, APIC 0.
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.fd().get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id selects the ioapic member of the union.
    unsafe {
        chip.chip.ioapic.redirtbl[20].bits = u64::from(LEVEL_VECTOR) | (1 << 15);
    }
    vm.fd().set_irqchip(&chip).unwrap();
    let (buses, events) = port_recorder(2);
    let thread = vcpu.spawn(buses).unwrap();
    assert!(next(&events).is_some(), "the guest did not start");

    let (irqfd, resample) = (Vm::new_eventfd().unwrap(), Vm::new_eventfd().unwrap());
    vm.register_irqfd_with_resample(&irqfd, &resample, 20)
        .unwrap();
    for _ in 0..2 {
        irqfd.write(1).unwrap();
        assert_eq!(next(&events), handled(LEVEL_VECTOR));
        // The guest's EOI deasserted the line and told the device, once.
        assert!(signalled(&resample), "no resample after the EOI");
        assert!(events.recv_timeout(Duration::from_millis(200)).is_err());
    }
    vm.unregister_irqfd(&irqfd, 20).unwrap();
    thread.handle.stop();
    assert_eq!(thread.wait().unwrap(), VcpuExitReason::Stopped);
}

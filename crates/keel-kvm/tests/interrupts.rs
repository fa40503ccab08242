//! Interrupts into a running long-mode guest: irqfd on an MSI route (with masking and
//! pending), KVM_SIGNAL_MSI, an IOAPIC line; and two vCPUs running at once.

mod support;

use keel_testutil::require_kvm;

use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use keel_bus::interrupt::{InterruptLine, MsiGroup, MsiMessage, MsiSender};
use keel_kvm::interrupt::{IrqLine, MsiIrqfdGroup};
use keel_kvm::x86::boot::{BootTables, Cpl};
use keel_kvm::{Vcpu, VcpuExitReason, Vm};
use support::{
    assemble, irq_guest_vcpu, load, port_recorder, vm_with_memory, Access, IRQ_HANDLER, LONG_ENTRY,
};
use vm_memory::{Bytes, GuestAddress};

const ENTRY: u64 = LONG_ENTRY;
const HANDLER: u64 = IRQ_HANDLER;
const MSI_VECTOR: u8 = 0x30;
const IOAPIC_VECTOR: u8 = 0x31;
const WAIT: Duration = Duration::from_secs(20);

struct Running {
    vm: Arc<Vm>,
    thread: keel_kvm::VcpuThread,
    events: Receiver<Access>,
}

impl Running {
    fn next(&self) -> Option<Access> {
        self.events.recv_timeout(WAIT).ok()
    }
    fn expect_vector(&self, vector: u8) {
        assert_eq!(
            self.next(),
            Some(Access::Write {
                offset: 1,
                data: vec![vector]
            }),
            "the guest's handler for vector {vector:#x} did not run"
        );
    }
    fn expect_nothing(&self) {
        let got = self.events.recv_timeout(Duration::from_millis(200));
        assert!(got.is_err(), "unexpected guest activity: {got:?}");
    }
    fn finish(self) {
        self.thread.handle.stop();
        assert_eq!(self.thread.wait().unwrap(), VcpuExitReason::Stopped);
    }
}

fn start_guest() -> Running {
    let (vm, mem, _) = vm_with_memory(4, true);
    let vcpu = irq_guest_vcpu(
        &vm,
        &mem,
        &[(MSI_VECTOR, HANDLER), (IOAPIC_VECTOR, HANDLER + 0x80)],
    );
    let (buses, events) = port_recorder(2);
    let thread = vcpu.spawn(buses).unwrap();
    let running = Running { vm, thread, events };
    assert_eq!(
        running.next(),
        Some(Access::Write {
            offset: 0,
            data: vec![0]
        }),
        "the guest did not start"
    );
    running
}

fn msi(vector: u8) -> MsiMessage {
    // Destination APIC 0, fixed delivery, edge.
    MsiMessage {
        address: 0xfee0_0000,
        data: u32::from(vector),
    }
}

#[test]
fn irqfd_on_msi_route_reaches_the_guest_handler() {
    require_kvm!();
    let g = start_guest();
    let group = MsiIrqfdGroup::new(g.vm.clone(), &[24, 25]).unwrap();
    group.configure(0, msi(MSI_VECTOR), false).unwrap();
    group.trigger(0).unwrap();
    g.expect_vector(MSI_VECTOR);

    // The notifier is the irqfd itself: a worker thread writes it directly.
    group.notifier(0).unwrap().write(1).unwrap();
    g.expect_vector(MSI_VECTOR);

    // Masked: the signal waits as pending, and arrives exactly once on unmask.
    group.configure(0, msi(MSI_VECTOR), true).unwrap();
    assert!(!group.is_pending(0).unwrap());
    group.trigger(0).unwrap();
    g.expect_nothing();
    assert!(group.is_pending(0).unwrap());
    group.configure(0, msi(MSI_VECTOR), false).unwrap();
    g.expect_vector(MSI_VECTOR);
    g.expect_nothing();

    // Retargeting the route to another vector takes effect.
    group.configure(0, msi(IOAPIC_VECTOR), false).unwrap();
    group.trigger(0).unwrap();
    g.expect_vector(IOAPIC_VECTOR);

    // Out-of-range vectors are errors, not panics.
    assert!(group.trigger(2).is_err());
    g.finish();
}

#[test]
fn signal_msi_and_ioapic_line_reach_the_guest() {
    require_kvm!();
    let g = start_guest();
    g.vm.send(msi(MSI_VECTOR)).unwrap();
    g.expect_vector(MSI_VECTOR);

    // IOAPIC pin 20 -> vector 0x31, edge, fixed, destination APIC 0, programmed from the
    // host with KVM_SET_IRQCHIP. (Pins 0-15 also drive the 8259, whose output reaches LINT0
    // as ExtINT; this guest does not mask the 8259, so it uses a pin above 15.)
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    g.vm.fd().get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id selects the ioapic member of the union.
    unsafe {
        chip.chip.ioapic.redirtbl[20].bits = u64::from(IOAPIC_VECTOR);
    }
    g.vm.fd().set_irqchip(&chip).unwrap();
    let line = IrqLine::new(g.vm.clone(), 20).unwrap();
    line.trigger().unwrap();
    g.expect_vector(IOAPIC_VECTOR);
    line.set_level(true).unwrap();
    line.set_level(false).unwrap();
    g.expect_vector(IOAPIC_VECTOR);
    g.finish();
}

/// Each vCPU reads its APIC ID from its LAPIC, meets the other at a counter in memory (so
/// both are provably running at once), reports the ID on port 0x10 and halts.
const SMP_GUEST: &str = r#"
    .code64
    mov $0xfee00000, %ebx
    mov 0x20(%rbx), %eax        # LAPIC ID register
    shr $24, %eax
    lock incl 0x3000
1:  cmpl $2, 0x3000
    jne 1b
    out %al, $0x10
    cli
2:  hlt
    jmp 2b
"#;

#[test]
fn two_vcpus_run_at_once_and_report_their_apic_ids() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, true);
    load(&mem, ENTRY, &assemble(SMP_GUEST, ENTRY));
    mem.write_obj(0u32, GuestAddress(0x3000)).unwrap();
    let tables = BootTables::default();
    let (buses, events) = port_recorder(1);
    tables.write(&mem, 0x8_0000, false).unwrap();
    let threads: Vec<_> = (0..2u8)
        .map(|id| {
            let vcpu: Vcpu = vm.create_vcpu(id).unwrap();
            vcpu.configure(&vm, 2, true).unwrap();
            let stack = 0x8_0000 - u64::from(id) * 0x1_0000;
            vcpu.setup_long_mode(&tables, Cpl::Kernel, ENTRY, stack, 0)
                .unwrap();
            vcpu.set_runnable().unwrap();
            vcpu.spawn(buses.clone()).unwrap()
        })
        .collect();
    let reports: Vec<_> = (0..2).map(|_| events.recv_timeout(WAIT)).collect();
    if reports.iter().any(|r| r.is_err()) {
        for t in &threads {
            t.handle.stop();
        }
        let ends: Vec<_> = threads.into_iter().map(|t| t.wait()).collect();
        panic!(
            "missing APIC ID reports {reports:?}; counter {}; vCPUs ended with {ends:?}",
            mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap()
        );
    }
    let mut ids: Vec<u8> = reports
        .into_iter()
        .map(|r| match r {
            Ok(Access::Write { offset: 0, data }) => data[0],
            other => panic!("expected an APIC ID report, got {other:?}"),
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1]);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 2);
    // Both now sit in an in-kernel HLT; stop them from this thread.
    for t in &threads {
        t.handle.stop();
    }
    for t in threads {
        assert_eq!(t.wait().unwrap(), VcpuExitReason::Stopped);
    }
}

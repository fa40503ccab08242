//! Real guest code reaching bus devices through PIO and MMIO exits, ioeventfds that signal
//! without an exit, and vCPUs paused and stopped from another thread.

mod support;

use keel_testutil::require_kvm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_bus::{BusRange, PioDevice};
use keel_kvm::x86::boot::{BootTables, Cpl};
use keel_kvm::{Buses, DataMatch, IoEventAddr, VcpuExitReason, VcpuHandle, VcpuState, Vm};
use support::{
    assemble, load, long_mode_guest, real_mode_guest, reset_real_mode, vm_with_memory, Access,
    Recorder, PLATFORM, REAL_ENTRY,
};
use vm_memory::{Bytes, GuestAddress};

fn buses_with_recorders(pio_read: u64, mmio_read: u64) -> (Buses, Arc<Recorder>, Arc<Recorder>) {
    let buses = Buses::default();
    let (pio, _) = Recorder::new(pio_read);
    let (mmio, _) = Recorder::new(mmio_read);
    buses
        .pio
        .insert(BusRange::new(0x10, 0x10).unwrap(), pio.clone())
        .unwrap();
    buses
        .mmio
        .insert(BusRange::new(PLATFORM, 0x100).unwrap(), mmio.clone())
        .unwrap();
    (buses, pio, mmio)
}

fn w(offset: u64, data: &[u8]) -> Access {
    Access::Write {
        offset,
        data: data.to_vec(),
    }
}

fn r(offset: u64, len: usize) -> Access {
    Access::Read { offset, len }
}

#[test]
fn real_mode_pio_and_mmio_reach_devices() {
    require_kvm!();
    let (_vm, _mem, mut vcpu) = real_mode_guest(&assemble(
        r#"
        .code16
        mov $0x42, %al
        out %al, $0x10          # 1 byte at offset 0
        mov $0x1234, %ax
        out %ax, $0x12          # 2 bytes at offset 2
        in $0x14, %eax          # 4-byte read at offset 4
        out %eax, $0x18         # echo it at offset 8
        movb $0x5a, %ds:0x20    # MMIO through DS (base set by the host)
        movl %ds:0x24, %ebx
        movl %ebx, %ds:0x28
        hlt
        "#,
        REAL_ENTRY,
    ));

    let (buses, pio, mmio) = buses_with_recorders(0x1122_3344_5566_7788, 0xcafe_f00d);
    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Halted);
    assert_eq!(
        pio.accesses(),
        vec![
            w(0, &[0x42]),
            w(2, &[0x34, 0x12]),
            r(4, 4),
            w(8, &[0x88, 0x77, 0x66, 0x55]),
        ]
    );
    assert_eq!(
        mmio.accesses(),
        vec![
            w(0x20, &[0x5a]),
            r(0x24, 4),
            w(0x28, &[0x0d, 0xf0, 0xfe, 0xca])
        ]
    );
}

/// Stops the vCPU when the guest writes to it: how a CPL3 guest (which cannot `hlt`) ends.
struct StopPort(VcpuHandle);
impl PioDevice for StopPort {
    fn pio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn pio_write(&self, _: u64, _: &[u8]) {
        self.0.stop()
    }
}

const LONG_MODE_GUEST: &str = r#"
    .code64
    mov $0xf0000000, %ebx
    movl $0xdeadbeef, 8(%rbx)   # 4-byte MMIO write at offset 8
    movq 0x10(%rbx), %rax       # 8-byte MMIO read at offset 0x10
    movq %rax, 0x18(%rbx)       # echoed at offset 0x18
    out %eax, $0x10             # 4-byte port write at offset 0
    movw $0xabcd, %ax
    out %ax, $0x1d              # 2-byte port write at offset 0xd, the range's last two
    in $0x11, %al               # 1-byte port read at offset 1
    out %al, $0x1f              # END
    hlt
"#;

fn run_long_mode(cpl: Cpl) {
    let (_vm, _mem, mut vcpu) = long_mode_guest(&assemble(LONG_MODE_GUEST, 0x10_0000), cpl);
    let (buses, pio, mmio) = buses_with_recorders(0x77, 0x0102_0304_0506_0708);
    // Offset 0xf of the recorder's range is claimed by a stop port instead.
    buses.pio.remove(0x10).unwrap();
    buses
        .pio
        .insert(BusRange::new(0x10, 0xf).unwrap(), pio.clone())
        .unwrap();
    buses
        .pio
        .insert(
            BusRange::new(0x1f, 1).unwrap(),
            Arc::new(StopPort(vcpu.handle())),
        )
        .unwrap();
    // The guest ends by writing the stop port, at either privilege level.
    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Stopped);
    assert_eq!(
        mmio.accesses(),
        vec![
            w(8, &0xdead_beefu32.to_le_bytes()),
            r(0x10, 8),
            w(0x18, &0x0102_0304_0506_0708u64.to_le_bytes()),
        ]
    );
    assert_eq!(
        pio.accesses(),
        vec![
            w(0, &0x0506_0708u32.to_le_bytes()),
            w(0xd, &[0xcd, 0xab]),
            r(1, 1),
        ]
    );
    assert_eq!(vcpu.handle().state(), VcpuState::Exited);
}

#[test]
fn long_mode_kernel_pio_and_mmio_reach_devices() {
    require_kvm!();
    run_long_mode(Cpl::Kernel);
}

#[test]
fn long_mode_user_pio_and_mmio_reach_devices() {
    require_kvm!();
    run_long_mode(Cpl::User);
}

#[test]
fn string_io_is_split_into_elements() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, false);
    let code = assemble(
        r#"
        .code16
        mov $0x2000, %si
        mov $4, %cx
        mov $0x10, %dx
        rep outsb               # 4 one-byte writes to port 0x10
        mov $0x3000, %di
        mov $2, %cx
        mov $0x12, %dx
        rep insw                # 2 two-byte reads from port 0x12
        hlt
        "#,
        0x1000,
    );
    load(&mem, 0x1000, &code);
    load(&mem, 0x2000, b"keel");
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.setup_real_mode(0x1000).unwrap();
    let (buses, pio, _) = buses_with_recorders(0xbeef, 0);
    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Halted);
    assert_eq!(
        pio.accesses(),
        vec![
            w(0, b"k"),
            w(0, b"e"),
            w(0, b"e"),
            w(0, b"l"),
            r(2, 2),
            r(2, 2)
        ]
    );
    let mut got = [0u8; 4];
    mem.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
    assert_eq!(got, [0xef, 0xbe, 0xef, 0xbe]);
}

/// On this project's PVM hosts, KVM's instruction emulator cannot run `int3` at CPL0 and
/// reports an internal error; on hosts with hardware virtualization, `int3` with an empty
/// IDT triple-faults. Either way the outcome names what happened, and where.
#[test]
fn internal_errors_name_the_rip() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, false);
    load(&mem, 0x10_0000, &[0x90, 0xcc]); // nop; int3
    BootTables::default().write(&mem, 0x7_0000, false).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(&vm, 1, false).unwrap();
    vcpu.setup_long_mode(&BootTables::default(), Cpl::Kernel, 0x10_0000, 0x8_0000, 0)
        .unwrap();
    match vcpu.run(&Buses::default()) {
        Err(e @ keel_kvm::VcpuError::Internal { suberror, rip, .. }) => {
            assert_eq!(suberror, 1, "emulation failure");
            assert_eq!(rip, 0x10_0001);
            assert!(e.to_string().contains("RIP 0x100001"), "{e}");
        }
        Ok(VcpuExitReason::TripleFault) => {}
        other => panic!("unexpected outcome {other:?}"),
    }
}

#[test]
fn unclaimed_accesses_read_all_ones() {
    require_kvm!();
    let (_vm, _mem, mut vcpu) = real_mode_guest(&assemble(
        r#"
        .code16
        in $0x99, %al           # nobody at 0x99
        out %al, $0x10
        movw %ds:0x200, %ax     # nobody at PLATFORM + 0x200
        out %ax, $0x10
        hlt
        "#,
        REAL_ENTRY,
    ));
    let (buses, pio, _) = buses_with_recorders(0, 0);
    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Halted);
    assert_eq!(pio.accesses(), vec![w(0, &[0xff]), w(0, &[0xff, 0xff])]);
}

#[test]
fn ioeventfd_signals_without_an_exit() {
    require_kvm!();
    let (vm, _mem, mut vcpu) = real_mode_guest(&assemble(
        r#"
        .code16
        mov $5, %cx
    1:  mov $7, %al
        out %al, $0x50                  # ioeventfd, any value
        movl $0x1234abcd, %ds:0x40      # ioeventfd, matching value
        loop 1b
        movl $0x99, %ds:0x40            # same address, other value: exits
        hlt
        "#,
        REAL_ENTRY,
    ));

    let pio_evt = Vm::new_eventfd().unwrap();
    let mmio_evt = Vm::new_eventfd().unwrap();
    vm.register_ioevent(&pio_evt, IoEventAddr::Pio(0x50), DataMatch::Any)
        .unwrap();
    vm.register_ioevent(
        &mmio_evt,
        IoEventAddr::Mmio(PLATFORM + 0x40),
        DataMatch::U32(0x1234_abcd),
    )
    .unwrap();
    let buses = Buses::default();
    let (port_dev, _) = Recorder::new(0);
    let (mmio_dev, _) = Recorder::new(0);
    buses
        .pio
        .insert(BusRange::new(0x50, 1).unwrap(), port_dev.clone())
        .unwrap();
    buses
        .mmio
        .insert(BusRange::new(PLATFORM, 0x100).unwrap(), mmio_dev.clone())
        .unwrap();

    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Halted);
    assert_eq!(pio_evt.read().unwrap(), 5);
    assert_eq!(mmio_evt.read().unwrap(), 5);
    // None of the matched writes reached userspace; the unmatched one did.
    assert_eq!(port_dev.accesses(), vec![]);
    assert_eq!(mmio_dev.accesses(), vec![w(0x40, &[0x99, 0, 0, 0])]);

    // Once unregistered, writes exit to the device again.
    vm.unregister_ioevent(&pio_evt, IoEventAddr::Pio(0x50), DataMatch::Any)
        .unwrap();
    reset_real_mode(&vcpu);
    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Halted);
    assert_eq!(port_dev.accesses().len(), 5);
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn running_vcpu_paused_resumed_and_stopped_from_another_thread() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, false);
    // A CPL3 loop: it never exits by itself.
    let code = assemble(
        r#"
        .code64
    1:  incq 0x200000
        jmp 1b
        "#,
        0x10_0000,
    );
    load(&mem, 0x10_0000, &code);
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.configure(&vm, 1, false).unwrap();
    BootTables::default().write(&mem, 0x7_0000, true).unwrap();
    vcpu.setup_long_mode(&BootTables::default(), Cpl::User, 0x10_0000, 0x8_0000, 0)
        .unwrap();
    let counter = || mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap();
    let t = vcpu.spawn(Buses::default()).unwrap();
    wait_until("the guest to run", || counter() > 0);

    t.handle.pause();
    assert_eq!(t.handle.state(), VcpuState::Paused);
    let c1 = counter();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(counter(), c1, "a paused vCPU kept running");

    t.handle.resume();
    wait_until("the guest to run again", || counter() > c1);

    t.handle.stop();
    assert_eq!(t.wait().unwrap(), VcpuExitReason::Stopped);
}

#[test]
fn stop_before_run_returns_at_once() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, false);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.handle().stop();
    assert_eq!(
        vcpu.run(&Buses::default()).unwrap(),
        VcpuExitReason::Stopped
    );
    // The request was consumed: the same vCPU runs again, here to a hlt.
    load(&mem, 0x1000, &[0xf4]);
    vcpu.setup_real_mode(0x1000).unwrap();
    assert_eq!(vcpu.run(&Buses::default()).unwrap(), VcpuExitReason::Halted);
}

#[test]
fn triple_fault_is_reported() {
    require_kvm!();
    // ud2 with an empty IDT: #UD, then #DF, then shutdown.
    let (_vm, _mem, mut vcpu) = long_mode_guest(&[0x0f, 0x0b], Cpl::Kernel);
    assert_eq!(
        vcpu.run(&Buses::default()).unwrap(),
        VcpuExitReason::TripleFault
    );
}

/// A port whose write waits (up to 10 s) until another vCPU is paused, as a device reset
/// waits for a worker that another vCPU keeps busy. Records whether the wait ended because
/// the other vCPU paused.
struct WaitsForPause {
    other: std::sync::OnceLock<VcpuHandle>,
    /// A write is waiting.
    entered: std::sync::atomic::AtomicBool,
    saw_paused: std::sync::atomic::AtomicBool,
}

impl PioDevice for WaitsForPause {
    fn pio_read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, _offset: u64, _data: &[u8]) {
        let Some(other) = self.other.get() else {
            return;
        };
        self.entered
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if other.state() == VcpuState::Paused {
                self.saw_paused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Pausing several vCPUs: ask each first, then wait for each. vCPU 0 sits in an exit that
/// ends only once vCPU 1 has paused; waiting for vCPU 0 before asking vCPU 1 would hold
/// both for the exit's whole timeout.
#[test]
fn vcpus_asked_to_pause_together_pause_when_one_waits_on_another() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, false);
    load(
        &mem,
        0x10_0000,
        &assemble(
            r#"
        .code64
    1:  out %al, $0x60
        jmp 1b
        "#,
            0x10_0000,
        ),
    );
    load(
        &mem,
        0x10_1000,
        &assemble(
            r#"
        .code64
    1:  incq 0x200000
        jmp 1b
        "#,
            0x10_1000,
        ),
    );
    BootTables::default().write(&mem, 0x7_0000, true).unwrap();
    let port = Arc::new(WaitsForPause {
        other: std::sync::OnceLock::new(),
        entered: std::sync::atomic::AtomicBool::new(false),
        saw_paused: std::sync::atomic::AtomicBool::new(false),
    });
    let buses = Buses::default();
    buses
        .pio
        .insert(BusRange::new(0x60, 1).unwrap(), port.clone())
        .unwrap();
    let mut threads = Vec::new();
    for (id, entry, stack) in [(0u8, 0x10_0000, 0x8_0000), (1, 0x10_1000, 0x9_0000)] {
        let vcpu = vm.create_vcpu(id).unwrap();
        vcpu.configure(&vm, 2, false).unwrap();
        vcpu.setup_long_mode(&BootTables::default(), Cpl::User, entry, stack, 0)
            .unwrap();
        threads.push(vcpu.spawn(buses.clone()).unwrap());
    }
    let counter = || mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap();
    wait_until("vCPU 1 to run", || counter() > 0);
    // Armed only now: vCPU 0's next write waits for vCPU 1.
    let _ = port.other.set(threads[1].handle.clone());
    wait_until("vCPU 0 to wait in its exit", || {
        port.entered.load(std::sync::atomic::Ordering::SeqCst)
    });
    let start = Instant::now();
    threads.iter().for_each(|t| t.handle.request_pause());
    threads.iter().for_each(|t| t.handle.wait_paused());
    let took = start.elapsed();
    assert!(
        threads
            .iter()
            .all(|t| t.handle.state() == VcpuState::Paused),
        "both paused"
    );
    assert!(
        port.saw_paused.load(std::sync::atomic::Ordering::SeqCst),
        "vCPU 0's exit ended by its timeout ({took:?}), not because vCPU 1 paused"
    );
    for t in threads {
        t.handle.stop();
        assert_eq!(t.wait().unwrap(), VcpuExitReason::Stopped);
    }
}

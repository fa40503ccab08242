//! VM-level behaviour: call order, routing errors, dirty logging, per-vCPU CPUID and MSRs.

mod support;

use keel_testutil::require_kvm;

use keel_bus::interrupt::MsiMessage;
use keel_kvm::x86::boot::{BootTables, Cpl};
use keel_kvm::x86::msr;
use keel_kvm::{Buses, DirtyLog, VcpuExitReason, Vm};
use keel_memory::{x86, MemoryLayout, MemoryOptions, MIB};
use support::{assemble, load, vm_with_memory};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Registering memory after the irqchip is slower than before it, but legal: keel-kvm
/// leaves the order to the VMM.
#[test]
fn memory_may_come_after_the_irqchip() {
    require_kvm!();
    let layout = MemoryLayout::new(4 * MIB).unwrap();
    let mem = layout
        .create_guest_memory(&MemoryOptions::default())
        .unwrap();
    let vm = Vm::new().unwrap();
    vm.set_identity_map_address(GuestAddress(x86::IDENTITY_MAP_START))
        .unwrap();
    vm.set_tss_address(GuestAddress(x86::TSS_START)).unwrap();
    vm.setup_irqchip().unwrap();
    vm.register_memory(&mem, DirtyLog::Off).unwrap();
    assert_eq!(vm.memory_slots().len(), layout.backed_ranges().len());
}

#[test]
fn memory_slots_follow_the_layout() {
    require_kvm!();
    let layout = MemoryLayout::new(3 * 1024 * MIB + 64 * MIB).unwrap();
    let mem = layout
        .create_guest_memory(&MemoryOptions::default())
        .unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, DirtyLog::Off).unwrap();
    let slots: Vec<(u64, u64)> = vm
        .memory_slots()
        .iter()
        .map(|s| (s.guest_addr, s.size))
        .collect();
    let expected: Vec<(u64, u64)> = layout
        .backed_ranges()
        .iter()
        .map(|(a, l)| (a.0, *l))
        .collect();
    assert_eq!(slots, expected);
    assert_eq!(slots.len(), 2, "RAM below the hole and above 4 GiB");
}

#[test]
fn msi_route_bookkeeping_rejects_bad_gsis() {
    require_kvm!();
    let (vm, _mem, _) = vm_with_memory(4, true);
    let m = MsiMessage {
        address: 0xfee0_0000,
        data: 0x40,
    };
    // IOAPIC pins are not MSI routes; GSIs past the table are refused.
    assert!(vm.add_msi_route(5, m).is_err());
    assert!(vm.add_msi_route(100_000, m).is_err());
    vm.add_msi_route(30, m).unwrap();
    assert!(vm.add_msi_route(30, m).is_err(), "a GSI is routed once");
    vm.update_msi_route(30, MsiMessage { data: 0x41, ..m })
        .unwrap();
    assert!(vm.update_msi_route(31, m).is_err());
    vm.remove_msi_route(30).unwrap();
    assert!(vm.remove_msi_route(30).is_err());
    vm.add_msi_route(30, m).unwrap();
}

#[test]
fn dirty_log_reports_the_pages_a_guest_wrote() {
    require_kvm!();
    let layout = MemoryLayout::new(4 * MIB).unwrap();
    // Both logs: KVM's for the guest's writes, the memory's bitmap for the VMM's.
    let opts = MemoryOptions {
        track_dirty_pages: true,
        ..Default::default()
    };
    let mem = layout.create_guest_memory(&opts).unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, DirtyLog::On).unwrap();
    let code = assemble(
        r#"
        .code16
        movb $1, %ds:0x3000
        movb $1, %ds:0x5010
        movb $1, %ds:0x9ff0
        hlt
        "#,
        0x1000,
    );
    load(&mem, 0x1000, &code);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.setup_real_mode(0x1000).unwrap();
    // Host writes (loading the code) are not logged by KVM; drain anything already set.
    vm.dirty_pages().unwrap();
    // They are in the memory's bitmap, which sees only them.
    let region = mem.find_region(GuestAddress(0x1000)).unwrap();
    assert!(region.bitmap().dirty_at(0x1000));
    assert_eq!(vcpu.run(&Buses::default()).unwrap(), VcpuExitReason::Halted);
    let pages = vm.dirty_pages().unwrap();
    for p in [0x3000, 0x5000, 0x9000] {
        assert!(pages.contains(&GuestAddress(p)), "{p:#x} not in {pages:?}");
        assert!(!region.bitmap().dirty_at(p as usize), "{p:#x}");
    }
    assert!(!pages.contains(&GuestAddress(0x7000)));
    // Reading clears the log.
    assert!(vm.dirty_pages().unwrap().is_empty());
    assert!(vm.dirty_log(99).is_err());
}

#[test]
fn cpuid_is_normalised_per_vcpu_and_msrs_are_set() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, true);
    BootTables::default().write(&mem, 0x7_0000, false).unwrap();
    for id in 0..2u8 {
        let vcpu = vm.create_vcpu(id).unwrap();
        vcpu.configure(&vm, 2, true).unwrap();
        vcpu.setup_long_mode(&BootTables::default(), Cpl::Kernel, 0x10_0000, 0x8_0000, 0)
            .unwrap();
        let cpuid = vcpu
            .fd()
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let leaf1 = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .expect("leaf 1");
        assert_eq!(leaf1.ebx >> 24, u32::from(id), "initial APIC ID");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical processor count");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        let msrs = vcpu
            .get_msrs(&[msr::IA32_MISC_ENABLE, msr::IA32_MTRR_DEF_TYPE])
            .unwrap();
        assert_eq!(
            msrs,
            vec![
                (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
                (msr::IA32_MTRR_DEF_TYPE, msr::MTRR_ENABLE_WB)
            ]
        );
        // LINT0 is ExtINT and LINT1 NMI.
        let lapic = vcpu.fd().get_lapic().unwrap();
        let reg =
            |off: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8));
        assert_eq!(reg(0x350) & 0x700, 0x700);
        assert_eq!(reg(0x360) & 0x700, 0x400);
        // The x87 and SSE control words are at their reset values. (Read through XSAVE's
        // legacy area: on these PVM hosts KVM_GET_FPU reports MXCSR as 0, and KVM_SET_FPU
        // does not change the state XSAVE shows, so a stale value cannot be planted first.)
        let xs = vcpu.fd().get_xsave().unwrap();
        assert_eq!(xs.region[0] & 0xffff, 0x37f, "FCW");
        assert_eq!(xs.region[6], 0x1f80, "MXCSR");
        let sregs = vcpu.sregs().unwrap();
        assert_eq!(sregs.cs.selector, 0x10, "__BOOT_CS");
        assert_eq!(sregs.ds.selector, 0x18, "__BOOT_DS");
    }
}

#[test]
fn bad_msr_is_named() {
    require_kvm!();
    let (vm, _mem, _) = vm_with_memory(4, false);
    let vcpu = vm.create_vcpu(0).unwrap();
    let err = vcpu
        .set_msrs(&[(msr::IA32_TSC, 0), (0xdead_0000, 1)])
        .unwrap_err();
    assert!(err.to_string().contains("0xdead0000"), "{err}");
}

#[test]
fn pvh_entry_state() {
    require_kvm!();
    let (vm, mem, _) = vm_with_memory(4, false);
    // 32-bit code: report EBX (the start_info pointer) on port 0x10, then halt.
    let code = assemble(".code32\nmov %ebx, %eax\nout %eax, $0x10\nhlt\n", 0x10_0000);
    load(&mem, 0x10_0000, &code);
    let tables = BootTables::default();
    tables.write(&mem, 0, false).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.setup_pvh(&tables, 0x10_0000, 0x6000).unwrap();
    let sregs = vcpu.sregs().unwrap();
    assert_eq!(
        (sregs.cs.db, sregs.cs.l, sregs.cr0 & 0x8000_0001),
        (1, 0, 1)
    );
    let (rec, _) = support::Recorder::new(0);
    let buses = Buses::default();
    buses
        .pio
        .insert(keel_bus::BusRange::new(0x10, 4).unwrap(), rec.clone())
        .unwrap();
    assert_eq!(vcpu.run(&buses).unwrap(), VcpuExitReason::Halted);
    assert_eq!(
        rec.accesses(),
        vec![support::Access::Write {
            offset: 0,
            data: 0x6000u32.to_le_bytes().to_vec()
        }]
    );
}

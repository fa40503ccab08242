//! The vCPU exit dispatch (`keel_kvm::Buses::dispatch`, what `Vcpu::run` does with every
//! `KVM_EXIT_IO` and `KVM_EXIT_MMIO`) over keel's platform, without /dev/kvm: COM1, the
//! i8042, the ACPI PM blocks, the debug-exit port (when the input asks for it), PCI
//! configuration mechanism #1 and ECAM, and the PCI test device (whose BARs the guest may
//! move). Accesses: `in`/`out` and string `ins`/`outs` of any element size (KVM's size
//! field included when it is 0 or larger than the data), MMIO reads and writes of 1 to 8
//! bytes, at the platform's ports, ECAM, wherever a device decodes now, or anywhere.
//!
//! Checks: dispatch fails exactly when some element is not wholly inside one device's
//! range; unclaimed reads return all ones; the VM is asked to stop only for a reset,
//! power-off or (when present) debug-exit; nothing panics.
#![no_main]

use std::sync::Arc;

use keel_bus::BusRange;
use keel_fuzz::irq::{Group, NullLine, OutOfRange};
use keel_kvm::{Buses, IoAccess};
use keel_memory::{x86, MemoryLayout, SystemAllocator, GIB};
use keel_pci::PciSegment;
use keel_vmm::devices::{
    legacy_ports, pci_test_function, AcpiPm, DebugExit, Serial, SerialOutput, COM1_PORT,
    DEBUG_EXIT_PORT, I8042, I8042_CMD_PORT, I8042_DATA_PORT, PCI_TEST_VECTORS, PM1A_CNT_PORT,
};
use keel_vmm::exit::{ExitSignal, VmExit};
use libfuzzer_sys::fuzz_target;

/// Ports worth aiming at: each device's, and the PCI configuration ports.
const PORTS: [u16; 8] = [
    COM1_PORT,
    I8042_DATA_PORT,
    I8042_CMD_PORT,
    PM1A_CNT_PORT,
    DEBUG_EXIT_PORT,
    0xcf8,
    0xcfc,
    0x80,
];

/// Whether `[addr, addr + len)` lies inside one of `ranges`.
fn claimed(ranges: &[BusRange], addr: u64, len: usize) -> bool {
    ranges
        .iter()
        .any(|r| r.contains(addr) && addr - r.base() + len as u64 <= r.len() && len > 0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let debug_exit = flags & 1 != 0;
    let exit = Arc::new(ExitSignal::new().unwrap());
    let buses = Buses::default();
    let serial = Arc::new(Serial::new(Arc::new(NullLine), SerialOutput::Sink));
    // keel's own table of legacy ports.
    let pio = legacy_ports(
        serial,
        Arc::new(I8042::new(exit.clone())),
        Arc::new(AcpiPm::new(exit.clone(), Arc::new(NullLine))),
        debug_exit.then(|| Arc::new(DebugExit(exit.clone()))),
    );
    for (port, len, dev) in pio {
        buses
            .pio
            .insert(BusRange::new(u64::from(port), len).unwrap(), dev)
            .unwrap();
    }
    let layout = MemoryLayout::new(GIB).unwrap();
    let mut alloc = SystemAllocator::new(&layout, 5).unwrap();
    let pci = Arc::new(PciSegment::new(
        buses.mmio.clone(),
        buses.pio.clone(),
        x86::ECAM_START,
    ));
    PciSegment::attach_config_access(&pci).unwrap();
    let f = pci_test_function(Arc::new(Group {
        len: usize::from(PCI_TEST_VECTORS),
        out_of_range: OutOfRange::Refuse,
    }))
    .unwrap();
    pci.add_device(f, &mut alloc).unwrap();

    for op in rest.chunks_exact(12) {
        let sel = op[1];
        let off = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let value = &op[4..12];
        let mut buf = [0u8; 16];
        let write = op[0] & 1 != 0;
        if op[0] & 2 == 0 {
            // Port I/O: `count` elements of `size` bytes; KVM's size may say anything.
            let port = if sel & 0x80 != 0 {
                off as u16
            } else {
                PORTS[usize::from(sel) % PORTS.len()].wrapping_add((off & 7) as u16)
            };
            let size = [1usize, 2, 4, 0, 3, 16][usize::from(op[0] >> 2) % 6];
            let count = usize::from(op[0] >> 5 & 3) + 1;
            let len = (size.max(1) * count).min(16);
            let elem = if size == 0 || size > len { len } else { size };
            let ranges = buses.pio.ranges();
            let all_claimed = buf[..len]
                .chunks(elem)
                .all(|e| claimed(&ranges, u64::from(port), e.len()));
            let r = if write {
                for (i, b) in buf[..len].iter_mut().enumerate() {
                    *b = value[i % 8];
                }
                buses.dispatch(IoAccess::PioOut {
                    port,
                    size,
                    data: &buf[..len],
                })
            } else {
                buses.dispatch(IoAccess::PioIn {
                    port,
                    size,
                    data: &mut buf[..len],
                })
            };
            assert_eq!(
                r.is_ok(),
                all_claimed,
                "{r:?} for port {port:#x}, {len} bytes in {elem}s"
            );
            if !write && !claimed(&ranges, u64::from(port), elem) {
                assert!(buf[..len].iter().all(|&b| b == 0xff), "unclaimed in floats");
            }
        } else {
            let len = usize::from(op[0] >> 2 & 7) + 1;
            let ranges = buses.mmio.ranges();
            let addr = match sel % 4 {
                0 => x86::ECAM_START + (u64::from(sel >> 2 & 3) << 15) + (off & 0xfff),
                1 | 2 if !ranges.is_empty() => {
                    ranges[usize::from(sel >> 2) % ranges.len()].base() + (off & 0x1fff)
                }
                _ => u64::from_le_bytes(value.try_into().unwrap()) ^ off,
            };
            let ok = claimed(&ranges, addr, len);
            let r = if write {
                buf[..len].copy_from_slice(&value[..len]);
                buses.dispatch(IoAccess::MmioWrite {
                    addr,
                    data: &buf[..len],
                })
            } else {
                buses.dispatch(IoAccess::MmioRead {
                    addr,
                    data: &mut buf[..len],
                })
            };
            assert_eq!(r.is_ok(), ok, "{r:?} for MMIO {addr:#x}, {len} bytes");
            if !write && !ok {
                assert!(
                    buf[..len].iter().all(|&b| b == 0xff),
                    "unclaimed read floats"
                );
            }
        }
        match exit.reason() {
            None | Some(VmExit::Reset) | Some(VmExit::PowerOff) => {}
            Some(VmExit::DebugExit(_)) => assert!(debug_exit, "debug exit without the port"),
            Some(other) => panic!("a port or MMIO access asked for {other:?}"),
        }
    }
});

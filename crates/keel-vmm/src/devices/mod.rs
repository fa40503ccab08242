//! The legacy platform devices keel puts in every VM (the debug-exit port only with
//! `--debug-exit`), and their ports.
//!
//! | port(s) | device |
//! |---|---|
//! | 0x3f8-0x3ff | 16550 UART (COM1), IRQ 4 |
//! | 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 | 8259 pair and ELCR (keel-irqchip; with `--irqchip kernel`, KVM's) |
//! | 0x40-0x43, 0x61 | 8254 PIT and port B (keel-irqchip; with `--irqchip kernel`, KVM's) |
//! | 0x60, 0x64 | i8042 (keyboard controller): only the CPU reset line (0xfe to 0x64) |
//! | 0x600-0x601 | ACPI PM1a control block: SLP_TYP=5 with SLP_EN powers off |
//! | 0x604-0x607 | ACPI PM1a event block (status/enable): the power button (QMP `system_powerdown`) raises the SCI, IRQ 9 |
//! | 0xf4-0xf7 | debug exit (`--debug-exit` only): the value written becomes keel's exit status |
//! | 0xcf8-0xcff | PCI configuration mechanism #1 (keel-pci) |
//!
//! MMIO 0xfec00000-0xfec0001f: the IOAPIC (keel-irqchip's, or KVM's with `--irqchip kernel`).
//!
//! PCI: one segment, bus 0, a host bridge at 00.0, ECAM at 0xe0000000 (published in the
//! ACPI MCFG table). `--device pci-test` adds [the test device](pci_test) to it.
//!
//! Virtio devices (`--device virtio-echo`) go on that segment over virtio-pci (MSI-X, one
//! vector per queue plus one for configuration, ioeventfd doorbells), or with
//! `--transport mmio` over virtio-mmio: 4 KiB each in the platform MMIO window from
//! 0xf0000000, IOAPIC pins from 5 up, announced by `virtio_mmio.device=4K@BASE:IRQ` words
//! appended to the kernel command line.
//!
//! QEMU's `isa-debug-exit,iobase=0xf4,iosize=4` sits at the same port, so a test guest can
//! end itself the same way under both (QEMU reports `(value << 1) | 1`).

mod acpi_pm;
mod debug_exit;
mod i8042;
mod pci_test;
mod serial;

pub use acpi_pm::{AcpiPm, PM1A_CNT_PORT, PM1A_EVT_PORT, SLP_TYP_S5};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT};
pub use i8042::{I8042, I8042_CMD_PORT, I8042_DATA_PORT};
pub use pci_test::{pci_test_function, PCI_TEST_VECTORS};
pub use serial::{CappedFile, Serial, SerialOutput, COM1_IRQ, COM1_PORT};

use std::sync::Arc;

use keel_bus::PioDevice;

/// The legacy devices' port ranges as keel places them (the table above): `(first port,
/// length, device)`. The i8042 takes 0x60 and 0x64 only (0x61 is the PIT's port B); the
/// debug-exit port is there when `debug_exit` is given.
pub fn legacy_ports(
    serial: Arc<Serial>,
    i8042: Arc<I8042>,
    pm: Arc<AcpiPm>,
    debug_exit: Option<Arc<DebugExit>>,
) -> Vec<(u16, u64, Arc<dyn PioDevice>)> {
    let mut pio: Vec<(u16, u64, Arc<dyn PioDevice>)> = vec![
        (COM1_PORT, 8, serial),
        (I8042_DATA_PORT, 1, i8042.clone()),
        (
            I8042_CMD_PORT,
            1,
            Arc::new(PortOffset(
                i8042,
                u64::from(I8042_CMD_PORT - I8042_DATA_PORT),
            )),
        ),
        (PM1A_CNT_PORT, 8, pm),
    ];
    if let Some(d) = debug_exit {
        pio.push((DEBUG_EXIT_PORT, 4, d));
    }
    pio
}

/// A port device seen from `offset` ports above where it is inserted (a device that spans
/// a gap another device fills, such as the i8042's 0x60 and 0x64 around port 0x61).
struct PortOffset<D>(Arc<D>, u64);

impl<D: PioDevice> PioDevice for PortOffset<D> {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        self.0.pio_read(offset + self.1, data)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        self.0.pio_write(offset + self.1, data)
    }
}

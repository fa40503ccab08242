//! A small PCI device for end-to-end tests of the PCI stack: one 4 KiB memory BAR and
//! MSI-X with two vectors.
//!
//! BAR 0 layout:
//!
//! | offset | register |
//! |---|---|
//! | 0x000 | magic, read-only: `0x4c45454b` ("KEEL") |
//! | 0x004 | scratch, read-write |
//! | 0x008 | doorbell, write-only: writing `n` raises MSI-X vector `n` |
//! | 0x00c | doorbells rung so far, read-only |
//! | 0x800 | MSI-X table (2 vectors) |
//! | 0xc00 | MSI-X PBA |

use std::sync::Arc;

use keel_bus::interrupt::MsiGroup;
use keel_pci::bar::BarSpec;
use keel_pci::config::ConfigSpace;
use keel_pci::function::FunctionError;
use keel_pci::{MsixLayout, PciDevice, PciFunction};

/// Vendor ID of the test device (a project-local value, not a PCI-SIG assignment).
pub const PCI_TEST_VENDOR: u16 = 0x6b65;
/// Device ID of the test device.
pub const PCI_TEST_DEVICE: u16 = 0x0001;
/// Value of the magic register.
pub const PCI_TEST_MAGIC: u32 = 0x4c45_454b;
/// MSI-X vectors.
pub const PCI_TEST_VECTORS: u16 = 2;

struct PciTest {
    scratch: u32,
    rung: u32,
    msix: Arc<dyn MsiGroup>,
}

impl PciDevice for PciTest {
    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        let reg = match offset & !3 {
            0x0 => PCI_TEST_MAGIC,
            0x4 => self.scratch,
            0xc => self.rung,
            _ => 0,
        };
        let bytes = reg.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get((offset & 3) as usize + i).copied().unwrap_or(0);
        }
    }

    fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(v);
        match offset {
            0x4 => self.scratch = v,
            0x8 => {
                self.rung = self.rung.wrapping_add(1);
                // The group applies the MSI-X masks the PCI model gave it: a masked vector
                // stays pending and shows in the PBA.
                if let Err(e) = self.msix.trigger(v as usize) {
                    log::warn!("pci-test: doorbell {v}: {e}");
                }
            }
            _ => {}
        }
    }
}

/// Builds the test device's PCI function, raising interrupts through `msix` (at least
/// [`PCI_TEST_VECTORS`] vectors).
pub fn pci_test_function(msix: Arc<dyn MsiGroup>) -> Result<PciFunction, FunctionError> {
    let cfg = ConfigSpace::new(PCI_TEST_VENDOR, PCI_TEST_DEVICE, 0xff, 0x00, 0x00);
    let dev = PciTest {
        scratch: 0,
        rung: 0,
        msix: msix.clone(),
    };
    PciFunction::new(cfg, Box::new(dev))
        .with_bar(0, BarSpec::mem32(0x1000, false)?)?
        .with_msix(
            MsixLayout {
                vectors: PCI_TEST_VECTORS,
                table_bar: 0,
                table_offset: 0x800,
                pba_bar: 0,
                pba_offset: 0xc00,
            },
            msix,
        )
}

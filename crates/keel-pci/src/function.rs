//! One PCI function: configuration space, BARs, MSI/MSI-X and INTx around a device model.

use std::sync::Arc;

use keel_bus::interrupt::{InterruptLine, MsiGroup};

use crate::bar::{BarError, BarKind, BarSpec, NUM_BARS};
use crate::config::{command, reg, status, ConfigError, ConfigSpace};
use crate::msi::Msi;
use crate::msix::{Msix, MsixLayout};
use keel_bus::ErrorChain;

/// The device-specific part of a PCI function.
///
/// The function handles configuration space, BAR decoding, MSI and MSI-X; the model sees
/// accesses to its BARs (except the MSI-X table and PBA) and hears about BAR moves.
pub trait PciDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` in BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A guest write at `offset` in BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// BAR `bar` moved from `old` to `new` (`None`: not decoded). Called before the bus
    /// ranges move, while the function is locked. A device with doorbell ioeventfds in the
    /// BAR registers them at `new` here first, then unregisters them at `old`, so no guest
    /// notification falls in a gap.
    fn bar_moved(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
        let _ = (bar, old, new);
    }
    /// The guest wrote `len` bytes of configuration space at `offset` (after masks were
    /// applied): for devices with registers in their own capabilities.
    fn config_written(&mut self, cfg: &ConfigSpace, offset: usize, len: usize) {
        let _ = (cfg, offset, len);
    }
    /// The guest reads `data.len()` bytes of configuration space at `offset`; `data` holds
    /// what the function reads there. A device with registers in its own capabilities
    /// whose value is computed at read time (virtio's PCI configuration access window, for
    /// example) replaces those bytes.
    fn config_read(&mut self, cfg: &ConfigSpace, offset: usize, data: &mut [u8]) {
        let _ = (cfg, offset, data);
    }
}

/// A BAR that changed where it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarChange {
    /// BAR index.
    pub bar: u8,
    /// Its kind.
    pub kind: BarKind,
    /// Its size.
    pub size: u64,
    /// Where it decoded before.
    pub old: Option<u64>,
    /// Where it decodes now.
    pub new: Option<u64>,
}

/// Errors while building a function.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FunctionError {
    /// A BAR could not be defined.
    #[error("cannot define the BAR")]
    Bar(#[from] BarError),
    /// A capability (MSI, MSI-X or the device's own) could not be added.
    #[error("cannot add the capability to configuration space")]
    Config(#[from] ConfigError),
    /// The MSI-X table or PBA lies outside its BAR, or in an undefined or I/O BAR.
    #[error("the MSI-X table or PBA does not fit in its memory BAR")]
    MsixPlacement,
}

struct Intx {
    line: Arc<dyn InterruptLine>,
    asserted: bool,
}

/// A PCI function ready to be placed on a segment.
pub struct PciFunction {
    cfg: ConfigSpace,
    bars: [Option<BarSpec>; NUM_BARS],
    decoded: [Option<u64>; NUM_BARS],
    msix: Option<Msix>,
    msi: Option<Msi>,
    intx: Option<Intx>,
    device: Box<dyn PciDevice>,
}

impl PciFunction {
    /// A function with the given header and no BARs or capabilities yet.
    pub fn new(cfg: ConfigSpace, device: Box<dyn PciDevice>) -> Self {
        PciFunction {
            cfg,
            bars: [None; NUM_BARS],
            decoded: [None; NUM_BARS],
            msix: None,
            msi: None,
            intx: None,
            device,
        }
    }

    /// Defines BAR `index`.
    pub fn with_bar(mut self, index: usize, spec: BarSpec) -> Result<Self, FunctionError> {
        let wide = matches!(spec.kind, BarKind::Memory64 { .. });
        if index >= NUM_BARS || (wide && index + 1 >= NUM_BARS) {
            return Err(BarError::BadIndex(index).into());
        }
        let taken = |i: usize| {
            self.bars[i].is_some()
                || (i > 0
                    && matches!(
                        self.bars[i - 1],
                        Some(BarSpec {
                            kind: BarKind::Memory64 { .. },
                            ..
                        })
                    ))
        };
        if taken(index) || (wide && self.bars[index + 1].is_some()) {
            return Err(BarError::Taken(index).into());
        }
        spec.install(&mut self.cfg, index);
        self.bars[index] = Some(spec);
        Ok(self)
    }

    /// Adds an MSI-X capability with its table and PBA in memory BARs already defined.
    pub fn with_msix(
        mut self,
        layout: MsixLayout,
        group: Arc<dyn MsiGroup>,
    ) -> Result<Self, FunctionError> {
        let fits = |bar: u8, off: u32, len: u64| {
            self.bars
                .get(usize::from(bar))
                .copied()
                .flatten()
                .is_some_and(|b| !b.kind.is_io() && u64::from(off) + len <= b.size && off % 8 == 0)
        };
        if !fits(layout.table_bar, layout.table_offset, layout.table_len())
            || !fits(layout.pba_bar, layout.pba_offset, layout.pba_len())
        {
            return Err(FunctionError::MsixPlacement);
        }
        self.msix = Some(Msix::new(&mut self.cfg, layout, group)?);
        Ok(self)
    }

    /// Adds an MSI capability with `vectors` vectors (a power of two up to 32).
    pub fn with_msi(
        mut self,
        vectors: u32,
        group: Arc<dyn MsiGroup>,
    ) -> Result<Self, FunctionError> {
        self.msi = Some(Msi::new(&mut self.cfg, vectors, group)?);
        Ok(self)
    }

    /// Connects INTx: `pin` 1-4 (INTA#-INTD#) reported in the interrupt pin register,
    /// `irq` the line number reported in the interrupt line register, `line` the wire.
    pub fn with_intx(mut self, pin: u8, irq: u8, line: Arc<dyn InterruptLine>) -> Self {
        self.cfg.set_u8(reg::INTERRUPT_PIN, pin);
        self.cfg.set_u8(reg::INTERRUPT_LINE, irq);
        self.intx = Some(Intx {
            line,
            asserted: false,
        });
        self
    }

    /// Adds a capability owned by the device model (vendor-specific ones, for example).
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, FunctionError> {
        Ok(self.cfg.add_capability(id, body, writable)?)
    }

    /// The configuration space (device-side view).
    pub fn config(&self) -> &ConfigSpace {
        &self.cfg
    }

    /// The BAR definitions.
    pub fn bars(&self) -> &[Option<BarSpec>; NUM_BARS] {
        &self.bars
    }

    /// Where each BAR decodes now.
    pub fn decoded(&self) -> [Option<u64>; NUM_BARS] {
        self.decoded
    }

    /// The device model.
    pub fn device_mut(&mut self) -> &mut dyn PciDevice {
        self.device.as_mut()
    }

    /// A guest configuration read.
    pub fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.cfg.read(offset, data);
        if let Some(msi) = &self.msi {
            // The MSI pending bits are computed, not stored.
            let p = msi.pending_offset();
            let bits = msi.pending_bits().to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(k) = (offset + i).checked_sub(p).filter(|&k| k < 4) {
                    *b = bits[k];
                }
            }
        }
        self.device.config_read(&self.cfg, offset, data);
    }

    /// A guest configuration write. Returns the BARs whose decoding changed; the segment
    /// moves their bus ranges.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarChange> {
        let before_cmd = self.cfg.command();
        self.cfg.write(offset, data);
        let end = offset + data.len();
        if let Some(msix) = &mut self.msix {
            let cap = msix.cap_offset();
            if offset < cap + 4 && end > cap + 2 {
                msix.control_written(&self.cfg);
            }
        }
        if let Some(msi) = &mut self.msi {
            if msi.covers(offset, data.len()) {
                msi.written(&self.cfg);
            }
        }
        if (before_cmd ^ self.cfg.command()) & command::INTX_DISABLE != 0 {
            self.drive_intx();
        }
        self.device.config_written(&self.cfg, offset, data.len());
        self.redecode()
    }

    /// Recomputes where every BAR decodes and returns the changes (and records them).
    pub(crate) fn redecode(&mut self) -> Vec<BarChange> {
        let mut changes = Vec::new();
        for (i, spec) in self.bars.iter().enumerate() {
            let Some(spec) = spec else { continue };
            let new = spec.decoded(&self.cfg, i);
            if new != self.decoded[i] {
                changes.push(BarChange {
                    bar: i as u8,
                    kind: spec.kind,
                    size: spec.size,
                    old: self.decoded[i],
                    new,
                });
                self.decoded[i] = new;
            }
        }
        changes
    }

    /// Records that BAR `bar` could not be placed where the guest put it (it overlaps
    /// another device): it does not decode until the guest moves it again.
    pub(crate) fn mark_undecoded(&mut self, bar: u8) {
        self.decoded[usize::from(bar)] = None;
    }

    /// Programs BAR `index`'s address from the VMM side (initial placement).
    pub(crate) fn place_bar(&mut self, index: usize, addr: u64) {
        if let Some(spec) = self.bars[index] {
            spec.set_address(&mut self.cfg, index, addr);
        }
    }

    /// Turns on decoding of memory and I/O BARs, as firmware would.
    pub(crate) fn enable_decoding(&mut self) {
        let cmd = self.cfg.command() | command::MEMORY | command::IO;
        self.cfg.set_u16(reg::COMMAND, cmd);
    }

    /// A guest read in BAR `bar`.
    pub fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match &self.msix {
            Some(m) if m.claims(bar, offset, data.len()) => m.read(bar, offset, data),
            _ => self.device.bar_read(bar, offset, data),
        }
    }

    /// A guest write in BAR `bar`.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match &mut self.msix {
            Some(m) if m.claims(bar, offset, data.len()) => m.write(&self.cfg, bar, offset, data),
            _ => self.device.bar_write(bar, offset, data),
        }
    }

    /// Raises MSI-X vector `v` (or, with MSI enabled instead, MSI vector `v`).
    pub fn trigger_msi(&mut self, v: usize) {
        match (&mut self.msix, &mut self.msi) {
            (Some(m), _) if m.enabled(&self.cfg) => m.trigger(&self.cfg, v),
            (_, Some(m)) if m.enabled(&self.cfg) => m.trigger(&self.cfg, v as u32),
            (Some(m), _) => m.trigger(&self.cfg, v),
            (None, Some(m)) => m.trigger(&self.cfg, v as u32),
            (None, None) => {}
        }
    }

    /// Sets the INTx level. The line follows unless the guest set INTx disable; the status
    /// register's interrupt bit always shows the device's state.
    pub fn set_intx(&mut self, asserted: bool) {
        if let Some(i) = &mut self.intx {
            i.asserted = asserted;
        }
        self.drive_intx();
    }

    fn drive_intx(&mut self) {
        let Some(i) = &self.intx else { return };
        let st = self.cfg.read_u16(reg::STATUS);
        let st = if i.asserted {
            st | status::INTERRUPT
        } else {
            st & !status::INTERRUPT
        };
        self.cfg.set_u16(reg::STATUS, st);
        let level = i.asserted && self.cfg.command() & command::INTX_DISABLE == 0;
        if let Err(e) = i.line.set_level(level) {
            log::warn!("INTx: {}", ErrorChain(&e));
        }
    }
}

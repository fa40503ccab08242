//! A PCI segment: bus 0 with a host bridge, configuration access through CF8/CFC and
//! ECAM, BAR placement and relocation on the VMM's buses.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};

use keel_bus::{BusRange, MmioBus, MmioDevice, PioBus, PioDevice};
use keel_memory::SystemAllocator;

use crate::bar::BarKind;
use crate::config::ConfigSpace;
use crate::function::{BarChange, PciDevice, PciFunction};
use keel_bus::ErrorChain;

/// Device slots on a bus.
pub const DEVICES_PER_BUS: usize = 32;
/// The CONFIG_ADDRESS port of configuration mechanism #1; CONFIG_DATA is at +4.
pub const CONFIG_IO_PORT: u64 = 0xcf8;
/// Bytes of ECAM space per bus.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Errors from segment operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// Every device slot is taken.
    #[error("no free device slot on bus 0")]
    Full,
    /// The slot is empty (or holds the host bridge, which cannot be removed).
    #[error("no removable device in slot {0}")]
    NoDevice(u8),
    /// A BAR could not be given an address.
    #[error("cannot place BAR {bar}")]
    Placement {
        /// BAR index.
        bar: u8,
        /// The allocator's error.
        #[source]
        source: keel_memory::AllocatorError,
    },
    /// A removed device's BAR space could not be returned to the allocator (it is not the
    /// allocator the device was added with).
    #[error("cannot return the space of BAR {bar} to the allocator")]
    Release {
        /// BAR index.
        bar: u8,
        /// The allocator's error.
        #[source]
        source: keel_memory::AllocatorError,
    },
    /// The PIO bus refused the CONFIG_ADDRESS/CONFIG_DATA ports.
    #[error("cannot place the configuration ports 0xcf8-0xcff on the PIO bus")]
    ConfigPorts(#[source] keel_bus::Error),
    /// The MMIO bus refused the ECAM window.
    #[error("cannot place the ECAM window at {base:#x} on the MMIO bus")]
    Ecam {
        /// Where the window was to go.
        base: u64,
        /// The bus's error.
        #[source]
        source: keel_bus::Error,
    },
}

/// What the VMM publishes in the ACPI MCFG table for this segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McfgEntry {
    /// ECAM base address.
    pub base: u64,
    /// PCI segment group number.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// A function as the segment and its BAR windows share it. Accesses clone the `Arc` for
/// their duration; removal takes the function out under the lock, so an access that
/// raced with it finds `None` and behaves as if the slot were empty.
type Slot = Arc<Mutex<Option<PciFunction>>>;

fn lock(f: &Slot) -> MutexGuard<'_, Option<PciFunction>> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An occupied slot: the function, and what the allocator gave each of its BARs (given
/// back on removal, wherever the guest has moved the BAR since).
struct Entry {
    function: Slot,
    placed: Vec<(u8, BarKind, (u64, u64))>,
}

/// A BAR's range on a bus, forwarding to its function.
struct BarWindow {
    function: Weak<Mutex<Option<PciFunction>>>,
    bar: u8,
}

impl BarWindow {
    fn with(&self, f: impl FnOnce(&mut PciFunction)) {
        if let Some(func) = self.function.upgrade() {
            if let Some(function) = lock(&func).as_mut() {
                f(function);
            }
        }
    }
}

impl MmioDevice for BarWindow {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let mut out = vec![0xff; data.len()];
        self.with(|f| f.bar_read(self.bar, offset, &mut out));
        data.copy_from_slice(&out);
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.with(|f| f.bar_write(self.bar, offset, data));
    }
}

impl PioDevice for BarWindow {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data)
    }
}

/// The host bridge's (empty) device model.
struct HostBridge;
impl PciDevice for HostBridge {
    fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

/// Bus 0 of a PCI segment.
pub struct PciSegment {
    slots: RwLock<Vec<Option<Entry>>>,
    config_address: Mutex<u32>,
    ecam_base: u64,
    mmio: Arc<MmioBus>,
    pio: Arc<PioBus>,
}

/// The host bridge's vendor and device IDs (Red Hat's "QEMU PCIe host bridge", which
/// guests know needs no driver).
pub const HOST_BRIDGE_ID: (u16, u16) = (0x1b36, 0x0008);

impl PciSegment {
    /// A segment whose BARs go on `mmio` and `pio`, with ECAM at `ecam_base` (one bus),
    /// and a host bridge in slot 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use keel_bus::{MmioBus, PioBus};
    /// use keel_pci::config::reg;
    /// use keel_pci::segment::{PciSegment, CONFIG_IO_PORT, HOST_BRIDGE_ID};
    ///
    /// let (mmio, pio) = (Arc::new(MmioBus::new()), Arc::new(PioBus::new()));
    /// let segment = Arc::new(PciSegment::new(mmio.clone(), pio.clone(), 0xe000_0000));
    /// PciSegment::attach_config_access(&segment)?;
    /// assert_eq!(segment.mcfg().base, 0xe000_0000);
    ///
    /// // The host bridge's IDs, through ECAM (bus 0, device 0) and through CF8/CFC.
    /// let mut id = [0u8; 4];
    /// mmio.read(0xe000_0000 + reg::VENDOR_ID as u64, &mut id)?;
    /// let bridge = u32::from(HOST_BRIDGE_ID.0) | u32::from(HOST_BRIDGE_ID.1) << 16;
    /// assert_eq!(u32::from_le_bytes(id), bridge);
    /// pio.write(CONFIG_IO_PORT, &0x8000_0000u32.to_le_bytes())?;
    /// pio.read(CONFIG_IO_PORT + 4, &mut id)?;
    /// assert_eq!(u32::from_le_bytes(id), bridge);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(mmio: Arc<MmioBus>, pio: Arc<PioBus>, ecam_base: u64) -> Self {
        let bridge = PciFunction::new(
            ConfigSpace::new(HOST_BRIDGE_ID.0, HOST_BRIDGE_ID.1, 0x06, 0x00, 0x00),
            Box::new(HostBridge),
        );
        let mut slots: Vec<Option<Entry>> = (0..DEVICES_PER_BUS).map(|_| None).collect();
        slots[0] = Some(Entry {
            function: Arc::new(Mutex::new(Some(bridge))),
            placed: Vec::new(),
        });
        PciSegment {
            slots: RwLock::new(slots),
            config_address: Mutex::new(0),
            ecam_base,
            mmio,
            pio,
        }
    }

    /// The MCFG entry describing this segment's ECAM window.
    pub fn mcfg(&self) -> McfgEntry {
        McfgEntry {
            base: self.ecam_base,
            segment: 0,
            start_bus: 0,
            end_bus: 0,
        }
    }

    /// Size of the ECAM window to place on the MMIO bus.
    pub fn ecam_size(&self) -> u64 {
        ECAM_BUS_SIZE
    }

    /// Places the CF8/CFC ports and the ECAM window of `segment` on its buses. The bus
    /// entries refer to the segment weakly (the segment owns the buses' references to it
    /// through its BAR windows, and a strong link back would be a cycle): keep the
    /// `Arc<PciSegment>` alive for as long as the guest may access configuration space.
    pub fn attach_config_access(segment: &Arc<PciSegment>) -> Result<(), SegmentError> {
        BusRange::new(CONFIG_IO_PORT, 8)
            .and_then(|r| {
                segment
                    .pio
                    .insert(r, Arc::new(ConfigIo(Arc::downgrade(segment))))
            })
            .map_err(SegmentError::ConfigPorts)?;
        let base = segment.ecam_base;
        BusRange::new(base, ECAM_BUS_SIZE)
            .and_then(|r| {
                segment
                    .mmio
                    .insert(r, Arc::new(Ecam(Arc::downgrade(segment))))
            })
            .map_err(|source| SegmentError::Ecam { base, source })?;
        Ok(())
    }

    fn slot(&self, device: usize) -> Option<Slot> {
        self.slots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(device)
            .and_then(Option::as_ref)
            .map(|e| e.function.clone())
    }

    /// Adds `function` in the first free slot: gives each BAR an address from `alloc`
    /// (aligned to its size), turns decoding on as firmware would, and maps the BARs.
    /// Returns the slot (device number). On error nothing is kept from `alloc`.
    pub fn add_device(
        &self,
        mut function: PciFunction,
        alloc: &mut SystemAllocator,
    ) -> Result<u8, SegmentError> {
        let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
        let free = slots
            .iter()
            .position(Option::is_none)
            .ok_or(SegmentError::Full)?;
        let specs = *function.bars();
        let mut placed = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let Some(spec) = spec else { continue };
            let bar = i as u8;
            let allocation = match spec.kind {
                BarKind::Io => alloc.allocate_pio(spec.size, spec.size),
                BarKind::Memory32 { .. } => alloc.allocate_mmio32(spec.size, spec.size.max(4096)),
                BarKind::Memory64 { .. } => alloc.allocate_mmio64(spec.size, spec.size.max(4096)),
            };
            match allocation {
                Ok(a) => {
                    function.place_bar(i, a.0);
                    placed.push((bar, spec.kind, a));
                }
                Err(source) => {
                    // Give back what the BARs before this one got. Freeing a range just
                    // handed out cannot fail; if it somehow did, the error that matters is
                    // still the placement one.
                    let _ = release(alloc, &placed);
                    return Err(SegmentError::Placement { bar, source });
                }
            }
        }
        function.enable_decoding();
        let slot: Slot = Arc::new(Mutex::new(None));
        {
            let mut guard = lock(&slot);
            let f = guard.insert(function);
            let changes = f.redecode();
            self.apply(&slot, f, &changes);
        }
        slots[free] = Some(Entry {
            function: slot,
            placed,
        });
        Ok(free as u8)
    }

    /// Removes the device in slot `device`, unmaps its BARs and returns their space to
    /// `alloc` (the allocator it was added with). Configuration and BAR accesses in flight
    /// on other threads are waited for; any that arrive later find an empty slot. Once
    /// this returns the device model is no longer called.
    ///
    /// With the wrong allocator the device is still removed (and dropped) and
    /// [`SegmentError::Release`] names the first BAR whose space could not be returned.
    pub fn remove_device(
        &self,
        device: u8,
        alloc: &mut SystemAllocator,
    ) -> Result<PciFunction, SegmentError> {
        let entry = {
            let mut slots = self.slots.write().unwrap_or_else(PoisonError::into_inner);
            match slots.get_mut(usize::from(device)) {
                Some(e @ Some(_)) if device != 0 => e.take(),
                _ => None,
            }
        }
        .ok_or(SegmentError::NoDevice(device))?;
        // The slot table is not held from here on: an access in flight may hold this
        // function's lock while it reaches for another slot.
        let function = {
            let mut guard = lock(&entry.function);
            let mut f = guard.take().ok_or(SegmentError::NoDevice(device))?;
            let changes: Vec<BarChange> = f
                .decoded()
                .iter()
                .enumerate()
                .filter_map(|(i, d)| {
                    let spec = f.bars()[i]?;
                    d.map(|old| BarChange {
                        bar: i as u8,
                        kind: spec.kind,
                        size: spec.size,
                        old: Some(old),
                        new: None,
                    })
                })
                .collect();
            self.apply(&entry.function, &mut f, &changes);
            f
        };
        release(alloc, &entry.placed)?;
        Ok(function)
    }

    /// Runs `f` on the function in slot `device` while holding its lock.
    pub fn with_function<R>(&self, device: u8, f: impl FnOnce(&mut PciFunction) -> R) -> Option<R> {
        self.slot(usize::from(device))
            .and_then(|s| lock(&s).as_mut().map(f))
    }

    /// Moves bus ranges for `changes`: the device hears first (to move its doorbells,
    /// new before old), then the bus switches atomically. A range that collides with
    /// another device is left undecoded until the guest moves it again.
    fn apply(&self, slot: &Slot, f: &mut PciFunction, changes: &[BarChange]) {
        for ch in changes {
            f.device_mut().bar_moved(ch.bar, ch.old, ch.new);
            let result = if ch.kind.is_io() {
                self.move_range(&self.pio, slot, ch, |w| w as Arc<dyn PioDevice>)
            } else {
                self.move_range(&self.mmio, slot, ch, |w| w as Arc<dyn MmioDevice>)
            };
            if let Err(e) = result {
                log::warn!(
                    "BAR {} cannot decode at {:#x?}: {}",
                    ch.bar,
                    ch.new,
                    ErrorChain(&e)
                );
                f.mark_undecoded(ch.bar);
                f.device_mut().bar_moved(ch.bar, ch.new, None);
            }
        }
    }

    fn move_range<D: ?Sized + keel_bus::Dispatch>(
        &self,
        bus: &keel_bus::Bus<D>,
        slot: &Slot,
        ch: &BarChange,
        as_dev: impl Fn(Arc<BarWindow>) -> Arc<D>,
    ) -> Result<(), keel_bus::Error> {
        let new_range = ch.new.map(|a| BusRange::new(a, ch.size)).transpose()?;
        bus.transaction(|t| {
            match (ch.old, new_range) {
                (Some(old), Some(new)) => t.relocate(old, new),
                (None, Some(new)) => t.insert(
                    new,
                    as_dev(Arc::new(BarWindow {
                        function: Arc::downgrade(slot),
                        bar: ch.bar,
                    })),
                ),
                (Some(old), None) => t.remove(old).map(drop),
                (None, None) => Ok(()),
            }
            .inspect_err(|_| {
                // Could not move: take the old range down too, so the BAR is cleanly
                // undecoded rather than left where the guest no longer expects it.
                if let Some(old) = ch.old {
                    let _ = t.remove(old);
                }
            })
        })
    }

    /// A configuration read of function `func` of device `device` on bus `bus`.
    /// Absent functions read as all ones.
    pub fn config_read(&self, bus: u8, device: u8, func: u8, offset: usize, data: &mut [u8]) {
        let slot = match (bus, func) {
            (0, 0) => self.slot(usize::from(device)),
            _ => None,
        };
        let mut guard = slot.as_ref().map(lock);
        match guard.as_deref_mut() {
            Some(Some(f)) => f.config_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// A configuration write; BAR changes are applied to the buses before it returns.
    pub fn config_write(&self, bus: u8, device: u8, func: u8, offset: usize, data: &[u8]) {
        if let (0, 0, Some(s)) = (bus, func, self.slot(usize::from(device))) {
            if let Some(f) = lock(&s).as_mut() {
                let changes = f.config_write(offset, data);
                self.apply(&s, f, &changes);
            }
        }
    }
}

/// Returns BAR allocations to `alloc`, all of them even if one fails; the first failure is
/// the error.
fn release(
    alloc: &mut SystemAllocator,
    placed: &[(u8, BarKind, (u64, u64))],
) -> Result<(), SegmentError> {
    let mut result = Ok(());
    for &(bar, kind, a) in placed {
        let freed = match kind {
            BarKind::Io => alloc.free_pio(a),
            BarKind::Memory32 { .. } => alloc.free_mmio32(a),
            BarKind::Memory64 { .. } => alloc.free_mmio64(a),
        };
        if let (Ok(()), Err(source)) = (&result, freed) {
            result = Err(SegmentError::Release { bar, source });
        }
    }
    result
}

/// Configuration mechanism #1: CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc-0xcff.
struct ConfigIo(Weak<PciSegment>);

impl ConfigIo {
    /// (bus, device, function, register) selected by CONFIG_ADDRESS, if enabled.
    fn target(seg: &PciSegment) -> Option<(u8, u8, u8, usize)> {
        let a = *seg
            .config_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (a & 0x8000_0000 != 0).then_some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as usize,
        ))
    }
}

impl PioDevice for ConfigIo {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        let Some(seg) = self.0.upgrade() else {
            data.fill(0xff);
            return;
        };
        match offset {
            0 if data.len() == 4 => {
                let a = *seg
                    .config_address
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                data.copy_from_slice(&a.to_le_bytes());
            }
            4..=7 => match Self::target(&seg) {
                Some((b, d, f, r)) => seg.config_read(b, d, f, r + (offset as usize - 4), data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&self, offset: u64, data: &[u8]) {
        let Some(seg) = self.0.upgrade() else {
            return;
        };
        match offset {
            // Only dword accesses reach CONFIG_ADDRESS (byte accesses to 0xcf8-0xcfb are
            // other chipset registers on real hardware).
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
                *seg.config_address
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = v & 0x80ff_fffc;
            }
            4..=7 => {
                if let Some((b, d, f, r)) = Self::target(&seg) {
                    seg.config_write(b, d, f, r + (offset as usize - 4), data)
                }
            }
            _ => {}
        }
    }
}

/// PCI Express enhanced configuration access (memory-mapped, 4 KiB per function).
struct Ecam(Weak<PciSegment>);

impl Ecam {
    fn decode(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl MmioDevice for Ecam {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r) = Self::decode(offset);
        match self.0.upgrade() {
            Some(seg) => seg.config_read(b, d, f, r, data),
            None => data.fill(0xff),
        }
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let (b, d, f, r) = Self::decode(offset);
        if let Some(seg) = self.0.upgrade() {
            seg.config_write(b, d, f, r, data)
        }
    }
}

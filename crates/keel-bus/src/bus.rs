//! Address-range buses that dispatch guest accesses to devices.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::device::{MmioDevice, PioDevice};

/// Errors from bus set-up and dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A range of zero length, or one whose end overflows `u64`.
    #[error("invalid bus range: base {base:#x}, length {len:#x}")]
    InvalidRange {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The new range overlaps a range already on the bus.
    #[error("bus range {new} overlaps existing range {existing}")]
    Overlap {
        /// The range being inserted.
        new: BusRange,
        /// The range already present.
        existing: BusRange,
    },
    /// No device range starts at this base.
    #[error("no device at base {0:#x}")]
    NotFound(u64),
    /// No device covers the accessed address.
    #[error("no device at {addr:#x} (access of {len} bytes)")]
    Unmapped {
        /// Accessed address.
        addr: u64,
        /// Access size in bytes.
        len: usize,
    },
    /// The access starts inside a device's range but runs past its end.
    #[error("access of {len} bytes at {addr:#x} crosses the end of {range}")]
    Straddle {
        /// Accessed address.
        addr: u64,
        /// Access size in bytes.
        len: usize,
        /// The range the access starts in.
        range: BusRange,
    },
}

/// Result alias for bus operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A non-empty, non-wrapping range of bus addresses `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusRange {
    base: u64,
    len: u64,
}

impl BusRange {
    /// Creates a range; fails on a zero length or when `base + len` would overflow.
    pub fn new(base: u64, len: u64) -> Result<Self> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(Error::InvalidRange { base, len });
        }
        Ok(BusRange { base, len })
    }
    /// First address of the range.
    pub fn base(&self) -> u64 {
        self.base
    }
    /// Number of addresses in the range.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: ranges are never empty. Present for API symmetry with collections.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Last address of the range (inclusive).
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }
    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr <= self.last()
    }
    /// Whether two ranges share an address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.base, self.last())
    }
}

/// How a bus calls its device type. Implemented for `dyn PioDevice` and `dyn MmioDevice`.
pub trait Dispatch: Send + Sync {
    /// Forwards a read at `offset` within the device's range.
    fn dispatch_read(&self, offset: u64, data: &mut [u8]);
    /// Forwards a write at `offset` within the device's range.
    fn dispatch_write(&self, offset: u64, data: &[u8]);
}

impl Dispatch for dyn PioDevice {
    fn dispatch_read(&self, offset: u64, data: &mut [u8]) {
        self.pio_read(offset, data)
    }
    fn dispatch_write(&self, offset: u64, data: &[u8]) {
        self.pio_write(offset, data)
    }
}

impl Dispatch for dyn MmioDevice {
    fn dispatch_read(&self, offset: u64, data: &mut [u8]) {
        self.mmio_read(offset, data)
    }
    fn dispatch_write(&self, offset: u64, data: &[u8]) {
        self.mmio_write(offset, data)
    }
}

struct Entry<D: ?Sized> {
    range: BusRange,
    device: Arc<D>,
}

/// A set of non-overlapping address ranges, each owned by a device.
///
/// Lookups are a binary search over ranges sorted by base. The table sits behind a
/// reader-writer lock: vCPU threads dispatch concurrently under the read lock (held only for
/// the lookup, never while a device runs), and changes such as [`Bus::relocate`] take the
/// write lock, so every access sees either the old layout or the new one, never a mix.
pub struct Bus<D: ?Sized> {
    entries: RwLock<Vec<Entry<D>>>,
}

/// The port I/O bus.
pub type PioBus = Bus<dyn PioDevice>;
/// The MMIO bus.
pub type MmioBus = Bus<dyn MmioDevice>;

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus {
            entries: RwLock::new(Vec::new()),
        }
    }
}

impl<D: ?Sized> fmt::Debug for Bus<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .map(|e| e.range),
            )
            .finish()
    }
}

impl<D: ?Sized + Dispatch> Bus<D> {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_table(&self) -> RwLockReadGuard<'_, Vec<Entry<D>>> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_table(&self) -> RwLockWriteGuard<'_, Vec<Entry<D>>> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Index of the entry whose range could contain `addr`: the last one with base <= addr.
    fn candidate(table: &[Entry<D>], addr: u64) -> Option<usize> {
        table
            .partition_point(|e| e.range.base <= addr)
            .checked_sub(1)
    }

    fn check_free(table: &[Entry<D>], range: BusRange, ignore: Option<u64>) -> Result<()> {
        let clash = table
            .iter()
            .filter(|e| Some(e.range.base) != ignore)
            .find(|e| e.range.overlaps(&range));
        match clash {
            Some(e) => Err(Error::Overlap {
                new: range,
                existing: e.range,
            }),
            None => Ok(()),
        }
    }

    /// Places `device` at `range`. Fails if the range overlaps one already on the bus.
    pub fn insert(&self, range: BusRange, device: Arc<D>) -> Result<()> {
        self.transaction(|t| t.insert(range, device))
    }

    /// Removes the device whose range starts at `base` and returns it with its range.
    pub fn remove(&self, base: u64) -> Result<(BusRange, Arc<D>)> {
        self.transaction(|t| t.remove(base))
    }

    /// Moves the device whose range starts at `old_base` to `new_range`, in one step.
    ///
    /// Concurrent accesses see the device either at its old range or at its new one. On an
    /// error (no such device, or the new range overlaps another device) the bus is unchanged.
    pub fn relocate(&self, old_base: u64, new_range: BusRange) -> Result<()> {
        self.transaction(|t| t.relocate(old_base, new_range))
    }

    /// Runs `f` while holding the bus's write lock, so that it can change other state (for
    /// example re-register an ioeventfd) atomically with respect to dispatch on this bus.
    /// `f` receives a [`BusTxn`] through which it may insert, remove and relocate devices.
    pub fn transaction<R>(&self, f: impl FnOnce(&mut BusTxn<'_, D>) -> R) -> R {
        let mut table = self.write_table();
        f(&mut BusTxn { table: &mut table })
    }

    /// Returns the device covering `[addr, addr + len)`, its range, and the offset of `addr`.
    pub fn resolve(&self, addr: u64, len: usize) -> Result<(Arc<D>, BusRange, u64)> {
        let table = self.read_table();
        let idx = Self::candidate(&table, addr).ok_or(Error::Unmapped { addr, len })?;
        let e = &table[idx];
        if !e.range.contains(addr) {
            return Err(Error::Unmapped { addr, len });
        }
        let offset = addr - e.range.base;
        // An empty access is treated as one byte for the bounds check.
        let span = (len.max(1) as u64) - 1;
        if offset
            .checked_add(span)
            .is_none_or(|end| end >= e.range.len)
        {
            return Err(Error::Straddle {
                addr,
                len,
                range: e.range,
            });
        }
        Ok((Arc::clone(&e.device), e.range, offset))
    }

    /// Dispatches a read of `data.len()` bytes at `addr`.
    ///
    /// On [`Error::Unmapped`] or [`Error::Straddle`] the device is not called and `data` is
    /// left as it was; the caller decides what the guest sees (usually all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<()> {
        let (dev, _, offset) = self.resolve(addr, data.len())?;
        dev.dispatch_read(offset, data);
        Ok(())
    }

    /// Dispatches a write of `data` at `addr`. Errors as for [`Bus::read`].
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let (dev, _, offset) = self.resolve(addr, data.len())?;
        dev.dispatch_write(offset, data);
        Ok(())
    }

    /// The ranges currently on the bus, in address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        self.read_table().iter().map(|e| e.range).collect()
    }
}

/// Changes to a bus made inside [`Bus::transaction`].
pub struct BusTxn<'a, D: ?Sized> {
    table: &'a mut Vec<Entry<D>>,
}

impl<D: ?Sized + Dispatch> BusTxn<'_, D> {
    /// As [`Bus::insert`].
    pub fn insert(&mut self, range: BusRange, device: Arc<D>) -> Result<()> {
        Bus::<D>::check_free(self.table, range, None)?;
        let at = self.table.partition_point(|e| e.range.base < range.base);
        self.table.insert(at, Entry { range, device });
        Ok(())
    }

    /// As [`Bus::remove`].
    pub fn remove(&mut self, base: u64) -> Result<(BusRange, Arc<D>)> {
        let idx = self
            .table
            .binary_search_by_key(&base, |e| e.range.base)
            .map_err(|_| Error::NotFound(base))?;
        let e = self.table.remove(idx);
        Ok((e.range, e.device))
    }

    /// As [`Bus::relocate`].
    pub fn relocate(&mut self, old_base: u64, new_range: BusRange) -> Result<()> {
        let idx = self
            .table
            .binary_search_by_key(&old_base, |e| e.range.base)
            .map_err(|_| Error::NotFound(old_base))?;
        Bus::<D>::check_free(self.table, new_range, Some(old_base))?;
        let mut e = self.table.remove(idx);
        e.range = new_range;
        let at = self
            .table
            .partition_point(|x| x.range.base < new_range.base);
        self.table.insert(at, e);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MutPioDevice;
    use std::sync::Mutex;

    /// Records the last access so tests can check offset, size and data.
    #[derive(Default)]
    struct Recorder {
        id: u8,
        last_write: Option<(u64, Vec<u8>)>,
        last_read: Option<(u64, usize)>,
    }

    impl MutPioDevice for Recorder {
        fn pio_read(&mut self, offset: u64, data: &mut [u8]) {
            self.last_read = Some((offset, data.len()));
            data.fill(self.id);
        }
        fn pio_write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn dev(id: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            id,
            ..Default::default()
        }))
    }

    fn r(base: u64, len: u64) -> BusRange {
        BusRange::new(base, len).unwrap()
    }

    #[test]
    fn range_validation() {
        assert!(BusRange::new(0x10, 0).is_err());
        assert!(BusRange::new(u64::MAX, 2).is_err());
        let top = BusRange::new(u64::MAX, 1).unwrap();
        assert_eq!(top.last(), u64::MAX);
        assert!(BusRange::new(0, u64::MAX).is_ok());
        assert!(r(0x10, 0x10).overlaps(&r(0x1f, 1)));
        assert!(!r(0x10, 0x10).overlaps(&r(0x20, 1)));
        assert!(!r(0x10, 0x10).overlaps(&r(0x0, 0x10)));
    }

    #[test]
    fn overlap_rejected() {
        let bus = PioBus::new();
        bus.insert(r(0x100, 0x10), dev(1)).unwrap();
        for (base, len) in [
            (0x100, 0x10),
            (0xff, 2),
            (0x10f, 1),
            (0x0, 0x1000),
            (0x108, 4),
        ] {
            let err = bus.insert(r(base, len), dev(2)).unwrap_err();
            assert_eq!(
                err,
                Error::Overlap {
                    new: r(base, len),
                    existing: r(0x100, 0x10)
                }
            );
        }
        // Adjacent ranges are fine on both sides.
        bus.insert(r(0xf0, 0x10), dev(2)).unwrap();
        bus.insert(r(0x110, 0x10), dev(3)).unwrap();
        assert_eq!(
            bus.ranges(),
            vec![r(0xf0, 0x10), r(0x100, 0x10), r(0x110, 0x10)]
        );
    }

    #[test]
    fn dispatch_at_boundaries() {
        let bus = PioBus::new();
        let a = dev(0xa);
        let b = dev(0xb);
        bus.insert(r(0x3f8, 8), a.clone()).unwrap();
        bus.insert(r(0x400, 4), b.clone()).unwrap();

        let mut byte = [0u8; 1];
        bus.read(0x3f8, &mut byte).unwrap();
        assert_eq!(byte, [0xa]);
        assert_eq!(a.lock().unwrap().last_read, Some((0, 1)));
        bus.read(0x3ff, &mut byte).unwrap();
        assert_eq!(a.lock().unwrap().last_read, Some((7, 1)));
        bus.read(0x400, &mut byte).unwrap();
        assert_eq!(byte, [0xb]);

        // Just outside each range.
        assert_eq!(
            bus.read(0x3f7, &mut byte),
            Err(Error::Unmapped {
                addr: 0x3f7,
                len: 1
            })
        );
        assert_eq!(
            bus.read(0x404, &mut byte),
            Err(Error::Unmapped {
                addr: 0x404,
                len: 1
            })
        );
        // A 4-byte write at the last 2 bytes straddles the end; the device sees nothing.
        assert_eq!(
            bus.write(0x3fe, &[1, 2, 3, 4]),
            Err(Error::Straddle {
                addr: 0x3fe,
                len: 4,
                range: r(0x3f8, 8)
            })
        );
        assert_eq!(a.lock().unwrap().last_write, None);
        bus.write(0x3fc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(a.lock().unwrap().last_write, Some((4, vec![1, 2, 3, 4])));
    }

    #[test]
    fn dispatch_at_top_of_address_space() {
        let bus = PioBus::new();
        bus.insert(r(u64::MAX - 3, 4), dev(7)).unwrap();
        let mut data = [0u8; 4];
        bus.read(u64::MAX - 3, &mut data).unwrap();
        assert_eq!(data, [7; 4]);
        assert!(matches!(
            bus.read(u64::MAX, &mut data),
            Err(Error::Straddle { .. })
        ));
    }

    #[test]
    fn remove_and_relocate() {
        let bus = PioBus::new();
        let a = dev(1);
        bus.insert(r(0x1000, 0x100), a.clone()).unwrap();
        bus.insert(r(0x2000, 0x100), dev(2)).unwrap();
        // Relocation onto another device fails and leaves the bus unchanged.
        assert!(matches!(
            bus.relocate(0x1000, r(0x1f80, 0x100)),
            Err(Error::Overlap { .. })
        ));
        assert_eq!(bus.ranges(), vec![r(0x1000, 0x100), r(0x2000, 0x100)]);
        // Overlapping its own old range is fine.
        bus.relocate(0x1000, r(0x1080, 0x100)).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x1000, &mut b).is_err());
        bus.write(0x1080 + 5, &[9]).unwrap();
        assert_eq!(a.lock().unwrap().last_write, Some((5, vec![9])));
        bus.relocate(0x1080, r(0x3000, 0x10)).unwrap();
        assert_eq!(bus.ranges(), vec![r(0x2000, 0x100), r(0x3000, 0x10)]);
        assert_eq!(
            bus.relocate(0x1080, r(0x5000, 1)),
            Err(Error::NotFound(0x1080))
        );
        let (range, _) = bus.remove(0x3000).unwrap();
        assert_eq!(range, r(0x3000, 0x10));
        assert_eq!(bus.remove(0x3000).err(), Some(Error::NotFound(0x3000)));
    }

    /// While one thread moves a device back and forth, readers must always find it at
    /// exactly one of its two ranges: never both, never neither.
    #[test]
    fn relocation_is_atomic_for_concurrent_readers() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let bus = Arc::new(PioBus::new());
        bus.insert(r(0x1000, 0x10), dev(1)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (bus, stop, reads) = (bus.clone(), stop.clone(), reads.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // One consistent snapshot of the table.
                        let ranges = bus.ranges();
                        let at_old = ranges.contains(&r(0x1000, 0x10));
                        let at_new = ranges.contains(&r(0x8000, 0x10));
                        assert!(at_old ^ at_new, "device seen at {ranges:?}");
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let mut moves = 0u64;
        while reads.load(Ordering::Relaxed) < 20_000 || moves < 2_000 {
            bus.relocate(0x1000, r(0x8000, 0x10)).unwrap();
            bus.relocate(0x8000, r(0x1000, 0x10)).unwrap();
            moves += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for t in readers {
            t.join().expect("a reader saw a torn relocation");
        }
    }

    #[test]
    fn transaction_groups_changes() {
        let bus = PioBus::new();
        bus.insert(r(0x10, 1), dev(1)).unwrap();
        let res = bus.transaction(|t| {
            t.insert(r(0x20, 1), dev(2))?;
            t.relocate(0x10, r(0x30, 1))
        });
        res.unwrap();
        assert_eq!(bus.ranges(), vec![r(0x20, 1), r(0x30, 1)]);
    }
}

//! The guest physical address map and what is derived from it.

use std::fmt;

use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::x86::*;
use crate::{DirtyBitmap, GuestMemoryMmap, GIB, MIB};

/// Errors from building a layout or the guest memory it describes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The RAM size is below the minimum, above the maximum, or not page-aligned.
    #[error(
        "invalid RAM size {size:#x}: must be a multiple of 4 KiB between {min:#x} and {max:#x}"
    )]
    InvalidRamSize {
        /// Requested size.
        size: u64,
        /// Smallest accepted size.
        min: u64,
        /// Largest accepted size.
        max: u64,
    },
    /// The 64-bit MMIO window size is zero, unaligned or too large.
    #[error("invalid 64-bit MMIO window size {0:#x}: must be a non-zero multiple of 1 GiB, at most 256 GiB")]
    InvalidMmio64Size(u64),
    /// Mapping guest memory in the host failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// An `madvise` call for huge pages or prefaulting failed.
    #[error("madvise({advice}) on guest memory failed")]
    Madvise {
        /// Which advice was given.
        advice: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias for layout operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What occupies a range of guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionKind {
    /// Guest RAM: backed by host memory, reported as usable in e820.
    Ram,
    /// The legacy EBDA/VGA/BIOS area: backed by host memory (ACPI and MP tables live here),
    /// reported as reserved in e820.
    Firmware,
    /// Window for 32-bit PCI memory BARs.
    PciMmio32,
    /// PCI Express configuration space (ECAM); reserved in e820, as Linux expects for MCFG.
    Ecam,
    /// Window for platform MMIO devices such as virtio-mmio.
    PlatformMmio,
    /// IOAPIC registers.
    Ioapic,
    /// Local APIC registers.
    Lapic,
    /// KVM's identity-map page and TSS; reserved in e820.
    KvmPrivate,
    /// Window for 64-bit PCI memory BARs, above RAM.
    PciMmio64,
}

impl RegionKind {
    /// Whether host memory backs this region.
    pub fn is_backed(self) -> bool {
        matches!(self, RegionKind::Ram | RegionKind::Firmware)
    }

    /// How the region appears in the e820 map, if at all.
    pub fn e820_kind(self) -> Option<E820Kind> {
        match self {
            RegionKind::Ram => Some(E820Kind::Ram),
            RegionKind::Firmware | RegionKind::Ecam | RegionKind::KvmPrivate => {
                Some(E820Kind::Reserved)
            }
            _ => None,
        }
    }
}

/// A range of guest physical addresses and what occupies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First address.
    pub base: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// What the range is for.
    pub kind: RegionKind,
}

impl Region {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// e820 entry types, with the values of the boot protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM (type 1).
    Ram = 1,
    /// Reserved (type 2).
    Reserved = 2,
}

/// One entry of the e820 map handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Entry type.
    pub kind: E820Kind,
}

impl fmt::Display for E820Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            E820Kind::Ram => "usable",
            E820Kind::Reserved => "reserved",
        };
        // The same form Linux prints: "[mem 0x...-0x...] usable".
        write!(
            f,
            "[mem {:#018x}-{:#018x}] {kind}",
            self.addr,
            self.addr + self.len - 1
        )
    }
}

/// How guest memory is mapped in the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`).
    pub transparent_huge_pages: bool,
    /// Populate every page up front (`madvise(MADV_POPULATE_WRITE)`), so the guest never
    /// takes a first-touch fault.
    pub prefault: bool,
    /// Give every region a dirty bitmap ([`DirtyBitmap::tracking`]), so that writes made
    /// through vm-memory's accessors (by device models) mark the pages they touch. The
    /// hypervisor's log of the guest's own writes is asked for separately, when the memory
    /// is registered (keel-kvm's `DirtyLog::On`); a VMM migrating a guest wants both.
    pub track_dirty_pages: bool,
}

/// The guest physical address map of an x86_64 VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_size: u64,
    regions: Vec<Region>,
}

impl MemoryLayout {
    /// Smallest RAM size accepted: enough for the legacy area plus 1 MiB.
    pub const MIN_RAM: u64 = 2 * MIB;
    /// Largest RAM size accepted, so that RAM and the 64-bit window fit in 40 physical
    /// address bits, which every x86_64 host KVM runs on offers.
    pub const MAX_RAM: u64 = 512 * GIB;

    /// A layout with `ram_size` bytes of RAM and the default 64-bit MMIO window.
    ///
    /// # Examples
    ///
    /// 4 GiB of RAM: 3 GiB below the 32-bit MMIO hole, the rest above 4 GiB; the guest
    /// memory is mapped from the layout, here with dirty-page tracking.
    ///
    /// ```
    /// use keel_memory::{x86, MemoryLayout, MemoryOptions, RegionKind, GIB};
    /// use vm_memory::bitmap::Bitmap;
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    ///
    /// let layout = MemoryLayout::new(4 * GIB)?;
    /// assert_eq!(
    ///     layout.backed_ranges(),
    ///     [(GuestAddress(0), 3 * GIB), (GuestAddress(x86::HIGH_MEMORY_START), GIB)]
    /// );
    /// let ecam = layout.region(RegionKind::Ecam).unwrap();
    /// assert_eq!(ecam.base, x86::ECAM_START);
    ///
    /// let opts = MemoryOptions {
    ///     track_dirty_pages: true,
    ///     ..Default::default()
    /// };
    /// let mem = layout.create_guest_memory(&opts)?;
    /// mem.write_obj(0x1234_u16, GuestAddress(x86::HIGH_MEMORY_START + 0x5000))?;
    /// let high = mem.find_region(GuestAddress(x86::HIGH_MEMORY_START)).unwrap();
    /// assert!(high.bitmap().dirty_at(0x5000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(ram_size: u64) -> Result<Self> {
        Self::with_mmio64_size(ram_size, DEFAULT_MMIO64_SIZE)
    }

    /// A layout with `ram_size` bytes of RAM and a 64-bit PCI window of `mmio64_size` bytes.
    pub fn with_mmio64_size(ram_size: u64, mmio64_size: u64) -> Result<Self> {
        if !(Self::MIN_RAM..=Self::MAX_RAM).contains(&ram_size) || ram_size % 4096 != 0 {
            return Err(Error::InvalidRamSize {
                size: ram_size,
                min: Self::MIN_RAM,
                max: Self::MAX_RAM,
            });
        }
        if mmio64_size == 0 || mmio64_size % GIB != 0 || mmio64_size > 256 * GIB {
            return Err(Error::InvalidMmio64Size(mmio64_size));
        }
        let low_end = ram_size.min(MMIO32_HOLE_START);
        let high_len = ram_size - low_end;

        let mut regions = vec![
            Region {
                base: 0,
                len: EBDA_START,
                kind: RegionKind::Ram,
            },
            Region {
                base: EBDA_START,
                len: HIGH_RAM_START - EBDA_START,
                kind: RegionKind::Firmware,
            },
            Region {
                base: HIGH_RAM_START,
                len: low_end - HIGH_RAM_START,
                kind: RegionKind::Ram,
            },
        ];
        let fixed = [
            (PCI_MMIO32_START, PCI_MMIO32_SIZE, RegionKind::PciMmio32),
            (ECAM_START, ECAM_SIZE, RegionKind::Ecam),
            (
                PLATFORM_MMIO_START,
                PLATFORM_MMIO_SIZE,
                RegionKind::PlatformMmio,
            ),
            (IOAPIC_START, IOAPIC_SIZE, RegionKind::Ioapic),
            (LAPIC_START, LAPIC_SIZE, RegionKind::Lapic),
            (IDENTITY_MAP_START, KVM_PRIVATE_SIZE, RegionKind::KvmPrivate),
        ];
        regions.extend(
            fixed
                .iter()
                .map(|&(base, len, kind)| Region { base, len, kind }),
        );
        let mut top = HIGH_MEMORY_START;
        if high_len > 0 {
            regions.push(Region {
                base: HIGH_MEMORY_START,
                len: high_len,
                kind: RegionKind::Ram,
            });
            top += high_len;
        }
        regions.push(Region {
            base: top.next_multiple_of(GIB),
            len: mmio64_size,
            kind: RegionKind::PciMmio64,
        });
        Ok(MemoryLayout { ram_size, regions })
    }

    /// Total bytes of host memory backing the guest (RAM plus the firmware area).
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Every region, in address order. Regions never overlap.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The first region of `kind`, if any.
    pub fn region(&self, kind: RegionKind) -> Option<Region> {
        self.regions.iter().copied().find(|r| r.kind == kind)
    }

    /// The backed ranges, adjacent ones merged: what becomes host mappings and memory slots.
    pub fn backed_ranges(&self) -> Vec<(GuestAddress, u64)> {
        let mut out: Vec<(GuestAddress, u64)> = Vec::new();
        for r in self.regions.iter().filter(|r| r.kind.is_backed()) {
            match out.last_mut() {
                Some((base, len)) if base.0 + *len == r.base => *len += r.len,
                _ => out.push((GuestAddress(r.base), r.len)),
            }
        }
        out
    }

    /// The e820 map for the guest, in address order, adjacent entries of one type merged.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut out: Vec<E820Entry> = Vec::new();
        for r in &self.regions {
            let Some(kind) = r.kind.e820_kind() else {
                continue;
            };
            match out.last_mut() {
                Some(e) if e.kind == kind && e.addr + e.len == r.base => e.len += r.len,
                _ => out.push(E820Entry {
                    addr: r.base,
                    len: r.len,
                    kind,
                }),
            }
        }
        out
    }

    /// One past the highest RAM address.
    pub fn ram_end(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.kind.is_backed())
            .map(Region::end)
            .max()
            .unwrap_or(0)
    }

    /// Maps the backed ranges in this process as guest memory, one region per range, with
    /// `opts` applied (dirty bitmaps, huge pages, prefaulting).
    pub fn create_guest_memory(&self, opts: &MemoryOptions) -> Result<GuestMemoryMmap> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .backed_ranges()
            .into_iter()
            .map(|(a, l)| (a, l as usize))
            .collect();
        let regions = ranges
            .iter()
            .map(|&(addr, len)| {
                let bitmap = if opts.track_dirty_pages {
                    DirtyBitmap::tracking(len)
                } else {
                    DirtyBitmap::untracked()
                };
                // The mapping vm-memory's `from_ranges` makes, with the bitmap chosen here.
                let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
                    .build()
                    .map_err(FromRangesError::from)?;
                GuestRegionMmap::new(mapping, addr).ok_or(FromRangesError::InvalidGuestRegion)
            })
            .collect::<std::result::Result<Vec<_>, FromRangesError>>()
            .map_err(Error::Mmap)?;
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| Error::Mmap(FromRangesError::from(e)))?;
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("offset 0 is inside every region");
            let len = region.len() as usize;
            if opts.transparent_huge_pages {
                madvise(host, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
            }
            if opts.prefault {
                madvise(host, len, libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")?;
            }
        }
        Ok(mem)
    }

    /// Whether `[addr, addr + len)` lies entirely in guest RAM usable by the guest.
    pub fn is_ram(&self, addr: GuestAddress, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions.iter().any(|r| {
            r.kind == RegionKind::Ram && addr.raw_value() >= r.base && end.raw_value() <= r.end()
        })
    }
}

fn madvise(addr: *mut u8, len: usize, advice: libc::c_int, name: &'static str) -> Result<()> {
    // SAFETY: `addr..addr+len` is one whole mapping owned by the guest memory object we just
    // created; these advices change paging behaviour only and never the mapping's contents
    // as seen by Rust code.
    let ret = unsafe { libc::madvise(addr.cast(), len, advice) };
    if ret != 0 {
        return Err(Error::Madvise {
            advice: name,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KIB;

    fn check_invariants(l: &MemoryLayout) {
        // Sorted and non-overlapping.
        for w in l.regions().windows(2) {
            assert!(w[0].end() <= w[1].base, "{:?} overlaps {:?}", w[0], w[1]);
        }
        // Nothing backed inside the hole, and the backed total is the RAM size.
        let backed: u64 = l.backed_ranges().iter().map(|r| r.1).sum();
        assert_eq!(backed, l.ram_size());
        for (a, len) in l.backed_ranges() {
            let end = a.0 + len;
            assert!(end <= MMIO32_HOLE_START || a.0 >= HIGH_MEMORY_START);
        }
    }

    /// The e820 map and the host mapping come from one description: the backed e820 entries
    /// (RAM, and the reserved firmware area) tile exactly the guest memory regions.
    fn check_e820_matches_memory(l: &MemoryLayout) {
        let mem = l.create_guest_memory(&MemoryOptions::default()).unwrap();
        let mut mapped: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        mapped.sort();
        let mut from_e820: Vec<(u64, u64)> = Vec::new();
        for e in l.e820() {
            let backed = l
                .regions()
                .iter()
                .any(|r| r.kind.is_backed() && r.base <= e.addr && e.addr < r.end());
            if !backed {
                // A reserved entry for something not backed must not touch RAM.
                assert!(!mapped
                    .iter()
                    .any(|&(b, n)| e.addr < b + n && b < e.addr + e.len));
                continue;
            }
            match from_e820.last_mut() {
                Some((b, n)) if *b + *n == e.addr => *n += e.len,
                _ => from_e820.push((e.addr, e.len)),
            }
        }
        assert_eq!(from_e820, mapped);
        // Every RAM entry is mapped.
        for e in l.e820().iter().filter(|e| e.kind == E820Kind::Ram) {
            assert!(l.is_ram(GuestAddress(e.addr), e.len));
            assert!(mem.check_range(GuestAddress(e.addr), e.len as usize));
        }
    }

    #[test]
    fn small_ram_sits_below_the_hole() {
        let l = MemoryLayout::new(128 * MIB).unwrap();
        check_invariants(&l);
        check_e820_matches_memory(&l);
        assert_eq!(l.backed_ranges(), vec![(GuestAddress(0), 128 * MIB)]);
        assert_eq!(
            l.e820(),
            vec![
                E820Entry {
                    addr: 0,
                    len: EBDA_START,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: EBDA_START,
                    len: MIB - EBDA_START,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: MIB,
                    len: 127 * MIB,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: ECAM_START,
                    len: ECAM_SIZE,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: IDENTITY_MAP_START,
                    len: 16 * KIB,
                    kind: E820Kind::Reserved
                },
            ]
        );
        assert_eq!(l.ram_end(), 128 * MIB);
        // The 64-bit window starts at 4 GiB when no RAM is above the hole.
        assert_eq!(
            l.region(RegionKind::PciMmio64).unwrap().base,
            HIGH_MEMORY_START
        );
    }

    #[test]
    fn ram_exactly_filling_low_memory() {
        let l = MemoryLayout::new(3 * GIB).unwrap();
        check_invariants(&l);
        assert_eq!(l.backed_ranges(), vec![(GuestAddress(0), 3 * GIB)]);
        assert!(l
            .regions()
            .iter()
            .all(|r| r.kind != RegionKind::Ram || r.end() <= 3 * GIB));
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        let l = MemoryLayout::new(6 * GIB).unwrap();
        check_invariants(&l);
        check_e820_matches_memory(&l);
        assert_eq!(
            l.backed_ranges(),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 3 * GIB)]
        );
        assert_eq!(l.ram_end(), 7 * GIB);
        let high = l.e820().into_iter().find(|e| e.addr == 4 * GIB).unwrap();
        assert_eq!((high.len, high.kind), (3 * GIB, E820Kind::Ram));
        let mmio64 = l.region(RegionKind::PciMmio64).unwrap();
        assert_eq!(mmio64.base, 7 * GIB);
        assert_eq!(mmio64.len, DEFAULT_MMIO64_SIZE);
        // An odd high size still puts the 64-bit window on a 1 GiB boundary.
        let l = MemoryLayout::new(3 * GIB + 4 * KIB).unwrap();
        assert_eq!(l.region(RegionKind::PciMmio64).unwrap().base, 5 * GIB);
    }

    #[test]
    fn platform_ranges_are_in_the_hole() {
        let l = MemoryLayout::new(8 * GIB).unwrap();
        for kind in [
            RegionKind::PciMmio32,
            RegionKind::Ecam,
            RegionKind::PlatformMmio,
            RegionKind::Ioapic,
            RegionKind::Lapic,
            RegionKind::KvmPrivate,
        ] {
            let r = l.region(kind).unwrap();
            assert!(
                r.base >= MMIO32_HOLE_START && r.end() <= HIGH_MEMORY_START,
                "{kind:?}"
            );
            assert!(!l.is_ram(GuestAddress(r.base), 1));
        }
        assert_eq!(l.region(RegionKind::Lapic).unwrap().base, 0xfee0_0000);
        assert_eq!(l.region(RegionKind::Ioapic).unwrap().base, 0xfec0_0000);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for size in [
            0,
            MIB,
            MemoryLayout::MIN_RAM + 1,
            MemoryLayout::MAX_RAM + GIB,
        ] {
            assert!(
                matches!(MemoryLayout::new(size), Err(Error::InvalidRamSize { .. })),
                "{size:#x}"
            );
        }
        assert!(MemoryLayout::with_mmio64_size(GIB, 0).is_err());
        assert!(MemoryLayout::with_mmio64_size(GIB, MIB).is_err());
        assert!(MemoryLayout::new(MemoryLayout::MIN_RAM).is_ok());
    }

    #[test]
    fn is_ram_rejects_overflow_and_firmware() {
        let l = MemoryLayout::new(64 * MIB).unwrap();
        assert!(l.is_ram(GuestAddress(0x1000), 0x1000));
        assert!(!l.is_ram(GuestAddress(EBDA_START), 1));
        assert!(!l.is_ram(GuestAddress(u64::MAX), 2));
        assert!(!l.is_ram(GuestAddress(63 * MIB), 2 * MIB));
    }

    #[test]
    fn huge_pages_and_prefault() {
        let l = MemoryLayout::new(8 * MIB).unwrap();
        let mem = l
            .create_guest_memory(&MemoryOptions {
                transparent_huge_pages: true,
                prefault: true,
                track_dirty_pages: false,
            })
            .unwrap();
        // Prefaulted memory is resident: mincore reports every page present.
        let region = mem.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        let pages = (region.len() as usize).div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: host..host+len is a live mapping owned by `mem`; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(host.cast(), region.len() as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(vec.iter().all(|b| b & 1 == 1), "not every page is resident");
        // MADV_HUGEPAGE shows as "hg" in the mapping's VmFlags.
        assert!(vm_flags(host as usize).contains(&"hg".to_string()));
        // Without prefault, a fresh mapping is not resident.
        let mem = l.create_guest_memory(&MemoryOptions::default()).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        // SAFETY: as above.
        let rc = unsafe { libc::mincore(host.cast(), region.len() as usize, vec.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(vec.iter().any(|b| b & 1 == 0));
        assert!(!vm_flags(host as usize).contains(&"hg".to_string()));
    }

    /// The VmFlags of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(String::from).collect();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }
}

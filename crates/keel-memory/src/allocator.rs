//! Allocators for MMIO windows, I/O ports and GSIs.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator, RangeInclusive};

use crate::layout::{MemoryLayout, RegionKind};
use crate::x86::{IOAPIC_PINS, MAX_GSI, PCI_PIO_SIZE, PCI_PIO_START};

/// Errors from [`SystemAllocator`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocatorError {
    /// A pool could not be set up over its range.
    #[error("cannot create the {pool} pool over {first:#x}..={last:#x}")]
    NewPool {
        /// Which pool.
        pool: &'static str,
        /// First address or identifier.
        first: u64,
        /// Last address or identifier.
        last: u64,
        /// What vm-allocator reported.
        #[source]
        source: vm_allocator::Error,
    },
    /// The named pool has no room for the request.
    #[error("cannot allocate {size:#x} bytes aligned to {align:#x} from the {pool} window")]
    Exhausted {
        /// Which pool.
        pool: &'static str,
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
        /// What vm-allocator reported.
        #[source]
        source: vm_allocator::Error,
    },
    /// No identifier is left in the named pool.
    #[error("cannot allocate from the {pool} pool")]
    IdExhausted {
        /// Which pool.
        pool: &'static str,
        /// What vm-allocator reported.
        #[source]
        source: vm_allocator::Error,
    },
    /// An identifier could not be freed (never allocated, or already freed).
    #[error("cannot free {id} in the {pool} pool")]
    FreeId {
        /// Which pool.
        pool: &'static str,
        /// The identifier.
        id: u32,
        /// What vm-allocator reported.
        #[source]
        source: vm_allocator::Error,
    },
    /// The layout lacks a region the allocator needs.
    #[error("the memory layout has no {0:?} region")]
    MissingRegion(RegionKind),
    /// A range could not be freed (never allocated, or already freed).
    #[error("cannot free {start:#x}..={end:#x} in the {pool} window")]
    Free {
        /// Which pool.
        pool: &'static str,
        /// First address.
        start: u64,
        /// Last address.
        end: u64,
        /// What vm-allocator reported.
        #[source]
        source: vm_allocator::Error,
    },
}

// Pool names, as errors print them.
const MMIO32: &str = "32-bit MMIO";
const MMIO64: &str = "64-bit MMIO";
const PLATFORM_MMIO: &str = "platform MMIO";
const PIO: &str = "I/O port";
const LEGACY_IRQ: &str = "legacy IRQ";
const MSI_GSI: &str = "MSI GSI";

/// A contiguous allocation: base and size.
pub type Allocation = (u64, u64);

/// The address and interrupt pools of one VM.
///
/// Not synchronised: a VMM that allocates from several threads wraps it in a `Mutex`.
#[derive(Debug)]
pub struct SystemAllocator {
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    platform_mmio: AddressAllocator,
    pio: AddressAllocator,
    legacy_irq: IdAllocator,
    msi_gsi: IdAllocator,
}

fn address_pool(
    pool: &'static str,
    base: u64,
    len: u64,
) -> Result<AddressAllocator, AllocatorError> {
    AddressAllocator::new(base, len).map_err(|source| AllocatorError::NewPool {
        pool,
        first: base,
        last: base.wrapping_add(len).wrapping_sub(1),
        source,
    })
}

fn window(
    layout: &MemoryLayout,
    kind: RegionKind,
    pool: &'static str,
) -> Result<AddressAllocator, AllocatorError> {
    let r = layout
        .region(kind)
        .ok_or(AllocatorError::MissingRegion(kind))?;
    address_pool(pool, r.base, r.len)
}

impl SystemAllocator {
    /// Creates the pools for `layout`. Legacy interrupt lines start at `first_legacy_irq`
    /// (lines below it are the platform's: PIT, keyboard, serial ports, ...); MSI GSIs are
    /// every GSI above the IOAPIC pins up to [`MAX_GSI`].
    pub fn new(layout: &MemoryLayout, first_legacy_irq: u32) -> Result<Self, AllocatorError> {
        let id = |pool, first: u32, last: u32| {
            IdAllocator::new(first, last).map_err(|source| AllocatorError::NewPool {
                pool,
                first: u64::from(first),
                last: u64::from(last),
                source,
            })
        };
        Ok(SystemAllocator {
            mmio32: window(layout, RegionKind::PciMmio32, MMIO32)?,
            mmio64: window(layout, RegionKind::PciMmio64, MMIO64)?,
            platform_mmio: window(layout, RegionKind::PlatformMmio, PLATFORM_MMIO)?,
            pio: address_pool(PIO, PCI_PIO_START, PCI_PIO_SIZE)?,
            legacy_irq: id(LEGACY_IRQ, first_legacy_irq, IOAPIC_PINS - 1)?,
            msi_gsi: id(MSI_GSI, IOAPIC_PINS, MAX_GSI)?,
        })
    }

    fn alloc(
        a: &mut AddressAllocator,
        pool: &'static str,
        size: u64,
        align: u64,
    ) -> Result<Allocation, AllocatorError> {
        a.allocate(size, align, AllocPolicy::FirstMatch)
            .map(|r| (r.start(), r.len()))
            .map_err(|source| AllocatorError::Exhausted {
                pool,
                size,
                align,
                source,
            })
    }

    fn release(
        a: &mut AddressAllocator,
        pool: &'static str,
        (base, size): Allocation,
    ) -> Result<(), AllocatorError> {
        let err = |source| AllocatorError::Free {
            pool,
            start: base,
            end: base.wrapping_add(size).wrapping_sub(1),
            source,
        };
        let end = base
            .checked_add(size.saturating_sub(1))
            .ok_or(err(vm_allocator::Error::Overflow))?;
        let range = RangeInclusive::new(base, end).map_err(err)?;
        a.free(&range).map_err(err)
    }

    /// Allocates `size` bytes of 32-bit PCI MMIO space aligned to `align` (a power of two).
    pub fn allocate_mmio32(&mut self, size: u64, align: u64) -> Result<Allocation, AllocatorError> {
        Self::alloc(&mut self.mmio32, MMIO32, size, align)
    }
    /// Allocates `size` bytes of 64-bit PCI MMIO space aligned to `align`.
    pub fn allocate_mmio64(&mut self, size: u64, align: u64) -> Result<Allocation, AllocatorError> {
        Self::alloc(&mut self.mmio64, MMIO64, size, align)
    }
    /// Allocates `size` bytes in the platform MMIO window aligned to `align`.
    pub fn allocate_platform_mmio(
        &mut self,
        size: u64,
        align: u64,
    ) -> Result<Allocation, AllocatorError> {
        Self::alloc(&mut self.platform_mmio, PLATFORM_MMIO, size, align)
    }
    /// Allocates `size` I/O ports aligned to `align`.
    pub fn allocate_pio(&mut self, size: u64, align: u64) -> Result<Allocation, AllocatorError> {
        Self::alloc(&mut self.pio, PIO, size, align)
    }
    /// Returns a 32-bit MMIO allocation.
    pub fn free_mmio32(&mut self, a: Allocation) -> Result<(), AllocatorError> {
        Self::release(&mut self.mmio32, MMIO32, a)
    }
    /// Returns a 64-bit MMIO allocation.
    pub fn free_mmio64(&mut self, a: Allocation) -> Result<(), AllocatorError> {
        Self::release(&mut self.mmio64, MMIO64, a)
    }
    /// Returns a platform MMIO allocation.
    pub fn free_platform_mmio(&mut self, a: Allocation) -> Result<(), AllocatorError> {
        Self::release(&mut self.platform_mmio, PLATFORM_MMIO, a)
    }
    /// Returns an I/O port allocation.
    pub fn free_pio(&mut self, a: Allocation) -> Result<(), AllocatorError> {
        Self::release(&mut self.pio, PIO, a)
    }

    /// Allocates a legacy interrupt line (an IOAPIC pin).
    pub fn allocate_legacy_irq(&mut self) -> Result<u32, AllocatorError> {
        self.legacy_irq
            .allocate_id()
            .map_err(|source| AllocatorError::IdExhausted {
                pool: LEGACY_IRQ,
                source,
            })
    }
    /// Allocates a GSI for an MSI route.
    pub fn allocate_msi_gsi(&mut self) -> Result<u32, AllocatorError> {
        self.msi_gsi
            .allocate_id()
            .map_err(|source| AllocatorError::IdExhausted {
                pool: MSI_GSI,
                source,
            })
    }
    /// Returns an MSI GSI.
    pub fn free_msi_gsi(&mut self, gsi: u32) -> Result<(), AllocatorError> {
        self.msi_gsi
            .free_id(gsi)
            .map(drop)
            .map_err(|source| AllocatorError::FreeId {
                pool: MSI_GSI,
                id: gsi,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::*;
    use crate::GIB;

    fn alloc() -> SystemAllocator {
        SystemAllocator::new(&MemoryLayout::new(GIB).unwrap(), 5).unwrap()
    }

    #[test]
    fn mmio_windows_hand_out_aligned_disjoint_ranges() {
        let mut a = alloc();
        let (b1, s1) = a.allocate_mmio32(0x1000, 0x1000).unwrap();
        let (b2, _) = a.allocate_mmio32(0x10_0000, 0x10_0000).unwrap();
        assert_eq!((b1, s1), (PCI_MMIO32_START, 0x1000));
        assert_eq!(b2 % 0x10_0000, 0);
        assert!(b2 >= b1 + s1);
        assert!(b2 + 0x10_0000 <= PCI_MMIO32_START + PCI_MMIO32_SIZE);
        let (b64, _) = a.allocate_mmio64(GIB, GIB).unwrap();
        assert!(b64 >= HIGH_MEMORY_START);
        // Too big for the window.
        assert!(matches!(
            a.allocate_mmio32(PCI_MMIO32_SIZE, 0x1000),
            Err(AllocatorError::Exhausted { .. })
        ));
        // Free and reuse.
        a.free_mmio32((b1, s1)).unwrap();
        assert_eq!(a.allocate_mmio32(0x1000, 0x1000).unwrap().0, b1);
        assert!(a.free_mmio32((b1 + 0x10, 0x10)).is_err());
    }

    #[test]
    fn pio_and_platform_windows() {
        let mut a = alloc();
        let (p, n) = a.allocate_pio(0x40, 0x40).unwrap();
        assert!(p >= PCI_PIO_START && p + n <= 0x1_0000);
        let (m, _) = a.allocate_platform_mmio(0x1000, 0x1000).unwrap();
        assert_eq!(m, PLATFORM_MMIO_START);
    }

    #[test]
    fn gsis() {
        let mut a = alloc();
        assert_eq!(a.allocate_legacy_irq().unwrap(), 5);
        let g = a.allocate_msi_gsi().unwrap();
        assert_eq!(g, IOAPIC_PINS);
        a.free_msi_gsi(g).unwrap();
        assert!(a.free_msi_gsi(g).is_err());
        // Legacy lines run out after pin 23.
        let mut n = 1;
        while a.allocate_legacy_irq().is_ok() {
            n += 1;
        }
        assert_eq!(n, IOAPIC_PINS - 5);
    }
}

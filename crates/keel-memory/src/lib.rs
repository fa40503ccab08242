//! x86_64 guest physical memory for KVM virtual machine monitors.
//!
//! One [`MemoryLayout`] describes the guest's physical address space: RAM below the 32-bit
//! MMIO hole, RAM above 4 GiB, the firmware area, and every reserved range (PCI windows,
//! ECAM, IOAPIC, LAPIC, the TSS and identity-map pages KVM needs). Both the host mapping
//! ([`MemoryLayout::create_guest_memory`]) and the guest's e820 map
//! ([`MemoryLayout::e820`]) are derived from it, so the two cannot disagree.
//! [`SystemAllocator`] hands out addresses in the MMIO windows, I/O port ranges and GSIs.
//!
//! ```
//! use keel_memory::{E820Kind, MemoryLayout, MemoryOptions, MIB};
//! use vm_memory::GuestMemoryBackend;
//!
//! let layout = MemoryLayout::new(256 * MIB)?;
//! let mem = layout.create_guest_memory(&MemoryOptions::default())?;
//! assert_eq!(mem.num_regions(), 1);
//! let ram: u64 = layout.e820().iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.len).sum();
//! assert!(ram < 256 * MIB); // the legacy BIOS area is reserved, not RAM
//! # Ok::<(), keel_memory::Error>(())
//! ```
#![deny(missing_docs)]

mod allocator;
mod dirty;
mod layout;

pub use allocator::{AllocatorError, SystemAllocator};
pub use dirty::DirtyBitmap;
pub use layout::{
    E820Entry, E820Kind, Error, MemoryLayout, MemoryOptions, Region, RegionKind, Result,
};

/// The guest memory type every Keel crate uses: vm-memory's mmap-backed memory whose
/// regions carry a [`DirtyBitmap`], so that a VMM tracking dirty pages (for migration, say)
/// sees the writes device models make through vm-memory's accessors. Tracking is off
/// unless [`MemoryOptions::track_dirty_pages`] asks for it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// Fixed addresses of the x86_64 platform Keel builds.
pub mod x86 {
    use super::{GIB, KIB, MIB};

    /// End of conventional low RAM; the EBDA starts here.
    pub const EBDA_START: u64 = 0x9_fc00;
    /// Start of RAM above the legacy BIOS area.
    pub const HIGH_RAM_START: u64 = MIB;
    /// Start of the 32-bit MMIO hole; RAM below 4 GiB ends here at the latest.
    pub const MMIO32_HOLE_START: u64 = 3 * GIB;
    /// Window for 32-bit PCI BARs.
    pub const PCI_MMIO32_START: u64 = MMIO32_HOLE_START;
    /// Size of the 32-bit PCI BAR window.
    pub const PCI_MMIO32_SIZE: u64 = 512 * MIB;
    /// PCI Express enhanced configuration space (ECAM), 256 buses.
    pub const ECAM_START: u64 = 0xe000_0000;
    /// Size of the ECAM window.
    pub const ECAM_SIZE: u64 = 256 * MIB;
    /// Window for platform MMIO devices (virtio-mmio and the like).
    pub const PLATFORM_MMIO_START: u64 = 0xf000_0000;
    /// Size of the platform MMIO window.
    pub const PLATFORM_MMIO_SIZE: u64 = 0xfec0_0000 - PLATFORM_MMIO_START;
    /// IOAPIC registers.
    pub const IOAPIC_START: u64 = 0xfec0_0000;
    /// Size of the IOAPIC register window.
    pub const IOAPIC_SIZE: u64 = 4 * KIB;
    /// Local APIC registers.
    pub const LAPIC_START: u64 = 0xfee0_0000;
    /// Size of the local APIC window.
    pub const LAPIC_SIZE: u64 = MIB;
    /// KVM's identity-map page (`KVM_SET_IDENTITY_MAP_ADDR`), one page.
    pub const IDENTITY_MAP_START: u64 = 0xfffb_c000;
    /// KVM's TSS area (`KVM_SET_TSS_ADDR`), three pages right after the identity map.
    pub const TSS_START: u64 = 0xfffb_d000;
    /// Size of the identity map page plus the TSS pages.
    pub const KVM_PRIVATE_SIZE: u64 = 4 * 4 * KIB;
    /// RAM above the hole starts here.
    pub const HIGH_MEMORY_START: u64 = 4 * GIB;
    /// Default size of the 64-bit PCI BAR window, placed above RAM.
    pub const DEFAULT_MMIO64_SIZE: u64 = 64 * GIB;
    /// I/O ports handed out to PCI I/O BARs (legacy ports live below).
    pub const PCI_PIO_START: u64 = 0x1000;
    /// Size of the PCI I/O port window.
    pub const PCI_PIO_SIZE: u64 = 0x1_0000 - PCI_PIO_START;
    /// Number of IOAPIC pins (GSIs 0-23).
    pub const IOAPIC_PINS: u32 = 24;
    /// Highest GSI handed out for MSI routes.
    pub const MAX_GSI: u32 = 4095;
}

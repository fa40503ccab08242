//! Dirty-page tracking for the writes the VMM makes to guest memory.
//!
//! KVM logs the pages the guest's vCPUs write (keel-kvm's `DirtyLog`); it cannot see the
//! writes a device model makes through vm-memory's accessors (a virtio device filling a
//! buffer, say). vm-memory tracks those in a bitmap carried by each region, and every
//! accessor that writes (`write_obj`, `write_slice`, a `VolatileSlice` written to, ...)
//! marks the pages it touches. [`DirtyBitmap`] is that bitmap in Keel's
//! [`GuestMemoryMmap`](crate::GuestMemoryMmap): either vm-memory's `AtomicBitmap` or
//! nothing, chosen when the memory is created ([`MemoryOptions`](crate::MemoryOptions)).

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, WithBitmapSlice, BS};

/// The dirty bitmap of one region of Keel's guest memory: vm-memory's [`AtomicBitmap`]
/// (one bit per host page) when tracking is on, nothing at all when it is off.
///
/// It is vm-memory's `Option<AtomicBitmap>` with one difference: it implements
/// [`NewBitmap`], making untracked memory, so vm-memory's own constructors
/// (`GuestMemoryMmap::from_ranges`) keep working for memory that needs no tracking.
/// Tracked memory comes from
/// [`MemoryLayout::create_guest_memory`](crate::MemoryLayout::create_guest_memory) or
/// [`DirtyBitmap::tracking`].
#[derive(Clone, Debug, Default)]
pub struct DirtyBitmap(Option<AtomicBitmap>);

impl DirtyBitmap {
    /// A bitmap tracking a region of `len` bytes, every page clean.
    pub fn tracking(len: usize) -> Self {
        DirtyBitmap(Some(AtomicBitmap::with_len(len)))
    }

    /// No tracking: writes are not recorded, and cost nothing extra.
    pub fn untracked() -> Self {
        DirtyBitmap(None)
    }

    /// The bitmap, when tracking is on: read it with `is_addr_set`, or collect and clear it
    /// with `get_and_reset` (bit `n` of word `w` is the page at offset
    /// `(w * 64 + n) * page size` in the region).
    pub fn bitmap(&self) -> Option<&AtomicBitmap> {
        self.0.as_ref()
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = BS<'a, Option<AtomicBitmap>>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark_dirty(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.0.slice_at(offset)
    }
}

impl NewBitmap for DirtyBitmap {
    /// Untracked: vm-memory calls this from its generic constructors, which cannot say
    /// whether tracking is wanted.
    fn with_len(_len: usize) -> Self {
        DirtyBitmap::untracked()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{
        Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion, VolatileMemory,
    };

    use super::*;
    use crate::{GuestMemoryMmap, MemoryLayout, MemoryOptions, MIB};

    const PAGE: u64 = 4096;

    /// The guest addresses of the pages marked dirty, in every region; clears the marks.
    fn take_dirty(mem: &GuestMemoryMmap) -> Vec<u64> {
        let mut pages = Vec::new();
        for region in mem.iter() {
            let bitmap = MmapRegion::bitmap(region).bitmap().expect("tracking is on");
            for (w, word) in bitmap.get_and_reset().into_iter().enumerate() {
                for n in (0..64).filter(|n| word & (1 << n) != 0) {
                    pages.push(region.start_addr().0 + (w as u64 * 64 + n) * PAGE);
                }
            }
        }
        pages
    }

    #[test]
    fn writes_through_vm_memory_mark_the_bitmap_when_tracking_is_on() {
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let opts = MemoryOptions {
            track_dirty_pages: true,
            ..Default::default()
        };
        let mem = layout.create_guest_memory(&opts).unwrap();
        assert!(take_dirty(&mem).is_empty(), "a new mapping is clean");

        // The accessors device models use: write_obj, write_slice (here across a page
        // boundary), and a volatile slice written in place.
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x3004))
            .unwrap();
        mem.write_slice(&[1; 8], GuestAddress(0x5ffc)).unwrap();
        let slice = mem.get_slice(GuestAddress(0x9000), 16).unwrap();
        slice.get_slice(8, 8).unwrap().copy_from(&[2u8; 8]);
        // Reads mark nothing.
        let _: u64 = mem.read_obj(GuestAddress(0xb000)).unwrap();
        assert_eq!(take_dirty(&mem), vec![0x3000, 0x5000, 0x6000, 0x9000]);
        assert!(
            take_dirty(&mem).is_empty(),
            "get_and_reset clears the marks"
        );

        // The region's bitmap answers per address too.
        mem.write_obj(1u8, GuestAddress(2 * MIB)).unwrap();
        let region = mem.find_region(GuestAddress(2 * MIB)).unwrap();
        assert!(region.bitmap().dirty_at(2 * MIB as usize));
        assert!(!region.bitmap().dirty_at(3 * MIB as usize));
    }

    #[test]
    fn untracked_memory_carries_no_bitmap() {
        let layout = MemoryLayout::new(4 * MIB).unwrap();
        let mem = layout
            .create_guest_memory(&MemoryOptions::default())
            .unwrap();
        mem.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        for region in mem.iter() {
            assert!(MmapRegion::bitmap(region).bitmap().is_none());
            assert!(!region.bitmap().dirty_at(0x3000));
        }
        // vm-memory's own constructors make untracked memory.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(1u64, GuestAddress(0x3000)).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(MmapRegion::bitmap(region).bitmap().is_none());
    }

    #[test]
    fn tracking_bitmap_starts_clean() {
        let b = DirtyBitmap::tracking(8 * PAGE as usize);
        assert!(!b.dirty_at(0));
        b.mark_dirty(PAGE as usize + 1, 1);
        assert!(b.dirty_at(PAGE as usize));
        assert!(!DirtyBitmap::untracked().dirty_at(0));
    }
}

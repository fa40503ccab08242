//! Buffers: heap buffers with a chosen alignment (for `O_DIRECT` I/O), and the memory an
//! asynchronous request owns while it is in flight ([`IoBuf`]): an owned host buffer, or
//! ranges of guest memory together with the handle that keeps them mapped ([`GuestBuf`]).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::Deref;

use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use crate::error::{Error, Result};
use crate::iov::{GuestRange, Iov};

/// A zero-initialised heap buffer aligned to a power of two.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// Panics if `align` is not a power of two or the allocation fails; both
    /// are programming or resource errors, not input errors.
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Raw pointer to the start.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The memory of an asynchronous request ([`crate::aio::AioRequest`]), owned by the
/// request from submission until its completion hands it back.
///
/// Engines reach the bytes only through [`VolatileSlice`]s: synchronous engines copy
/// through them, io_uring hands their addresses to the kernel. So a request over guest
/// memory never forms a Rust reference to memory the guest may change meanwhile.
///
/// # Safety
///
/// Implementations promise that the memory behind the slices [`IoBuf::slices`] returns
/// stays valid for reads and writes of their whole length for as long as `self` exists,
/// *including after `self` has been moved* (it is not inline in `self`), and that nothing
/// forms Rust references to it while the slices' addresses may be in use: engines give
/// those addresses to the kernel, which accesses them until the request completes.
pub unsafe trait IoBuf: Send + 'static {
    /// The dirty-page bitmap type of the slices (`()` for memory nobody tracks).
    type Bitmap<'a>: BitmapSlice
    where
        Self: 'a;

    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory, for `access` (`Permissions::Write` when the request stores into it,
    /// `Permissions::Read` when it reads from it), covering [`IoBuf::len`] bytes in order.
    fn slices(&mut self, access: Permissions) -> Result<Iov<VolatileSlice<'_, Self::Bitmap<'_>>>>;

    /// The bytes as a plain slice, for buffers in host memory only Rust accesses (the
    /// synchronous engines then skip a copy).
    fn host_bytes(&mut self) -> Option<&mut [u8]> {
        None
    }
}

// SAFETY: the bytes live in a heap allocation that moves with the AlignedBuf's pointer,
// not inline, and is only freed on drop; Rust references to them need `&self`/`&mut self`,
// which the request's owner (the engine) does not form while the request is in flight.
unsafe impl IoBuf for AlignedBuf {
    type Bitmap<'a> = ();

    fn len(&self) -> usize {
        self.len
    }
    fn slices(&mut self, _: Permissions) -> Result<Iov<VolatileSlice<'_>>> {
        Ok(Iov::from(VolatileSlice::from(self.as_mut_slice())))
    }
    fn host_bytes(&mut self) -> Option<&mut [u8]> {
        Some(self.as_mut_slice())
    }
}

// SAFETY: as for AlignedBuf: a vector's bytes are on the heap and do not move with it.
unsafe impl IoBuf for Vec<u8> {
    type Bitmap<'a> = ();

    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn slices(&mut self, _: Permissions) -> Result<Iov<VolatileSlice<'_>>> {
        Ok(Iov::from(VolatileSlice::from(self.as_mut_slice())))
    }
    fn host_bytes(&mut self) -> Option<&mut [u8]> {
        Some(self.as_mut_slice())
    }
}

/// Ranges of guest memory, with the handle (`M`, for example an
/// `Arc<GuestMemoryMmap>` or a `GuestMemoryLoadGuard`) that keeps them mapped until the
/// request that owns them completes.
///
/// Writes into the ranges are recorded in the memory's dirty bitmap, if it has one: the
/// volatile copies of the synchronous engines mark what they write, and io_uring marks
/// the ranges a read filled when it completes.
///
/// ```
/// use std::sync::Arc;
/// use keel_block::buf::{GuestBuf, IoBuf};
/// use keel_block::iov::GuestRange;
/// use vm_memory::{GuestAddress, GuestMemoryMmap, Permissions};
///
/// let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
/// let ranges = [GuestRange::new(GuestAddress(0x1000), 512), GuestRange::new(GuestAddress(0x3000), 512)];
/// let mut buf = GuestBuf::new(mem, ranges.into_iter().collect());
/// assert_eq!(buf.len(), 1024);
/// assert_eq!(buf.slices(Permissions::Write).unwrap().segments().len(), 2);
/// ```
pub struct GuestBuf<M> {
    mem: M,
    ranges: Iov<GuestRange>,
}

impl<M> GuestBuf<M>
where
    M: Deref,
    M::Target: GuestMemory,
{
    /// `ranges` of the guest memory `mem`. The ranges are checked when an engine uses
    /// them: one outside guest memory fails the request.
    pub fn new(mem: M, ranges: Iov<GuestRange>) -> Self {
        GuestBuf { mem, ranges }
    }

    /// The guest ranges.
    pub fn ranges(&self) -> &Iov<GuestRange> {
        &self.ranges
    }
}

impl<M> std::fmt::Debug for GuestBuf<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBuf")
            .field("ranges", &self.ranges)
            .finish_non_exhaustive()
    }
}

// SAFETY: the slices point into the mappings of `mem`'s regions, which `mem` (a handle
// such as an Arc, moved along with self) keeps alive for as long as self exists; the
// memory is never inline in self. keel-block does not enable vm-memory's `xen` feature, so
// the addresses taken from the slices stay valid without a live PtrGuard. Rust code only
// reaches guest memory through volatile accessors, never through references.
unsafe impl<M> IoBuf for GuestBuf<M>
where
    M: Deref + Send + 'static,
    M::Target: GuestMemory,
{
    type Bitmap<'a> = BS<'a, <M::Target as GuestMemory>::Bitmap>;

    fn len(&self) -> usize {
        self.ranges.len()
    }

    fn slices(&mut self, access: Permissions) -> Result<Iov<VolatileSlice<'_, Self::Bitmap<'_>>>> {
        let mut out = Iov::with_capacity(self.ranges.segments().len());
        for r in &self.ranges {
            let fail = |source| Error::GuestMemory {
                addr: r.addr.0,
                len: r.len,
                source,
            };
            for s in self.mem.get_slices(r.addr, r.len, access).map_err(fail)? {
                out.push(s.map_err(fail)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn guest_buffers_span_regions_and_refuse_holes() {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 0x1000),
                (GuestAddress(0x1000), 0x1000),
            ])
            .unwrap(),
        );
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0xffe)).unwrap();
        let r = GuestRange::new(GuestAddress(0xffe), 4);
        let mut buf = GuestBuf::new(mem.clone(), std::iter::once(r).collect());
        let iov = buf.slices(Permissions::Read).unwrap();
        assert_eq!(iov.segments().len(), 2, "one slice per region");
        let mut out = [0u8; 4];
        iov.copy_to_slice(0, &mut out);
        assert_eq!(out, [1, 2, 3, 4]);

        let hole = GuestRange::new(GuestAddress(0x1ff0), 0x20);
        let mut buf = GuestBuf::new(mem, std::iter::once(hole).collect());
        assert!(matches!(
            buf.slices(Permissions::Write),
            Err(Error::GuestMemory {
                addr: 0x1ff0,
                len: 0x20,
                ..
            })
        ));
    }
}

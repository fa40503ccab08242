//! One scatter-gather list type for every layer.
//!
//! An [`Iov`] is a list of segments addressed as one run of bytes: a virtio-blk request's
//! guest ranges ([`GuestRange`]), the volatile slices of guest memory they map to
//! ([`VolatileSlice`]), the host buffers a [`crate::BlockBackend`] call carries
//! (`&[u8]`, `&mut [u8]`), or the `iovec`s handed to `preadv`/`pwritev`. It splits at a
//! byte offset, takes a prefix, skips a prefix, iterates its segments and knows its total
//! length; segments whose bytes Rust may touch also copy to and from plain slices.
//!
//! ```
//! use keel_block::iov::Iov;
//!
//! let (a, b) = ([1u8, 2, 3], [4u8, 5]);
//! let iov: Iov<&[u8]> = [&a[..], &b[..]].into_iter().collect();
//! assert_eq!(iov.len(), 5);
//! let mut out = [0u8; 3];
//! assert_eq!(iov.copy_to_slice(2, &mut out), 3);
//! assert_eq!(out, [3, 4, 5]);
//! let (head, tail) = iov.split_at(4);
//! assert_eq!(head.len(), 4);
//! assert_eq!(tail.segments(), [&[5u8][..]]);
//! ```

use std::io::{IoSlice, IoSliceMut};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, VolatileSlice};

/// A piece of memory an [`Iov`] is made of.
pub trait Segment: Sized {
    /// Length in bytes.
    fn len(&self) -> usize;

    /// Whether the segment is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `mid` bytes and the rest. `mid` is at most [`Segment::len`].
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// Segments whose bytes can be copied out into a Rust slice.
pub trait ReadSegment: Segment {
    /// Copies `dst.len()` bytes starting `offset` bytes into the segment into `dst`
    /// (the range lies inside the segment).
    fn read_into(&self, offset: usize, dst: &mut [u8]);
}

/// Segments whose bytes can be overwritten from a Rust slice.
pub trait WriteSegment: Segment {
    /// Copies `src` into the segment, `offset` bytes in (the range lies inside the
    /// segment).
    fn write_from(&mut self, offset: usize, src: &[u8]);

    /// Zeroes `len` bytes starting `offset` bytes in (the range lies inside the segment).
    fn zero(&mut self, offset: usize, len: usize);
}

/// A range of guest-physical memory, not yet resolved to host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    /// Guest-physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: usize,
}

impl GuestRange {
    /// `len` bytes at `addr`.
    pub fn new(addr: GuestAddress, len: usize) -> GuestRange {
        GuestRange { addr, len }
    }

    /// The address of the last byte (the range is not empty).
    pub fn last_addr(&self) -> GuestAddress {
        GuestAddress(self.addr.0.wrapping_add(self.len as u64).wrapping_sub(1))
    }
}

impl Segment for GuestRange {
    fn len(&self) -> usize {
        self.len
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let mid = mid.min(self.len);
        // Guest addresses are only checked when the range is resolved: wrapping here
        // names memory that does not exist, which resolution then refuses.
        let rest = GuestAddress(self.addr.0.wrapping_add(mid as u64));
        (
            GuestRange::new(self.addr, mid),
            GuestRange::new(rest, self.len - mid),
        )
    }
}

impl Segment for &[u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        <[u8]>::split_at(self, mid.min(<[u8]>::len(self)))
    }
}

impl ReadSegment for &[u8] {
    fn read_into(&self, offset: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self[offset..offset + dst.len()]);
    }
}

impl Segment for &mut [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let mid = mid.min(<[u8]>::len(self));
        self.split_at_mut(mid)
    }
}

impl ReadSegment for &mut [u8] {
    fn read_into(&self, offset: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&self[offset..offset + dst.len()]);
    }
}

impl WriteSegment for &mut [u8] {
    fn write_from(&mut self, offset: usize, src: &[u8]) {
        self[offset..offset + src.len()].copy_from_slice(src);
    }
    fn zero(&mut self, offset: usize, len: usize) {
        self[offset..offset + len].fill(0);
    }
}

impl<B: BitmapSlice> Segment for VolatileSlice<'_, B> {
    fn len(&self) -> usize {
        VolatileSlice::len(self)
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let mid = mid.min(VolatileSlice::len(&self));
        VolatileSlice::split_at(&self, mid).expect("mid is at most the slice's length")
    }
}

impl<B: BitmapSlice> ReadSegment for VolatileSlice<'_, B> {
    fn read_into(&self, offset: usize, dst: &mut [u8]) {
        if let Ok(s) = self.subslice(offset, dst.len()) {
            s.copy_to(dst);
        }
    }
}

/// Zeroes written into memory that cannot be filled in place.
static ZEROES: [u8; 4096] = [0; 4096];

impl<B: BitmapSlice> WriteSegment for VolatileSlice<'_, B> {
    fn write_from(&mut self, offset: usize, src: &[u8]) {
        if let Ok(s) = self.subslice(offset, src.len()) {
            // Marks the bytes dirty in the slice's bitmap.
            s.copy_from(src);
        }
    }
    fn zero(&mut self, offset: usize, len: usize) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len());
            self.write_from(offset + done, &ZEROES[..n]);
            done += n;
        }
    }
}

/// The kernel's own segment type, for `preadv`/`pwritev`. Splitting only computes
/// addresses; nothing here dereferences them.
impl Segment for libc::iovec {
    fn len(&self) -> usize {
        self.iov_len
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let mid = mid.min(self.iov_len);
        let base = self.iov_base.cast::<u8>();
        (
            libc::iovec {
                iov_base: self.iov_base,
                iov_len: mid,
            },
            libc::iovec {
                iov_base: base.wrapping_add(mid).cast(),
                iov_len: self.iov_len - mid,
            },
        )
    }
}

/// A scatter-gather list: segments addressed as one run of bytes. Empty segments are
/// dropped as they are added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iov<S> {
    segs: Vec<S>,
    len: usize,
}

impl<S> Default for Iov<S> {
    fn default() -> Self {
        Iov {
            segs: Vec::new(),
            len: 0,
        }
    }
}

impl<S: Segment> Iov<S> {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty list with room for `n` segments.
    pub fn with_capacity(n: usize) -> Self {
        Iov {
            segs: Vec::with_capacity(n),
            len: 0,
        }
    }

    /// Appends a segment (nothing, if it is empty).
    pub fn push(&mut self, s: S) {
        if !s.is_empty() {
            self.len += s.len();
            self.segs.push(s);
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments, in order.
    pub fn segments(&self) -> &[S] {
        &self.segs
    }

    /// Iterates over the segments.
    pub fn iter(&self) -> std::slice::Iter<'_, S> {
        self.segs.iter()
    }

    /// The last segment.
    pub fn last(&self) -> Option<&S> {
        self.segs.last()
    }

    /// The segments, as a vector.
    pub fn into_segments(self) -> Vec<S> {
        self.segs
    }

    /// The first `at` bytes and the rest (`at` is capped at the length).
    pub fn split_at(self, at: usize) -> (Self, Self) {
        if at >= self.len {
            // The whole list: no copy of its segments.
            return (self, Iov::new());
        }
        let mut head = Iov::new();
        let mut tail = Iov::new();
        for s in self.segs {
            let done = head.len;
            if done + s.len() <= at {
                head.push(s);
            } else if done >= at {
                tail.push(s);
            } else {
                let (a, b) = s.split_at(at - done);
                head.push(a);
                tail.push(b);
            }
        }
        (head, tail)
    }

    /// The first `n` bytes.
    pub fn take(self, n: usize) -> Self {
        if n >= self.len {
            return self;
        }
        self.split_at(n).0
    }

    /// Everything after the first `n` bytes.
    pub fn skip(self, n: usize) -> Self {
        if n == 0 {
            return self;
        }
        self.split_at(n).1
    }

    /// `len` bytes starting `skip` bytes in.
    pub fn slice(self, skip: usize, len: usize) -> Self {
        self.skip(skip).take(len)
    }

    /// Drops the first `n` bytes in place.
    pub fn advance(&mut self, n: usize) {
        let rest = std::mem::take(self).skip(n);
        *self = rest;
    }

    /// The pieces of the list that cover `len` bytes starting `skip` bytes in: for each,
    /// the segment's index, the offset inside it, the length, and the position of the
    /// piece in the requested range.
    fn pieces(
        &self,
        skip: usize,
        len: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        let mut start = 0usize;
        let end = skip.saturating_add(len);
        self.segs.iter().enumerate().filter_map(move |(i, s)| {
            let (lo, hi) = (start, start + s.len());
            start = hi;
            let from = lo.max(skip);
            let to = hi.min(end);
            (from < to).then(|| (i, from - lo, to - from, from - skip))
        })
    }
}

impl<S: Segment + Clone> Iov<S> {
    /// The segments covering `len` bytes starting `skip` bytes in, without consuming the
    /// list.
    pub fn range(&self, skip: usize, len: usize) -> impl Iterator<Item = S> + '_ {
        self.pieces(skip, len)
            .map(|(i, off, n, _)| self.segs[i].clone().split_at(off).1.split_at(n).0)
    }

    /// A copy of `len` bytes starting `skip` bytes in.
    pub fn sub(&self, skip: usize, len: usize) -> Self {
        self.range(skip, len).collect()
    }
}

impl<S: ReadSegment> Iov<S> {
    /// Copies bytes starting `skip` bytes in into `dst`; returns how many (fewer than
    /// `dst.len()` only at the end of the list).
    pub fn copy_to_slice(&self, skip: usize, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for (i, off, n, at) in self.pieces(skip, dst.len()) {
            self.segs[i].read_into(off, &mut dst[at..at + n]);
            done += n;
        }
        done
    }
}

impl<S: WriteSegment> Iov<S> {
    /// Copies `src` into the list starting `skip` bytes in; returns how many bytes
    /// (fewer than `src.len()` only at the end of the list).
    pub fn copy_from_slice(&mut self, skip: usize, src: &[u8]) -> usize {
        let mut done = 0;
        let pieces: Vec<_> = self.pieces(skip, src.len()).collect();
        for (i, off, n, at) in pieces {
            self.segs[i].write_from(off, &src[at..at + n]);
            done += n;
        }
        done
    }

    /// Zeroes `len` bytes starting `skip` bytes in (as far as the list reaches).
    pub fn fill_zero(&mut self, skip: usize, len: usize) {
        let pieces: Vec<_> = self.pieces(skip, len).collect();
        for (i, off, n, _) in pieces {
            self.segs[i].zero(off, n);
        }
    }
}

impl<'a> Iov<&'a [u8]> {
    /// The buffers of a vectored write.
    pub fn from_io_slices(bufs: &'a [IoSlice<'_>]) -> Self {
        bufs.iter().map(|b| &**b).collect()
    }

    /// The list as the buffers of a vectored write.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        self.segs.iter().map(|s| IoSlice::new(s)).collect()
    }
}

impl<'a> Iov<&'a mut [u8]> {
    /// The buffers of a vectored read.
    pub fn from_io_slices_mut(bufs: &'a mut [IoSliceMut<'_>]) -> Self {
        bufs.iter_mut().map(|b| &mut **b).collect()
    }

    /// The list as the buffers of a vectored read.
    pub fn io_slices_mut(&mut self) -> Vec<IoSliceMut<'_>> {
        self.segs.iter_mut().map(|s| IoSliceMut::new(s)).collect()
    }

    /// The same bytes, borrowed for a shorter time (to slice them and keep the list).
    pub fn reborrow(&mut self) -> Iov<&mut [u8]> {
        Iov {
            len: self.len,
            segs: self.segs.iter_mut().map(|s| &mut **s).collect(),
        }
    }
}

impl<S: Segment> From<S> for Iov<S> {
    fn from(s: S) -> Self {
        let mut iov = Iov::with_capacity(1);
        iov.push(s);
        iov
    }
}

impl<S: Segment> FromIterator<S> for Iov<S> {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut iov = Iov::new();
        for s in iter {
            iov.push(s);
        }
        iov
    }
}

impl<S: Segment> Extend<S> for Iov<S> {
    fn extend<I: IntoIterator<Item = S>>(&mut self, iter: I) {
        for s in iter {
            self.push(s);
        }
    }
}

impl<S> IntoIterator for Iov<S> {
    type Item = S;
    type IntoIter = std::vec::IntoIter<S>;
    fn into_iter(self) -> Self::IntoIter {
        self.segs.into_iter()
    }
}

impl<'a, S> IntoIterator for &'a Iov<S> {
    type Item = &'a S;
    type IntoIter = std::slice::Iter<'a, S>;
    fn into_iter(self) -> Self::IntoIter {
        self.segs.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_cross_segment_boundaries() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let src = [IoSlice::new(&a), IoSlice::new(&b)];
        let mut out = [0u8; 3];
        assert_eq!(Iov::from_io_slices(&src).copy_to_slice(2, &mut out), 3);
        assert_eq!(out, [3, 4, 5]);

        let mut x = [0u8; 2];
        let mut y = [0u8; 3];
        {
            let mut dst = [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)];
            let mut iov = Iov::from_io_slices_mut(&mut dst);
            assert_eq!(iov.copy_from_slice(1, &[9, 8, 7]), 3);
            iov.fill_zero(3, 1);
            // Past the end: copies what fits.
            assert_eq!(iov.copy_from_slice(4, &[6, 6]), 1);
        }
        assert_eq!(x, [0, 9]);
        assert_eq!(y, [8, 0, 6]);
    }

    #[test]
    fn splits_takes_and_skips_guest_ranges() {
        let r = |a: u64, l: usize| GuestRange::new(GuestAddress(a), l);
        let iov: Iov<GuestRange> = [r(0x1000, 16), r(0x2000, 0), r(0x3000, 100)]
            .into_iter()
            .collect();
        assert_eq!(iov.len(), 116);
        assert_eq!(iov.segments().len(), 2, "empty segments are dropped");
        let (h, t) = iov.clone().split_at(20);
        assert_eq!(h.segments(), [r(0x1000, 16), r(0x3000, 4)]);
        assert_eq!(t.segments(), [r(0x3004, 96)]);
        assert_eq!(iov.sub(10, 10).segments(), [r(0x100a, 6), r(0x3000, 4)]);
        assert_eq!(iov.clone().slice(16, 1000).segments(), [r(0x3000, 100)]);
        assert_eq!(iov.clone().take(0).len(), 0);
        assert!(iov.clone().skip(500).is_empty());
        let mut a = iov.clone();
        a.advance(17);
        assert_eq!(a.segments(), [r(0x3001, 99)]);
        assert_eq!(
            iov.last().map(|s| s.last_addr()),
            Some(GuestAddress(0x3063))
        );
    }

    #[test]
    fn volatile_slices_copy_and_zero() {
        let mut mem = [7u8; 8];
        let (lo, hi) = mem.split_at_mut(3);
        let mut iov: Iov<VolatileSlice<'_>> = [VolatileSlice::from(lo), VolatileSlice::from(hi)]
            .into_iter()
            .collect();
        assert_eq!(iov.copy_from_slice(2, &[1, 2, 3]), 3);
        iov.fill_zero(6, 5);
        let mut out = [0u8; 8];
        assert_eq!(iov.copy_to_slice(0, &mut out), 8);
        assert_eq!(out, [7, 7, 1, 2, 3, 7, 0, 0]);
    }

    #[test]
    fn system_iovecs_advance() {
        let mut buf = [0u8; 10];
        let base = buf.as_mut_ptr();
        let mut iov: Iov<libc::iovec> = [(0usize, 4usize), (4, 6)]
            .into_iter()
            .map(|(o, l)| libc::iovec {
                iov_base: base.wrapping_add(o).cast(),
                iov_len: l,
            })
            .collect();
        iov.advance(5);
        assert_eq!(iov.len(), 5);
        assert_eq!(
            iov.segments()[0].iov_base.cast::<u8>(),
            base.wrapping_add(5)
        );
    }
}

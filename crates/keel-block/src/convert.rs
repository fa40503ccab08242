//! Copying an image's contents into another, as `qemu-img convert` does: plain,
//! compressed (qcow2), or as an overlay holding only what differs from a backing image.

use crate::backend::BlockBackend;
use crate::buf::AlignedBuf;
use crate::error::Result;
use crate::qcow2::Qcow2;
use crate::raw::RawFile;

/// Where [`convert`] writes.
pub enum Destination<'a> {
    /// Any backend, written as it is. A new image reads as zeroes, so ranges of
    /// zeroes are not written.
    Plain(&'a dyn BlockBackend),
    /// A qcow2 image whose clusters are written compressed (clusters that do not
    /// shrink are stored as they are).
    Compressed(&'a Qcow2<RawFile>),
    /// An overlay of `backing` (the image the destination reads through): only the
    /// `granularity`-sized blocks (its cluster size) whose contents differ from
    /// `backing`'s are written, zeroes as zero clusters.
    Overlay {
        /// The new overlay.
        image: &'a dyn BlockBackend,
        /// What it reads through where it holds nothing.
        backing: &'a dyn BlockBackend,
        /// Block size of the comparison: the overlay's cluster size.
        granularity: u64,
    },
}

/// Copies the contents of `src` into `dst` (at least as large), reporting the
/// fraction done to `progress`.
///
/// # Examples
///
/// ```
/// use keel_block::convert::{convert, Destination};
/// use keel_block::{BlockBackend, MemBackend};
///
/// let src = MemBackend::new((0..1 << 20).map(|i| (i / 4096) as u8).collect());
/// let dst = MemBackend::new(vec![0; 1 << 20]);
/// convert(&src, Destination::Plain(&dst), &mut |_| {})?;
/// let (mut a, mut b) = (vec![0; 1 << 20], vec![0; 1 << 20]);
/// src.read_at(&mut a, 0)?;
/// dst.read_at(&mut b, 0)?;
/// assert_eq!(a, b);
/// # Ok::<(), keel_block::Error>(())
/// ```
pub fn convert(
    src: &dyn BlockBackend,
    dst: Destination<'_>,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let size = src.size();
    let chunk: u64 = match &dst {
        // Compressed writes take whole clusters.
        Destination::Compressed(q) => q.cluster_size().max(64 << 10),
        Destination::Overlay { granularity, .. } => (2 << 20) / (*granularity).max(1) * granularity,
        Destination::Plain(_) => 2 << 20,
    }
    .max(512);
    let mut buf = AlignedBuf::new(chunk as usize, 4096);
    let mut old = match &dst {
        Destination::Overlay { .. } => vec![0u8; chunk as usize],
        _ => Vec::new(),
    };
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(chunk) as usize;
        let b = &mut buf.as_mut_slice()[..n];
        src.read_at(b, pos)?;
        match &dst {
            Destination::Compressed(q) => {
                let cs = q.cluster_size() as usize;
                for (k, c) in b.chunks(cs).enumerate() {
                    if !is_zero(c) {
                        q.write_compressed(pos + (k * cs) as u64, c)?;
                    }
                }
            }
            Destination::Plain(d) => {
                if !is_zero(b) {
                    d.write_at(b, pos)?;
                }
            }
            Destination::Overlay {
                image,
                backing,
                granularity,
            } => {
                let old = &mut old[..n];
                read_zero_padded(*backing, old, pos)?;
                let g = *granularity as usize;
                for (k, (new, was)) in b.chunks(g).zip(old.chunks(g)).enumerate() {
                    let at = pos + (k * g) as u64;
                    if new == was {
                        continue;
                    }
                    if is_zero(new) {
                        image.write_zeroes(at, new.len() as u64, false)?;
                    } else {
                        image.write_at(new, at)?;
                    }
                }
            }
        }
        pos += n as u64;
        progress(pos as f64 / size as f64);
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `pos`, zeroes past `b`'s end.
fn read_zero_padded(b: &dyn BlockBackend, buf: &mut [u8], pos: u64) -> Result<()> {
    let avail = b.size().saturating_sub(pos).min(buf.len() as u64) as usize;
    if avail > 0 {
        b.read_at(&mut buf[..avail], pos)?;
    }
    buf[avail..].fill(0);
    Ok(())
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

//! Comparing the contents of two images, as `qemu-img compare` does.
//!
//! Ranges both images' block status calls zeroes are not read. Differences are found
//! at 512-byte granularity: the offset reported is that of the first 512-byte sector
//! whose contents differ. Without `strict`, images of different sizes compare equal
//! when the larger one holds only zeroes past the smaller one's end.

use crate::chain::{BlockStatus, Chain};
use crate::error::Result;

/// Bytes read at once from each image.
const CHUNK: u64 = 2 << 20;
/// The unit in which differences are reported.
const SECTOR: usize = 512;

/// Why two images differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Difference {
    /// The contents differ at this offset (the start of a 512-byte sector). `past_end`:
    /// the offset lies past the smaller image's end, where the larger one is not zero.
    Content {
        /// First differing byte's sector.
        offset: u64,
        /// Found past the smaller image's end.
        past_end: bool,
    },
    /// Strict mode: the sizes differ.
    Size,
    /// Strict mode: the block status (allocation, zero, data) differs at this offset.
    Status {
        /// Start of the first range whose status differs.
        offset: u64,
    },
}

/// The outcome of [`compare`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    /// The first difference found, `None` if the images read the same.
    pub difference: Option<Difference>,
    /// The virtual sizes differ.
    pub sizes_differ: bool,
}

/// Compares the contents of two images (each through its backing chain). With
/// `strict`, images also differ when their sizes or block status differ.
/// `progress` is told the fraction done, from 0.0 to 1.0.
///
/// # Examples
///
/// ```
/// use keel_block::chain::Chain;
/// use keel_block::compare::{compare, Difference};
/// use keel_block::{BlockBackend, Format, Qcow2Options, RawFile, RawOptions};
///
/// let dir = tempfile::tempdir().unwrap();
/// let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
/// RawFile::create(&a, 1 << 20)?;
/// RawFile::create(&b, 2 << 20)?;
/// let f = RawFile::open(&b, RawOptions::default())?;
/// f.write_at(&[1; 10], 4096 + 700)?;
/// drop(f);
/// let open = |p| Chain::open(p, Format::Raw, Qcow2Options::default());
/// let c = compare(&open(&a)?, &open(&b)?, false, &mut |_| {})?;
/// assert!(c.sizes_differ);
/// assert_eq!(c.difference, Some(Difference::Content { offset: 4096 + 512, past_end: false }));
/// # Ok::<(), keel_block::Error>(())
/// ```
pub fn compare(
    a: &Chain,
    b: &Chain,
    strict: bool,
    progress: &mut dyn FnMut(f64),
) -> Result<Comparison> {
    let (sa, sb) = (a.size(), b.size());
    let sizes_differ = sa != sb;
    let done = |difference| {
        Ok(Comparison {
            difference: Some(difference),
            sizes_differ,
        })
    };
    if strict && sizes_differ {
        return done(Difference::Size);
    }
    let common = sa.min(sb);
    let total = sa.max(sb).max(1) as f64;
    let (ea, eb) = (statuses(a, common)?, statuses(b, common)?);
    let (mut ia, mut ib) = (0, 0);
    let mut pos = 0;
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    while pos < common {
        let (x, y) = (&ea[ia], &eb[ib]);
        let end = (x.start + x.length).min(y.start + y.length);
        if strict && !same_status(x, y, sa) {
            return done(Difference::Status { offset: pos });
        }
        if !(x.zero && y.zero) && (x.present || y.present) {
            let mut p = pos;
            while p < end {
                let n = (end - p).min(CHUNK) as usize;
                let (ba, bb) = (&mut buf_a[..n], &mut buf_b[..n]);
                if x.present {
                    a.image().backend().read_at(ba, p)?;
                } else {
                    ba.fill(0);
                }
                if y.present {
                    b.image().backend().read_at(bb, p)?;
                } else {
                    bb.fill(0);
                }
                if let Some(k) = first_diff(ba, bb) {
                    return done(Difference::Content {
                        offset: p + k,
                        past_end: false,
                    });
                }
                p += n as u64;
            }
        }
        progress(end as f64 / total);
        pos = end;
        if pos == x.start + x.length {
            ia += 1;
        }
        if pos == y.start + y.length {
            ib += 1;
        }
    }
    if sizes_differ {
        let over = if sa > sb { a } else { b };
        let size = over.size();
        let zeroes = vec![0u8; CHUNK as usize];
        for e in over.block_status(common, size - common)? {
            if !e.present || e.zero {
                continue;
            }
            let mut p = e.start;
            while p < e.start + e.length {
                let n = (e.start + e.length - p).min(CHUNK) as usize;
                over.image().backend().read_at(&mut buf_a[..n], p)?;
                if let Some(k) = first_diff(&buf_a[..n], &zeroes[..n]) {
                    return done(Difference::Content {
                        offset: p + k,
                        past_end: true,
                    });
                }
                p += n as u64;
            }
        }
    }
    progress(1.0);
    Ok(Comparison {
        difference: None,
        sizes_differ,
    })
}

fn statuses(c: &Chain, len: u64) -> Result<Vec<BlockStatus>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    c.block_status(0, len)
}

/// Whether two ranges' block status agrees, as strict mode requires: the same flags,
/// and both ending at the image's end or neither.
fn same_status(x: &BlockStatus, y: &BlockStatus, size: u64) -> bool {
    (x.present, x.zero, x.data, x.compressed, x.offset.is_some())
        == (y.present, y.zero, y.data, y.compressed, y.offset.is_some())
        && (x.start + x.length == size) == (y.start + y.length == size)
}

/// Offset of the first 512-byte sector where `a` and `b` differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| (i * SECTOR) as u64)
}

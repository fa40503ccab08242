//! How large an image would be: the sizes `qemu-img measure` reports for a new image
//! of a given format, options and size or contents.

use crate::chain::Chain;
use crate::error::Result;
use crate::qcow2::bitmaps::bitmaps;
use crate::qcow2::CreateOptions;

pub use crate::volume::Preallocation;

/// The image to measure for.
#[derive(Debug, Clone)]
pub enum Target {
    /// A raw image.
    Raw,
    /// A qcow2 image with these creation options (`size` is ignored: the size comes
    /// from the [`Source`]) and this preallocation.
    Qcow2(CreateOptions, Preallocation),
}

/// What the new image would hold.
pub enum Source<'a> {
    /// An empty image of this virtual size.
    Size(u64),
    /// A copy of this image (through its backing chain).
    Image(&'a Chain),
}

/// The sizes, in bytes, of `qemu-img measure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// File size the new image needs for its contents.
    pub required: u64,
    /// File size with every cluster allocated.
    pub fully_allocated: u64,
    /// Space the source's persistent dirty bitmaps would take, when both the source
    /// and the target can hold them (qcow2 version 3).
    pub bitmaps: Option<u64>,
}

/// Measures the file a new image of `target` holding `source` needs.
///
/// # Examples
///
/// ```
/// use keel_block::measure::{measure, Preallocation, Source, Target};
/// use keel_block::qcow2::CreateOptions;
///
/// let m = measure(&Target::Qcow2(CreateOptions::default(), Preallocation::Off), Source::Size(1 << 30))?;
/// assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
/// let m = measure(&Target::Raw, Source::Size(1000))?;
/// assert_eq!((m.required, m.fully_allocated), (1024, 1024));
/// # Ok::<(), keel_block::Error>(())
/// ```
pub fn measure(target: &Target, source: Source<'_>) -> Result<Measurement> {
    match target {
        Target::Raw => {
            let size = match source {
                Source::Size(s) => s.div_ceil(512) * 512,
                Source::Image(c) => c.size(),
            };
            Ok(Measurement {
                required: size,
                fully_allocated: size,
                bitmaps: None,
            })
        }
        Target::Qcow2(o, prealloc) => {
            // The options and the size as `create` would take them (a cluster size of 3
            // or a size of 2^64 - 1 are refused, not divided by or overflowed).
            let size = match source {
                Source::Size(s) => s,
                Source::Image(c) => c.size(),
            };
            crate::qcow2::check_options(&crate::qcow2::CreateOptions { size, ..o.clone() })?;
            let cs = o.cluster_size;
            let full = matches!(prealloc, Preallocation::Full | Preallocation::Falloc);
            let (virtual_size, mut required, bitmaps) = match source {
                Source::Size(s) => (s.div_ceil(cs) * cs, 0, None),
                Source::Image(c) => {
                    let vs = c.size().div_ceil(cs) * cs;
                    let required = if full { vs } else { data_size(c, cs)? };
                    let bitmaps = match c.layers()[0].qcow2_info() {
                        Some(i) if i.version >= 3 && o.version >= 3 => Some(bitmaps_size(c, cs)?),
                        _ => None,
                    };
                    (vs, required, bitmaps)
                }
            };
            if full {
                required = virtual_size;
            }
            let fully_allocated = prealloc_size(
                virtual_size,
                cs,
                o.refcount_bits.trailing_zeros(),
                o.extended_l2,
            );
            Ok(Measurement {
                required: fully_allocated - virtual_size + required,
                fully_allocated,
                bitmaps,
            })
        }
    }
}

/// Bytes of whole clusters holding data, as QEMU counts them.
fn data_size(c: &Chain, cs: u64) -> Result<u64> {
    let size = c.size();
    if size == 0 {
        return Ok(0);
    }
    let st = c.block_status(0, size)?;
    let mut required = 0;
    let mut offset = 0;
    let mut i = 0;
    while offset < size {
        while st[i].start + st[i].length <= offset {
            i += 1;
        }
        let e = &st[i];
        let mut pnum = e.start + e.length - offset;
        if e.zero {
            // Skipped.
        } else if e.data && e.present {
            pnum = (offset + pnum).div_ceil(cs) * cs - offset;
            required += offset % cs + pnum;
        }
        offset += pnum;
    }
    Ok(required)
}

/// QEMU's `qcow2_calc_prealloc_size`: the file size of a fully allocated image.
fn prealloc_size(total: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = total.div_ceil(cs) * cs;
    let l2e: u64 = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// QEMU's `qcow2_refcount_metadata_size`: refcount table and blocks for `clusters`
/// clusters and themselves (the fixed point).
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cs
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size` for the top image's bitmaps.
fn bitmaps_size(c: &Chain, cs: u64) -> Result<u64> {
    let top = &c.layers()[0];
    let Some(h) = top.qcow2_header() else {
        return Ok(0);
    };
    let (mut size, mut dir_bytes) = (0u64, 0u64);
    for b in bitmaps(top.file(), &h)? {
        let bits = c.size().div_ceil(b.granularity);
        let clusters = bits.div_ceil(8).div_ceil(cs);
        // The bitmap's clusters, its table's, and its directory entry.
        size += clusters * cs;
        size += (clusters * 8).div_ceil(cs) * cs;
        dir_bytes += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    Ok(size + dir_bytes.div_ceil(cs) * cs)
}

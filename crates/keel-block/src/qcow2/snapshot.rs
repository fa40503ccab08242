//! The internal snapshot table: parsing (bounds-checked).
//!
//! Writing to an image with snapshots is safe because every write checks
//! refcounts: a data cluster or L2 table whose refcount is above one is
//! shared with a snapshot and is copied before it is changed (see
//! `Meta::l2_writable` and `Qcow2::map_write`).

use super::header::{Header, MAX_L1_BYTES};
use crate::backend::BlockBackend;
use crate::error::{Error, InvalidImage, Result, SnapshotProblem};

/// Largest snapshot table we read (QEMU's limit is 64 MiB).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Largest extra data per entry we accept (QEMU's limit).
pub(super) const MAX_EXTRA: u64 = 1024;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id string.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Host offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count, if recorded.
    pub icount: Option<u64>,
    /// Bytes this entry takes in the table (padded to 8).
    pub entry_len: u64,
}

fn be16(b: &[u8], o: usize) -> u64 {
    u16::from_be_bytes([b[o], b[o + 1]]) as u64
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Reads and validates the snapshot table of the image in `f`.
pub fn read_snapshots(f: &dyn BlockBackend, h: &Header) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok(out);
    }
    let fsize = f.size();
    let cs = h.cluster_size();
    let mut off = h.snapshots_offset;
    let bad = |index: u32, problem: SnapshotProblem| {
        Error::InvalidImage(InvalidImage::Snapshot { index, problem })
    };
    for k in 0..h.nb_snapshots {
        if off - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(bad(
                k,
                SnapshotProblem::TableTooLarge {
                    limit: MAX_TABLE_BYTES,
                },
            ));
        }
        if off.saturating_add(40) > fsize {
            return Err(bad(k, SnapshotProblem::PastEnd));
        }
        let mut fixed = [0u8; 40];
        f.read_at(&mut fixed, off)?;
        let l1_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12);
        let name_len = be16(&fixed, 14);
        let extra_len = be32(&fixed, 36) as u64;
        if extra_len > MAX_EXTRA {
            return Err(bad(
                k,
                SnapshotProblem::ExtraData {
                    len: extra_len,
                    limit: MAX_EXTRA,
                },
            ));
        }
        let var = extra_len + id_len + name_len;
        if (off + 40).saturating_add(var) > fsize {
            return Err(bad(k, SnapshotProblem::PastEnd));
        }
        let mut rest = vec![0u8; var as usize];
        f.read_at(&mut rest, off + 40)?;
        if l1_offset % cs != 0
            || l1_size as u64 * 8 > MAX_L1_BYTES
            || (l1_size > 0
                && (l1_offset == 0 || l1_offset.saturating_add(l1_size as u64 * 8) > fsize))
        {
            return Err(bad(
                k,
                SnapshotProblem::L1Table {
                    offset: l1_offset,
                    size: l1_size,
                },
            ));
        }
        let extra = &rest[..extra_len as usize];
        let vm_state_size = if extra_len >= 8 {
            be64(extra, 0)
        } else {
            be32(&fixed, 32) as u64
        };
        let disk_size = (extra_len >= 16).then(|| be64(extra, 8));
        let icount = (extra_len >= 24)
            .then(|| be64(extra, 16))
            .filter(|&v| v != u64::MAX);
        let e = extra_len as usize;
        let id = String::from_utf8_lossy(&rest[e..e + id_len as usize]).into_owned();
        let name = String::from_utf8_lossy(&rest[e + id_len as usize..]).into_owned();
        let entry_len = (40 + var).div_ceil(8) * 8;
        out.push(Snapshot {
            id,
            name,
            l1_offset,
            l1_size,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            icount,
            entry_len,
        });
        off += entry_len;
    }
    Ok(out)
}

/// Total length of the snapshot table in bytes.
pub fn table_len(snaps: &[Snapshot]) -> u64 {
    snaps.iter().map(|s| s.entry_len).sum()
}

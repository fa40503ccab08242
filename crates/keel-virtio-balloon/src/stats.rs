//! Memory statistics (virtio 1.2 section 5.5.6.3, and the tags Linux added since): the
//! tags, and the parser for the buffers the driver sends on the statistics queue.

use std::time::{Instant, SystemTime};

use crate::spec::STAT_SIZE;

/// A statistics tag. Tags 0-9 are virtio 1.2's; 10-15 were added by Linux
/// (include/uapi/linux/virtio_balloon.h) and are in virtio 1.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum StatTag {
    /// VIRTIO_BALLOON_S_SWAP_IN: bytes swapped in.
    SwapIn,
    /// VIRTIO_BALLOON_S_SWAP_OUT: bytes swapped out.
    SwapOut,
    /// VIRTIO_BALLOON_S_MAJFLT: major page faults.
    MajorFaults,
    /// VIRTIO_BALLOON_S_MINFLT: minor page faults.
    MinorFaults,
    /// VIRTIO_BALLOON_S_MEMFREE: bytes of memory not in use.
    FreeMemory,
    /// VIRTIO_BALLOON_S_MEMTOT: bytes of memory in total.
    TotalMemory,
    /// VIRTIO_BALLOON_S_AVAIL: bytes of memory available without swapping.
    AvailableMemory,
    /// VIRTIO_BALLOON_S_CACHES: bytes of disk caches.
    DiskCaches,
    /// VIRTIO_BALLOON_S_HTLB_PGALLOC: successful hugetlb page allocations.
    HugetlbAllocations,
    /// VIRTIO_BALLOON_S_HTLB_PGFAIL: failed hugetlb page allocations.
    HugetlbFailures,
    /// VIRTIO_BALLOON_S_OOM_KILL: OOM killer invocations.
    OomKills,
    /// VIRTIO_BALLOON_S_ALLOC_STALL: allocation stalls.
    AllocationStalls,
    /// VIRTIO_BALLOON_S_ASYNC_SCAN: pages scanned by kswapd.
    AsyncScans,
    /// VIRTIO_BALLOON_S_DIRECT_SCAN: pages scanned by direct reclaim.
    DirectScans,
    /// VIRTIO_BALLOON_S_ASYNC_RECLAIM: pages reclaimed by kswapd.
    AsyncReclaims,
    /// VIRTIO_BALLOON_S_DIRECT_RECLAIM: pages reclaimed by direct reclaim.
    DirectReclaims,
}

impl StatTag {
    /// Every tag, in tag order.
    pub const ALL: [StatTag; 16] = [
        StatTag::SwapIn,
        StatTag::SwapOut,
        StatTag::MajorFaults,
        StatTag::MinorFaults,
        StatTag::FreeMemory,
        StatTag::TotalMemory,
        StatTag::AvailableMemory,
        StatTag::DiskCaches,
        StatTag::HugetlbAllocations,
        StatTag::HugetlbFailures,
        StatTag::OomKills,
        StatTag::AllocationStalls,
        StatTag::AsyncScans,
        StatTag::DirectScans,
        StatTag::AsyncReclaims,
        StatTag::DirectReclaims,
    ];

    /// The tag with wire value `v`, if it is one.
    pub fn from_wire(v: u16) -> Option<StatTag> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// The wire value.
    pub fn wire(self) -> u16 {
        Self::ALL.iter().position(|&t| t == self).unwrap_or(0) as u16
    }

    /// The name QEMU's `guest-stats` property uses (`stat-free-memory`, ...), for display.
    pub fn name(self) -> &'static str {
        match self {
            StatTag::SwapIn => "stat-swap-in",
            StatTag::SwapOut => "stat-swap-out",
            StatTag::MajorFaults => "stat-major-faults",
            StatTag::MinorFaults => "stat-minor-faults",
            StatTag::FreeMemory => "stat-free-memory",
            StatTag::TotalMemory => "stat-total-memory",
            StatTag::AvailableMemory => "stat-available-memory",
            StatTag::DiskCaches => "stat-disk-caches",
            StatTag::HugetlbAllocations => "stat-htlb-pgalloc",
            StatTag::HugetlbFailures => "stat-htlb-pgfail",
            StatTag::OomKills => "stat-oom-kills",
            StatTag::AllocationStalls => "stat-alloc-stalls",
            StatTag::AsyncScans => "stat-async-scans",
            StatTag::DirectScans => "stat-direct-scans",
            StatTag::AsyncReclaims => "stat-async-reclaims",
            StatTag::DirectReclaims => "stat-direct-reclaims",
        }
    }
}

/// The last statistics the driver sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsReport {
    /// When the device received them (monotonic).
    pub received: Instant,
    /// When the device received them (wall clock).
    pub received_wall: SystemTime,
    /// The value of each tag the driver reported, in tag order; tags it did not send are
    /// `None` (a driver sends only what it knows).
    pub values: [Option<u64>; 16],
    /// Entries with a tag no version of the specification defines (ignored).
    pub unknown_tags: u32,
}

impl StatsReport {
    /// The value reported for `tag`.
    pub fn get(&self, tag: StatTag) -> Option<u64> {
        self.values[usize::from(tag.wire())]
    }
}

/// Why a statistics buffer was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StatsBufferError {
    /// Its length is not a whole number of 10-byte entries.
    #[error("a statistics buffer of {0} bytes is not a whole number of 10-byte entries")]
    OddLength(usize),
    /// It is longer than [`MAX_STATS_BYTES`].
    #[error("a statistics buffer of {0} bytes is too long")]
    TooLong(usize),
}

/// Longest statistics buffer read: 256 entries (a driver sends one per tag it knows).
pub const MAX_STATS_BYTES: usize = 256 * STAT_SIZE;

/// Parses a statistics buffer (the bytes the driver made device-readable): entries with a
/// known tag are kept (a repeated tag keeps its last value), unknown tags are counted.
///
/// # Examples
///
/// ```
/// use keel_virtio_balloon::stats::{parse_stats, StatTag};
///
/// let mut buf = Vec::new();
/// buf.extend_from_slice(&4u16.to_le_bytes()); // VIRTIO_BALLOON_S_MEMFREE
/// buf.extend_from_slice(&(64u64 << 20).to_le_bytes());
/// buf.extend_from_slice(&99u16.to_le_bytes()); // no such tag
/// buf.extend_from_slice(&1u64.to_le_bytes());
/// let report = parse_stats(&buf).unwrap();
/// assert_eq!(report.get(StatTag::FreeMemory), Some(64 << 20));
/// assert_eq!(report.unknown_tags, 1);
/// ```
pub fn parse_stats(buf: &[u8]) -> Result<StatsReport, StatsBufferError> {
    if buf.len() > MAX_STATS_BYTES {
        return Err(StatsBufferError::TooLong(buf.len()));
    }
    if buf.len() % STAT_SIZE != 0 {
        return Err(StatsBufferError::OddLength(buf.len()));
    }
    let mut report = StatsReport {
        received: Instant::now(),
        received_wall: SystemTime::now(),
        values: [None; 16],
        unknown_tags: 0,
    };
    for entry in buf.chunks_exact(STAT_SIZE) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&entry[2..]);
        match StatTag::from_wire(tag) {
            Some(t) => report.values[usize::from(t.wire())] = Some(u64::from_le_bytes(v)),
            None => report.unknown_tags += 1,
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for (i, t) in StatTag::ALL.iter().enumerate() {
            assert_eq!(usize::from(t.wire()), i);
            assert_eq!(StatTag::from_wire(i as u16), Some(*t));
        }
        assert_eq!(StatTag::from_wire(16), None);
    }

    #[test]
    fn malformed_buffers() {
        assert_eq!(parse_stats(&[0; 11]), Err(StatsBufferError::OddLength(11)));
        assert_eq!(
            parse_stats(&vec![0; MAX_STATS_BYTES + STAT_SIZE]),
            Err(StatsBufferError::TooLong(MAX_STATS_BYTES + STAT_SIZE))
        );
        let empty = parse_stats(&[]).unwrap();
        assert!(empty.values.iter().all(Option::is_none));
    }
}

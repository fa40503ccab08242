//! Host clusters with data transfers in flight, and why that is enough to
//! make discard safe against concurrent I/O.
//!
//! # The hazard
//!
//! A data transfer is split in two: the guest range is *mapped* to host
//! clusters under the metadata lock, then the data moves without that lock,
//! either inline (the synchronous [`BlockBackend`](crate::BlockBackend)
//! methods, [`ThreadQueue`](crate::aio::ThreadQueue)) or long after the call
//! returned ([`UringQueue`](crate::aio::UringQueue) hands it to the kernel).
//! Between the two, a discard or an unmapping write-zeroes of the same guest
//! range may drop the host cluster's last reference. If the allocator then
//! handed that cluster to another guest offset, the late write would land in
//! the other offset's data, and a late read would return it. The metadata
//! stays consistent, so `check` cannot notice. Guests are untrusted and may
//! overlap requests in any order, so this must be impossible, not unlikely.
//!
//! # The rule
//!
//! Every mapping of a guest range to host data clusters *pins* those
//! clusters, atomically with the lookup (under the metadata lock), and the
//! pin lasts until the transfer has completed: a [`Mapping`] owns it and
//! releases it on drop. The allocator never hands out a pinned cluster:
//! a cluster whose refcount dropped to zero while pinned stays free but
//! unused until its last pin goes, and is then offered again. Refcounts
//! themselves are always exact (decrements are not deferred), so the image
//! on disk is consistent at every moment and nothing has to be caught up at
//! flush, close or after a crash. The same rule covers every way a cluster
//! changes owner:
//!
//! * discard and write-zeroes with unmap freeing a cluster with a write or a
//!   read in flight (the late write lands in a free cluster; the late read
//!   returns the old data);
//! * a free cluster reused for an L2 table or a refcount block, which a late
//!   data write would otherwise corrupt;
//! * a cluster shared by several L2 entries (refcount above one) that one of
//!   them copies away, leaving the other as the sole owner: if a read through
//!   the old sharer is in flight, the new owner copies on write instead of
//!   writing in place.
//!
//! A freed cluster that is pinned is not given back to the host (hole
//! punched), so a late read still returns the data it was issued for.
//!
//! The converse race, a read overlapping an allocating write whose data has
//! not landed yet, would see the new L2 entry and read whatever the host
//! cluster held before: a previous owner's data. So a cluster newly linked
//! for a write is zeroed in full before its L2 entry changes (not only the
//! part outside the written range; on files this is one `fallocate`), and
//! such a read gets zeroes, the guest cluster's content before the write.
//! Copy on write copies the whole old cluster before linking, to the same
//! effect.
//!
//! # Why not serialise overlapping requests
//!
//! QEMU waits: requests overlapping an in-flight allocation or discard are
//! queued behind it. That needs a wait queue per range and a way for a
//! completion-based engine to park a request, and it orders requests the
//! guest did not ask to order. Here the only thing that must not happen is
//! reuse of a cluster under a transfer, so only the allocator waits (by
//! looking elsewhere), nothing blocks, and a discard racing a transfer to the
//! same range gives one of the results the guest could expect from two
//! overlapping requests in flight: the old data, the new data or zeroes,
//! per block, never another offset's data.
//!
//! # The one wait: copies on write in flight
//!
//! [`UringQueue`](crate::aio::UringQueue) copies a partial write's cluster from the
//! backing image asynchronously (`Qcow2::map_write_or_copy`): the host cluster is
//! allocated and pinned, the old contents read and the data merged in, the cluster
//! written, and only then is the L2 entry linked. Until then the guest cluster reads
//! as before (the backing data), and a second write to it cannot be mapped: it would
//! allocate a cluster of its own, and whichever linked last would drop the other's
//! data. So requests that change the L2 entry of a cluster with a copy in flight wait
//! for the copy, as QEMU's do for in-flight allocations: the io_uring engine parks
//! them until one of its copies completes (or, with none of its own in flight, waits
//! for another queue's), and the synchronous paths wait on a condition variable, which
//! the engine never does while it has copies of its own in flight (it completes them
//! first). Reads and transfers to allocated clusters never wait.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::mapping::{Extent, ExtentKind, Mapping};

/// Counts of transfers in flight per host cluster.
#[derive(Default)]
pub(crate) struct InFlight {
    state: Mutex<State>,
}

/// The tables are keyed by host cluster indices, which come from L2 entries a crafted
/// image chooses, and one large request pins many clusters at once: they use std's keyed
/// SipHash (a random key per table), which chosen keys cannot make collide, not a cheap
/// multiplicative hash that puts every multiple of a large power of two in one chain.
type ClusterMap<V> = HashMap<u64, V>;
type ClusterSet = HashSet<u64>;

#[derive(Default)]
struct State {
    /// Pins per host cluster index; absent means zero.
    pins: ClusterMap<u32>,
    /// Free clusters the allocator passed over because they were pinned.
    passed: ClusterSet,
    /// The lowest passed-over cluster whose last pin has since gone.
    idle: Option<u64>,
}

impl InFlight {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether host cluster `c` has transfers in flight.
    pub(crate) fn is_pinned(&self, c: u64) -> bool {
        self.state().pins.contains_key(&c)
    }

    /// For the allocator: whether free cluster `c` must be skipped. A
    /// skipped cluster is reported by [`InFlight::take_idle`] once unpinned.
    pub(crate) fn skip_free(&self, c: u64) -> bool {
        let mut st = self.state();
        if st.pins.contains_key(&c) {
            st.passed.insert(c);
            true
        } else {
            false
        }
    }

    /// The lowest cluster skipped by the allocator that is free to use again.
    pub(crate) fn take_idle(&self) -> Option<u64> {
        self.state().idle.take()
    }

    fn pin(&self, ranges: &[(u64, u64)]) {
        let mut st = self.state();
        for &(first, n) in ranges {
            for c in first..first + n {
                *st.pins.entry(c).or_insert(0) += 1;
            }
        }
    }

    fn unpin(&self, ranges: &[(u64, u64)]) {
        let mut st = self.state();
        for &(first, n) in ranges {
            for c in first..first + n {
                let last = match st.pins.get_mut(&c) {
                    Some(k) if *k > 1 => {
                        *k -= 1;
                        false
                    }
                    Some(_) => true,
                    // Pins are balanced by construction; nothing to undo.
                    None => false,
                };
                if last {
                    st.pins.remove(&c);
                    if st.passed.remove(&c) {
                        st.idle = Some(st.idle.map_or(c, |i| i.min(c)));
                    }
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn pinned_clusters(&self) -> usize {
        self.state().pins.len()
    }
}

/// Pinned runs of host clusters, `(first, count)`, unpinned on drop.
pub(crate) struct Pin {
    set: Arc<InFlight>,
    ranges: Vec<(u64, u64)>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.set.unpin(&self.ranges);
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.ranges).finish()
    }
}

impl Mapping {
    /// Pins the host clusters (of `1 << cluster_bits` bytes) of every data
    /// and compressed extent. Call with the metadata lock held, so that no extent can be
    /// freed and reallocated between the lookup and the pin.
    pub(crate) fn pinned(extents: Vec<Extent>, set: &Arc<InFlight>, cluster_bits: u32) -> Mapping {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for e in &extents {
            let (h, len) = match e.kind {
                ExtentKind::Data(h) => (h, e.len),
                ExtentKind::Compressed { host, len } => (host, len),
                _ => continue,
            };
            {
                if len == 0 {
                    continue;
                }
                let first = h >> cluster_bits;
                let n = ((h + len - 1) >> cluster_bits) - first + 1;
                match ranges.last_mut() {
                    Some((f, k)) if *f + *k == first => *k += n,
                    _ => ranges.push((first, n)),
                }
            }
        }
        if ranges.is_empty() {
            return Mapping::unpinned(extents);
        }
        set.pin(&ranges);
        Mapping::with_pin(
            extents,
            Pin {
                set: set.clone(),
                ranges,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clusters at multiples of a large power of two (which a crafted image's L2 entries
    /// choose) must not pile up in one probe chain of the pin table.
    #[test]
    fn pins_of_clusters_at_powers_of_two_stay_fast() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let set = InFlight::default();
            let ranges: Vec<(u64, u64)> = (1..=100_000u64).map(|i| (i << 30, 1)).collect();
            set.pin(&ranges);
            assert_eq!(set.pinned_clusters(), ranges.len());
            set.unpin(&ranges);
            let _ = tx.send(set.pinned_clusters());
        });
        let left = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("pinning 100000 clusters took more than 5 s");
        assert_eq!(left, 0);
    }
}

//! Which guest pages the balloon holds, and what goes back to the host: PFN arrays from
//! the inflate and deflate queues and ranges from the reporting queue are checked against
//! guest RAM, and whole pages of the backing's page size are released through a
//! [`MemoryReleaser`]. With huge pages, a huge page is released once every 4 KiB balloon
//! page in it is inflated; until then it is tracked as partial.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel_bus::ErrorChain;
use keel_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::release::MemoryReleaser;
use crate::spec::{BALLOON_PAGE, PFN_SHIFT};

/// Longest PFN array read from one inflate or deflate buffer: 65536 PFNs (256 MiB of
/// balloon pages; Linux sends at most 256 at a time). Longer arrays are ignored.
pub const MAX_PFN_ARRAY_BYTES: usize = 256 * 1024;

/// Why a PFN array was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PfnArrayError {
    /// Its length is not a whole number of le32 PFNs.
    #[error("a PFN array of {0} bytes is not a whole number of le32 entries")]
    OddLength(usize),
    /// It is longer than [`MAX_PFN_ARRAY_BYTES`].
    #[error("a PFN array of {0} bytes is too long")]
    TooLong(usize),
}

/// Checks the length of a PFN array of `len` bytes.
pub fn check_pfn_array(len: usize) -> Result<(), PfnArrayError> {
    if len > MAX_PFN_ARRAY_BYTES {
        Err(PfnArrayError::TooLong(len))
    } else if len % 4 != 0 {
        Err(PfnArrayError::OddLength(len))
    } else {
        Ok(())
    }
}

/// What the device counted since it was created. Malformed or out-of-range input is
/// ignored and counted here; nothing the guest sends stops the device.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) held_pages: AtomicU64,
    pub(crate) released_bytes: AtomicU64,
    pub(crate) release_failures: AtomicU64,
    pub(crate) pfns_outside_ram: AtomicU64,
    pub(crate) pfns_repeated: AtomicU64,
    pub(crate) pfns_not_inflated: AtomicU64,
    pub(crate) ignored_arrays: AtomicU64,
    pub(crate) oom_deflated_pages: AtomicU64,
    pub(crate) unrequested_deflated_pages: AtomicU64,
    pub(crate) stats_reports: AtomicU64,
    pub(crate) ignored_stats_buffers: AtomicU64,
    pub(crate) unknown_stat_tags: AtomicU64,
    pub(crate) reported_bytes: AtomicU64,
    pub(crate) ignored_report_ranges: AtomicU64,
    pub(crate) poison_kept_bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonCounters {
    /// 4 KiB pages the balloon holds now.
    pub held_pages: u64,
    /// Bytes released to the host (inflated and reported), in total.
    pub released_bytes: u64,
    /// Releases the releaser failed (the pages stay held but resident).
    pub release_failures: u64,
    /// PFNs outside guest RAM (past its end, in the MMIO hole): ignored.
    pub pfns_outside_ram: u64,
    /// Inflated PFNs the balloon already held: ignored.
    pub pfns_repeated: u64,
    /// Deflated PFNs the balloon did not hold: ignored.
    pub pfns_not_inflated: u64,
    /// Inflate or deflate arrays of an odd or too large size: ignored.
    pub ignored_arrays: u64,
    /// Pages deflated beyond what the target asked for, with DEFLATE_ON_OOM negotiated.
    pub oom_deflated_pages: u64,
    /// Pages deflated beyond what the target asked for without DEFLATE_ON_OOM (a driver
    /// breaking virtio 1.2 section 5.5.6.1; the pages are the guest's anyway).
    pub unrequested_deflated_pages: u64,
    /// Statistics buffers accepted.
    pub stats_reports: u64,
    /// Statistics buffers of an odd or too large size: ignored.
    pub ignored_stats_buffers: u64,
    /// Statistics entries with an unknown tag: ignored.
    pub unknown_stat_tags: u64,
    /// Bytes released through free page reporting.
    pub reported_bytes: u64,
    /// Reported ranges not inside guest RAM: ignored.
    pub ignored_report_ranges: u64,
    /// Reported bytes kept resident because the guest poisons free pages with a
    /// non-zero value (releasing them would lose the poison).
    pub poison_kept_bytes: u64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> BalloonCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BalloonCounters {
            held_pages: g(&self.held_pages),
            released_bytes: g(&self.released_bytes),
            release_failures: g(&self.release_failures),
            pfns_outside_ram: g(&self.pfns_outside_ram),
            pfns_repeated: g(&self.pfns_repeated),
            pfns_not_inflated: g(&self.pfns_not_inflated),
            ignored_arrays: g(&self.ignored_arrays),
            oom_deflated_pages: g(&self.oom_deflated_pages),
            unrequested_deflated_pages: g(&self.unrequested_deflated_pages),
            stats_reports: g(&self.stats_reports),
            ignored_stats_buffers: g(&self.ignored_stats_buffers),
            unknown_stat_tags: g(&self.unknown_stat_tags),
            reported_bytes: g(&self.reported_bytes),
            ignored_report_ranges: g(&self.ignored_report_ranges),
            poison_kept_bytes: g(&self.poison_kept_bytes),
        }
    }
}

struct RegionPages {
    start: u64,
    len: u64,
    page_size: u64,
    /// One bit per 4 KiB balloon page: held.
    bits: Vec<u64>,
}

impl RegionPages {
    fn test(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64, v: bool) {
        let w = &mut self.bits[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
    /// Whether every balloon page of the backing page holding offset `off` is held; if
    /// so, the backing page's offset. A backing page cut by the region's end is never
    /// complete.
    fn complete_page(&self, off: u64) -> Option<u64> {
        let first = off & !(self.page_size - 1);
        if first + self.page_size > self.len {
            return None;
        }
        let per = self.page_size / BALLOON_PAGE;
        let base = first / BALLOON_PAGE;
        (0..per).all(|k| self.test(base + k)).then_some(first)
    }
}

/// The balloon's pages: which 4 KiB pages it holds, region by region, and the releasing.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use keel_memory::GuestMemoryMmap;
/// use keel_virtio_balloon::pages::{Counters, PageTracker};
/// use keel_virtio_balloon::HostReleaser;
/// use vm_memory::GuestAddress;
///
/// let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let counters = Arc::new(Counters::default());
/// let mut pages = PageTracker::new(&mem, Arc::new(HostReleaser::new()), counters.clone());
/// // PFNs 5 and 6, then 5 again (ignored), then one past RAM (ignored).
/// let pfns: Vec<u8> = [5u32, 6, 5, 0x1000].iter().flat_map(|p| p.to_le_bytes()).collect();
/// pages.inflate(&pfns).unwrap();
/// let c = counters.snapshot();
/// assert_eq!((c.held_pages, c.pfns_repeated, c.pfns_outside_ram), (2, 1, 1));
/// ```
pub struct PageTracker {
    mem: GuestMemoryMmap,
    releaser: Arc<dyn MemoryReleaser>,
    regions: Vec<RegionPages>,
    counters: Arc<Counters>,
}

/// A release waiting to be made: consecutive pages are released in one call.
#[derive(Default)]
struct Pending(Vec<(u64, u64)>);

impl Pending {
    fn push(&mut self, gpa: u64, len: u64) {
        if let Some(last) = self.0.last_mut() {
            if last.0 + last.1 == gpa {
                last.1 += len;
                return;
            }
            if gpa + len == last.0 {
                *last = (gpa, last.1 + len);
                return;
            }
        }
        self.0.push((gpa, len));
    }
}

impl PageTracker {
    /// A tracker over `mem`'s regions (each region's page size asked of `releaser`),
    /// holding nothing.
    pub fn new(
        mem: &GuestMemoryMmap,
        releaser: Arc<dyn MemoryReleaser>,
        counters: Arc<Counters>,
    ) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let start = r.start_addr().0;
                let len = r.len();
                let page_size = releaser
                    .page_size(mem, r.start_addr())
                    .max(BALLOON_PAGE)
                    .next_power_of_two();
                let pages = len / BALLOON_PAGE;
                RegionPages {
                    start,
                    len,
                    page_size,
                    bits: vec![0; pages.div_ceil(64) as usize],
                }
            })
            .collect();
        counters.held_pages.store(0, Ordering::Relaxed);
        PageTracker {
            mem: mem.clone(),
            releaser,
            regions,
            counters,
        }
    }

    /// 4 KiB pages held.
    pub fn held_pages(&self) -> u64 {
        self.counters.held_pages.load(Ordering::Relaxed)
    }

    /// The region and balloon-page index of `pfn`, if the whole page is RAM.
    fn locate(&self, pfn: u32) -> Option<(usize, u64)> {
        let gpa = u64::from(pfn) << PFN_SHIFT;
        self.regions
            .iter()
            .position(|r| gpa >= r.start && gpa + BALLOON_PAGE <= r.start + r.len)
            .map(|i| (i, (gpa - self.regions[i].start) / BALLOON_PAGE))
    }

    fn flush(&self, pending: Pending, reported: bool) {
        for (gpa, len) in pending.0 {
            match self.releaser.release(&self.mem, GuestAddress(gpa), len) {
                Ok(()) => {
                    Counters::add(&self.counters.released_bytes, len);
                    if reported {
                        Counters::add(&self.counters.reported_bytes, len);
                    }
                }
                Err(e) => {
                    log::warn!("virtio-balloon: {}", ErrorChain(&e));
                    Counters::add(&self.counters.release_failures, 1);
                }
            }
        }
    }

    /// Inflates the pages of a PFN array (le32 PFNs of 4 KiB pages): pages outside RAM
    /// and pages already held are ignored and counted; whole backing pages are released.
    /// Returns the number of pages newly held.
    pub fn inflate(&mut self, array: &[u8]) -> Result<u64, PfnArrayError> {
        if let Err(e) = check_pfn_array(array.len()) {
            Counters::add(&self.counters.ignored_arrays, 1);
            return Err(e);
        }
        let mut pending = Pending::default();
        let mut added = 0;
        for p in array.chunks_exact(4) {
            let pfn = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            let Some((ri, i)) = self.locate(pfn) else {
                Counters::add(&self.counters.pfns_outside_ram, 1);
                continue;
            };
            let r = &mut self.regions[ri];
            if r.test(i) {
                Counters::add(&self.counters.pfns_repeated, 1);
                continue;
            }
            r.set(i, true);
            added += 1;
            if let Some(first) = r.complete_page(i * BALLOON_PAGE) {
                pending.push(r.start + first, r.page_size);
            }
        }
        Counters::add(&self.counters.held_pages, added);
        self.flush(pending, false);
        Ok(added)
    }

    /// Deflates the pages of a PFN array: pages the balloon does not hold (or outside
    /// RAM) are ignored and counted. Nothing needs doing for the host: a released page
    /// comes back on the guest's next touch. Returns the number of pages given back.
    pub fn deflate(&mut self, array: &[u8]) -> Result<u64, PfnArrayError> {
        if let Err(e) = check_pfn_array(array.len()) {
            Counters::add(&self.counters.ignored_arrays, 1);
            return Err(e);
        }
        let mut removed = 0;
        for p in array.chunks_exact(4) {
            let pfn = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            let Some((ri, i)) = self.locate(pfn) else {
                Counters::add(&self.counters.pfns_outside_ram, 1);
                continue;
            };
            let r = &mut self.regions[ri];
            if !r.test(i) {
                Counters::add(&self.counters.pfns_not_inflated, 1);
                continue;
            }
            r.set(i, false);
            removed += 1;
        }
        self.counters
            .held_pages
            .fetch_sub(removed, Ordering::Relaxed);
        Ok(removed)
    }

    /// Releases the free pages of reported ranges `(gpa, len)`: the whole backing pages
    /// inside each range. A range not inside one RAM region is ignored and counted. With
    /// `keep_poison` (the guest poisons free pages with a non-zero value) nothing is
    /// released, since the guest would read zeroes where it expects its poison.
    pub fn report(&mut self, ranges: &[(u64, u64)], keep_poison: bool) {
        let mut pending = Pending::default();
        for &(gpa, len) in ranges {
            let inside = gpa.checked_add(len).and_then(|end| {
                self.regions
                    .iter()
                    .find(|r| gpa >= r.start && end <= r.start + r.len && len > 0)
            });
            let Some(r) = inside else {
                Counters::add(&self.counters.ignored_report_ranges, 1);
                continue;
            };
            if keep_poison {
                Counters::add(&self.counters.poison_kept_bytes, len);
                continue;
            }
            let off = gpa - r.start;
            let first = off.next_multiple_of(r.page_size);
            let end = (off + len) & !(r.page_size - 1);
            if end > first {
                pending.push(r.start + first, end - first);
            }
        }
        self.flush(pending, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::ReleaseError;
    use std::sync::Mutex;

    /// Records releases; pretends the backing has pages of `page_size`.
    struct Recorder {
        page_size: u64,
        log: Mutex<Vec<(u64, u64)>>,
    }

    impl MemoryReleaser for Recorder {
        fn page_size(&self, _: &GuestMemoryMmap, _: GuestAddress) -> u64 {
            self.page_size
        }
        fn release(
            &self,
            _: &GuestMemoryMmap,
            g: GuestAddress,
            l: u64,
        ) -> Result<(), ReleaseError> {
            self.log.lock().unwrap().push((g.0, l));
            Ok(())
        }
    }

    fn tracker(page_size: u64) -> (PageTracker, Arc<Recorder>, Arc<Counters>) {
        // Two regions with a hole between them, like RAM below and above the MMIO hole.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(8 << 20), 4 << 20),
        ])
        .unwrap();
        let rec = Arc::new(Recorder {
            page_size,
            log: Mutex::new(Vec::new()),
        });
        let counters = Arc::new(Counters::default());
        (
            PageTracker::new(&mem, rec.clone(), counters.clone()),
            rec,
            counters,
        )
    }

    fn arr(pfns: impl IntoIterator<Item = u32>) -> Vec<u8> {
        pfns.into_iter().flat_map(u32::to_le_bytes).collect()
    }

    #[test]
    fn consecutive_pages_are_released_in_one_call() {
        let (mut t, rec, _) = tracker(4096);
        assert_eq!(t.inflate(&arr(10..20)).unwrap(), 10);
        assert_eq!(t.inflate(&arr((30..40).rev())).unwrap(), 10);
        assert_eq!(
            *rec.log.lock().unwrap(),
            [(10 << 12, 10 << 12), (30 << 12, 10 << 12)]
        );
    }

    #[test]
    fn outside_ram_repeated_and_not_inflated_are_counted() {
        let (mut t, rec, c) = tracker(4096);
        // 0x500: in the hole between the regions; 0xc00: past the end.
        t.inflate(&arr([1, 1, 0x500, 0xc00, 0x800])).unwrap();
        t.deflate(&arr([1, 2, 0x500])).unwrap();
        let s = c.snapshot();
        assert_eq!(s.held_pages, 1, "page 0x800 (second region) stays held");
        assert_eq!(s.pfns_repeated, 1);
        assert_eq!(s.pfns_outside_ram, 3);
        assert_eq!(s.pfns_not_inflated, 1);
        assert_eq!(rec.log.lock().unwrap().len(), 2);
        assert_eq!(t.inflate(&[0; 6]), Err(PfnArrayError::OddLength(6)));
        assert_eq!(
            t.inflate(&vec![0; MAX_PFN_ARRAY_BYTES + 4]),
            Err(PfnArrayError::TooLong(MAX_PFN_ARRAY_BYTES + 4))
        );
        assert_eq!(c.snapshot().ignored_arrays, 2);
    }

    #[test]
    fn huge_pages_are_released_only_when_whole() {
        let (mut t, rec, _) = tracker(2 << 20);
        // 511 of the 512 pages of the huge page at 2 MiB: nothing released.
        t.inflate(&arr(512..1023)).unwrap();
        assert!(rec.log.lock().unwrap().is_empty());
        // Deflating one and inflating it again keeps it partial.
        t.deflate(&arr([600])).unwrap();
        t.inflate(&arr([600])).unwrap();
        assert!(rec.log.lock().unwrap().is_empty());
        t.inflate(&arr([1023])).unwrap();
        assert_eq!(*rec.log.lock().unwrap(), [(2 << 20, 2 << 20)]);
    }

    #[test]
    fn reported_ranges_release_whole_pages_inside() {
        let (mut t, rec, c) = tracker(2 << 20);
        // 1 MiB..4 MiB holds one whole huge page (2..4 MiB) of the first region.
        t.report(&[(1 << 20, 3 << 20)], false);
        // Past the end of RAM, across the hole, overflowing, empty: ignored.
        t.report(
            &[
                (11 << 20, 2 << 20),
                (3 << 20, 6 << 20),
                (u64::MAX - 10, 20),
                (0, 0),
            ],
            false,
        );
        assert_eq!(*rec.log.lock().unwrap(), [(2 << 20, 2 << 20)]);
        let s = c.snapshot();
        assert_eq!((s.reported_bytes, s.ignored_report_ranges), (2 << 20, 4));
        t.report(&[(0, 4 << 20)], true);
        assert_eq!(rec.log.lock().unwrap().len(), 1, "poisoned pages are kept");
        assert_eq!(c.snapshot().poison_kept_bytes, 4 << 20);
    }
}

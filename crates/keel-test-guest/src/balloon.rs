//! A virtio-balloon driver (virtio 1.2 section 5.5) on the driver core in
//! virtio.rs, over either transport, polled at CPL3: feature negotiation,
//! the target (`num_pages`) and `actual`, inflating and deflating 4 KiB
//! pages taken from the top of RAM, the statistics buffer (refilled each
//! time the device gives it back) and free page reporting.
//!
//! Queues: inflate in the main ring area (its "out" pool holds the PFN
//! arrays of both directions, one 4 KiB array of 1024 PFNs a buffer),
//! deflate in the small one, statistics and reporting in the extra ones.

use core::cell::UnsafeCell;

use crate::arch::{rdtsc, wait_for, TIMEOUT_CYCLES};
use crate::pvh::BootInfo;
use crate::text::Text;
use crate::virtio::{Pool, QueueMem, Res, Transport, Vq, F_VERSION_1, POOL};

/// The virtio device type of a memory balloon.
pub const BALLOON_TYPE: u16 = 5;

/// Feature bits (section 5.5.3).
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_PAGE_POISON: u64 = 1 << 4;
pub const F_PAGE_REPORTING: u64 = 1 << 5;

/// What this driver accepts when offered (not PAGE_POISON: it does not
/// poison free pages, like a Linux guest without page poisoning).
const F_WANTED: u64 =
    F_VERSION_1 | F_MUST_TELL_HOST | F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING;

/// `struct virtio_balloon_config` offsets (section 5.5.4).
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;

const PAGE: u64 = 4096;
/// PFNs per inflate or deflate buffer (one 4 KiB array).
const PFNS_PER_BUFFER: u64 = 1024;
/// Buffers in flight at once (their arrays fill the pool).
const ARRAYS: usize = POOL / 4096;
/// Bytes per reported range (descriptor) and ranges per reporting chain.
const REPORT_RANGE: u64 = 2 << 20;
const REPORT_RANGES: usize = 8;

/// Statistics tags this driver sends: all 16 (section 5.5.6.3, and the
/// ones Linux added since).
const STAT_TAGS: usize = 16;
const STAT_SIZE: usize = 10;

#[repr(C, align(64))]
struct StatsMem([u8; STAT_TAGS * STAT_SIZE]);
struct StatsCell(UnsafeCell<StatsMem>);
// SAFETY: only the one `Balloon` (which holds the statistics queue, claimed
// through its ring area) writes it, and the device reads it.
unsafe impl Sync for StatsCell {}
static STATS_MEM: StatsCell = StatsCell(UnsafeCell::new(StatsMem([0; STAT_TAGS * STAT_SIZE])));

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// The RAM the balloon may take: RAM ranges of the boot memory map below
/// 4 GiB (identity-mapped by boot.s), above 1 MiB, minus the guest image.
pub struct Ram {
    ranges: [(u64, u64); 8],
    n: usize,
    /// Pages in all ranges.
    pub pages: u64,
}

impl Ram {
    pub fn from_boot(boot: &BootInfo) -> Ram {
        let image = (
            &raw const __image_start as u64 & !(PAGE - 1),
            (&raw const __image_end as u64).next_multiple_of(PAGE),
        );
        let mut ram = Ram {
            ranges: [(0, 0); 8],
            n: 0,
            pages: 0,
        };
        for e in boot.memmap().iter().filter(|e| e.kind == 1) {
            let start = e.addr.max(1 << 20).next_multiple_of(PAGE);
            let end = e.addr.saturating_add(e.size).min(4 << 30) & !(PAGE - 1);
            // At most two pieces: below and above the image.
            for (s, t) in [(start, end.min(image.0)), (start.max(image.1), end)] {
                if t > s && ram.n < ram.ranges.len() {
                    ram.ranges[ram.n] = (s, t);
                    ram.n += 1;
                    ram.pages += (t - s) / PAGE;
                }
            }
        }
        ram
    }

    /// Address of page `k` counted from the top of RAM (0: the highest).
    pub fn page_from_top(&self, k: u64) -> u64 {
        let mut k = k;
        for &(s, t) in self.ranges[..self.n].iter().rev() {
            let n = (t - s) / PAGE;
            if k < n {
                return t - (k + 1) * PAGE;
            }
            k -= n;
        }
        0
    }

    /// Write one word in each of pages `[from, to)` counted from the top,
    /// so that every one is backed.
    pub fn touch(&self, from: u64, to: u64, v: u64) {
        for k in from..to {
            let a = self.page_from_top(k);
            // SAFETY: a RAM page of the boot map outside the guest image
            // (see `from_boot`), identity-mapped and user-accessible; nothing
            // else of this guest uses it.
            unsafe { core::ptr::write_volatile(a as *mut u64, v ^ a) };
        }
    }

    /// Whether pages `[from, to)` hold what `touch` wrote.
    pub fn check(&self, from: u64, to: u64, v: u64) -> Option<u64> {
        (from..to).map(|k| self.page_from_top(k)).find(|&a| {
            // SAFETY: as in `touch`.
            unsafe { core::ptr::read_volatile(a as *const u64) != v ^ a }
        })
    }

    /// The ranges, for reporting.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges[..self.n]
    }
}

pub struct Balloon<'a> {
    t: &'a Transport,
    pub offered: u64,
    pub features: u64,
    inflate: Vq,
    deflate: Vq,
    stats: Option<Vq>,
    report: Option<Vq>,
    /// Pages in the balloon: the top `held` pages of `ram`.
    pub held: u64,
    pub ram: Ram,
    /// Statistics buffers sent (the first at start).
    pub stats_sent: u32,
    /// Balloon operations done, reported as statistics.
    inflated_total: u64,
    deflated_total: u64,
}

fn wait_one(vq: &mut Vq, what: &str) -> Res<()> {
    if !vq.wait_used(1, 8 * TIMEOUT_CYCLES) {
        crate::fail!("{what}: the device did not use a buffer");
    }
    let Some((id, _)) = vq.pop_used() else {
        crate::fail!("{what}: used ring empty");
    };
    if !vq.complete(id) {
        crate::fail!("{what}: the device returned head {id}, not in flight");
    }
    Ok(())
}

impl<'a> Balloon<'a> {
    /// Negotiate, set up the queues, set DRIVER_OK and send the first
    /// statistics.
    pub fn open(t: &'a Transport, ram: Ram) -> Res<Balloon<'a>> {
        t.begin()?;
        let offered = t.device_features();
        if offered & F_VERSION_1 == 0 {
            crate::fail!("the device does not offer VERSION_1 ({offered:#x})");
        }
        let features = offered & F_WANTED;
        if !t.offer_features(features) {
            crate::fail!("FEATURES_OK refused for {features:#x}");
        }
        let inflate = t.setup_queue_in(QueueMem::Main, 0, None, false)?;
        let deflate = t.setup_queue_in(QueueMem::Small, 1, None, false)?;
        // Queue numbers without gaps: statistics, then reporting.
        let mut next = 2;
        let stats = if features & F_STATS_VQ != 0 {
            next += 1;
            Some(t.setup_queue_in(QueueMem::Extra(0), next - 1, None, false)?)
        } else {
            None
        };
        let report = if features & F_PAGE_REPORTING != 0 {
            Some(t.setup_queue_in(QueueMem::Extra(1), next, None, false)?)
        } else {
            None
        };
        for q in [
            Some(&inflate),
            Some(&deflate),
            stats.as_ref(),
            report.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            // Polled: no interrupts wanted.
            q.set_no_interrupt(true);
        }
        t.driver_ok()?;
        let mut b = Balloon {
            t,
            offered,
            features,
            inflate,
            deflate,
            stats,
            report,
            held: 0,
            ram,
            stats_sent: 0,
            inflated_total: 0,
            deflated_total: 0,
        };
        b.set_actual();
        b.send_stats();
        Ok(b)
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// The device's target, in pages.
    pub fn target(&self) -> u32 {
        self.t.config_read32(CFG_NUM_PAGES)
    }

    /// What the device reads back as `actual`.
    pub fn actual(&self) -> u32 {
        self.t.config_read32(CFG_ACTUAL)
    }

    fn set_actual(&self) {
        self.t
            .config_write32(CFG_ACTUAL, u32::try_from(self.held).unwrap_or(u32::MAX));
    }

    /// Fill the statistics buffer and hand it to the device.
    fn send_stats(&mut self) {
        let free = (self.ram.pages - self.held) * PAGE;
        let values: [u64; STAT_TAGS] = [
            0,                     // SWAP_IN
            0,                     // SWAP_OUT
            0,                     // MAJFLT
            self.deflated_total,   // MINFLT: deflated pages touched again
            free,                  // MEMFREE
            self.ram.pages * PAGE, // MEMTOT
            free,                  // AVAIL
            0,                     // CACHES
            0,                     // HTLB_PGALLOC
            0,                     // HTLB_PGFAIL
            0,                     // OOM_KILL
            0,                     // ALLOC_STALL
            self.inflated_total,   // ASYNC_SCAN
            0,                     // DIRECT_SCAN
            self.inflated_total,   // ASYNC_RECLAIM
            0,                     // DIRECT_RECLAIM
        ];
        let Some(vq) = self.stats.as_mut() else {
            return;
        };
        let base = STATS_MEM.0.get() as u64;
        for (tag, v) in values.iter().enumerate() {
            let at = base + (tag * STAT_SIZE) as u64;
            // SAFETY: inside STATS_MEM, which only this driver writes, and
            // the device does not hold it (it was used or never sent);
            // unaligned writes of plain integers.
            unsafe {
                core::ptr::write_unaligned(at as *mut u16, (tag as u16).to_le());
                core::ptr::write_unaligned((at + 2) as *mut u64, v.to_le());
            }
        }
        if vq
            .add(&[(base, (STAT_TAGS * STAT_SIZE) as u32, false)])
            .is_some()
        {
            vq.submit(self.t);
            self.stats_sent += 1;
        }
    }

    /// If the device gave the statistics buffer back, refill and resend it.
    pub fn poll_stats(&mut self) -> Res<bool> {
        let Some(vq) = self.stats.as_mut() else {
            return Ok(false);
        };
        let Some((id, _)) = vq.pop_used() else {
            return Ok(false);
        };
        if !vq.complete(id) {
            crate::fail!("statistics: the device returned head {id}, not in flight");
        }
        self.send_stats();
        Ok(true)
    }

    /// Send pages `[from, to)` (from the top) as PFN arrays on the inflate
    /// or the deflate queue, waiting until the device used them all.
    fn transfer(&mut self, deflate: bool, from: u64, to: u64) -> Res<()> {
        let what = if deflate { "deflate" } else { "inflate" };
        let mut k = from;
        let mut slot = 0usize;
        while k < to || self.queue(deflate).in_flight() > 0 {
            let room =
                self.queue(deflate).in_flight() < ARRAYS.min(usize::from(self.queue(deflate).size));
            if k < to && room {
                let n = (to - k).min(PFNS_PER_BUFFER);
                let array = self.inflate.pool_addr(Pool::Out, slot * 4096);
                for i in 0..n {
                    let pfn = (self.ram.page_from_top(k + i) / PAGE) as u32;
                    // SAFETY: inside the inflate queue's out pool (4 KiB
                    // array `slot`), which the device does not read: its
                    // previous buffer was used.
                    unsafe { core::ptr::write_volatile((array + 4 * i) as *mut u32, pfn) };
                }
                let t = self.t;
                let vq = self.queue_mut(deflate);
                if vq.add(&[(array, (4 * n) as u32, false)]).is_none() {
                    crate::fail!("{what}: no free descriptor");
                }
                vq.submit(t);
                k += n;
                slot = (slot + 1) % ARRAYS;
            } else {
                wait_one(self.queue_mut(deflate), what)?;
            }
        }
        Ok(())
    }

    fn queue(&self, deflate: bool) -> &Vq {
        if deflate {
            &self.deflate
        } else {
            &self.inflate
        }
    }

    fn queue_mut(&mut self, deflate: bool) -> &mut Vq {
        if deflate {
            &mut self.deflate
        } else {
            &mut self.inflate
        }
    }

    /// Inflate by `n` pages (not beyond RAM) and update `actual`; returns
    /// the TSC cycles it took.
    pub fn inflate_by(&mut self, n: u64) -> Res<u64> {
        let n = n.min(self.ram.pages - self.held);
        let t0 = rdtsc();
        self.transfer(false, self.held, self.held + n)?;
        self.held += n;
        self.inflated_total += n;
        self.set_actual();
        Ok(rdtsc() - t0)
    }

    /// Deflate by `n` pages and update `actual` (with MUST_TELL_HOST the
    /// pages are reused only after the device used the buffers, which
    /// `transfer` waits for anyway); returns the TSC cycles it took.
    pub fn deflate_by(&mut self, n: u64) -> Res<u64> {
        let n = n.min(self.held);
        let t0 = rdtsc();
        self.transfer(true, self.held - n, self.held)?;
        self.held -= n;
        self.deflated_total += n;
        self.set_actual();
        Ok(rdtsc() - t0)
    }

    /// Report `[start, end)` (page-aligned) as free, in chains of up to
    /// `REPORT_RANGES` ranges of `REPORT_RANGE` bytes; returns the bytes.
    pub fn report_free(&mut self, start: u64, end: u64) -> Res<u64> {
        let t = self.t;
        let Some(vq) = self.report.as_mut() else {
            crate::fail!("free page reporting was not negotiated");
        };
        let mut a = start;
        let mut bytes = 0;
        while a < end {
            let mut bufs = [(0u64, 0u32, true); REPORT_RANGES];
            let mut n = 0;
            while n < REPORT_RANGES && a < end {
                let len = (end - a).min(REPORT_RANGE);
                bufs[n] = (a, len as u32, true);
                bytes += len;
                a += len;
                n += 1;
            }
            if vq.add(&bufs[..n]).is_none() {
                crate::fail!("report: no free descriptors");
            }
            vq.submit(t);
            wait_one(vq, "report")?;
        }
        Ok(bytes)
    }

    /// Report every page not in the balloon as free; returns the bytes.
    pub fn report_all_free(&mut self) -> Res<u64> {
        let mut total = 0;
        let mut ranges = [(0u64, 0u64); 8];
        let n = self.ram.ranges().len();
        ranges[..n].copy_from_slice(self.ram.ranges());
        // Pages below the balloon (the balloon is the top `held` pages).
        let floor = if self.held == 0 {
            u64::MAX
        } else {
            self.ram.page_from_top(self.held - 1)
        };
        for &(s, t) in &ranges[..n] {
            let t = t.min(floor);
            if t > s {
                total += self.report_free(s, t)?;
            }
        }
        Ok(total)
    }
}

/// `keel.balloon=WORD` on the command line.
pub fn cmdline_has(boot: &BootInfo, word: &str) -> bool {
    boot.cmdline()
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("keel.balloon="))
        .any(|v| v.split(',').any(|x| x == word))
}

/// Text for a feature set, for progress lines.
pub fn feature_names(f: u64) -> Text<120> {
    let mut t = Text::new();
    for (bit, name) in [
        (F_MUST_TELL_HOST, "MUST_TELL_HOST"),
        (F_STATS_VQ, "STATS_VQ"),
        (F_DEFLATE_ON_OOM, "DEFLATE_ON_OOM"),
        (F_PAGE_POISON, "PAGE_POISON"),
        (F_PAGE_REPORTING, "PAGE_REPORTING"),
    ] {
        if f & bit != 0 {
            if !t.as_str().is_empty() {
                t.push_str(" ");
            }
            t.push_str(name);
        }
    }
    t
}

/// Spin for about `us` microseconds (TSC at `hz`).
pub fn spin_us(hz: u64, us: u64) {
    let cycles = hz / 1_000_000 * us;
    wait_for(cycles, || false);
}

//! The virtio-balloon device driven from the driver side (keel-virtio's test harness, rings
//! from MockSplitQueue) over both transports: inflate and deflate with the host memory
//! really released, the target and its configuration interrupt, statistics, deflate-on-OOM,
//! free page reporting, page poison, huge pages, and malformed input.

use std::time::Duration;

use keel_virtio::testing::*;
use keel_virtio_balloon::spec::feature;
use keel_virtio_balloon::{Balloon, BalloonHandle, BalloonOptions, HostReleaser, StatTag};
use vm_memory::{Bytes, GuestAddress};

const W: u16 = VRING_DESC_F_WRITE;
/// Where the test pages are: PFNs 0x180.. (1.5 MiB up).
const PAGES: u64 = 0x18_0000;
const PFN0: u32 = (PAGES >> 12) as u32;
const INFLATE: u16 = 0;
const DEFLATE: u16 = 1;
const STATS: u16 = 2;
const REPORT: u16 = 3;

fn both(opts: BalloonOptions, test: impl Fn(&dyn Driver, &BalloonHandle)) {
    both_with(opts, None, test)
}

fn both_with(
    opts: BalloonOptions,
    page_size: Option<u64>,
    test: impl Fn(&dyn Driver, &BalloonHandle),
) {
    let make = || {
        let releaser = match page_size {
            Some(s) => HostReleaser::with_page_size(s),
            None => HostReleaser::new(),
        };
        let b = Balloon::with_releaser(opts, std::sync::Arc::new(releaser));
        let h = b.handle();
        (Box::new(b), h)
    };
    let (b, h) = make();
    test(&MmioDriver::new(b), &h);
    let (b, h) = make();
    test(&PciDriver::new(b), &h);
}

/// The queues' rings, 8 KiB apart from RING_BASE.
fn rings(mem: &keel_memory::GuestMemoryMmap, n: u16) -> Vec<Ring<'_>> {
    (0..n)
        .map(|i| Ring::at(mem, RING_BASE + 0x2000 * u64::from(i), QUEUE_SIZE))
        .collect()
}

/// Negotiates `features`, sets up every ring and sets DRIVER_OK.
fn start(d: &dyn Driver, features: u64, rings: &[Ring]) {
    assert_ne!(
        d.negotiate(features) & FEATURES_OK,
        0,
        "FEATURES_OK refused"
    );
    for (i, r) in rings.iter().enumerate() {
        d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
        d.enable_queue(i as u16);
    }
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Sends raw `bytes` as one readable buffer on queue `q` and waits for it to be used.
fn send(d: &dyn Driver, ring: &mut Ring, q: u16, bytes: &[u8], at: u64) {
    d.mem().write_slice(bytes, GuestAddress(at)).unwrap();
    let head = ring.add_descriptors(&[(at, bytes.len() as u32, 0)]);
    ring.publish(head);
    let before = ring.used_idx();
    d.notify(q);
    ring.wait_used(before.wrapping_add(1));
}

fn fill(d: &dyn Driver, pages: std::ops::Range<u32>, v: u8) {
    for p in pages {
        d.mem()
            .write_slice(&[v; 4096], GuestAddress(u64::from(p) << 12))
            .unwrap();
    }
}

fn page_is(d: &dyn Driver, pfn: u32, v: u8) -> bool {
    read_bytes(d.mem(), u64::from(pfn) << 12, 4096)
        .iter()
        .all(|&b| b == v)
}

fn cfg32(d: &dyn Driver, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn inflate_releases_pages_and_deflate_gives_them_back() {
    both(BalloonOptions::default(), |d, h| {
        let mem = d.mem().clone();
        let mut r = rings(&mem, 3);
        start(d, VERSION_1 | feature::STATS_VQ, &r);
        fill(d, PFN0..PFN0 + 8, 0xaa);
        send(
            d,
            &mut r[0],
            INFLATE,
            &pfn_bytes(&[PFN0, PFN0 + 1, PFN0 + 2]),
            DATA_BASE,
        );
        assert!(
            page_is(d, PFN0, 0) && page_is(d, PFN0 + 2, 0),
            "inflated pages are released"
        );
        assert!(page_is(d, PFN0 + 3, 0xaa), "the next page is untouched");
        // The driver reports `actual`.
        d.write_config(4, &3u32.to_le_bytes());
        assert_eq!(h.actual_pages(), 3);
        assert_eq!(cfg32(d, 4), 3);
        assert_eq!(h.counters().held_pages, 3);
        assert_eq!(h.counters().released_bytes, 3 * 4096);
        send(
            d,
            &mut r[1],
            DEFLATE,
            &pfn_bytes(&[PFN0 + 1]),
            DATA_BASE + 0x100,
        );
        assert_eq!(h.counters().held_pages, 2);
        // A deflated page is the guest's again: it writes and reads it.
        mem.write_obj(0x55u8, GuestAddress(u64::from(PFN0 + 1) << 12))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(u64::from(PFN0 + 1) << 12))
                .unwrap(),
            0x55
        );
        assert_eq!(d.status() & NEEDS_RESET, 0);
    });
}

#[test]
fn target_changes_raise_a_configuration_interrupt() {
    both(
        BalloonOptions {
            target_bytes: 64 << 12,
            ..Default::default()
        },
        |d, h| {
            assert_eq!(cfg32(d, 0), 64, "num_pages before the driver starts");
            let mem = d.mem().clone();
            let r = rings(&mem, 3);
            start(d, VERSION_1 | feature::STATS_VQ, &r);
            let before = d.irqs();
            h.set_target_pages(100);
            assert_eq!(d.irqs(), before + 1);
            assert_ne!(
                d.ack() & 2,
                0,
                "the interrupt's cause is a configuration change"
            );
            assert_eq!(cfg32(d, 0), 100);
            h.set_target_pages(100);
            assert_eq!(d.irqs(), before + 1, "no interrupt when nothing changed");
            h.set_target_bytes(1 << 20);
            assert_eq!(h.target_pages(), 256);
            assert_eq!(cfg32(d, 0), 256);
        },
    );
}

fn stats_buffer(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| {
            let mut e = t.to_le_bytes().to_vec();
            e.extend_from_slice(&v.to_le_bytes());
            e
        })
        .collect()
}

#[test]
fn statistics_are_held_returned_on_request_and_read() {
    both(BalloonOptions::default(), |d, h| {
        let mem = d.mem().clone();
        let mut r = rings(&mem, 3);
        start(d, VERSION_1 | feature::STATS_VQ, &r);
        let all: Vec<(u16, u64)> = (0..16u16).map(|t| (t, 1000 + u64::from(t))).collect();
        let buf = stats_buffer(&all);
        mem.write_slice(&buf, GuestAddress(DATA_BASE)).unwrap();
        let head = r[2].add_descriptors(&[(DATA_BASE, buf.len() as u32, 0)]);
        r[2].publish(head);
        d.notify(STATS);
        eventually("statistics", || h.stats().is_some());
        settle();
        assert_eq!(r[2].used_idx(), 0, "the device holds the buffer");
        let s = h.stats().unwrap();
        for t in StatTag::ALL {
            assert_eq!(s.get(t), Some(1000 + u64::from(t.wire())), "{}", t.name());
        }
        // The host asks: the buffer comes back, the driver refills and re-adds it.
        h.request_stats();
        r[2].wait_used(1);
        let buf = stats_buffer(&[(StatTag::FreeMemory.wire(), 7 << 20), (77, 1)]);
        mem.write_slice(&buf, GuestAddress(DATA_BASE)).unwrap();
        let head = r[2].add_descriptors(&[(DATA_BASE, buf.len() as u32, 0)]);
        r[2].publish(head);
        d.notify(STATS);
        eventually("new statistics", || {
            h.stats().and_then(|s| s.get(StatTag::FreeMemory)) == Some(7 << 20)
        });
        assert!(h.stats().unwrap().received > s.received);
        assert_eq!(h.counters().unknown_stat_tags, 1);
        assert_eq!(h.counters().stats_reports, 2);
    });
}

#[test]
fn statistics_are_requested_every_period() {
    both(
        BalloonOptions {
            stats_period: Some(Duration::from_millis(20)),
            ..Default::default()
        },
        |d, _| {
            let mem = d.mem().clone();
            let mut r = rings(&mem, 3);
            start(d, VERSION_1 | feature::STATS_VQ, &r);
            for round in 1..=3u16 {
                let buf = stats_buffer(&[(4, u64::from(round))]);
                mem.write_slice(&buf, GuestAddress(DATA_BASE)).unwrap();
                let head = r[2].add_descriptors(&[(DATA_BASE, buf.len() as u32, 0)]);
                r[2].publish(head);
                d.notify(STATS);
                r[2].wait_used(round);
            }
        },
    );
}

#[test]
fn malformed_input_is_ignored_and_counted() {
    both(
        BalloonOptions {
            free_page_reporting: true,
            ..Default::default()
        },
        |d, h| {
            let mem = d.mem().clone();
            let mut r = rings(&mem, 4);
            start(
                d,
                VERSION_1 | feature::STATS_VQ | feature::PAGE_REPORTING,
                &r,
            );
            fill(d, PFN0..PFN0 + 2, 0xaa);
            // Odd-sized array: nothing inflated, not even its whole entries.
            let mut odd = pfn_bytes(&[PFN0]);
            odd.push(1);
            send(d, &mut r[0], INFLATE, &odd, DATA_BASE);
            assert!(page_is(d, PFN0, 0xaa));
            // A huge array (300 KiB) is ignored too.
            send(d, &mut r[0], INFLATE, &vec![0; 300 << 10], DATA_BASE);
            // PFNs past RAM, far out, and repeated.
            send(
                d,
                &mut r[0],
                INFLATE,
                &pfn_bytes(&[PFN0, PFN0, 0x200, 0xffff_ffff, 0xfee00]),
                DATA_BASE,
            );
            // A deflate of a page not inflated.
            send(d, &mut r[1], DEFLATE, &pfn_bytes(&[PFN0 + 1]), DATA_BASE);
            // Statistics: an odd-sized buffer (held, then given back when the next comes),
            // and a bogus tag in a good one.
            mem.write_slice(&[0; 13], GuestAddress(DATA_BASE)).unwrap();
            let head = r[2].add_descriptors(&[(DATA_BASE, 13, 0)]);
            r[2].publish(head);
            d.notify(STATS);
            send(
                d,
                &mut r[2],
                STATS,
                &stats_buffer(&[(0xffff, 5)]),
                DATA_BASE + 64,
            );
            // Reporting: a range past RAM, one overflowing.
            let head = r[3].add_descriptors(&[(MEM_SIZE as u64 - 0x1000, 0x2000, W)]);
            r[3].publish(head);
            let head = r[3].add_descriptors(&[(u64::MAX - 0xfff, 0x1000, W)]);
            r[3].publish(head);
            d.notify(REPORT);
            r[3].wait_used(2);
            let c = h.counters();
            assert_eq!(c.ignored_arrays, 2);
            assert_eq!(
                (c.held_pages, c.pfns_repeated, c.pfns_outside_ram),
                (1, 1, 3)
            );
            assert_eq!(c.pfns_not_inflated, 1);
            assert_eq!((c.ignored_stats_buffers, c.unknown_stat_tags), (1, 1));
            assert_eq!(c.ignored_report_ranges, 2);
            assert_eq!(d.status() & NEEDS_RESET, 0, "the device goes on");
            // And it still works.
            send(d, &mut r[0], INFLATE, &pfn_bytes(&[PFN0 + 1]), DATA_BASE);
            assert!(page_is(d, PFN0 + 1, 0));
        },
    );
}

#[test]
fn deflate_on_oom_counts_pages_taken_back_below_the_target() {
    for oom in [true, false] {
        both(
            BalloonOptions {
                deflate_on_oom: oom,
                target_bytes: 4 << 12,
                ..Default::default()
            },
            |d, h| {
                let offered = d.device_features();
                assert_eq!(offered & feature::DEFLATE_ON_OOM != 0, oom);
                let mem = d.mem().clone();
                let mut r = rings(&mem, 3);
                start(
                    d,
                    offered & (VERSION_1 | feature::STATS_VQ | feature::DEFLATE_ON_OOM),
                    &r,
                );
                send(
                    d,
                    &mut r[0],
                    INFLATE,
                    &pfn_bytes(&[PFN0, PFN0 + 1, PFN0 + 2, PFN0 + 3]),
                    DATA_BASE,
                );
                // The host lowers the target by one page: one page is asked for, the
                // guest (out of memory) takes three.
                h.set_target_pages(3);
                send(
                    d,
                    &mut r[1],
                    DEFLATE,
                    &pfn_bytes(&[PFN0, PFN0 + 1, PFN0 + 2]),
                    DATA_BASE,
                );
                let c = h.counters();
                assert_eq!(c.held_pages, 1);
                if oom {
                    assert_eq!((c.oom_deflated_pages, c.unrequested_deflated_pages), (2, 0));
                } else {
                    assert_eq!((c.oom_deflated_pages, c.unrequested_deflated_pages), (0, 2));
                }
                // The pages are the guest's again whatever was negotiated.
                mem.write_obj(1u8, GuestAddress(PAGES)).unwrap();
                assert_eq!(d.status() & NEEDS_RESET, 0);
            },
        );
    }
}

fn report(d: &dyn Driver, ring: &mut Ring, ranges: &[(u64, u32)]) {
    let descs: Vec<(u64, u32, u16)> = ranges.iter().map(|&(a, l)| (a, l, W)).collect();
    let head = ring.add_descriptors(&descs);
    ring.publish(head);
    let before = ring.used_idx();
    d.notify(REPORT);
    ring.wait_used(before.wrapping_add(1));
}

#[test]
fn free_page_reporting_releases_unless_the_guest_poisons() {
    both(
        BalloonOptions {
            free_page_reporting: true,
            ..Default::default()
        },
        |d, h| {
            let f = VERSION_1 | feature::STATS_VQ | feature::PAGE_REPORTING | feature::PAGE_POISON;
            assert_eq!(d.device_features() & f, f);
            let mem = d.mem().clone();
            let mut r = rings(&mem, 4);
            // Poison value written during initialisation, before DRIVER_OK; zero poison
            // first: reported pages are released.
            start(d, f, &r);
            fill(d, PFN0..PFN0 + 8, 0xaa);
            report(d, &mut r[3], &[(PAGES, 0x2000), (PAGES + 0x4000, 0x1000)]);
            assert!(page_is(d, PFN0, 0) && page_is(d, PFN0 + 1, 0) && page_is(d, PFN0 + 4, 0));
            assert!(page_is(d, PFN0 + 2, 0xaa));
            assert_eq!(h.counters().reported_bytes, 0x3000);
            // A guest poisoning free pages with 0xaa keeps them.
            d.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
            assert_eq!(h.poison_value(), 0xaaaa_aaaa);
            report(d, &mut r[3], &[(PAGES + 0x5000, 0x3000)]);
            assert!(
                (PFN0 + 5..PFN0 + 8).all(|p| page_is(d, p, 0xaa)),
                "the poison survives"
            );
            assert_eq!(h.counters().poison_kept_bytes, 0x3000);
            assert_eq!(h.counters().reported_bytes, 0x3000);
            // Inflated pages are still released: the guest poisons them again when it
            // frees them after a deflate.
            send(d, &mut r[0], INFLATE, &pfn_bytes(&[PFN0 + 6]), DATA_BASE);
            assert!(page_is(d, PFN0 + 6, 0));
        },
    );
}

#[test]
fn huge_pages_are_released_whole() {
    // Pretend the backing has 16 KiB pages.
    both_with(BalloonOptions::default(), Some(0x4000), |d, h| {
        let mem = d.mem().clone();
        let mut r = rings(&mem, 3);
        start(d, VERSION_1 | feature::STATS_VQ, &r);
        fill(d, PFN0..PFN0 + 4, 0xaa);
        send(
            d,
            &mut r[0],
            INFLATE,
            &pfn_bytes(&[PFN0, PFN0 + 1, PFN0 + 3]),
            DATA_BASE,
        );
        assert!(
            (PFN0..PFN0 + 4).all(|p| page_is(d, p, 0xaa)),
            "a partial page stays"
        );
        assert_eq!(h.counters().released_bytes, 0);
        send(d, &mut r[0], INFLATE, &pfn_bytes(&[PFN0 + 2]), DATA_BASE);
        assert!(
            (PFN0..PFN0 + 4).all(|p| page_is(d, p, 0)),
            "the whole page goes"
        );
        assert_eq!(h.counters().released_bytes, 0x4000);
    });
}

#[test]
fn reset_forgets_the_balloon_and_the_device_starts_again() {
    both(BalloonOptions::default(), |d, h| {
        let mem = d.mem().clone();
        let mut r = rings(&mem, 3);
        start(d, VERSION_1 | feature::STATS_VQ, &r);
        send(d, &mut r[0], INFLATE, &pfn_bytes(&[PFN0]), DATA_BASE);
        d.write_config(4, &1u32.to_le_bytes());
        d.set_status(0);
        assert_eq!((h.counters().held_pages, h.actual_pages()), (0, 0));
        let mut r = rings(&mem, 3);
        start(d, VERSION_1 | feature::STATS_VQ, &r);
        send(d, &mut r[0], INFLATE, &pfn_bytes(&[PFN0]), DATA_BASE);
        assert_eq!(h.counters().held_pages, 1, "held afresh, not a repeat");
        assert_eq!(h.counters().pfns_repeated, 0);
    });
}

#[test]
fn must_tell_host_deflates_complete_after_the_device_took_them() {
    both(
        BalloonOptions {
            must_tell_host: true,
            ..Default::default()
        },
        |d, h| {
            assert_ne!(d.device_features() & feature::MUST_TELL_HOST, 0);
            let mem = d.mem().clone();
            let mut r = rings(&mem, 3);
            start(
                d,
                VERSION_1 | feature::STATS_VQ | feature::MUST_TELL_HOST,
                &r,
            );
            send(
                d,
                &mut r[0],
                INFLATE,
                &pfn_bytes(&[PFN0, PFN0 + 1]),
                DATA_BASE,
            );
            send(d, &mut r[1], DEFLATE, &pfn_bytes(&[PFN0]), DATA_BASE);
            // Used means the device has seen them: they are no longer held.
            assert_eq!(h.counters().held_pages, 1);
        },
    );
}

/// A driver that keeps the statistics queue full of buffers cannot keep the worker from a
/// reset: the worker takes at most a queue's worth before it looks at its stop flag again,
/// so the reset (a status write on a vCPU, which waits for the worker) returns while the
/// flood goes on.
#[test]
fn a_reset_returns_while_the_driver_floods_the_statistics_queue() {
    // Large queues: the worker cannot take a ringful before the driver refills it.
    const FLOOD: u16 = 4096;
    both(
        BalloonOptions {
            queue_size: FLOOD,
            ..Default::default()
        },
        |d, _| {
            let mem = d.mem().clone();
            let r: Vec<Ring> = (0..3)
                .map(|i| Ring::at(&mem, RING_BASE + 0x2_0000 * i, FLOOD))
                .collect();
            start(d, VERSION_1 | feature::STATS_VQ, &r);
            let at = DATA_BASE;
            mem.write_slice(
                &stats_buffer(&[(StatTag::FreeMemory as u16, 1 << 20)]),
                GuestAddress(at),
            )
            .unwrap();
            // One buffer chain, named by every entry of the available ring.
            let mut stats = Ring::at(&mem, RING_BASE + 0x4_0000, FLOOD);
            let h = stats.add_descriptors(&[(at, 10, 0)]);
            // One buffer is held by the device: FLOOD outstanding at most.
            let flood = Flood::new(&stats, h, FLOOD - 1);
            std::thread::scope(|s| {
                s.spawn(|| flood.run());
                eventually("the flood to get going", || {
                    d.notify(STATS);
                    flood.served() > 2 * usize::from(FLOOD)
                });
                d.set_status(0);
                assert!(
                    flood.stop(),
                    "the reset returned only once the driver stopped making buffers available"
                );
            });
            assert_eq!(d.status(), 0);
        },
    );
}

//! The virtio-balloon's guest-facing parsers: inflate and deflate PFN arrays (any length,
//! any PFN: outside RAM, in the hole between regions, repeated), statistics buffers (any
//! length, any tag) and free page reporting ranges (any address and length, past RAM,
//! overflowing), with 4 KiB or 16 KiB backing pages. Nothing may panic, and the pages
//! held never exceed RAM.

#![no_main]

use std::sync::Arc;

use keel_memory::GuestMemoryMmap;
use keel_virtio_balloon::pages::{Counters, PageTracker};
use keel_virtio_balloon::stats::parse_stats;
use keel_virtio_balloon::HostReleaser;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    // RAM: 256 KiB at 0 and 256 KiB at 1 MiB, a hole between.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x4_0000),
        (GuestAddress(0x10_0000), 0x4_0000),
    ])
    .unwrap();
    let releaser = if mode & 1 == 0 {
        HostReleaser::new()
    } else {
        HostReleaser::with_page_size(0x4000)
    };
    let counters = Arc::new(Counters::default());
    let mut pages = PageTracker::new(&mem, Arc::new(releaser), counters.clone());
    // Records: op (1 byte), length (1 byte), then that many bytes.
    while rest.len() >= 2 {
        let (op, len) = (rest[0], usize::from(rest[1]));
        let body = &rest[2..];
        let take = len.min(body.len());
        let (chunk, tail) = body.split_at(take);
        rest = tail;
        match op % 4 {
            0 => {
                let _ = pages.inflate(chunk);
            }
            1 => {
                let _ = pages.deflate(chunk);
            }
            2 => {
                let _ = parse_stats(chunk);
            }
            _ => {
                let ranges: Vec<(u64, u64)> = chunk
                    .chunks_exact(12)
                    .map(|r| {
                        let a = u64::from_le_bytes(r[..8].try_into().unwrap());
                        let l = u32::from_le_bytes(r[8..].try_into().unwrap());
                        (a, u64::from(l))
                    })
                    .collect();
                pages.report(&ranges, op & 0x80 != 0);
            }
        }
        assert!(counters.snapshot().held_pages <= 0x8_0000 / 4096);
    }
});

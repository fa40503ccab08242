//! Partial-cluster writes into fresh qcow2 overlays copy the rest of each cluster from
//! the backing image. Through io_uring the copy is asynchronous: the cluster is linked
//! only once the copy and the data have landed, and writes to a cluster whose copy is in
//! flight wait for it (on the same queue, another queue, or the synchronous path). Many
//! writers hit the same clusters at once here; qemu-img is the oracle: the overlay
//! checks clean and compares identical to the expected content, built as raw.
#![cfg(feature = "io_uring")]

mod common;

use std::path::Path;
use std::sync::Arc;

use keel_block::aio::{AioQueue, AioRequest, UringQueue};
use keel_block::buf::AlignedBuf;
use keel_block::qcow2::{backing, Qcow2Options};
use keel_block::{BlockBackend, CacheMode, Qcow2, RawFile, RawOptions};

use common::{assert_clean_and_equal, create_image, ok, p, qemu_check, require_qemu, Rng};

const CLUSTER: u64 = 64 << 10;
const SLOT: u64 = 4096;
const SLOTS: u64 = CLUSTER / SLOT;
/// The overlay: 8 MiB; the backing image ends inside cluster 100, so the clusters past
/// it copy zeroes (and one copies both).
const SIZE: u64 = 8 << 20;
const BACKING: u64 = 100 * CLUSTER + 20 * 1024;
/// Writers: two io_uring queues and the synchronous path.
const WRITERS: u64 = 3;

/// Byte `i` of the backing image.
fn backing_byte(i: u64) -> u8 {
    (i / 512 % 199 + 1) as u8
}

/// The content of slot `s` of cluster `c` after writer `w` wrote it.
fn slot_byte(c: u64, s: u64, w: u64) -> u8 {
    0x80 | ((c * 7 + s * 3 + w) % 120) as u8
}

/// Each slot is written at most once, by the writer that owns it (slot % WRITERS), so the
/// final content does not depend on the order of racing requests; writers share every
/// cluster. Returns the writes of each writer: (offset, slots), shuffled or in cluster
/// order (all writers on the same clusters at the same time).
fn plan(rng: &mut Rng, shuffle: bool) -> Vec<Vec<(u64, u64)>> {
    let mut out = vec![Vec::new(); WRITERS as usize];
    for c in 0..SIZE / CLUSTER {
        for w in 0..WRITERS {
            // About two thirds of the writer's slots, one write each.
            let mut s = w;
            while s < SLOTS {
                if rng.below(3) != 0 {
                    out[w as usize].push((c * CLUSTER + s * SLOT, 1));
                }
                s += WRITERS;
            }
        }
    }
    for v in out.iter_mut().filter(|_| shuffle) {
        for i in (1..v.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
    out
}

fn filled(offset: u64, slots: u64, w: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new((slots * SLOT) as usize, 4096);
    for (k, chunk) in b.as_mut_slice().chunks_mut(SLOT as usize).enumerate() {
        let at = offset + k as u64 * SLOT;
        chunk.fill(slot_byte(at / CLUSTER, at % CLUSTER / SLOT, w));
    }
    b
}

fn make_images(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base_raw = dir.join("base.raw");
    let data: Vec<u8> = (0..BACKING).map(backing_byte).collect();
    std::fs::write(&base_raw, data).unwrap();
    let base = dir.join("base.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&base_raw),
            p(&base),
        ],
    );
    let overlay = dir.join("overlay.qcow2");
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", p(&base), "-F", "qcow2"],
        &overlay,
        Some(&SIZE.to_string()),
    );
    (base, overlay)
}

/// The overlay opened read-write with `cache`, over its backing file.
fn open_overlay(overlay: &Path, cache: CacheMode) -> Arc<Qcow2<RawFile>> {
    Arc::new(
        backing::open_path(
            overlay,
            RawOptions {
                cache,
                growable: true,
                ..Default::default()
            },
            Qcow2Options::default(),
        )
        .unwrap(),
    )
}

fn run(cache: CacheMode, seed: u64, shuffle: bool) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let (_, overlay) = make_images(dir.path());
    let img = open_overlay(&overlay, cache);
    let mut rng = Rng(seed);
    let plans = plan(&mut rng, shuffle);
    std::thread::scope(|s| {
        for (w, writes) in plans.iter().enumerate() {
            let img = img.clone();
            s.spawn(move || {
                let w = w as u64;
                if w == WRITERS - 1 {
                    // The synchronous path (whole-cluster copies with the data merged in).
                    for &(off, n) in writes {
                        img.write_at(filled(off, n, w).as_slice(), off).unwrap();
                    }
                    return;
                }
                let mut q = UringQueue::new(img, 32).unwrap();
                let mut out = Vec::new();
                for (i, &(off, n)) in writes.iter().enumerate() {
                    q.submit(AioRequest::write(off, filled(off, n, w), i as u64));
                    if q.in_flight() >= 24 {
                        q.wait(1, &mut out).unwrap();
                    }
                }
                while q.in_flight() > 0 {
                    q.wait(1, &mut out).unwrap();
                }
                assert_eq!(out.len(), writes.len());
                for c in &out {
                    assert!(c.result.is_ok(), "writer {w}: {:?}", c.result);
                }
            });
        }
    });
    img.close().unwrap();
    drop(img);

    let mut want: Vec<u8> = (0..SIZE)
        .map(|i| if i < BACKING { backing_byte(i) } else { 0 })
        .collect();
    for (w, writes) in plans.iter().enumerate() {
        for &(off, n) in writes {
            let b = filled(off, n, w as u64);
            want[off as usize..(off + n * SLOT) as usize].copy_from_slice(b.as_slice());
        }
    }
    assert_clean_and_equal(&overlay, &want, dir.path());
}

#[test]
fn concurrent_partial_writes_into_a_fresh_overlay_match_qemu_img_o_direct() {
    run(CacheMode::None, 0x5eed_0001, true);
    run(CacheMode::None, 0x5eed_0003, false);
}

#[test]
fn concurrent_partial_writes_into_a_fresh_overlay_match_qemu_img_writeback() {
    run(CacheMode::Writeback, 0x5eed_0002, true);
    run(CacheMode::Writeback, 0x5eed_0004, false);
}

/// A read of a cluster whose copy is in flight sees the backing data (the cluster is not
/// linked yet) or the new data, never zeroes or another cluster's.
#[test]
fn reads_racing_copies_see_old_or_new_data() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let (_, overlay) = make_images(dir.path());
    let img = open_overlay(&overlay, CacheMode::None);
    let mut q = UringQueue::new(img.clone(), 64).unwrap();
    let clusters = 64;
    for c in 0..clusters {
        q.submit(AioRequest::write(c * CLUSTER, filled(c * CLUSTER, 1, 0), c));
    }
    // Reads of the rest of each cluster, and of its first slot, while the copies run.
    for c in 0..clusters {
        let mut rest = vec![0u8; (CLUSTER - SLOT) as usize];
        img.read_at(&mut rest, c * CLUSTER + SLOT).unwrap();
        for (i, &b) in rest.iter().enumerate() {
            assert_eq!(
                b,
                backing_byte(c * CLUSTER + SLOT + i as u64),
                "cluster {c}"
            );
        }
        let mut first = vec![0u8; SLOT as usize];
        img.read_at(&mut first, c * CLUSTER).unwrap();
        let new = slot_byte(c, 0, 0);
        let is_new = first.iter().all(|&b| b == new);
        let is_old = first
            .iter()
            .enumerate()
            .all(|(i, &b)| b == backing_byte(c * CLUSTER + i as u64));
        assert!(
            is_new || is_old,
            "cluster {c}: first slot reads neither the old nor the new data: {:?}",
            &first[..8]
        );
    }
    let mut out = Vec::new();
    while q.in_flight() > 0 {
        q.wait(1, &mut out).unwrap();
    }
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    drop(q);
    img.close().unwrap();
    let (code, corrupt, leaks, errors) = qemu_check(&overlay);
    assert_eq!(
        (code, corrupt, leaks, errors),
        (0, 0, 0, 0),
        "qemu-img check"
    );
}

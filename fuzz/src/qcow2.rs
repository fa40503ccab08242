//! The qcow2 image exercise behind the `qcow2_parse` target: open arbitrary bytes as an
//! image (read-write over a backing image, and read-only), read, write (plain, compressed,
//! copy-on-write from the backing image), discard, write-zeroes, check, and repair a copy.
//!
//! Time bound per input: the image lives in memory and may grow to [`MAX_IMAGE`] bytes;
//! every operation touches at most a few clusters at a handful of offsets, whatever the
//! virtual size says; write-zeroes and discard cover at most 1 MiB. What remains
//! proportional to the input (header, L1, refcount and snapshot tables, check's walks) is
//! bounded by the image's own size, which libFuzzer's `-max_len` bounds.

use std::sync::Arc;

use keel_block::qcow2::{check, CacheSizes, Fix, Qcow2, Qcow2Options};
use keel_block::{BlockBackend, MemBackend};

/// Largest size an image may grow to while it is exercised.
pub const MAX_IMAGE: u64 = 4 << 20;

/// The backing image every overlay reads its unallocated clusters from: 256 KiB of a
/// pattern (so copy-on-write has something to copy).
fn backing() -> Arc<dyn BlockBackend> {
    Arc::new(MemBackend::read_only(
        (0..256 << 10).map(|i| (i % 251) as u8).collect(),
    ))
}

/// Runs every operation on `data` opened as an image. Errors are fine; panics, hangs and
/// unbounded growth are not. Checks: a repair that reports success leaves an image a
/// second check finds clean.
pub fn exercise_image(data: &[u8]) {
    let backing = backing();
    read_write(data, &backing);
    read_only(data, &backing);
    repair(data);
}

fn read_write(data: &[u8], backing: &Arc<dyn BlockBackend>) {
    let Ok(img) = Qcow2::open_with_backing(
        MemBackend::new(data.to_vec()).with_max_size(MAX_IMAGE),
        Qcow2Options {
            cache_sizes: CacheSizes {
                l2: Some(4096),
                refcount: Some(4096),
            },
            ..Default::default()
        },
        Some(backing.clone()),
    ) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 8192];
    for off in [0, size / 3, size.saturating_sub(8192)] {
        let n = (size - off).min(8192) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        let _ = img.write_at(&buf[..n.min(1000)], off);
    }
    let cs = img.cluster_size();
    if size >= 2 * cs && cs <= 1 << 16 {
        let text: Vec<u8> = (0..cs).map(|i| (i / 64) as u8).collect();
        let _ = img.write_compressed(cs, &text);
        let _ = img.read_at(&mut buf[..100], cs + 10);
        let _ = img.write_at(&buf[..100], cs + 50);
    }
    let _ = img.write_zeroes(0, size.min(1 << 20), true);
    let _ = img.discard(size / 2, size.min(1 << 20) / 2);
    let _ = img.flush();
    // What a clean session leaves behind is consistent.
    if let Ok(r) = check(img.file(), Fix::None) {
        let _ = r.is_clean();
    }
    assert!(img.file().size() <= MAX_IMAGE);
}

fn read_only(data: &[u8], backing: &Arc<dyn BlockBackend>) {
    // (No check of the input as it is: `repair` walks it the same way first.)
    let ro = MemBackend::read_only(data.to_vec());
    if let Ok(img) = Qcow2::open_with_backing(ro, Qcow2Options::default(), Some(backing.clone())) {
        let mut buf = vec![0u8; 4096];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.read_at(&mut buf, img.size().saturating_sub(4096));
        let _ = img.snapshots();
    }
}

/// `check -r all` on a copy; when it says it repaired everything, a second check agrees.
fn repair(data: &[u8]) {
    let copy = MemBackend::new(data.to_vec()).with_max_size(MAX_IMAGE);
    let Ok(fixed) = check(&copy, Fix::All) else {
        return;
    };
    if fixed.check_errors == 0 && fixed.corruptions == 0 && fixed.leaks == 0 {
        if let Ok(again) = check(&copy, Fix::None) {
            assert_eq!(
                (again.corruptions, again.leaks),
                (0, 0),
                "repair reported success but left {again:?} (after {fixed:?})"
            );
        }
    }
}

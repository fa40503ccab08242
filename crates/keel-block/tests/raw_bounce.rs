//! With `O_DIRECT`, buffers the file cannot use directly are copied through a bounce
//! buffer: one of bounded size, however long the request (a guest chooses the length, up
//! to gigabytes, and a failed allocation aborts the process).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_block::{BlockBackend, CacheMode, RawFile, RawOptions};

/// The system allocator, recording the largest allocation while `WATCH` is set.
struct Largest;

static WATCH: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) != 0 {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's obligations are those of System.alloc.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) != 0 {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// Runs `f` and returns the largest allocation it made.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    WATCH.store(1, Ordering::SeqCst);
    f();
    WATCH.store(0, Ordering::SeqCst);
    LARGEST.load(Ordering::SeqCst)
}

#[test]
fn misaligned_direct_io_bounces_in_bounded_chunks() {
    const LEN: usize = 16 << 20;
    const BOUND: usize = 2 << 20;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    RawFile::create(&p, 2 * LEN as u64).unwrap();
    let f = RawFile::open(
        &p,
        RawOptions {
            cache: CacheMode::None,
            ..Default::default()
        },
    )
    .unwrap();
    // One byte in: memory no O_DIRECT transfer can use.
    let mut src = vec![0u8; LEN + 1];
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut dst = vec![0u8; LEN + 1];
    // Memory misaligned, offset aligned; then offset misaligned too (read-modify-write).
    for offset in [4096u64, 4096 + 7] {
        let n = largest_allocation(|| f.write_at(&src[1..], offset).unwrap());
        assert!(n <= BOUND, "writing {LEN} bytes at {offset} allocated {n}");
        let n = largest_allocation(|| f.read_at(&mut dst[1..], offset).unwrap());
        assert!(n <= BOUND, "reading {LEN} bytes at {offset} allocated {n}");
        assert!(dst[1..] == src[1..], "data at {offset}");
    }
    // The bytes around the last write are intact.
    let mut edge = [9u8; 7];
    f.read_at(&mut edge, 4096).unwrap();
    assert_eq!(edge, src[1..8]);
}

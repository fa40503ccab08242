//! io_uring with the data file and guest memory registered (fixed file, fixed buffers):
//! the kernel shows both registrations in the ring's `/proc/self/fdinfo`, and transfers
//! through them move the same bytes as plain ones, in both directions, for a request that
//! crosses from one memory region (one registered buffer) into the next, for a request in
//! memory that was not registered, and after the caller dropped its own memory handle.
//!
//! One test in its own binary: it looks at every io_uring descriptor of the process.
#![cfg(feature = "io_uring")]

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use keel_block::aio::{AioQueue, AioRequest, UringQueue};
use keel_block::buf::GuestBuf;
use keel_block::iov::GuestRange;
use keel_block::{CacheMode, RawFile, RawOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REGION: u64 = 64 << 10;

/// `(registered files, registered buffers)` of every io_uring instance the process has
/// open, from the kernel's fdinfo (`UserFiles:` and `UserBufs:`).
fn registrations() -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy() != "anon_inode:[io_uring]" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap();
        let count = |key: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().parse::<usize>().unwrap())
                .unwrap_or_else(|| panic!("no {key} in io_uring fdinfo:\n{info}"))
        };
        out.push((count("UserFiles:"), count("UserBufs:")));
    }
    out
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn wait_ok(q: &mut UringQueue<RawFile, GuestBuf<Arc<GuestMemoryMmap>>>) {
    let mut done = Vec::new();
    q.wait(1, &mut done).unwrap();
    assert_eq!(done.len(), 1);
    done.pop().unwrap().result.unwrap();
}

#[test]
fn registered_file_and_memory_move_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    RawFile::create(&path, 1 << 20).unwrap();
    let file = Arc::new(
        RawFile::open(
            &path,
            RawOptions {
                cache: CacheMode::None,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let check = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // Two regions, so a request at their border is two transfers in two buffers.
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .unwrap(),
    );
    let mut q: UringQueue<RawFile, GuestBuf<Arc<GuestMemoryMmap>>> =
        UringQueue::new(file.clone(), 16).unwrap();
    assert_eq!(
        registrations(),
        [(1, 0)],
        "the data file is registered at once"
    );
    q.register_memory(mem.clone()).unwrap();
    assert_eq!(registrations(), [(1, 2)], "one buffer per region");

    // Guest to disk across the border: 8 KiB from 4 KiB before it.
    let at = GuestAddress(REGION - 4096);
    let data = pattern(1, 8192);
    mem.write_slice(&data, at).unwrap();
    let range = |a: GuestAddress, n: usize| [GuestRange::new(a, n)].into_iter().collect();
    q.submit(AioRequest::write(
        128 << 10,
        GuestBuf::new(mem.clone(), range(at, 8192)),
        1,
    ));
    wait_ok(&mut q);
    let mut on_disk = vec![0; 8192];
    check.read_exact_at(&mut on_disk, 128 << 10).unwrap();
    assert_eq!(on_disk, data, "the write landed");

    // Disk to guest across the border, with the caller's handle gone (the queue and
    // the request keep the memory).
    let data = pattern(2, 8192);
    check.write_all_at(&data, 256 << 10).unwrap();
    check.sync_all().unwrap();
    let weak = Arc::downgrade(&mem);
    let buf = GuestBuf::new(mem, range(at, 8192));
    q.submit(AioRequest::read(256 << 10, buf, 2));
    wait_ok(&mut q);
    let mem = weak
        .upgrade()
        .expect("the queue keeps the memory it registered");
    let mut got = vec![0; 8192];
    mem.read_slice(&mut got, at).unwrap();
    assert_eq!(got, data, "the read landed");

    // Memory that is not registered goes through the plain path.
    let other = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), REGION as usize)]).unwrap(),
    );
    let data = pattern(3, 4096);
    check.write_all_at(&data, 512 << 10).unwrap();
    q.submit(AioRequest::read(
        512 << 10,
        GuestBuf::new(other.clone(), range(GuestAddress(0x2000), 4096)),
        3,
    ));
    wait_ok(&mut q);
    let mut got = vec![0; 4096];
    other.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
    assert_eq!(got, data, "the read into unregistered memory landed");

    // A second registration replaces the first.
    q.register_memory(other).unwrap();
    assert_eq!(registrations(), [(1, 1)]);
    drop(q);
    assert_eq!(registrations(), [], "the ring is closed");
    assert_eq!(
        Arc::strong_count(&mem),
        1,
        "the closed queue let go of the memory"
    );
}

//! Under `O_DIRECT` a write that covers part of a block is a read-modify-write of the
//! whole block. It must be serialised against every write of that block, aligned ones
//! included (synchronous, or in flight on io_uring): otherwise an aligned write that lands
//! between its read and its write is undone outside the small write's range.
#![cfg(feature = "io_uring")]

use std::sync::{Arc, Barrier};

use keel_block::aio::{AioQueue, AioRequest, UringQueue};
use keel_block::buf::AlignedBuf;
use keel_block::{BlockBackend, CacheMode, RawFile, RawOptions};

const ROUNDS: usize = 400;

fn direct_file(dir: &tempfile::TempDir) -> Arc<RawFile> {
    let p = dir.path().join("disk.raw");
    RawFile::create(&p, 1 << 20).unwrap();
    Arc::new(
        RawFile::open(
            &p,
            RawOptions {
                cache: CacheMode::None,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn block(byte: u8, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, 4096);
    b.as_mut_slice().fill(byte);
    b
}

/// Races a one-byte write at offset 1 (a read-modify-write of block 0) against an aligned
/// write of 0xff over block 0, `ROUNDS` times; `aligned` performs the aligned write.
/// Whichever goes first, block 0 ends as 0xff everywhere except byte 1.
fn race(f: &Arc<RawFile>, aligned: impl Fn(&Barrier) + Sync) {
    let a = f.limits().request_alignment as usize;
    for round in 0..ROUNDS {
        f.write_at(block(0, a).as_slice(), 0).unwrap();
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                f.write_at(&[0xaa], 1).unwrap();
            });
            aligned(&barrier);
        });
        let mut got = block(0, a);
        f.read_at(got.as_mut_slice(), 0).unwrap();
        let got = got.as_slice();
        let lost = got
            .iter()
            .enumerate()
            .filter(|&(i, &x)| i != 1 && x != 0xff)
            .count();
        assert_eq!(
            lost, 0,
            "round {round}: the aligned write was undone in {lost} of {a} bytes"
        );
        assert!(got[1] == 0xaa || got[1] == 0xff);
    }
}

#[test]
fn a_read_modify_write_does_not_undo_a_synchronous_aligned_write() {
    let dir = tempfile::tempdir().unwrap();
    let f = direct_file(&dir);
    let a = f.limits().request_alignment as usize;
    let data = block(0xff, a);
    race(&f, |b| {
        b.wait();
        f.write_at(data.as_slice(), 0).unwrap();
    });
}

#[test]
fn a_read_modify_write_does_not_undo_an_aligned_write_in_flight_on_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let f = direct_file(&dir);
    let a = f.limits().request_alignment as usize;
    race(&f, |b| {
        let mut q = UringQueue::new(f.clone(), 4).unwrap();
        b.wait();
        q.submit(AioRequest::write(0, block(0xff, a), 1));
        let mut out = Vec::new();
        while q.in_flight() > 0 {
            q.wait(1, &mut out).unwrap();
        }
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    });
}

/// A partial-block write served inline behind an aligned write of the same block on the
/// same io_uring queue: the queue lets its own write complete first instead of waiting for
/// itself.
#[test]
fn a_queue_does_not_wait_for_its_own_write_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let f = direct_file(&dir);
    let a = f.limits().request_alignment as usize;
    let (tx, rx) = std::sync::mpsc::channel();
    let file = f.clone();
    std::thread::spawn(move || {
        let mut q = UringQueue::new(file, 4).unwrap();
        q.submit(AioRequest::write(0, block(0xff, a), 1));
        q.submit(AioRequest::write(1, block(0xaa, 1), 2));
        let mut out = Vec::new();
        while q.in_flight() > 0 {
            q.wait(1, &mut out).unwrap();
        }
        let _ = tx.send(out.iter().all(|c| c.result.is_ok()));
    });
    let ok = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the queue waits for itself");
    assert!(ok);
    let mut got = block(0, a);
    f.read_at(got.as_mut_slice(), 0).unwrap();
    assert_eq!(got.as_slice()[..3], [0xff, 0xaa, 0xff]);
}

//! A raw image whose format was probed ([`ProbedRaw`]) refuses writes that would make it
//! probe as qcow2 next time, through every path (synchronous, io_uring, buffered and
//! `O_DIRECT`), as QEMU refuses them; an image opened as raw explicitly takes them. The
//! file is checked from outside: its bytes, and how `qemu-img info` probes it.

mod common;

use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use keel_block::image::Format;
use keel_block::{BlockBackend, CacheMode, Error, ProbedRaw, RawFile, RawOptions, WriteFlags};

use common::{ok, p, require_qemu};

const SIZE: u64 = 1 << 20;
/// What the image's first sector holds before each test: an ordinary boot sector.
const BOOT: u8 = 0x55;

/// The first 512 bytes of a real qcow2 image of 1 TiB, made by qemu-img: what a hostile
/// guest would write.
fn qcow2_header(dir: &Path) -> Vec<u8> {
    let q = dir.join("header.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&q), "1T"]);
    let mut h = std::fs::read(&q).unwrap();
    h.truncate(512);
    assert_eq!(&h[..4], b"QFI\xfb");
    h
}

/// A raw image of `SIZE` bytes whose first sector is `BOOT` bytes.
fn raw_image(dir: &Path) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut data = vec![0u8; SIZE as usize];
    data[..512].fill(BOOT);
    std::fs::write(&path, data).unwrap();
    path
}

fn open(path: &Path, cache: CacheMode) -> Arc<RawFile> {
    Arc::new(
        RawFile::open(
            path,
            RawOptions {
                cache,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// The format `qemu-img info` probes the file as.
fn qemu_probes(path: &Path) -> String {
    let out = ok("qemu-img", &["info", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format"]
        .as_str()
        .expect("format in qemu-img info")
        .to_owned()
}

fn assert_refused(r: keel_block::Result<()>) {
    match r {
        Err(e @ Error::ProbedFormatChange { .. }) => {
            assert!(
                matches!(
                    e,
                    Error::ProbedFormatChange {
                        format: Format::Qcow2
                    }
                ),
                "{e:?}"
            );
            assert_eq!(e.errno(), libc::EPERM);
            assert!(e.to_string().contains("probe as qcow2"), "{e}");
        }
        other => panic!("expected the write refused, got {other:?}"),
    }
}

/// The file still probes raw (keel and qemu-img) and its first sector is `first`.
fn assert_still_raw(path: &Path, first: &[u8]) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(&data[..first.len()], first, "first sector changed");
    assert_eq!(Format::probe(path).unwrap(), Format::Raw);
    assert_eq!(qemu_probes(path), "raw");
}

#[test]
fn probed_raw_refuses_writes_that_make_it_qcow2_and_takes_the_rest() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let header = qcow2_header(dir.path());
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let path = raw_image(dir.path());
        let disk = ProbedRaw::new(open(&path, cache));

        // Ordinary writes to sector 0, whole and partial, are taken.
        let mut boot = vec![BOOT; 512];
        boot[510..].copy_from_slice(&[0x55, 0xaa]);
        disk.write_at(&boot, 0).unwrap();
        disk.write_at(b"QF", 0).unwrap();
        boot[..2].copy_from_slice(b"QF");
        assert_still_raw(&path, &boot);

        // The whole header over sector 0 is refused, and so is a write of 4 KiB that
        // starts with it.
        assert_refused(disk.write_at(&header, 0));
        let mut block = header.clone();
        block.resize(4096, 0xee);
        assert_refused(disk.write_at(&block, 0));
        // A partial write that completes the magic with what sector 0 holds ("QF"),
        // also cut across several buffers.
        assert_refused(disk.write_at(b"I\xfb", 2));
        assert_refused(disk.write_vectored_at(
            &[IoSlice::new(b"I"), IoSlice::new(b"\xfb\0\0\0\x03")],
            2,
            WriteFlags::NONE,
        ));
        assert_refused(disk.write_vectored_at(
            &[
                IoSlice::new(b""),
                IoSlice::new(b"Q"),
                IoSlice::new(&header[1..]),
            ],
            0,
            WriteFlags::FUA,
        ));
        assert_still_raw(&path, &boot);

        // The magic anywhere but at the start, zeroes over it, and everything past the
        // first sector are taken.
        disk.write_at(b"QFI\xfb", 508).unwrap();
        disk.write_zeroes(0, 2, false).unwrap();
        disk.discard(0, 512).unwrap();
        disk.write_at(&header, 512).unwrap();
        disk.write_at(b"I\xfb", 2).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..4], b"\0\0I\xfb");
        assert_eq!(&data[512..1024], &header[..]);
        assert_eq!(qemu_probes(&path), "raw");
        disk.flush().unwrap();
    }
}

#[test]
fn explicit_raw_takes_a_qcow2_header() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let header = qcow2_header(dir.path());
    let path = raw_image(dir.path());
    let disk = open(&path, CacheMode::Writeback);
    disk.write_at(&header, 0).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert_eq!(&std::fs::read(&path).unwrap()[..512], &header[..]);
    // Which is why probing must not be trusted with a raw image.
    assert_eq!(Format::probe(&path).unwrap(), Format::Qcow2);
    assert_eq!(qemu_probes(&path), "qcow2");
}

#[cfg(feature = "io_uring")]
mod uring {
    use super::*;
    use keel_block::aio::{AioQueue, AioRequest, Completion, UringQueue};
    use keel_block::buf::AlignedBuf;

    fn buf(data: &[u8], len: usize) -> AlignedBuf {
        let mut b = AlignedBuf::new(len, 4096);
        b.as_mut_slice().fill(0xee);
        b.as_mut_slice()[..data.len()].copy_from_slice(data);
        b
    }

    fn run<Q: AioQueue<AlignedBuf>>(
        q: &mut Q,
        reqs: Vec<AioRequest<AlignedBuf>>,
    ) -> Vec<Completion<AlignedBuf>> {
        let n = reqs.len();
        for r in reqs {
            q.submit(r);
        }
        let mut out = Vec::new();
        while out.len() < n {
            q.wait(1, &mut out).unwrap();
        }
        out.sort_by_key(|c| c.user_data);
        out
    }

    /// Through io_uring, whose aligned writes would otherwise go straight to the file, and
    /// beside writes that do (the rest of the image).
    #[test]
    fn probed_raw_refuses_the_header_through_io_uring() {
        require_qemu();
        let dir = tempfile::tempdir().unwrap();
        let header = qcow2_header(dir.path());
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let path = raw_image(dir.path());
            let disk = Arc::new(ProbedRaw::new(open(&path, cache)));
            let mut q = UringQueue::new(disk.clone(), 8).unwrap();
            let out = run(
                &mut q,
                vec![
                    AioRequest::write(0, buf(&header, 4096), 0),
                    AioRequest::write(4096, buf(&header, 4096), 1),
                    AioRequest::write(8192, buf(b"", 4096), 2),
                ],
            );
            assert_refused(out.into_iter().next().unwrap().result);
            let out = run(
                &mut q,
                vec![
                    AioRequest::write(0, buf(&[BOOT; 512], 4096), 3),
                    AioRequest::read(0, buf(b"", 4096), 4),
                ],
            );
            assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
            let data = std::fs::read(&path).unwrap();
            assert!(data[..512].iter().all(|&b| b == BOOT));
            assert!(data[512..4096].iter().all(|&b| b == 0xee));
            assert_eq!(&data[4096..4608], &header[..]);
            assert!(data[8192..12288].iter().all(|&b| b == 0xee));
            assert_eq!(qemu_probes(&path), "raw");
        }
    }
}

/// Two partial writes that are each harmless but together write the magic, racing from
/// two threads: one of them is refused every time.
#[test]
fn racing_halves_of_the_magic_never_both_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_image(dir.path());
    let disk = ProbedRaw::new(open(&path, CacheMode::Writeback));
    for round in 0..300 {
        disk.write_at(&[0; 4], 0).unwrap();
        let barrier = Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                barrier.wait();
                disk.write_at(b"QF", 0)
            });
            barrier.wait();
            let b = disk.write_at(b"I\xfb", 2);
            (a.join().unwrap(), b)
        });
        assert!(
            a.is_err() || b.is_err(),
            "round {round}: both halves landed"
        );
        let mut first = [0u8; 512];
        disk.read_at(&mut first, 0).unwrap();
        assert_eq!(Format::detect(&first), Format::Raw, "round {round}");
    }
}

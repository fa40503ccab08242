use std::sync::Arc;

use super::*;
use crate::error::{Corruption, HeaderField, InvalidImage};
use crate::image::Format;
use crate::mapping::{ExtentKind, MapExtents};
use crate::mem::MemBackend;

/// Opens `data` as an image and runs every operation on it, ignoring errors: the
/// randomized tests below only require that nothing panics (the fuzz crate's `qcow2_parse`
/// target does more of the same).
fn exercise_image(data: &[u8]) {
    let backing: Arc<dyn BlockBackend> = Arc::new(MemBackend::read_only(
        (0..256 << 10).map(|i| (i % 251) as u8).collect(),
    ));
    if let Ok(img) = Qcow2::open_with_backing(
        MemBackend::new(data.to_vec()).with_max_size(64 << 20),
        Qcow2Options {
            cache_sizes: CacheSizes {
                l2: Some(4096),
                refcount: Some(4096),
            },
            ..Default::default()
        },
        Some(backing.clone()),
    ) {
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
        let _ = check(img.file(), Fix::None);
    }
    let ro = MemBackend::read_only(data.to_vec());
    let _ = check(&ro, Fix::None);
    if let Ok(img) = Qcow2::open_with_backing(ro, Qcow2Options::default(), Some(backing)) {
        let mut buf = vec![0u8; 4096];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.snapshots();
    }
}

fn new_image(size: u64, cluster_size: u64, refcount_bits: u32, version: u32) -> MemBackend {
    let m = MemBackend::new(Vec::new());
    create(
        &m,
        &CreateOptions {
            size,
            cluster_size,
            version,
            refcount_bits,
            lazy_refcounts: false,
            ..Default::default()
        },
    )
    .unwrap();
    m
}

fn clean(img: &Qcow2<MemBackend>) {
    img.flush().unwrap();
    let r = check(img.file(), Fix::None).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

#[test]
fn queues_share_one_image_across_threads() {
    let img =
        Arc::new(Qcow2::open(new_image(8 << 20, 4096, 16, 3), Qcow2Options::default()).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    // Interleaved regions: neighbouring clusters belong to other threads.
                    let off = (i * 4 + t as u64) * 6000;
                    let data = vec![t * 50 + (i as u8 % 50); 6000];
                    img.write_at(&data, off).unwrap();
                    let mut back = vec![0u8; 6000];
                    img.read_at(&mut back, off).unwrap();
                    assert_eq!(back, data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4u8 {
        for i in 0..64u64 {
            let off = (i * 4 + t as u64) * 6000;
            let mut back = vec![0u8; 6000];
            img.read_at(&mut back, off).unwrap();
            assert!(back.iter().all(|&b| b == t * 50 + (i as u8 % 50)));
        }
    }
    clean(&img);
}

#[test]
fn refcount_table_grows_with_small_clusters() {
    let img = Qcow2::open(
        new_image(16 << 20, 512, 64, 3),
        Qcow2Options {
            cache_sizes: CacheSizes {
                l2: Some(2048),
                refcount: Some(1024),
            },
            ..Default::default()
        },
    )
    .unwrap();
    let before = img.header().refcount_table_clusters;
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
    img.write_at(&data, 4 << 20).unwrap();
    clean(&img);
    let after = read_header(img.file()).unwrap();
    assert!(
        after.refcount_table_clusters > before,
        "{before} -> {}",
        after.refcount_table_clusters
    );
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 4 << 20).unwrap();
    assert!(back == data);
}

#[test]
fn zero_discard_and_reuse_leave_no_leaks() {
    for version in [2, 3] {
        let img = Qcow2::open(
            new_image(4 << 20, 4096, 16, version),
            Qcow2Options::default(),
        )
        .unwrap();
        img.write_at(&vec![7u8; 1 << 20], 0).unwrap();
        img.write_zeroes(4096, 8192, false).unwrap();
        img.write_zeroes(65536, 65536, true).unwrap();
        img.discard(200_000, 300_000).unwrap();
        // Partial-cluster write-zeroes writes real zeroes.
        img.write_zeroes(500_001, 10, true).unwrap();
        let mut b = vec![1u8; 1 << 20];
        img.read_at(&mut b, 0).unwrap();
        for (i, &x) in b.iter().enumerate() {
            let i = i as u64;
            let zero = (4096..12288).contains(&i)
                || (65536..131072).contains(&i)
                || (200_704..499_712).contains(&i)
                || (500_001..500_011).contains(&i);
            assert_eq!(x, if zero { 0 } else { 7 }, "v{version} byte {i}");
        }
        // Freed clusters are reused.
        let end_before = img.file().size();
        img.write_at(&vec![9u8; 65536], 2 << 20).unwrap();
        assert_eq!(
            img.file().size(),
            end_before,
            "v{version}: freed clusters not reused"
        );
        clean(&img);
    }
}

#[test]
fn read_only_and_corrupt_images_refuse_writes() {
    let m = new_image(1 << 20, 4096, 16, 3);
    let bytes = m.to_vec();
    let img = Qcow2::open(
        MemBackend::read_only(bytes.clone()),
        Qcow2Options::default(),
    )
    .unwrap();
    assert!(matches!(img.write_at(&[1], 0), Err(Error::ReadOnly)));
    // Set the corrupt bit: read-write open is refused, read-only works.
    let mut c = bytes;
    c[79] |= 2;
    assert!(matches!(
        Qcow2::open(MemBackend::new(c.clone()), Qcow2Options::default()),
        Err(Error::Corrupt(Corruption::MarkedCorrupt))
    ));
    let ro = Qcow2::open(
        MemBackend::new(c),
        Qcow2Options {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(ro.info().corrupt);
    let mut b = [1u8; 16];
    ro.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0; 16]);
}

#[test]
fn unknown_extensions_and_autoclear_bits() {
    let m = new_image(1 << 20, 4096, 16, 3);
    let mut bytes = m.to_vec();
    // Append an unknown extension after the feature table, and set an
    // unknown autoclear bit.
    let h = read_header(&m).unwrap();
    let mut ext_end = h.header_length as usize;
    for e in &h.extensions {
        ext_end += 8 + e.data.len().div_ceil(8) * 8;
    }
    bytes[ext_end..ext_end + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bytes[ext_end + 4..ext_end + 8].copy_from_slice(&5u32.to_be_bytes());
    bytes[ext_end + 8..ext_end + 13].copy_from_slice(b"hello");
    bytes[88 + 7] = 0x80;
    let img = Qcow2::open(MemBackend::new(bytes), Qcow2Options::default()).unwrap();
    img.write_at(&[5u8; 5000], 0).unwrap();
    img.close().unwrap();
    let h2 = read_header(img.file()).unwrap();
    assert_eq!(h2.autoclear_features, 0);
    let ext = h2
        .extensions
        .iter()
        .find(|e| e.kind == 0x1234_5678)
        .unwrap();
    assert_eq!(ext.data, b"hello");
}

#[test]
fn hostile_headers_give_errors_not_panics() {
    let good = new_image(64 << 20, 4096, 16, 3).to_vec();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Corrupt header fields, L1/refcount table entries, and truncate.
    for _ in 0..400 {
        let mut b = good.clone();
        for _ in 0..(1 + next() % 6) {
            let pos = match next() % 3 {
                0 => next() % 112,
                _ => next() % b.len() as u64,
            } as usize;
            b[pos] = next() as u8;
        }
        if next() % 8 == 0 {
            let n = (next() % b.len() as u64) as usize;
            b.truncate(n);
        }
        exercise_image(&b);
    }
    // Specific hostile values.
    let mut b = good.clone();
    b[36..40].copy_from_slice(&u32::MAX.to_be_bytes()); // l1_size
    assert!(matches!(
        Qcow2::open(MemBackend::new(b), Qcow2Options::default()),
        Err(Error::InvalidImage(InvalidImage::HeaderField {
            field: HeaderField::L1Size,
            value: 0xffff_ffff,
            ..
        }))
    ));
    let mut b = good.clone();
    b[48..56].copy_from_slice(&(!0xfffu64).to_be_bytes()); // reftable offset
    assert!(Qcow2::open(MemBackend::new(b), Qcow2Options::default()).is_err());
    exercise_image(&[]);
    exercise_image(b"QFI\xfb");
}

/// The host offset of a guest offset's data.
fn host_of(img: &Qcow2<MemBackend>, guest: u64) -> u64 {
    match img.map_read_extents(guest, 1, false).unwrap().extents()[0].kind {
        ExtentKind::Data(h) => h,
        k => panic!("guest {guest:#x} is {k:?}"),
    }
}

#[test]
fn pinned_clusters_are_reused_only_after_unpinning() {
    let img = Qcow2::open(new_image(1 << 20, 4096, 16, 3), Qcow2Options::default()).unwrap();
    img.write_at(&[1u8; 4096], 0).unwrap();
    let h = host_of(&img, 0);
    // A transfer from guest cluster 0 is in flight.
    let read = img.map_read(0, 4096).unwrap();
    assert_eq!(read.extents()[0].kind, ExtentKind::Data(h));
    assert_eq!(img.meta().inflight.pinned_clusters(), 1);
    img.discard(0, 4096).unwrap();
    // Freed, but neither given to a data cluster nor to a new L2 table.
    img.write_at(&[2u8; 4096], 8192).unwrap();
    img.write_at(&[3u8; 4096], 1 << 19).unwrap();
    assert_ne!(host_of(&img, 8192), h);
    assert_ne!(host_of(&img, 1 << 19), h);
    let mut b = [0u8; 4096];
    img.file().read_at(&mut b, h).unwrap();
    assert_eq!(b, [1u8; 4096], "the late read still finds its data");
    // Once the transfer is done, the next allocation takes it.
    drop(read);
    assert_eq!(img.meta().inflight.pinned_clusters(), 0);
    img.write_at(&[4u8; 4096], 16384).unwrap();
    assert_eq!(host_of(&img, 16384), h);
    clean(&img);
}

#[test]
fn writes_pin_until_done_and_unpinned_clusters_are_not_skipped() {
    let img = Qcow2::open(new_image(1 << 20, 4096, 16, 3), Qcow2Options::default()).unwrap();
    let w = img.map_write(0, 4096).unwrap();
    let ExtentKind::Data(h) = w.extents()[0].kind else {
        panic!("write maps to data")
    };
    img.write_zeroes(0, 4096, true).unwrap();
    img.write_at(&[5u8; 8192], 4096).unwrap();
    assert_ne!(host_of(&img, 4096), h);
    assert_ne!(host_of(&img, 8192), h);
    // The late write lands in the free cluster and nobody sees it.
    img.file().write_at(&[6u8; 4096], h).unwrap();
    drop(w);
    let mut b = [9u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0u8; 4096]);
    // Reused now, and zeroed in full before it is linked.
    img.write_at(&[7u8; 512], 12288 + 512).unwrap();
    assert_eq!(host_of(&img, 12288), h);
    img.read_at(&mut b, 12288).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0));
    assert!(b[512..1024].iter().all(|&x| x == 7));
    assert!(b[1024..].iter().all(|&x| x == 0));
    clean(&img);
}

/// Guest clusters 0 and 1 share one host cluster (refcount 2, COPIED clear),
/// as in images written by other tools.
fn shared_cluster_image() -> (Qcow2<MemBackend>, u64) {
    let img = Qcow2::open(new_image(1 << 20, 4096, 16, 3), Qcow2Options::default()).unwrap();
    img.write_at(&[1u8; 4096], 0).unwrap();
    img.write_at(&[2u8; 4096], 4096).unwrap();
    let (h0, h1) = (host_of(&img, 0), host_of(&img, 4096));
    img.flush().unwrap();
    let hdr = img.header();
    let f = img.file();
    let l2 = read_u64s(f, hdr.l1_table_offset, 1).unwrap()[0] & meta::OFFSET_MASK;
    f.write_at(&h0.to_be_bytes(), l2).unwrap();
    f.write_at(&h0.to_be_bytes(), l2 + 8).unwrap();
    let rb = read_u64s(f, hdr.refcount_table_offset, 1).unwrap()[0];
    f.write_at(&2u16.to_be_bytes(), rb + 2 * (h0 >> 12))
        .unwrap();
    f.write_at(&0u16.to_be_bytes(), rb + 2 * (h1 >> 12))
        .unwrap();
    let bytes = f.to_vec();
    drop(img);
    let img = Qcow2::open(MemBackend::new(bytes), Qcow2Options::default()).unwrap();
    clean(&img);
    (img, h0)
}

#[test]
fn sole_owner_copies_on_write_while_a_former_sharer_reads() {
    let (img, h) = shared_cluster_image();
    // A read through guest cluster 0 is in flight; guest cluster 0 is then
    // rewritten (copy on write), leaving guest cluster 1 the sole owner.
    let read = img.map_read(0, 4096).unwrap();
    img.write_at(&[3u8; 4096], 0).unwrap();
    assert_ne!(host_of(&img, 0), h);
    // Writing in place would show guest cluster 1's data to that read.
    img.write_at(&[4u8; 4096], 4096).unwrap();
    assert_ne!(host_of(&img, 4096), h);
    let mut b = [0u8; 4096];
    img.file().read_at(&mut b, h).unwrap();
    assert_eq!(b, [1u8; 4096]);
    drop(read);
    for (g, v) in [(0, 3u8), (4096, 4)] {
        img.read_at(&mut b, g).unwrap();
        assert_eq!(b, [v; 4096]);
    }
    clean(&img);

    // With nothing in flight the sole owner writes in place.
    let (img, h) = shared_cluster_image();
    img.write_at(&[3u8; 4096], 0).unwrap();
    img.write_at(&[4u8; 4096], 4096).unwrap();
    assert_eq!(host_of(&img, 4096), h);
    clean(&img);
}

/// The exercise reaches the new paths: compressed clusters, a
/// backing image, extended L2 entries, snapshots tables, on damaged copies.
#[test]
fn exercise_image_covers_compressed_backing_and_extended_l2() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (ext, backing, ctype) in [
        (false, true, CompressionType::Deflate),
        (true, false, CompressionType::Zstd),
        (true, true, CompressionType::Deflate),
    ] {
        let m = MemBackend::new(Vec::new());
        create(
            &m,
            &CreateOptions {
                size: 1 << 20,
                cluster_size: 16384,
                extended_l2: ext,
                compression_type: ctype,
                backing_file: backing.then(|| "base".to_string()),
                backing_format: backing.then_some(Format::Raw),
                ..Default::default()
            },
        )
        .unwrap();
        let base: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(vec![3u8; 1 << 19]));
        let img = Qcow2::open_with_backing(m, Qcow2Options::default(), Some(base)).unwrap();
        let text: Vec<u8> = (0..16384u32).map(|i| (i / 64) as u8).collect();
        img.write_compressed(0, &text).unwrap();
        img.write_compressed(16384, &text).unwrap();
        img.write_at(&[1u8; 3000], 40000).unwrap();
        img.write_at(&[2u8; 100], 16384 + 5).unwrap();
        let mut b = vec![0u8; 16384];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b, text);
        img.read_at(&mut b, 16384).unwrap();
        assert_eq!(&b[..5], &text[..5]);
        assert_eq!(&b[5..105], &[2u8; 100][..]);
        assert_eq!(&b[105..], &text[105..]);
        clean(&img);
        let good = img.file().to_vec();
        drop(img);
        exercise_image(&good);
        for _ in 0..200 {
            let mut d = good.clone();
            for _ in 0..(1 + next() % 4) {
                let pos = (next() % d.len() as u64) as usize;
                d[pos] = next() as u8;
            }
            exercise_image(&d);
        }
    }
}

/// Runs `f` on a thread and fails unless it returns within `secs` seconds (a stalled
/// thread is left behind; the test process ends anyway).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

/// The big-endian u64 at `at` of an image's bytes (the edit tests use it too).
pub(super) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Every refcount table entry names the same refcount block, which says every cluster
/// is in use: the allocator would scan 8192 * 32768 clusters for a free one. The image
/// is refused at open instead.
#[test]
fn aliased_refcount_blocks_are_refused_at_open() {
    let mut b = new_image(1 << 30, 65536, 16, 3).to_vec();
    let rt = be64(&b, 48) as usize;
    let rt_clusters = u32::from_be_bytes(b[56..60].try_into().unwrap()) as usize;
    let rb = be64(&b, rt);
    for i in 0..rt_clusters * 65536 / 8 {
        b[rt + i * 8..rt + i * 8 + 8].copy_from_slice(&rb.to_be_bytes());
    }
    for i in 0..65536 / 2 {
        b[rb as usize + i * 2..rb as usize + i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let r = within(20, "opening and writing", move || {
        let img = Qcow2::open(MemBackend::new(b), Qcow2Options::default())?;
        img.write_at(&[1; 512], 0)
    });
    assert!(
        matches!(
            r,
            Err(Error::Corrupt(Corruption::Aliased {
                table: crate::error::Metadata::RefcountTable,
                index: 1,
                other: 0,
                ..
            }))
        ),
        "{r:?}"
    );
}

/// A dirty image whose 65536 L1 entries all name one L2 table: the check that opening it
/// read-write runs walks that table once, not once per entry, and reports the aliases.
#[test]
fn dirty_image_with_aliased_l2_tables_checks_in_bounded_time() {
    let m = new_image(1 << 45, 65536, 16, 3);
    let img = Qcow2::open(m, Qcow2Options::default()).unwrap();
    img.write_at(&[1; 512], 0).unwrap();
    img.flush().unwrap();
    let mut b = img.file().to_vec();
    drop(img);
    let l1 = be64(&b, 40) as usize;
    let l1_size = u32::from_be_bytes(b[36..40].try_into().unwrap()) as usize;
    assert_eq!(l1_size, 65536);
    let e = be64(&b, l1);
    for i in 1..l1_size {
        b[l1 + i * 8..l1 + i * 8 + 8].copy_from_slice(&e.to_be_bytes());
    }
    b[79] |= 1; // dirty
    let checked = b.clone();
    let r = within(20, "checking", move || {
        check(&MemBackend::new(checked), Fix::None)
    });
    let r = r.unwrap();
    assert!(r.corruptions >= 65535, "{}", r.corruptions);
    let r = within(20, "opening", move || {
        Qcow2::open(MemBackend::new(b), Qcow2Options::default()).map(|_| ())
    });
    assert!(matches!(r, Ok(()) | Err(Error::Corrupt(_))), "{r:?}");
}

/// `m` with 512 bytes of data written at guest offset 0: the image's bytes, the L1
/// table's offset and the first L2 table's.
fn with_data_at_0(m: MemBackend) -> (Vec<u8>, usize, usize) {
    let img = Qcow2::open(m, Qcow2Options::default()).unwrap();
    img.write_at(&[7u8; 512], 0).unwrap();
    img.flush().unwrap();
    let b = img.file().to_vec();
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    (b, l1, l2)
}

/// Opens the damaged image `b` and writes 512 bytes at guest offset `at`: the write
/// must fail as corruption `refusal` accepts, naming the L1 table, and the first `len`
/// bytes of the L1 table at `l1` must be as they were. Returns the image.
fn refused_sparing_l1(
    b: Vec<u8>,
    at: u64,
    l1: usize,
    len: usize,
    refusal: fn(&Corruption) -> Option<crate::error::Metadata>,
) -> Qcow2<MemBackend> {
    let before = b[l1..l1 + len].to_vec();
    let img = Qcow2::open(MemBackend::new(b), Qcow2Options::default()).unwrap();
    match img.write_at(&[9u8; 512], at) {
        Err(Error::Corrupt(c)) => {
            assert_eq!(refusal(&c), Some(crate::error::Metadata::L1Table), "{c:?}")
        }
        r => panic!("the write was not refused as corruption: {r:?}"),
    }
    assert_eq!(&img.file().to_vec()[l1..l1 + len], &before[..]);
    img
}

fn overlap(c: &Corruption) -> Option<crate::error::Metadata> {
    match c {
        Corruption::DataOverlap { metadata, .. } => Some(*metadata),
        _ => None,
    }
}

/// An extended-L2 entry without COPIED that names the L1 table (a cluster of refcount 1,
/// so "owned alone"): a write into one of its unallocated subclusters would zero and
/// write the L1 table. It is refused as an overlap with metadata, and the L1 table is
/// untouched.
#[test]
fn extended_l2_writes_never_land_in_metadata() {
    let m = MemBackend::new(Vec::new());
    create(
        &m,
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 16384,
            extended_l2: true,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut b, l1, l2) = with_data_at_0(m);
    // Entry 0: the L1 table's cluster, COPIED clear; subcluster 0 allocated.
    b[l2..l2 + 8].copy_from_slice(&(l1 as u64).to_be_bytes());
    b[l2 + 8..l2 + 16].copy_from_slice(&1u64.to_be_bytes());
    // Subcluster 1 (512 bytes each at 16 KiB clusters): newly allocated by this write.
    refused_sparing_l1(b, 512, l1, 16384, overlap);
}

/// A zero cluster without COPIED that names the L1 table: a write allocates a new cluster
/// and drops the old one's reference, which would have freed the L1 table's cluster for
/// the next allocation (guest data in the L1 table). The release is refused as an
/// overlap with metadata, and the L1 table stays as it was.
#[test]
fn a_zero_entry_naming_metadata_is_never_released() {
    let (mut b, l1, l2) = with_data_at_0(new_image(1 << 20, 512, 16, 3));
    // ZERO (bit 0) with the L1 table's offset, COPIED clear.
    b[l2..l2 + 8].copy_from_slice(&(l1 as u64 | 1).to_be_bytes());
    let img = refused_sparing_l1(b, 0, l1, 512, overlap);
    // Nothing more is written to a corrupt image.
    assert!(img.write_at(&[9u8; 512], 1024).is_err());
}

/// Refcounts that call the L1 table free: the allocator finds its cluster first and would
/// hand it out for the write's new L2 table (zeroes over the L1 table). Refused as
/// corruption; the L1 table stays as it was.
#[test]
fn the_allocator_never_hands_out_metadata_the_refcounts_call_free() {
    let mut b = new_image(1 << 20, 512, 16, 3).to_vec();
    let l1 = be64(&b, 40) as usize;
    let rb = be64(&b, be64(&b, 48) as usize) as usize;
    let at = rb + 2 * (l1 / 512);
    assert_eq!(u16::from_be_bytes([b[at], b[at + 1]]), 1);
    b[at..at + 2].copy_from_slice(&0u16.to_be_bytes());
    refused_sparing_l1(b, 0, l1, 512, |c| match c {
        Corruption::FreeMetadata { metadata, .. } => Some(*metadata),
        _ => None,
    });
}

//! qcow2 guest-offset mapping in keel-block, with the L2 table cached and not.
//!
//! `cargo bench -p keel-benches --bench qcow2`
//!
//! What it measures: `MapExtents::map_read` on a qcow2 image, the question every guest
//! read asks first (which host cluster holds this guest offset?), answered from the L1
//! table and one L2 table. With the L2 table in keel-block's L2 cache it is a lookup
//! under the image's metadata lock; without it the 64 KiB table is read from the file
//! first and replaces the least recently used one. The difference is what a working set
//! larger than the L2 cache costs per request (QEMU's `l2-cache-size` trade-off), and the
//! cached figure is the floor of the qcow2 path on top of a raw file. `read_4k/*` adds
//! the data: a 4 KiB `BlockBackend::read_at` through the same mapping.
//!
//! How: qemu-img converts a sparse raw file with 64 KiB of data at every 512 MiB
//! (so each data cluster has its own L2 table: 8192 entries of 64 KiB clusters) into an
//! 8 GiB qcow2 image with 64 KiB clusters in a temporary directory. The image is opened
//! read-write as a VMM opens its disk, and the bench maps 4 KiB at those 16 offsets in
//! turn:
//! * `cached`: default cache sizes, all 16 L2 tables resident after the first pass;
//! * `uncached`: the L2 cache at its minimum (2 tables), so every lookup in the
//!   16-table cycle evicts one table and reads another (from the host page cache);
//! * `uncached_odirect`: the same with the file opened `O_DIRECT` (cache=none), so each
//!   L2 miss is a 64 KiB read from the host's disk.
//!
//! Needs qemu-img (scripts/test installs it).

use std::path::Path;
use std::process::Command;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keel_block::mapping::{ExtentKind, MapExtents};
use keel_block::qcow2::{CacheSizes, Qcow2, Qcow2Options};
use keel_block::{BlockBackend, CacheMode, RawFile, RawOptions};

/// Virtual size of the image.
const SIZE: u64 = 8 << 30;
/// qemu-img's default cluster size.
const CLUSTER: u64 = 64 << 10;
/// Guest bytes one L2 table maps (CLUSTER / 8 entries of CLUSTER bytes).
const L2_SPAN: u64 = CLUSTER / 8 * CLUSTER;
/// One allocated cluster per L2 table.
const TABLES: u64 = SIZE / L2_SPAN;
/// Bytes mapped or read per request.
const REQ: u64 = 4096;

fn pattern(k: u64) -> u8 {
    0x10 + k as u8
}

/// Makes `disk.qcow2` in `dir`: data at the start of every L2 table's span.
fn make_image(dir: &Path) -> std::path::PathBuf {
    let raw = dir.join("disk.raw");
    let qcow2 = dir.join("disk.qcow2");
    let f = std::fs::File::create(&raw).expect("create the raw source");
    f.set_len(SIZE).expect("size the raw source");
    for k in 0..TABLES {
        let data = vec![pattern(k); CLUSTER as usize];
        std::os::unix::fs::FileExt::write_all_at(&f, &data, k * L2_SPAN)
            .expect("write the raw source");
    }
    drop(f);
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=65536",
        ])
        .arg(&raw)
        .arg(&qcow2)
        .output()
        .expect("run qemu-img (scripts/test installs it)");
    assert!(
        out.status.success(),
        "qemu-img convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&raw).expect("remove the raw source");
    qcow2
}

fn open(path: &Path, cache: CacheMode, l2: Option<u64>) -> Qcow2<RawFile> {
    let file = RawFile::open(
        path,
        RawOptions {
            cache,
            growable: true,
            ..Default::default()
        },
    )
    .expect("open the image file");
    let opts = Qcow2Options {
        cache_sizes: CacheSizes {
            l2,
            ..Default::default()
        },
        ..Default::default()
    };
    Qcow2::open(file, opts).expect("open the qcow2 image")
}

/// The guest offsets the bench cycles through: one 4 KiB block inside each data cluster.
fn offsets() -> Vec<u64> {
    (0..TABLES).map(|k| k * L2_SPAN + 2 * REQ).collect()
}

/// Checks that every offset maps to host data and reads back its pattern.
fn check(img: &Qcow2<RawFile>) {
    let mut hosts = Vec::new();
    for (k, off) in offsets().into_iter().enumerate() {
        let m = img.map_read(off, REQ).expect("map");
        let [e] = m.extents() else {
            panic!("{off:#x}: one extent expected, got {:?}", m.extents())
        };
        let ExtentKind::Data(host) = e.kind else {
            panic!("{off:#x}: data expected, got {:?}", e.kind)
        };
        assert_eq!(e.len, REQ);
        hosts.push(host);
        let mut buf = vec![0u8; REQ as usize];
        img.read_at(&mut buf, off).expect("read");
        assert!(
            buf.iter().all(|&b| b == pattern(k as u64)),
            "data at {off:#x}"
        );
    }
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(hosts.len() as u64, TABLES, "distinct host clusters");
}

fn qcow2(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = make_image(dir.path());
    let offsets = offsets();
    let variants = [
        ("cached", CacheMode::Writeback, None),
        ("uncached", CacheMode::Writeback, Some(2 * CLUSTER)),
        ("uncached_odirect", CacheMode::None, Some(2 * CLUSTER)),
    ];

    let mut g = c.benchmark_group("qcow2");
    g.throughput(Throughput::Elements(1));
    for (name, cache, l2) in variants {
        let img = open(&path, cache, l2);
        check(&img);
        let mut i = 0;
        g.bench_function(format!("map_read/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % offsets.len();
                img.map_read(offsets[i], REQ).expect("map")
            })
        });
        let mut buf = vec![0u8; REQ as usize];
        let mut i = 0;
        g.bench_function(format!("read_4k/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) % offsets.len();
                img.read_at(&mut buf, offsets[i]).expect("read");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, qcow2);
criterion_main!(benches);

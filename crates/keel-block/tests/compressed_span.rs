//! Compressed clusters whose data crosses a host-cluster boundary, as `qemu-img convert
//! -c` packs them: keel reads them, overwrites them (dropping the reference to each host
//! cluster they touch), and writes such clusters itself; qemu-img checks and compares.

mod common;

use std::path::Path;

use keel_block::convert::{convert, Destination};
use keel_block::qcow2::{self, backing, CreateOptions, Qcow2, Qcow2Options};
use keel_block::{BlockBackend, RawFile, RawOptions};

use common::{assert_clean_and_equal, ok, p, require_qemu, Rng};

const CLUSTER: u64 = 64 << 10;
const SIZE: u64 = 4 << 20;

/// Clusters of varied compressibility: each starts with a random run of 1 to 15 KiB (so
/// compressed sizes vary and packed clusters keep crossing host-cluster ends) and
/// continues with a short repeating pattern.
fn data() -> Vec<u8> {
    let mut rng = Rng(0xc0ff_ee00_1234_5678);
    let mut d = vec![0u8; SIZE as usize];
    for (c, chunk) in d.chunks_mut(CLUSTER as usize).enumerate() {
        let random = (1 + rng.below(15)) as usize * 1024;
        for b in &mut chunk[..random] {
            *b = rng.next_u64() as u8;
        }
        for (i, b) in chunk[random..].iter_mut().enumerate() {
            *b = (i % 13) as u8 + c as u8;
        }
    }
    d
}

/// Compressed L2 entries of the image, and how many of them cross a host-cluster end.
fn compressed_entries(path: &Path) -> (usize, usize) {
    let f = RawFile::open(
        path,
        RawOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let h = qcow2::read_header(&f).unwrap();
    let cb = h.cluster_bits;
    let cs = 1u64 << cb;
    let x = 62 - (cb - 8);
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    f.read_at(&mut l1, h.l1_table_offset).unwrap();
    let (mut n, mut spanning) = (0, 0);
    for e in l1.chunks(8) {
        let l2_off = u64::from_be_bytes(e.try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
        if l2_off == 0 {
            continue;
        }
        let mut l2 = vec![0u8; cs as usize];
        f.read_at(&mut l2, l2_off).unwrap();
        for e in l2.chunks(8) {
            let e = u64::from_be_bytes(e.try_into().unwrap());
            if e & (1 << 62) == 0 {
                continue;
            }
            let host = e & ((1 << x) - 1);
            let sectors = ((e & !(3 << 62)) >> x) + 1;
            let end = (host & !511) + sectors * 512;
            n += 1;
            if host >> cb != (end - 1) >> cb {
                spanning += 1;
            }
        }
    }
    (n, spanning)
}

fn read_all(path: &Path) -> Vec<u8> {
    let img = backing::open_path(
        path,
        RawOptions {
            read_only: true,
            ..Default::default()
        },
        Qcow2Options::default(),
    )
    .unwrap();
    let mut out = vec![0u8; img.size() as usize];
    img.read_at(&mut out, 0).unwrap();
    out
}

#[test]
fn qemu_compressed_clusters_across_host_clusters_read_and_overwrite() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("data.raw");
    let mut want = data();
    std::fs::write(&raw, &want).unwrap();
    let img = dir.path().join("c.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&raw),
            p(&img),
        ],
    );
    let (n, spanning) = compressed_entries(&img);
    assert_eq!(n as u64, SIZE / CLUSTER, "every cluster compressed");
    assert!(
        spanning >= 8,
        "only {spanning} of {n} compressed clusters span two host clusters"
    );
    assert!(
        read_all(&img) == want,
        "keel reads the compressed image differently"
    );

    // Overwrite part of every other cluster (each a read-modify-write of a compressed
    // cluster that drops its references, spanning ones included).
    let rw = backing::open_path(
        &img,
        RawOptions {
            growable: true,
            ..Default::default()
        },
        Qcow2Options::default(),
    )
    .unwrap();
    for c in (0..SIZE / CLUSTER).step_by(2) {
        let at = c * CLUSTER + 4096;
        rw.write_at(&[0xa5; 4096], at).unwrap();
        want[at as usize..at as usize + 4096].fill(0xa5);
    }
    rw.close().unwrap();
    drop(rw);
    assert_clean_and_equal(&img, &want, dir.path());
}

#[test]
fn keel_packs_compressed_clusters_across_host_clusters() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("data.raw");
    let want = data();
    std::fs::write(&raw, &want).unwrap();
    let img = dir.path().join("k.qcow2");
    // What `keel-img convert -c -f raw -O qcow2` does, through the library call.
    let file = qcow2::create_path(
        &img,
        &CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .unwrap();
    let dst = Qcow2::open(file, Qcow2Options::default()).unwrap();
    let src = RawFile::open(
        &raw,
        RawOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    convert(&src, Destination::Compressed(&dst), &mut |_| {}).unwrap();
    dst.close().unwrap();
    drop(dst);
    let (n, spanning) = compressed_entries(&img);
    assert_eq!(n as u64, SIZE / CLUSTER, "every cluster compressed");
    assert!(
        spanning >= 8,
        "only {spanning} of {n} compressed clusters span two host clusters"
    );
    assert_clean_and_equal(&img, &want, dir.path());
    assert!(read_all(&img) == want);
}

//! Compressed clusters, backing chains, internal snapshots and extended L2
//! entries, with QEMU (qemu-img, qemu-io) as the oracle.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use keel_block::image::{Format, Image, ImageOptions};
use keel_block::qcow2::{self, CreateOptions};
use keel_block::{BlockBackend, Error, MemBackend, Qcow2, Qcow2Options, RawFile, RawOptions};

/// Test data: compressible text, random bytes, zeroes, a pattern, and an
/// odd-sized random tail.
fn sample_data(rng: &mut Rng) -> Vec<u8> {
    let mut d = Vec::new();
    let mut i = 0;
    while d.len() < 1_500_000 {
        d.extend_from_slice(format!("line {i} of some compressible text\n").as_bytes());
        i += 1;
    }
    d.extend((0..300_000).map(|_| rng.next_u64() as u8));
    d.resize(d.len() + 500_000, 0);
    d.resize(d.len() + 70_000, 0xab);
    d.extend((0..3001).map(|_| rng.next_u64() as u8));
    d
}

fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

fn open_image(path: &Path, read_only: bool) -> Image {
    Image::open(
        path,
        Format::Qcow2,
        ImageOptions {
            file: RawOptions {
                read_only,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn read_all(b: &dyn BlockBackend, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut pos = 0usize;
    let mut step = 5555usize;
    while pos < len {
        let n = step.min(len - pos);
        b.read_at(&mut v[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = step * 3 % 200_001 + 1;
    }
    v
}

fn assert_qemu_clean(path: &Path) {
    let (code, c, l, e) = qemu_check(path);
    assert_eq!(
        (code, c, l, e),
        (0, 0, 0, 0),
        "qemu-img check {}",
        path.display()
    );
}

fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let o = run("qemu-img", &["compare", "-f", fa, "-F", fb, p(a), p(b)]);
    assert!(
        o.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Random partial writes and write-zeroes applied to a keel image and, with
/// qemu-io, to a raw mirror.
fn random_writes(img: &dyn BlockBackend, mirror: &Path, rng: &mut Rng, n: usize) {
    let size = img.size();
    let mut cmds: Vec<String> = Vec::new();
    for k in 0..n {
        let len = 1 + rng.below(if k % 3 == 0 { 200_000 } else { 9000 });
        let off = rng.below(size - len);
        if k % 5 == 4 {
            img.write_zeroes(off, len, k % 2 == 0).unwrap();
            cmds.push(format!("write -z {off} {len}"));
        } else {
            let pat = 1 + rng.below(250) as u8;
            img.write_at(&vec![pat; len as usize], off).unwrap();
            cmds.push(format!("write -P {pat} {off} {len}"));
        }
    }
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for c in cmds {
        args.push("-c".into());
        args.push(c);
    }
    args.push(p(mirror).into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    ok("qemu-io", &a);
}

/// `TOOL convert -c -f raw -O qcow2 -o OPTS SRC DST` (TOOL: qemu-img or keel-img).
fn convert_compressed(tool: &str, src: &Path, dst: &Path, opts: &str) {
    ok(
        tool,
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            opts,
            p(src),
            p(dst),
        ],
    );
}

/// keel writes `n` random requests into the qcow2 image `q` and its raw mirror; then
/// `qemu-img check` is clean and the two compare equal.
fn keel_writes_then_qemu_agrees(q: &Path, mirror: &Path, seed: u64, n: usize) {
    {
        let img = open_image(q, false);
        random_writes(img.backend(), mirror, &mut Rng(seed), n);
        img.close().unwrap();
    }
    assert_qemu_clean(q);
    assert_same(q, "qcow2", mirror, "raw");
}

#[test]
fn qemu_compressed_images_read_exactly() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = sample_data(&mut Rng(7));
    write_raw(&raw, &data);
    for ctype in ["zlib", "zstd"] {
        for cs in ["4k", "64k", "2M"] {
            let q = dir.path().join(format!("{ctype}-{cs}.qcow2"));
            let opts = format!("compression_type={ctype},cluster_size={cs}");
            convert_compressed("qemu-img", &raw, &q, &opts);
            let img = open_image(&q, true);
            assert_eq!(
                img.backend().size(),
                (data.len() as u64).div_ceil(512) * 512
            );
            let got = read_all(img.backend(), data.len());
            assert!(got == data, "{opts}: contents differ");
            let Image::Qcow2(qi) = &img else {
                unreachable!()
            };
            assert_eq!(qi.info().compression_type.name(), ctype);
        }
    }
}

#[test]
fn writes_over_compressed_clusters_leave_qemu_check_clean() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut rng = Rng(11);
    let data = sample_data(&mut rng);
    write_raw(&raw, &data);
    for (ctype, cs) in [("zlib", "4k"), ("zstd", "64k"), ("zlib", "64k")] {
        let q = dir.path().join(format!("{ctype}-{cs}.qcow2"));
        let mirror = dir.path().join(format!("{ctype}-{cs}.raw"));
        let opts = format!("compression_type={ctype},cluster_size={cs}");
        convert_compressed("qemu-img", &raw, &q, &opts);
        ok(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", p(&q), p(&mirror)],
        );
        {
            let img = open_image(&q, false);
            random_writes(img.backend(), &mirror, &mut rng, 60);
            img.close().unwrap();
        }
        assert_qemu_clean(&q);
        assert_same(&q, "qcow2", &mirror, "raw");
        let (code, ..) = keel_check(&q);
        assert_eq!(code, 0, "{opts}: keel-img check");
    }
}

#[test]
fn keel_compressed_images_pass_qemu_check_and_compare() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = sample_data(&mut Rng(3));
    write_raw(&raw, &data);
    for opts in [
        "cluster_size=64k",
        "compression_type=zstd",
        "cluster_size=4k,compression_type=zstd",
        "cluster_size=512",
        "cluster_size=64k,refcount_bits=1",
    ] {
        let q = dir.path().join("out.qcow2");
        let _ = std::fs::remove_file(&q);
        convert_compressed(KEEL_IMG, &raw, &q, opts);
        assert_qemu_clean(&q);
        assert_same(&raw, "raw", &q, "qcow2");
        let file_len = std::fs::metadata(&q).unwrap().len();
        // With 1-bit refcounts compressed clusters cannot share a host
        // cluster, so nothing is saved (but they are still compressed).
        assert!(
            opts.contains("refcount_bits=1") || file_len < data.len() as u64 * 3 / 4,
            "{opts}: {file_len} bytes is not compressed"
        );
        // QEMU sees compressed clusters.
        let out = ok("qemu-img", &["check", p(&q)]);
        assert!(
            !out.contains(" 0.00% compressed"),
            "{opts}: no compressed clusters: {out}"
        );
        // And writing over them keeps it clean.
        let mirror = dir.path().join("mirror.raw");
        std::fs::copy(&raw, &mirror).unwrap();
        ok(
            "qemu-img",
            &[
                "resize",
                "-q",
                "-f",
                "raw",
                p(&mirror),
                &std::fs::metadata(&q)
                    .map(|_| ((data.len() as u64).div_ceil(512) * 512).to_string())
                    .unwrap(),
            ],
        );
        keel_writes_then_qemu_agrees(&q, &mirror, 99, 30);
    }
}

/// A raw base, a qcow2 image over it (made by qemu-img), and a keel-made
/// overlay in a subdirectory naming its backing file relatively.
#[test]
fn backing_chains_read_and_write_like_qemu() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let mut rng = Rng(5);
    let data: Vec<u8> = (0..3 << 20).map(|_| rng.next_u64() as u8).collect();
    write_raw(&base, &data);
    let mid = dir.path().join("mid.qcow2");
    // The mid image is larger than its base: reads past the base are zeroes.
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=4k", "-b", "base.raw", "-F", "raw"],
        &mid,
        Some("4M"),
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x22 1M 100k",
            "-c",
            "write -z 2M 64k",
            p(&mid),
        ],
    );
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let top = sub.join("top.qcow2");
    create_image(
        KEEL_IMG,
        "qcow2",
        &[
            "-o",
            "cluster_size=64k",
            "-b",
            "../mid.qcow2",
            "-F",
            "qcow2",
        ],
        &top,
        None,
    );
    let info = ok("qemu-img", &["info", "--output=json", p(&top)]);
    assert!(
        info.contains("\"backing-filename-format\": \"qcow2\""),
        "{info}"
    );
    // Expected contents: the chain flattened by QEMU, then the same writes.
    let expect = dir.path().join("expect.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&top), p(&expect)]);
    {
        let img = open_image(&top, false);
        assert_eq!(img.backend().size(), 4 << 20);
        let flat = std::fs::read(&expect).unwrap();
        assert!(read_all(img.backend(), flat.len()) == flat, "chain reads");
        random_writes(img.backend(), &expect, &mut rng, 50);
        img.backend().discard(3 << 20, 256 << 10).unwrap();
        qemu_io("raw", &expect, &["write -z 3M 256k"]);
        img.close().unwrap();
    }
    assert_qemu_clean(&top);
    assert_same(&top, "qcow2", &expect, "raw");
    // The backing images were not touched.
    assert!(std::fs::read(&base).unwrap() == data);
    assert_qemu_clean(&mid);
    // QEMU reads the keel overlay through the chain (the comparison above),
    // and keel's allocation left the rest to the backing images.
    let map = qemu_map(&top);
    let mapped: u64 = map.iter().map(|e| e.1).sum();
    assert!(mapped < 4 << 20, "the overlay allocated everything");
}

#[test]
fn bad_backing_chains_give_clear_errors() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| -> PathBuf { dir.path().join(n) };
    let open = |p: &Path, probe: bool| {
        Image::open(
            p,
            Format::Qcow2,
            ImageOptions {
                file: RawOptions {
                    read_only: true,
                    ..Default::default()
                },
                qcow2: Qcow2Options {
                    allow_probed_backing: probe,
                    ..Default::default()
                },
            },
        )
    };
    // Missing backing file.
    create_image(
        "qemu-img",
        "qcow2",
        &["-u", "-b", "gone.qcow2", "-F", "qcow2"],
        &path("miss.qcow2"),
        Some("1M"),
    );
    let e = open(&path("miss.qcow2"), false)
        .err()
        .expect("missing backing");
    assert!(matches!(e, Error::Backing { .. }), "{e}");
    assert!(e.to_string().contains("gone.qcow2"), "{e}");
    // A loop.
    create_image(
        "qemu-img",
        "qcow2",
        &["-u", "-b", "l2.qcow2", "-F", "qcow2"],
        &path("l1.qcow2"),
        Some("1M"),
    );
    create_image(
        "qemu-img",
        "qcow2",
        &["-u", "-b", "l1.qcow2", "-F", "qcow2"],
        &path("l2.qcow2"),
        Some("1M"),
    );
    let e = open(&path("l1.qcow2"), false).err().expect("loop");
    assert!(e.to_string().contains("loop"), "{e}");
    // Too deep: 16 backing images are fine, 17 are not.
    create_image("qemu-img", "qcow2", &[], &path("d0.qcow2"), Some("1M"));
    ok(
        "qemu-io",
        &["-c", "write -P 0x5d 0 4k", p(&path("d0.qcow2"))],
    );
    for k in 1..=17 {
        let b = format!("d{}.qcow2", k - 1);
        create_image(
            "qemu-img",
            "qcow2",
            &["-b", &b, "-F", "qcow2"],
            &path(&format!("d{k}.qcow2")),
            None,
        );
    }
    let img = open(&path("d16.qcow2"), false).expect("16 backing images");
    let mut b = [0u8; 4096];
    img.backend().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x5d; 4096]);
    let e = open(&path("d17.qcow2"), false).err().expect("too deep");
    assert!(e.to_string().contains("deeper than 16"), "{e}");
    // A backing file whose format is not stated: refused unless allowed.
    let nofmt = path("nofmt.qcow2");
    qcow2::create_path(
        &nofmt,
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some("d0.qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let e = open(&nofmt, false).err().expect("unstated format");
    assert!(matches!(e, Error::BackingChain { .. }), "{e}");
    assert!(e.to_string().contains("refusing to probe"), "{e}");
    let img = open(&nofmt, true).expect("probing allowed");
    img.backend().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x5d; 4096]);
    let o = run(KEEL_IMG, &["read", "-P", "0x5d", p(&nofmt), "0", "4k"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to probe"));
    ok(
        KEEL_IMG,
        &[
            "read",
            "--allow-probed-backing",
            "-P",
            "0x5d",
            p(&nofmt),
            "0",
            "4k",
        ],
    );
    // Without its chain an image with a backing file opens read-only only.
    let f = RawFile::open(
        path("d1.qcow2"),
        RawOptions {
            growable: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(
        Qcow2::open(f, Qcow2Options::default()),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn snapshots_never_change_when_keel_writes() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k,refcount_bits=4",
        "cluster_size=64k,extended_l2=on",
    ] {
        let q = dir.path().join("s.qcow2");
        let _ = std::fs::remove_file(&q);
        create_image("qemu-img", "qcow2", &["-o", opts], &q, Some("8M"));
        ok(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 0 3M",
                "-c",
                "write -P 0x12 6M 100k",
                p(&q),
            ],
        );
        ok("qemu-img", &["snapshot", "-c", "one", p(&q)]);
        ok(
            "qemu-io",
            &["-c", "write -P 0x22 1M 3M", "-c", "write -z 6M 64k", p(&q)],
        );
        ok("qemu-img", &["snapshot", "-c", "two", p(&q)]);
        assert_same_snapshot_listing(
            &ok(KEEL_IMG, &["snapshot", "-l", p(&q)]),
            &ok("qemu-img", &["snapshot", "-l", p(&q)]),
        );
        let snap = |name: &str, out: &Path| {
            let _ = std::fs::remove_file(out);
            ok(
                "qemu-img",
                &[
                    "convert",
                    "-O",
                    "raw",
                    "-l",
                    &format!("snapshot.name={name}"),
                    p(&q),
                    p(out),
                ],
            );
            std::fs::read(out).unwrap()
        };
        let one = snap("one", &dir.path().join("one.raw"));
        let two = snap("two", &dir.path().join("two.raw"));
        let mirror = dir.path().join("mirror.raw");
        ok("qemu-img", &["convert", "-O", "raw", p(&q), p(&mirror)]);
        {
            let img = open_image(&q, false);
            random_writes(img.backend(), &mirror, &mut Rng(21), 60);
            img.backend().discard(0, 1 << 20).unwrap();
            qemu_io("raw", &mirror, &["write -z 0 1M"]);
            img.close().unwrap();
        }
        assert_qemu_clean(&q);
        assert_same(&q, "qcow2", &mirror, "raw");
        assert!(
            snap("one", &dir.path().join("one2.raw")) == one,
            "{opts}: snapshot one changed"
        );
        assert!(
            snap("two", &dir.path().join("two2.raw")) == two,
            "{opts}: snapshot two changed"
        );
        // Applying a snapshot on a copy gives the same contents.
        let c = dir.path().join("copy.qcow2");
        std::fs::copy(&q, &c).unwrap();
        ok("qemu-img", &["snapshot", "-a", "one", p(&c)]);
        let applied = dir.path().join("applied.raw");
        let _ = std::fs::remove_file(&applied);
        ok("qemu-img", &["convert", "-O", "raw", p(&c), p(&applied)]);
        assert!(std::fs::read(&applied).unwrap() == one);
    }
}

#[test]
fn extended_l2_images_read_and_write_both_ways() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let cmds = [
        "write -P 0x11 0 3000",
        "write -P 0x22 70000 5000",
        "write -z 200k 8k",
        "write -P 0x33 1M 300k",
        "write -z -u 1200k 64k",
        "write -P 0x44 5000000 2048",
    ];
    for cs in ["16k", "64k", "2M"] {
        // Written by qemu-io, read and then written by keel.
        let q = dir.path().join(format!("q{cs}.qcow2"));
        let r = dir.path().join(format!("q{cs}.raw"));
        let size = "8M";
        create_image(
            "qemu-img",
            "qcow2",
            &["-o", &format!("extended_l2=on,cluster_size={cs}")],
            &q,
            Some(size),
        );
        create_image("qemu-img", "raw", &[], &r, Some(size));
        for (t, f) in [(&q, "qcow2"), (&r, "raw")] {
            qemu_io(f, t, &cmds);
        }
        {
            let img = open_image(&q, false);
            let expect = std::fs::read(&r).unwrap();
            assert!(
                read_all(img.backend(), expect.len()) == expect,
                "{cs}: reads"
            );
            random_writes(img.backend(), &r, &mut Rng(31), 80);
            img.close().unwrap();
        }
        assert_qemu_clean(&q);
        assert_same(&q, "qcow2", &r, "raw");
        assert_eq!(keel_check(&q).0, 0);
        // Made by keel, over a backing file, read by QEMU.
        let base = dir.path().join("xbase.qcow2");
        let _ = std::fs::remove_file(&base);
        create_image("qemu-img", "qcow2", &[], &base, Some(size));
        ok("qemu-io", &["-c", "write -P 0x77 0 8M", p(&base)]);
        let k = dir.path().join(format!("k{cs}.qcow2"));
        create_image(
            KEEL_IMG,
            "qcow2",
            &[
                "-o",
                &format!("extended_l2=on,cluster_size={cs}"),
                "-b",
                "xbase.qcow2",
                "-F",
                "qcow2",
            ],
            &k,
            None,
        );
        let info = ok("qemu-img", &["info", p(&k)]);
        assert!(info.contains("extended l2: true"), "{info}");
        let kr = dir.path().join(format!("k{cs}.raw"));
        ok("qemu-img", &["convert", "-O", "raw", p(&base), p(&kr)]);
        keel_writes_then_qemu_agrees(&k, &kr, 41, 60);
    }
}

/// The in-memory paths the fuzz target drives also work on real data: a
/// compressed cluster over an in-memory backing image.
#[test]
fn in_memory_backing_and_compression() {
    let base = MemBackend::new(vec![0x42; 1 << 20]);
    let top = MemBackend::new(Vec::new());
    qcow2::create(
        &top,
        &CreateOptions {
            size: 2 << 20,
            cluster_size: 4096,
            backing_file: Some("base".into()),
            backing_format: Some(Format::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let img = Qcow2::open_with_backing(
        top,
        Qcow2Options::default(),
        Some(std::sync::Arc::new(base)),
    )
    .unwrap();
    let mut b = vec![0u8; 8192];
    img.read_at(&mut b, (1 << 20) - 4096).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0x42) && b[4096..].iter().all(|&x| x == 0));
    img.write_at(&[7; 100], 10).unwrap();
    img.read_at(&mut b[..4096], 0).unwrap();
    assert!(b[..10].iter().all(|&x| x == 0x42) && b[10..110].iter().all(|&x| x == 7));
    img.write_compressed(8192, &[9u8; 4096]).unwrap();
    img.read_at(&mut b[..4096], 8192).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 9));
    img.flush().unwrap();
    let r = qcow2::check(img.file(), qcow2::Fix::None).unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

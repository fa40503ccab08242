//! qcow2 and raw tested against QEMU as the oracle (qemu-img, qemu-io).

mod common;

use std::path::Path;

use common::*;
use keel_block::qcow2::{self, CacheSizes, CreateOptions};
use keel_block::{BlockBackend, Qcow2, Qcow2Options, RawFile, RawOptions};

fn open_file(path: &Path, read_only: bool) -> RawFile {
    RawFile::open(
        path,
        RawOptions {
            read_only,
            growable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_all(b: &dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; b.size() as usize];
    // Odd-sized reads exercise partial clusters and extent merging.
    let mut pos = 0usize;
    let mut step = 7777usize;
    while pos < v.len() {
        let n = step.min(v.len() - pos);
        b.read_at(&mut v[pos..pos + n], pos as u64).unwrap();
        pos += n;
        step = step * 3 % 300_001 + 1;
    }
    v
}

/// Images written by qemu-io across a matrix of options read back byte-exact.
#[test]
fn qemu_made_images_read_back_exactly() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let mut configs = Vec::new();
    for cs in ["512", "4k", "64k", "2M"] {
        configs.push(format!("cluster_size={cs},compat=0.10"));
        for rb in ["1", "16", "32", "64"] {
            configs.push(format!("cluster_size={cs},compat=1.1,refcount_bits={rb}"));
        }
        configs.push(format!(
            "cluster_size={cs},compat=1.1,lazy_refcounts=on,refcount_bits=8"
        ));
    }
    let size: u64 = 12 << 20;
    for (n, opts) in configs.iter().enumerate() {
        let q = dir.path().join(format!("{n}.qcow2"));
        let r = dir.path().join(format!("{n}.raw"));
        create_image(
            "qemu-img",
            "qcow2",
            &["-o", opts],
            &q,
            Some(&size.to_string()),
        );
        create_image("qemu-img", "raw", &[], &r, Some(&size.to_string()));
        let v3 = opts.contains("1.1");
        let mut cmds = vec![
            "write -P 0x11 0 65536".to_string(),
            "write -P 0x22 1000 3000".to_string(),
            "write -P 0x33 5M 2M".to_string(),
            "write -P 0x44 11M 1M".to_string(),
            "write -P 0x55 3M 1536".to_string(),
            "discard 4M 2M".to_string(),
            "write -z 11M 512k".to_string(),
        ];
        if v3 {
            cmds.push("write -z -u 6M 512k".into());
        }
        for target in [&q, &r] {
            let mut args: Vec<String> = Vec::new();
            for c in &cmds {
                args.push("-c".into());
                args.push(c.clone());
            }
            args.push(p(target).into());
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            ok("qemu-io", &a);
        }
        let expect = std::fs::read(&r).unwrap();
        let img = Qcow2::open(
            open_file(&q, true),
            Qcow2Options {
                read_only: true,
                // Small caches force evictions.
                cache_sizes: CacheSizes {
                    l2: Some(16 << 10),
                    refcount: Some(4 << 10),
                },
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{opts}: {e}"));
        let got = read_all(&img);
        assert!(
            got == expect,
            "{opts}: contents differ from QEMU's raw mirror"
        );
        let rep = qcow2::check(img.file(), qcow2::Fix::None).unwrap();
        assert!(rep.is_clean(), "{opts}: {:?}", rep.messages);
        // keel-img reads it too, through format probing.
        ok(
            KEEL_IMG,
            &["read", "-P", "0x44", p(&q), "12058624", "524288"],
        );
        let o = run(KEEL_IMG, &["read", "-P", "0x44", p(&q), "11M", "1M"]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{opts}: zeroed range must mismatch"
        );
    }
}

struct Workload {
    rng: Rng,
    size: u64,
}

impl Workload {
    /// Applies one random operation to both backends.
    fn step(&mut self, img: &dyn BlockBackend, mirror: &dyn BlockBackend) {
        let r = &mut self.rng;
        let len = match r.below(4) {
            0 => 1 + r.below(600),
            1 => 512 * (1 + r.below(16)),
            2 => 1 + r.below(300_000),
            _ => 4096 * (1 + r.below(64)),
        }
        .min(self.size);
        let off = if r.below(2) == 0 {
            r.below(self.size - len + 1)
        } else {
            r.below((self.size - len) / 4096 + 1) * 4096
        };
        match r.below(10) {
            0..=5 => {
                let seed = r.next_u64();
                let data: Vec<u8> = (0..len)
                    .map(|i| (seed.wrapping_add(i * 31) >> 3) as u8)
                    .collect();
                img.write_at(&data, off).unwrap();
                mirror.write_at(&data, off).unwrap();
            }
            6 => {
                img.discard(off, len).unwrap();
                // Discard may leave data or zeroes: make the mirror match the image.
                let mut b = vec![0u8; len as usize];
                img.read_at(&mut b, off).unwrap();
                mirror.write_at(&b, off).unwrap();
            }
            7 => {
                img.write_zeroes(off, len, true).unwrap();
                mirror.write_at(&vec![0u8; len as usize], off).unwrap();
            }
            8 => {
                img.write_zeroes(off, len, false).unwrap();
                mirror.write_at(&vec![0u8; len as usize], off).unwrap();
            }
            _ => img.flush().unwrap(),
        }
    }
}

/// Randomized write/discard/write-zeroes workloads through keel; the result
/// passes `qemu-img check` and equals a raw mirror under `qemu-img compare`.
#[test]
fn random_workloads_pass_qemu_check_and_compare() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    // refcount_bits 1, 2, 4, 8, 16, 32, 64: every refcount_order keel can write.
    let configs: [(u64, u32, u32, bool); 8] = [
        (512, 3, 64, false),
        (1024, 3, 4, false),
        (16384, 3, 32, false),
        (4096, 3, 2, false),
        (65536, 2, 16, false),
        (65536, 3, 16, true),
        (2 << 20, 3, 8, false),
        (8192, 3, 1, false),
    ];
    for (n, &(cluster_size, version, refcount_bits, lazy)) in configs.iter().enumerate() {
        let size: u64 = if cluster_size == 512 {
            6 << 20
        } else {
            24 << 20
        };
        let q = dir.path().join(format!("w{n}.qcow2"));
        let r = dir.path().join(format!("w{n}.raw"));
        std::fs::File::create(&q).unwrap();
        qcow2::create(
            &open_file(&q, false),
            &CreateOptions {
                size,
                cluster_size,
                version,
                refcount_bits,
                lazy_refcounts: lazy,
                ..Default::default()
            },
        )
        .unwrap();
        RawFile::create(&r, size).unwrap();
        let mirror = RawFile::open(&r, RawOptions::default()).unwrap();
        let mut w = Workload {
            rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (n as u64 + 1)),
            size,
        };
        for round in 0..3 {
            let img = Qcow2::open(
                open_file(&q, false),
                Qcow2Options {
                    cache_sizes: CacheSizes {
                        l2: Some(cluster_size * 4),
                        refcount: Some(cluster_size * 2),
                    },
                    ..Default::default()
                },
            )
            .unwrap();
            for _ in 0..120 {
                w.step(&img, &mirror);
            }
            let got = read_all(&img);
            let want = read_all(&mirror);
            assert!(
                got == want,
                "config {n} round {round}: image differs from mirror"
            );
            img.close().unwrap();
        }
        let cfg = format!("cluster {cluster_size} v{version} refcount_bits {refcount_bits}");
        let (code, corrupt, leaks, errs) = qemu_check(&q);
        assert_eq!(
            (code, corrupt, leaks, errs),
            (0, 0, 0, 0),
            "{cfg}: qemu-img check"
        );
        ok(
            "qemu-img",
            &["compare", "-q", "-f", "qcow2", "-F", "raw", p(&q), p(&r)],
        );
        assert_eq!(keel_check(&q).0, 0, "{cfg}: keel-img check");
        // Convert both ways and compare again.
        let c = dir.path().join(format!("w{n}.conv.qcow2"));
        let c2 = dir.path().join(format!("w{n}.conv.raw"));
        ok(
            KEEL_IMG,
            &[
                "convert",
                "-p",
                "-f",
                "qcow2",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k",
                p(&q),
                p(&c),
            ],
        );
        ok(
            KEEL_IMG,
            &["convert", "-f", "qcow2", "-O", "raw", p(&c), p(&c2)],
        );
        ok(
            "qemu-img",
            &["compare", "-q", "-f", "qcow2", "-F", "raw", p(&c), p(&r)],
        );
        ok("cmp", &[p(&c2), p(&r)]);
        assert_eq!(qemu_check(&c).0, 0);
    }
}

/// An unclean shutdown with lazy refcounts leaves the dirty bit; the next
/// read-write open rebuilds the refcounts.
#[test]
fn lazy_refcounts_dirty_image_is_repaired_on_open() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let q = keel_lazy_image(dir.path(), "16M");
    {
        let img = Qcow2::open(open_file(&q, false), Qcow2Options::default()).unwrap();
        for i in 0..64u64 {
            img.write_at(&[i as u8 + 1; 4096], i * 65536).unwrap();
        }
        img.flush().unwrap();
        // Simulate a crash: no close, so the dirty bit stays set.
        std::mem::forget(img);
    }
    let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");
    {
        let img = Qcow2::open(open_file(&q, false), Qcow2Options::default()).unwrap();
        assert!(!img.info().dirty);
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 63 * 65536).unwrap();
        assert_eq!(b, [64u8; 4096]);
        img.close().unwrap();
    }
    assert_eq!(qemu_check(&q), (0, 0, 0, 0));
    let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
}

/// Images keel creates match what qemu-img reports, for every option.
#[test]
fn keel_created_images_are_valid_for_qemu() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    for (n, opts) in [
        "cluster_size=512,refcount_bits=1",
        "cluster_size=512,compat=0.10",
        "cluster_size=2M,refcount_bits=64",
        "cluster_size=64k,lazy_refcounts=on",
        "cluster_size=1k,refcount_bits=4",
    ]
    .iter()
    .enumerate()
    {
        let q = dir.path().join(format!("c{n}.qcow2"));
        create_image(KEEL_IMG, "qcow2", &["-o", opts], &q, Some("1G"));
        assert_eq!(qemu_check(&q), (0, 0, 0, 0), "{opts}");
        let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"].as_u64(), Some(1 << 30), "{opts}");
        let ours = ok(KEEL_IMG, &["info", "--output=json", p(&q)]);
        let o: serde_json::Value = serde_json::from_str(&ours).unwrap();
        assert_eq!(o["cluster-size"], v["cluster-size"], "{opts}");
        assert_eq!(
            o["format-specific"]["data"], v["format-specific"]["data"],
            "{opts}"
        );
        // qemu-io writes into it; keel reads it back.
        ok("qemu-io", &["-c", "write -P 0x5a 100M 300k", p(&q)]);
        ok(KEEL_IMG, &["read", "-P", "0x5a", p(&q), "100M", "300k"]);
    }
}

/// `keel-img bench` takes `qemu-img bench`'s flags and prints the same two lines, so
/// scripts written for one run the other.
#[test]
fn bench_speaks_like_qemu_img_bench() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("b.raw");
    let q = dir.path().join("b.qcow2");
    let (raw, q) = (raw.to_str().unwrap(), q.to_str().unwrap());
    ok("qemu-img", &["create", "-q", "-f", "raw", raw, "8M"]);
    ok("qemu-img", &["create", "-q", "-f", "qcow2", q, "8M"]);
    let runs: [&[&str]; 5] = [
        &["-c", "64", "-f", "raw", raw],
        &["-c", "50", "-d", "4", "-s", "8192", "-w", "-f", "raw", raw],
        &[
            "-c", "30", "-o", "4096", "-S", "16384", "-t", "none", "-f", "raw", raw,
        ],
        &["-c", "40", "-d", "2", "-w", "-f", "qcow2", q],
        &[
            "-c",
            "20",
            "-d",
            "4",
            "-w",
            "--flush-interval=5",
            "-f",
            "qcow2",
            q,
        ],
    ];
    for args in runs {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        let theirs = ok("qemu-img", &all);
        let ours = ok(KEEL_IMG, &all);
        let (t, o): (Vec<&str>, Vec<&str>) = (theirs.lines().collect(), ours.lines().collect());
        assert_eq!(o.len(), 2, "{args:?}: {ours}");
        assert_eq!(o[0], t[0], "{args:?}");
        let secs = o[1]
            .strip_prefix("Run completed in ")
            .and_then(|r| r.strip_suffix(" seconds."))
            .unwrap_or_else(|| panic!("{args:?}: {}", o[1]));
        assert!(secs.parse::<f64>().is_ok() && secs.split('.').nth(1).map(str::len) == Some(3));
    }
}

//! `keel-img check` agrees with `qemu-img check` on damaged images, and
//! killing a writer at random points never corrupts an image.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use keel_block::qcow2::{read_header, refcount};
use keel_block::{Qcow2, Qcow2Options, RawFile, RawOptions};

fn raw_ro(path: &Path) -> RawFile {
    RawFile::open(
        path,
        RawOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn read_u64(path: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn write_u64(path: &Path, off: u64, v: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

/// Sets the stored refcount of host cluster `c` (which must be covered by
/// the first refcount block).
fn poke_refcount(path: &Path, c: u64, value: u64) {
    let h = read_header(&raw_ro(path)).unwrap();
    let block = read_u64(path, h.refcount_table_offset);
    let cs = h.cluster_size();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; cs as usize];
    f.read_exact_at(&mut b, block).unwrap();
    assert!(
        c < (cs * 8) >> h.refcount_order,
        "cluster outside the first block"
    );
    refcount::set(&mut b, c as usize, h.refcount_order, value);
    f.write_all_at(&b, block).unwrap();
}

fn make_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let q = dir.join(name);
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=4k"],
        &q,
        Some("32M"),
    );
    ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x61 0 64k",
            "-c",
            "write -P 0x62 1M 12k",
            p(&q),
        ],
    );
    q
}

fn assert_agree(q: &Path, what: &str) -> (i32, u64, u64, u64) {
    let theirs = qemu_check(q);
    let ours = keel_check(q);
    assert_eq!(
        ours, theirs,
        "{what}: keel-img check (left) vs qemu-img check (right)"
    );
    theirs
}

#[test]
fn check_agrees_with_qemu_on_damaged_images() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();

    // Clean image.
    let q = make_image(dir.path(), "clean.qcow2");
    assert_eq!(assert_agree(&q, "clean"), (0, 0, 0, 0));

    // Leak: a cluster at the end of the file with refcount 1 and no reference.
    let q = make_image(dir.path(), "leak.qcow2");
    let len = std::fs::metadata(&q).unwrap().len();
    let f = OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(len + 3 * 4096).unwrap();
    for k in 0..3 {
        poke_refcount(&q, len / 4096 + k, 1);
    }
    assert_eq!(assert_agree(&q, "leak"), (3, 0, 3, 0));
    ok(KEEL_IMG, &["check", "-r", "leaks", p(&q)]);
    assert_eq!(qemu_check(&q), (0, 0, 0, 0));

    // Corruption: a data cluster whose refcount is 0.
    let q = make_image(dir.path(), "rc0.qcow2");
    let (_, _, host) = qemu_map(&q)[0];
    poke_refcount(&q, host / 4096, 0);
    let r = assert_agree(&q, "refcount 0");
    assert_eq!(r.0, 2);
    assert!(r.1 >= 1);
    // -r leaks does not fix corruption; -r all does.
    let o = run(KEEL_IMG, &["check", "-r", "leaks", p(&q)]);
    assert_eq!(o.status.code(), Some(2));
    ok(KEEL_IMG, &["check", "-r", "all", p(&q)]);
    assert_eq!(qemu_check(&q), (0, 0, 0, 0));
    ok(
        "qemu-io",
        &[
            "-c",
            "read -P 0x61 0 64k",
            "-c",
            "read -P 0x62 1M 12k",
            p(&q),
        ],
    );

    // Refcount 2 on a cluster whose L2 entry claims COPIED: a leak plus a
    // COPIED-flag error.
    let q = make_image(dir.path(), "rc2.qcow2");
    let (_, _, host) = qemu_map(&q)[0];
    poke_refcount(&q, host / 4096, 2);
    let r = assert_agree(&q, "refcount 2");
    assert_eq!(r.0, 2);
    ok(KEEL_IMG, &["check", "-r", "all", p(&q)]);
    assert_eq!(qemu_check(&q), (0, 0, 0, 0));

    // An L2 entry with an unaligned host offset.
    let q = make_image(dir.path(), "unaligned.qcow2");
    let h = read_header(&raw_ro(&q)).unwrap();
    let l2 = read_u64(&q, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    let e = read_u64(&q, l2);
    write_u64(&q, l2, e + 512);
    let r = assert_agree(&q, "unaligned L2 entry");
    assert_eq!(r.0, 2);
    // Reading it through keel reports corruption and sets the corrupt bit.
    {
        let f = RawFile::open(
            &q,
            RawOptions {
                growable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Qcow2::open(f, Qcow2Options::default()).unwrap();
        let mut b = [0u8; 512];
        let err = keel_block::BlockBackend::read_at(&img, &mut b, 0).unwrap_err();
        assert!(matches!(err, keel_block::Error::Corrupt(_)), "{err}");
        assert_eq!(err.errno(), libc_eio());
        // Writes are refused from now on.
        assert!(keel_block::BlockBackend::write_at(&img, &b, 1 << 20).is_err());
    }
    let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
    // A corrupt image opens read-only only.
    let o = run(KEEL_IMG, &["write", "-P", "1", p(&q), "0", "512"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("corrupt"));
    ok(KEEL_IMG, &["read", "-P", "0x62", p(&q), "1M", "12k"]);

    // Found by keel-img's own write: the image is marked, and keel-img says so.
    let q = make_image(dir.path(), "unaligned-cli.qcow2");
    let h = read_header(&raw_ro(&q)).unwrap();
    let l2 = read_u64(&q, h.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    write_u64(&q, l2, read_u64(&q, l2) + 512);
    let o = run(KEEL_IMG, &["write", "-P", "1", p(&q), "0", "512"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is now marked corrupt"), "{err}");
    let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
    assert!(info.contains("\"corrupt\": true"), "{info}");

    // Persistent bitmaps are counted while their autoclear bit is set; a
    // keel write clears the bit (the spec-compliant way to drop them), after
    // which both tools see the bitmap clusters as leaks.
    let q = dir.path().join("bitmap.qcow2");
    create_image("qemu-img", "qcow2", &[], &q, Some("64M"));
    ok("qemu-img", &["bitmap", "--add", p(&q), "b0"]);
    ok(
        "qemu-io",
        &["-c", "write -P 1 0 1M", "-c", "write -P 2 32M 64k", p(&q)],
    );
    assert_eq!(assert_agree(&q, "bitmaps"), (0, 0, 0, 0));
    ok(KEEL_IMG, &["write", "-P", "3", p(&q), "0", "4k"]);
    let r = assert_agree(&q, "dropped bitmaps");
    assert_eq!((r.0, r.1), (3, 0));
    ok(KEEL_IMG, &["check", "-r", "leaks", p(&q)]);
    assert_eq!(qemu_check(&q), (0, 0, 0, 0));

    // L1 entry pointing at the refcount table: writes detect the overlap.
    let q = make_image(dir.path(), "overlap.qcow2");
    let h = read_header(&raw_ro(&q)).unwrap();
    write_u64(
        &q,
        h.l1_table_offset + 8,
        h.refcount_table_offset | (1 << 63),
    );
    let r = assert_agree(&q, "L2 table overlapping the refcount table");
    assert_eq!(r.0, 2);
    let o = run(KEEL_IMG, &["write", "-P", "1", p(&q), "2M", "512"]);
    assert_eq!(o.status.code(), Some(1));
    let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
    assert!(info.contains("\"corrupt\": true"), "{info}");

    // Truncated inside its data: the clusters past the end are an error (QEMU's rule: a
    // range a cluster or more past the end of the file), not a clean image.
    let q = make_image(dir.path(), "truncated.qcow2");
    let (_, _, host) = qemu_map(&q)[1];
    let f = OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(host + 100).unwrap();
    let r = assert_agree(&q, "truncated");
    assert_eq!(r.0, 2);
}

fn libc_eio() -> i32 {
    5
}

/// Unknown incompatible features, encryption and external data files are
/// refused with an error naming the feature; compressed clusters and
/// snapshots are supported.
#[test]
fn refused_features_are_named() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("f.qcow2");
    create_image("qemu-img", "qcow2", &[], &q, Some("16M"));
    write_u64(&q, 72, 1 << 5);
    let o = run(KEEL_IMG, &["read", p(&q), "0", "512"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown incompatible feature bit 5"));
    write_u64(&q, 72, 1 << 17);
    let o = run(KEEL_IMG, &["read", p(&q), "0", "512"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("bit 17"));

    let e = dir.path().join("enc.qcow2");
    // qemu-img's PBKDF benchmark sometimes fails on these hosts ("Unable to
    // get accurate CPU usage"): retry it.
    let args = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100",
        p(&e),
        "16M",
    ];
    let made = (0..10).any(|_| run("qemu-img", &args).status.success());
    if !made {
        ok("qemu-img", &args);
    }
    let o = run(KEEL_IMG, &["read", p(&e), "0", "512"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("LUKS"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let d = dir.path().join("ext.qcow2");
    let data = dir.path().join("ext.data");
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", &format!("data_file={}", p(&data))],
        &d,
        Some("16M"),
    );
    let o = run(KEEL_IMG, &["read", p(&d), "0", "512"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("external data file"));

    // Compressed clusters are read (and checked like QEMU does).
    let src = dir.path().join("src.raw");
    let c = dir.path().join("comp.qcow2");
    create_image("qemu-img", "raw", &[], &src, Some("1M"));
    qemu_io("raw", &src, &["write -P 3 0 64k"]);
    ok(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", p(&src), p(&c)],
    );
    ok(KEEL_IMG, &["read", "-P", "3", p(&c), "0", "64k"]);
    assert_eq!(keel_check(&c), qemu_check(&c));

    // Snapshots: read-only and read-write both work (writes copy shared
    // clusters first).
    let s = dir.path().join("snap.qcow2");
    create_image("qemu-img", "qcow2", &[], &s, Some("16M"));
    ok("qemu-io", &["-c", "write -P 7 0 64k", p(&s)]);
    ok("qemu-img", &["snapshot", "-c", "s1", p(&s)]);
    ok(KEEL_IMG, &["read", "-P", "7", p(&s), "0", "64k"]);
    ok(KEEL_IMG, &["write", "-P", "8", p(&s), "0", "512"]);
    assert_eq!(keel_check(&s), qemu_check(&s));
    assert_eq!(qemu_check(&s), (0, 0, 0, 0));
}

/// Kill keel-img at random points during allocating writes: qemu-img check
/// must never report corruption, and leaks are repaired by `check -r leaks`.
#[test]
fn killed_writers_never_corrupt() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let configs: [(&str, &str, &str, &str); 4] = [
        (
            "cluster_size=512,refcount_bits=64",
            "threads",
            "1",
            "writeback",
        ),
        (
            "cluster_size=4k,refcount_bits=2",
            "threads",
            "1",
            "writeback",
        ),
        ("cluster_size=64k", "io_uring", "32", "none"),
        ("cluster_size=1k,compat=0.10", "io_uring", "8", "writeback"),
    ];
    let mut leaked_runs = 0;
    for (n, (opts, aio, depth, cache)) in configs.iter().enumerate() {
        let q = dir.path().join(format!("crash{n}.qcow2"));
        create_image(KEEL_IMG, "qcow2", &["-o", opts], &q, Some("48M"));
        for iter in 0..10 {
            let step = [4096u64, 8192, 65536, 12288][rng.below(4) as usize];
            let offset = rng.below(40 << 20) / 512 * 512;
            let pattern = (rng.below(255) + 1).to_string();
            let mut child = Command::new(KEEL_IMG)
                .args([
                    "bench",
                    "-w",
                    "-q",
                    "-f",
                    "qcow2",
                    "-c",
                    "1000000",
                    "-d",
                    depth,
                    "-i",
                    aio,
                    "-t",
                    cache,
                    "-s",
                    "4096",
                    "-S",
                    &step.to_string(),
                    "-o",
                    &offset.to_string(),
                    "--pattern",
                    &pattern,
                    p(&q),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(5 + rng.below(60)));
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.code().is_none(),
                "writer exited before being killed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (code, corrupt, leaks, errs) = qemu_check(&q);
            assert_eq!(
                (corrupt, errs),
                (0, 0),
                "{opts} iteration {iter}: qemu-img check found corruption (exit {code})"
            );
            assert_eq!(
                keel_check(&q),
                (code, corrupt, leaks, errs),
                "{opts} iteration {iter}"
            );
            if leaks > 0 {
                leaked_runs += 1;
                ok(KEEL_IMG, &["check", "-q", "-r", "leaks", p(&q)]);
                assert_eq!(qemu_check(&q), (0, 0, 0, 0));
            }
            // Free some clusters so later runs reuse them.
            if rng.below(2) == 0 {
                let off = rng.below(40 << 20) / 65536 * 65536;
                ok(
                    KEEL_IMG,
                    &["discard", "-f", "qcow2", p(&q), &off.to_string(), "1M"],
                );
            }
        }
    }
    // Not an assertion on timing: only a note of how often the kill landed
    // between a refcount update and its use.
    eprintln!("{leaked_runs} of 40 killed runs leaked clusters");
}

/// With lazy refcounts a killed writer leaves a dirty image whose refcounts
/// are repaired by `check -r all` or by the next read-write open.
#[test]
fn killed_lazy_writer_is_repaired() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let q = keel_lazy_image(dir.path(), "48M");
    let mut rng = Rng(77);
    for iter in 0..6 {
        let mut child = Command::new(KEEL_IMG)
            .args([
                "bench",
                "-w",
                "-q",
                "-c",
                "1000000",
                "-d",
                "1",
                "-i",
                "threads",
                "-S",
                "8192",
                p(&q),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(10 + rng.below(40)));
        let _ = child.kill();
        let _ = child.wait();
        if iter % 2 == 0 {
            ok(KEEL_IMG, &["check", "-q", "-r", "all", p(&q)]);
        } else {
            ok(KEEL_IMG, &["write", "-P", "9", p(&q), "0", "4096"]);
        }
        assert_eq!(qemu_check(&q), (0, 0, 0, 0), "iteration {iter}");
        let info = ok("qemu-img", &["info", "--output=json", p(&q)]);
        assert!(info.contains("\"dirty-flag\": false"));
    }
}

/// Two bitmaps naming one table (a hostile image can name one 64 MiB table millions of
/// times): `check` walks each table once and reports the second as corruption.
#[test]
fn check_walks_a_shared_bitmap_table_once_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("bitmaps.qcow2");
    create_image("qemu-img", "qcow2", &[], &q, Some("64M"));
    ok("qemu-img", &["bitmap", "--add", p(&q), "b0"]);
    ok("qemu-img", &["bitmap", "--add", p(&q), "b1"]);
    ok("qemu-io", &["-c", "write -P 1 0 1M", p(&q)]);
    let h = read_header(&raw_ro(&q)).unwrap();
    let ext = h
        .extensions
        .iter()
        .find(|e| e.kind == 0x2385_2875)
        .expect("a bitmaps extension");
    let nb = u32::from_be_bytes(ext.data[0..4].try_into().unwrap());
    assert_eq!(nb, 2);
    let dir_off = u64::from_be_bytes(ext.data[16..24].try_into().unwrap());
    let f = std::fs::File::open(&q).unwrap();
    let mut e0 = [0u8; 24];
    f.read_exact_at(&mut e0, dir_off).unwrap();
    let name = u16::from_be_bytes([e0[18], e0[19]]) as u64;
    let extra = u32::from_be_bytes(e0[20..24].try_into().unwrap()) as u64;
    let second = dir_off + (24 + extra + name).div_ceil(8) * 8;
    let t0 = read_u64(&q, dir_off);
    assert_ne!(t0, 0, "b0 has a table");
    write_u64(&q, second, t0);
    let o = run(KEEL_IMG, &["check", p(&q)]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("bitmap table at {t0:#x} belongs to two bitmaps")),
        "{out}"
    );
    assert_eq!(o.status.code(), Some(2), "{out}");
}

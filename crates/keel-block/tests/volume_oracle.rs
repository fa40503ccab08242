//! The volume operations of keel-block (`volume::resize`, `commit`, `rebase`,
//! `qcow2::edit` snapshots and amend) against qemu-img as the oracle: the
//! same operation on copies of the same image gives images `qemu-img
//! compare` finds identical and `qemu-img check` finds clean, and each side
//! reads what the other wrote.

mod common;

use std::path::{Path, PathBuf};

use keel_block::qcow2::edit::{self, AmendOptions, BackingFile};
use keel_block::volume::{self, CommitOptions, Preallocation, RebaseOptions, ResizeOptions};
use keel_block::{Format, RawFile, RawOptions};

use common::{assert_same_contents, copy_files, create_image, ok, p as s, qio, run, two_dirs};

fn clean(path: &Path) {
    let o = run("qemu-img", &["check", s(path)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn rw(path: &Path) -> RawFile {
    RawFile::open(
        path,
        RawOptions {
            growable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Two directories holding the same files: `a` for qemu-img, `b` for keel.
struct Pair {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Pair {
    fn new() -> Pair {
        let (_dir, a, b) = two_dirs("qemu", "keel");
        Pair { _dir, a, b }
    }
    /// Copies every file of `a` into `b`.
    fn sync(&self) {
        copy_files(&self.a, &self.b);
    }
    fn qa(&self, name: &str) -> PathBuf {
        self.a.join(name)
    }
    fn kb(&self, name: &str) -> PathBuf {
        self.b.join(name)
    }
    fn same(&self, name: &str) {
        assert_same_contents(&self.qa(name), &self.kb(name), name);
        clean(&self.qa(name));
        clean(&self.kb(name));
    }
}

fn qcow2(path: &Path, size: &str, opts: &str) {
    create_image("qemu-img", "qcow2", &["-o", opts], path, Some(size));
}

#[test]
fn resize_matches_qemu_img() {
    let p = Pair::new();
    // 512-byte clusters: an L2 table maps 32 KiB, so growing moves the L1 table.
    qcow2(&p.qa("d.qcow2"), "1M", "cluster_size=512");
    qio(&p.qa("d.qcow2"), "write -P 0x11 0 64k");
    qio(&p.qa("d.qcow2"), "write -P 0x22 900k 100k");
    p.sync();
    let grow = ResizeOptions::default();
    ok("qemu-img", &["resize", s(&p.qa("d.qcow2")), "64M"]);
    volume::resize(&p.kb("d.qcow2"), Format::Qcow2, 64 << 20, &grow).unwrap();
    p.same("d.qcow2");
    qio(&p.kb("d.qcow2"), "write -P 0x33 63M 1M");
    qio(&p.qa("d.qcow2"), "write -P 0x33 63M 1M");
    p.same("d.qcow2");
    // Shrinking needs --shrink.
    assert!(matches!(
        volume::resize(&p.kb("d.qcow2"), Format::Qcow2, 512 << 10, &grow),
        Err(volume::VolumeError::ShrinkRefused)
    ));
    let shrink = ResizeOptions {
        shrink: true,
        ..Default::default()
    };
    ok(
        "qemu-img",
        &["resize", "--shrink", s(&p.qa("d.qcow2")), "950K"],
    );
    volume::resize(&p.kb("d.qcow2"), Format::Qcow2, 950 << 10, &shrink).unwrap();
    p.same("d.qcow2");
    ok("qemu-img", &["resize", s(&p.qa("d.qcow2")), "2M"]);
    volume::resize(&p.kb("d.qcow2"), Format::Qcow2, 2 << 20, &grow).unwrap();
    p.same("d.qcow2");
    // Preallocated growth reads as zeroes and is allocated.
    let full = ResizeOptions {
        shrink: false,
        preallocation: Preallocation::Full,
    };
    ok(
        "qemu-img",
        &["resize", "--preallocation=full", s(&p.qa("d.qcow2")), "3M"],
    );
    volume::resize(&p.kb("d.qcow2"), Format::Qcow2, 3 << 20, &full).unwrap();
    p.same("d.qcow2");
    // Raw.
    std::fs::write(p.qa("r.raw"), vec![7u8; 1 << 20]).unwrap();
    p.sync();
    ok(
        "qemu-img",
        &["resize", "-f", "raw", s(&p.qa("r.raw")), "+1M"],
    );
    volume::resize(&p.kb("r.raw"), Format::Raw, 2 << 20, &grow).unwrap();
    assert_same_contents(&p.qa("r.raw"), &p.kb("r.raw"), "raw resize");
    ok(
        "qemu-img",
        &["resize", "-f", "raw", "--shrink", s(&p.qa("r.raw")), "4096"],
    );
    volume::resize(&p.kb("r.raw"), Format::Raw, 4096, &shrink).unwrap();
    assert_eq!(
        std::fs::read(p.qa("r.raw")).unwrap(),
        std::fs::read(p.kb("r.raw")).unwrap()
    );
}

#[test]
fn snapshots_match_qemu_img_both_ways() {
    let p = Pair::new();
    qcow2(&p.qa("s.qcow2"), "4M", "cluster_size=4096");
    qio(&p.qa("s.qcow2"), "write -P 0x11 0 1M");
    p.sync();
    let (qa, kb) = (p.qa("s.qcow2"), p.kb("s.qcow2"));
    ok("qemu-img", &["snapshot", "-c", "one", s(&qa)]);
    edit::snapshot_create(&rw(&kb), "one").unwrap();
    p.same("s.qcow2");
    for img in [&qa, &kb] {
        qio(img, "write -P 0x22 512k 1M");
        qio(img, "write -z 2M 64k");
    }
    ok("qemu-img", &["snapshot", "-c", "two", s(&qa)]);
    edit::snapshot_create(&rw(&kb), "two").unwrap();
    for img in [&qa, &kb] {
        qio(img, "write -P 0x33 0 3M");
    }
    p.same("s.qcow2");
    // Each side lists the other's snapshots.
    let list = ok("qemu-img", &["snapshot", "-l", s(&kb)]);
    assert!(list.contains(" one ") && list.contains(" two "), "{list}");
    ok("qemu-img", &["snapshot", "-a", "one", s(&qa)]);
    edit::snapshot_apply(&rw(&kb), "one").unwrap();
    p.same("s.qcow2");
    ok("qemu-img", &["snapshot", "-d", "one", s(&qa)]);
    edit::snapshot_delete(&rw(&kb), "one").unwrap();
    p.same("s.qcow2");
    ok("qemu-img", &["snapshot", "-a", "two", s(&qa)]);
    edit::snapshot_apply(&rw(&kb), "two").unwrap();
    p.same("s.qcow2");
    // Cross: a snapshot qemu-img made, applied and deleted by keel, and the reverse.
    let (x, y) = (p.qa("x.qcow2"), p.kb("x.qcow2"));
    std::fs::copy(&qa, &x).unwrap();
    ok("qemu-img", &["snapshot", "-c", "q", s(&x)]);
    qio(&x, "write -P 0x44 0 2M");
    std::fs::copy(&x, &y).unwrap();
    edit::snapshot_apply(&rw(&x), "q").unwrap();
    ok("qemu-img", &["snapshot", "-a", "q", s(&y)]);
    assert_same_contents(&x, &y, "snapshots across");
    edit::snapshot_delete(&rw(&x), "q").unwrap();
    ok("qemu-img", &["snapshot", "-d", "q", s(&y)]);
    assert_same_contents(&x, &y, "snapshots across");
    clean(&x);
    clean(&y);
    edit::snapshot_create(&rw(&x), "k").unwrap();
    qio(&x, "write -P 0x55 1M 1M");
    ok("qemu-img", &["snapshot", "-a", "k", s(&x)]);
    ok("qemu-img", &["snapshot", "-d", "k", s(&x)]);
    assert_same_contents(&x, &y, "snapshots across");
    clean(&x);
    assert!(matches!(
        edit::snapshot_delete(&rw(&kb), "nope"),
        Err(edit::EditError::SnapshotNotFound { .. })
    ));
}

/// base <- mid <- top, in both directories, each layer with its own data.
fn chain3(p: &Pair) {
    qcow2(&p.qa("base.qcow2"), "4M", "cluster_size=65536");
    qio(&p.qa("base.qcow2"), "write -P 0x01 0 4M");
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        &p.qa("mid.qcow2"),
        None,
    );
    qio(&p.qa("mid.qcow2"), "write -P 0x02 1M 1M");
    qio(&p.qa("mid.qcow2"), "write -z 3M 64k");
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2"],
        &p.qa("top.qcow2"),
        None,
    );
    qio(&p.qa("top.qcow2"), "write -P 0x03 1536k 1M");
    qio(&p.qa("top.qcow2"), "write -P 0x04 100k 3k");
    p.sync();
}

fn none(_: f64) {}

#[test]
fn commit_matches_qemu_img_in_a_chain_of_three() {
    let p = Pair::new();
    chain3(&p);
    ok("qemu-img", &["commit", s(&p.qa("top.qcow2"))]);
    volume::commit(
        &p.kb("top.qcow2"),
        Format::Qcow2,
        &CommitOptions::default(),
        &mut none,
    )
    .unwrap();
    for n in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        p.same(n);
    }
    // Into the base, two levels down (implies -d).
    chain3(&p);
    let mut seen = Vec::new();
    ok(
        "qemu-img",
        &[
            "commit",
            "-b",
            s(&p.qa("base.qcow2")),
            s(&p.qa("top.qcow2")),
        ],
    );
    volume::commit(
        &p.kb("top.qcow2"),
        Format::Qcow2,
        &CommitOptions {
            base: Some(p.kb("base.qcow2")),
            keep: false,
        },
        &mut |v| seen.push(v),
    )
    .unwrap();
    assert_eq!(seen.first(), Some(&0.0));
    assert_eq!(seen.last(), Some(&100.0));
    for n in ["top.qcow2", "base.qcow2"] {
        p.same(n);
    }
    assert!(matches!(
        volume::commit(
            &p.kb("base.qcow2"),
            Format::Qcow2,
            &CommitOptions::default(),
            &mut none
        ),
        Err(volume::VolumeError::NoBacking)
    ));
}

#[test]
fn rebase_matches_qemu_img_in_a_chain_of_three() {
    let p = Pair::new();
    chain3(&p);
    let onto_base = RebaseOptions {
        backing: Some(BackingFile {
            name: "base.qcow2".into(),
            format: Some(Format::Qcow2),
        }),
        unsafe_mode: false,
    };
    ok(
        "qemu-img",
        &[
            "rebase",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&p.qa("top.qcow2")),
        ],
    );
    volume::rebase(&p.kb("top.qcow2"), Format::Qcow2, &onto_base, &mut none).unwrap();
    p.same("top.qcow2");
    let info = ok("qemu-img", &["info", s(&p.kb("top.qcow2"))]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    // Flatten.
    let flat = RebaseOptions::default();
    ok("qemu-img", &["rebase", "-b", "", s(&p.qa("top.qcow2"))]);
    volume::rebase(&p.kb("top.qcow2"), Format::Qcow2, &flat, &mut none).unwrap();
    p.same("top.qcow2");
    // Unsafe: header only.
    chain3(&p);
    let unsafe_mid = RebaseOptions {
        backing: Some(BackingFile {
            name: "base.qcow2".into(),
            format: Some(Format::Qcow2),
        }),
        unsafe_mode: true,
    };
    ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&p.qa("top.qcow2")),
        ],
    );
    volume::rebase(&p.kb("top.qcow2"), Format::Qcow2, &unsafe_mid, &mut none).unwrap();
    p.same("top.qcow2");
}

#[test]
fn amend_matches_qemu_img() {
    let p = Pair::new();
    qcow2(&p.qa("m.qcow2"), "4M", "cluster_size=4096");
    qio(&p.qa("m.qcow2"), "write -P 0x11 0 1M");
    qio(&p.qa("m.qcow2"), "write -z 512k 64k");
    ok("qemu-img", &["snapshot", "-c", "s", s(&p.qa("m.qcow2"))]);
    p.sync();
    let (qa, kb) = (p.qa("m.qcow2"), p.kb("m.qcow2"));
    for (opt, o) in [
        (
            "refcount_bits=8",
            AmendOptions {
                refcount_bits: Some(8),
                ..Default::default()
            },
        ),
        (
            "lazy_refcounts=on",
            AmendOptions {
                lazy_refcounts: Some(true),
                ..Default::default()
            },
        ),
        (
            "lazy_refcounts=off,refcount_bits=16",
            AmendOptions {
                lazy_refcounts: Some(false),
                refcount_bits: Some(16),
                ..Default::default()
            },
        ),
        (
            "compat=0.10",
            AmendOptions {
                version: Some(2),
                ..Default::default()
            },
        ),
        (
            "compat=1.1",
            AmendOptions {
                version: Some(3),
                ..Default::default()
            },
        ),
    ] {
        ok("qemu-img", &["amend", "-o", opt, s(&qa)]);
        edit::amend(&rw(&kb), &o).unwrap();
        p.same("m.qcow2");
        let qi = ok("qemu-img", &["info", s(&qa)]);
        let ki = ok("qemu-img", &["info", s(&kb)]);
        let pick = |t: &str| {
            t.lines()
                .filter(|l| {
                    ["compat:", "lazy refcounts:", "refcount bits:"]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(pick(&qi), pick(&ki), "after {opt}");
    }
}

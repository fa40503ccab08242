//! keel-img's life-cycle verbs (resize, snapshot, commit, rebase, amend) with
//! qemu-img 10 as the oracle: the same command line run by both on copies of
//! the same images gives images `qemu-img compare` finds identical and
//! `qemu-img check` finds clean, with equal exit codes for successes and
//! errors; and each tool reads (and applies, deletes) what the other wrote.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    assert_same_contents, copy_files, create_image, ok, p, qemu_check, qemu_io, qio, require_qemu,
    two_dirs, KEEL_IMG,
};

/// The same files in two directories: `q/` for qemu-img, `k/` for keel-img.
struct Twin {
    _dir: tempfile::TempDir,
    q: PathBuf,
    k: PathBuf,
}

impl Twin {
    fn new() -> Twin {
        require_qemu();
        let (_dir, q, k) = two_dirs("q", "k");
        Twin { _dir, q, k }
    }

    /// Makes `k/` a copy of `q/`.
    fn copy(&self) {
        for e in std::fs::read_dir(&self.k).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        copy_files(&self.q, &self.k);
    }

    fn q(&self, name: &str) -> PathBuf {
        self.q.join(name)
    }

    /// Runs `args` (file names relative) with qemu-img in `q/` and keel-img in
    /// `k/`; both must exit with the same code, which is returned.
    fn both(&self, args: &[&str]) -> i32 {
        let run_in = |tool: &str, dir: &Path| {
            Command::new(tool)
                .args(args)
                .current_dir(dir)
                .output()
                .unwrap_or_else(|e| panic!("running {tool}: {e}"))
        };
        let qo = run_in("qemu-img", &self.q);
        let ko = run_in(KEEL_IMG, &self.k);
        let (qc, kc) = (qo.status.code(), ko.status.code());
        assert_eq!(
            qc,
            kc,
            "{args:?}: qemu-img exited {qc:?} ({}), keel-img {kc:?} ({})",
            String::from_utf8_lossy(&qo.stderr),
            String::from_utf8_lossy(&ko.stderr)
        );
        qc.unwrap_or(-1)
    }

    /// The image `name` reads the same in both directories, and both are clean.
    fn same(&self, name: &str) {
        let (a, b) = (self.q.join(name), self.k.join(name));
        assert_same_contents(&a, &b, name);
        for f in [&a, &b] {
            assert_eq!(
                qemu_check(f),
                (0, 0, 0, 0),
                "qemu-img check {}",
                f.display()
            );
        }
    }
}

#[test]
fn resize_like_qemu_img() {
    let t = Twin::new();
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=512"],
        &t.q("d.qcow2"),
        Some("1M"),
    );
    qio(&t.q("d.qcow2"), "write -P 0x11 0 64k");
    qio(&t.q("d.qcow2"), "write -P 0x22 1000k 24k");
    std::fs::write(t.q("r.raw"), vec![5u8; 1 << 20]).unwrap();
    t.copy();
    // Growth that moves the L1 table (an L2 table maps 32 KiB here).
    assert_eq!(t.both(&["resize", "d.qcow2", "+63M"]), 0);
    t.same("d.qcow2");
    // Shrinking without --shrink, sizes that are not multiples of 512 or
    // do not parse, a missing file: refused alike.
    for args in [
        &["resize", "d.qcow2", "1M"][..],
        &["resize", "d.qcow2", "--", "-1M"],
        &["resize", "--shrink", "d.qcow2", "1000"],
        &["resize", "d.qcow2", "12Q"],
        &["resize", "missing.qcow2", "1M"],
        &["resize", "d.qcow2"],
        &[
            "resize",
            "--shrink",
            "--preallocation=full",
            "d.qcow2",
            "1M",
        ],
        &["resize", "-f", "raw", "r.raw", "512K"],
        &[
            "resize",
            "-f",
            "raw",
            "--preallocation=metadata",
            "r.raw",
            "2M",
        ],
    ] {
        assert_eq!(t.both(args), 1, "{args:?}");
    }
    t.same("d.qcow2");
    assert_eq!(t.both(&["resize", "--shrink", "d.qcow2", "1010K"]), 0);
    t.same("d.qcow2");
    assert_eq!(
        t.both(&["resize", "--preallocation=metadata", "d.qcow2", "3M"]),
        0
    );
    t.same("d.qcow2");
    assert_eq!(
        t.both(&["resize", "--preallocation=full", "d.qcow2", "+1M"]),
        0
    );
    t.same("d.qcow2");
    assert_eq!(
        t.both(&["resize", "--preallocation=falloc", "d.qcow2", "+512K"]),
        0
    );
    t.same("d.qcow2");
    assert_eq!(t.both(&["resize", "-f", "raw", "r.raw", "+1M"]), 0);
    assert_eq!(
        t.both(&[
            "resize",
            "-f",
            "raw",
            "--preallocation=falloc",
            "r.raw",
            "+1M"
        ]),
        0
    );
    assert_eq!(
        t.both(&["resize", "-f", "raw", "--preallocation=full", "r.raw", "4M"]),
        0
    );
    assert_eq!(
        t.both(&["resize", "-f", "raw", "--shrink", "r.raw", "4097"]),
        0
    );
    assert_eq!(
        std::fs::read(t.q("r.raw")).unwrap(),
        std::fs::read(t.k.join("r.raw")).unwrap()
    );
    // Growing an overlay over a larger backing file: the new space reads as
    // zeroes, not as the backing file.
    create_image("qemu-img", "qcow2", &[], &t.q("b.qcow2"), Some("4M"));
    qio(&t.q("b.qcow2"), "write -P 0x66 0 4M");
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "b.qcow2", "-F", "qcow2"],
        &t.q("o.qcow2"),
        Some("1000K"),
    );
    t.copy();
    assert_eq!(t.both(&["resize", "o.qcow2", "3M"]), 0);
    t.same("o.qcow2");
    // qemu-img reads keel's result and keeps writing.
    let k = t.k.join("d.qcow2");
    qio(&k, "write -P 0x33 4M 4096");
    qemu_io("qcow2", &k, &["read -P 0x33 4M 4096"]);
    assert_eq!(qemu_check(&k), (0, 0, 0, 0));
}

#[test]
fn snapshots_like_qemu_img_and_across() {
    let t = Twin::new();
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=4k"],
        &t.q("s.qcow2"),
        Some("8M"),
    );
    qio(&t.q("s.qcow2"), "write -P 0x11 0 2M");
    t.copy();
    let write_both = |cmd: &str| {
        qio(&t.q("s.qcow2"), cmd);
        qio(&t.k.join("s.qcow2"), cmd);
    };
    assert_eq!(t.both(&["snapshot", "-c", "one", "s.qcow2"]), 0);
    t.same("s.qcow2");
    write_both("write -P 0x22 1M 2M");
    write_both("write -z 4M 64k");
    assert_eq!(t.both(&["snapshot", "-c", "two", "s.qcow2"]), 0);
    write_both("write -P 0x33 0 6M");
    t.same("s.qcow2");
    // The listings agree on ids and names.
    let ids = |out: &str| -> Vec<(String, String)> {
        out.lines()
            .skip(2)
            .map(|l| {
                let mut w = l.split_whitespace();
                (w.next().unwrap().into(), w.next().unwrap().into())
            })
            .collect()
    };
    let ql = ok("qemu-img", &["snapshot", "-l", p(&t.q("s.qcow2"))]);
    let kl = ok(KEEL_IMG, &["snapshot", "-l", p(&t.k.join("s.qcow2"))]);
    assert_eq!(ids(&ql), ids(&kl));
    let kq = ok("qemu-img", &["snapshot", "-l", p(&t.k.join("s.qcow2"))]);
    assert_eq!(ids(&ql), ids(&kq));
    for args in [
        &["snapshot", "-a", "one", "s.qcow2"][..],
        &["snapshot", "-d", "one", "s.qcow2"],
        &["snapshot", "-a", "2", "s.qcow2"],
    ] {
        assert_eq!(t.both(args), 0, "{args:?}");
        t.same("s.qcow2");
    }
    for args in [
        &["snapshot", "-a", "one", "s.qcow2"][..],
        &["snapshot", "-d", "nope", "s.qcow2"],
        &["snapshot", "-d", "2", "s.qcow2"],
        &["snapshot", "-c", "x", "missing.qcow2"],
    ] {
        assert_eq!(t.both(args), 1, "{args:?}");
    }
    std::fs::write(t.q("r.raw"), vec![0u8; 65536]).unwrap();
    t.copy();
    assert_eq!(t.both(&["snapshot", "-f", "raw", "-c", "x", "r.raw"]), 1);
    assert_eq!(t.both(&["snapshot", "-f", "raw", "-l", "r.raw"]), 0);
    // Across: qemu-img's snapshots applied and deleted by keel-img, and keel-img's by qemu-img.
    let (q, k) = (t.q("s.qcow2"), t.k.join("s.qcow2"));
    ok("qemu-img", &["snapshot", "-c", "byqemu", p(&q)]);
    ok(KEEL_IMG, &["snapshot", "-c", "bykeel", p(&k)]);
    for (img, tool) in [(&q, "qemu-img"), (&k, KEEL_IMG)] {
        let _ = tool;
        qio(img, "write -P 0x44 512k 3M");
    }
    ok(KEEL_IMG, &["snapshot", "-a", "byqemu", p(&q)]);
    ok("qemu-img", &["snapshot", "-a", "bykeel", p(&k)]);
    t.same("s.qcow2");
    ok(KEEL_IMG, &["snapshot", "-d", "byqemu", p(&q)]);
    ok("qemu-img", &["snapshot", "-d", "bykeel", p(&k)]);
    t.same("s.qcow2");
    assert_eq!(
        ids(&ok("qemu-img", &["snapshot", "-l", p(&q)])),
        ids(&ok("qemu-img", &["snapshot", "-l", p(&k)]))
    );
}

/// base.qcow2 <- mid.qcow2 <- top.qcow2 in `q/`, each layer with data of its own.
fn chain3(t: &Twin) {
    for e in std::fs::read_dir(&t.q).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let (b, m, top) = (t.q("base.qcow2"), t.q("mid.qcow2"), t.q("top.qcow2"));
    create_image("qemu-img", "qcow2", &[], &b, Some("4M"));
    qio(&b, "write -P 0x01 0 4M");
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        &m,
        None,
    );
    qio(&m, "write -P 0x02 1M 1M");
    qio(&m, "write -z 3M 64k");
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2"],
        &top,
        Some("6M"),
    );
    qio(&top, "write -P 0x03 1536k 1M");
    qio(&top, "write -P 0x04 100k 3k");
    qio(&top, "write -P 0x05 5M 64k");
    t.copy();
}

#[test]
fn commit_like_qemu_img_in_a_chain_of_three() {
    let t = Twin::new();
    chain3(&t);
    assert_eq!(t.both(&["commit", "top.qcow2"]), 0);
    for n in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        t.same(n);
    }
    chain3(&t);
    assert_eq!(t.both(&["commit", "-d", "-p", "top.qcow2"]), 0);
    for n in ["top.qcow2", "mid.qcow2"] {
        t.same(n);
    }
    chain3(&t);
    assert_eq!(t.both(&["commit", "-b", "base.qcow2", "top.qcow2"]), 0);
    for n in ["top.qcow2", "base.qcow2"] {
        t.same(n);
    }
    for args in [
        &["commit", "base.qcow2"][..],
        &["commit", "-b", "other.qcow2", "top.qcow2"],
        &["commit", "missing.qcow2"],
    ] {
        assert_eq!(t.both(args), 1, "{args:?}");
    }
    // Progress as qemu-img prints it.
    chain3(&t);
    let out = ok(KEEL_IMG, &["commit", "-p", p(&t.k.join("top.qcow2"))]);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(
        out.ends_with("    (100.00/100%)\r\nImage committed.\n"),
        "{out:?}"
    );
}

#[test]
fn rebase_like_qemu_img_in_a_chain_of_three() {
    let t = Twin::new();
    chain3(&t);
    assert_eq!(
        t.both(&["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]),
        0
    );
    t.same("top.qcow2");
    let info = ok("qemu-img", &["info", p(&t.k.join("top.qcow2"))]);
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
    assert_eq!(t.both(&["rebase", "-p", "-b", "", "top.qcow2"]), 0);
    t.same("top.qcow2");
    let info = ok("qemu-img", &["info", p(&t.k.join("top.qcow2"))]);
    assert!(!info.contains("backing file"), "{info}");
    chain3(&t);
    assert_eq!(
        t.both(&[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2"
        ]),
        0
    );
    t.same("top.qcow2");
    for args in [
        &["rebase", "-u", "-b", "mid.qcow2", "top.qcow2"][..],
        &["rebase", "-b", "missing.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "top.qcow2"],
    ] {
        assert_eq!(t.both(args), 1, "{args:?}");
    }
    t.same("top.qcow2");
    // Unsafe without -b: the image keeps its data and loses its backing file.
    chain3(&t);
    assert_eq!(t.both(&["rebase", "-u", "top.qcow2"]), 0);
    t.same("top.qcow2");
    let info = ok("qemu-img", &["info", p(&t.k.join("top.qcow2"))]);
    assert!(!info.contains("backing file"), "{info}");
}

#[test]
fn amend_like_qemu_img() {
    let t = Twin::new();
    let m = t.q("m.qcow2");
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "cluster_size=4k"],
        &m,
        Some("4M"),
    );
    qio(&m, "write -P 0x11 0 1M");
    qio(&m, "write -z 512k 64k");
    ok("qemu-img", &["snapshot", "-c", "s", p(&m)]);
    t.copy();
    let info = |path: &Path| -> String {
        ok("qemu-img", &["info", p(path)])
            .lines()
            .filter(|l| {
                ["compat:", "lazy refcounts:", "refcount bits:"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for o in [
        "refcount_bits=8",
        "lazy_refcounts=on",
        "lazy_refcounts=off,refcount_bits=64",
        "refcount_bits=16",
        "compat=0.10",
        "compat=1.1",
    ] {
        assert_eq!(t.both(&["amend", "-o", o, "m.qcow2"]), 0, "{o}");
        t.same("m.qcow2");
        assert_eq!(info(&m), info(&t.k.join("m.qcow2")), "after {o}");
    }
    assert_eq!(t.both(&["amend", "-o", "compat=0.10", "m.qcow2"]), 0);
    for o in ["lazy_refcounts=on", "cluster_size=4k", "refcount_bits=8"] {
        assert_eq!(t.both(&["amend", "-o", o, "m.qcow2"]), 1, "{o}");
    }
    assert_eq!(t.both(&["amend", "m.qcow2"]), 1);
    t.same("m.qcow2");
}

#[test]
fn commit_and_rebase_with_a_raw_base() {
    let t = Twin::new();
    std::fs::write(t.q("base.raw"), vec![0x5a; 2 << 20]).unwrap();
    std::fs::write(t.q("other.raw"), vec![0x5b; 1 << 20]).unwrap();
    let top = t.q("top.qcow2");
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "base.raw", "-F", "raw"],
        &top,
        Some("3M"),
    );
    qio(&top, "write -P 0x01 512k 1M");
    qio(&top, "write -z 1792k 64k");
    t.copy();
    assert_eq!(
        t.both(&["rebase", "-b", "other.raw", "-F", "raw", "top.qcow2"]),
        0
    );
    t.same("top.qcow2");
    assert_eq!(t.both(&["commit", "top.qcow2"]), 0);
    t.same("top.qcow2");
    // The raw base grew to the overlay's size and holds the same bytes.
    assert_eq!(
        std::fs::read(t.q("other.raw")).unwrap(),
        std::fs::read(t.k.join("other.raw")).unwrap()
    );
}

//! The volume operations as library calls (`chain`, `compare`, `measure`), checked
//! against qemu-img 10 on images qemu-img and qemu-io made: a chain of three qcow2
//! images over a raw base, with data, zero, discarded and compressed clusters.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use keel_block::chain::{BlockStatus, Chain};
use keel_block::compare::{compare, Difference};
use keel_block::measure::{measure, Preallocation, Source, Target};
use keel_block::qcow2::CreateOptions;
use keel_block::{Format, Qcow2Options};

/// base.raw <- mid.qcow2 <- top.qcow2, and a compressed copy of the top.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    create_image("qemu-img", "raw", &[], &base, Some("3M"));
    qemu_io("raw", &base, &["write -P 1 0 256k", "write -P 2 2M 4k"]);
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "base.raw", "-F", "raw"],
        &mid,
        None,
    );
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 3 64k 64k", "write -z 128k 64k", "discard 2M 64k"],
    );
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "mid.qcow2", "-F", "qcow2"],
        &top,
        Some("4M"),
    );
    qemu_io(
        "qcow2",
        &top,
        &["write -P 4 100k 8k", "write -P 5 3500k 4k"],
    );
    let c = dir.join("compressed.qcow2");
    ok(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", p(&top), p(&c)],
    );
    (top, c)
}

/// qemu-img map --output=json, as BlockStatus values.
fn qemu_status(path: &Path) -> Vec<BlockStatus> {
    let v: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["map", "--output=json", p(path)])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| BlockStatus {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap() as usize,
            present: e["present"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
            data: e["data"].as_bool().unwrap(),
            compressed: e["compressed"].as_bool().unwrap(),
            offset: e.get("offset").and_then(|o| o.as_u64()),
        })
        .collect()
}

fn open(path: &Path) -> Chain {
    Chain::open(path, Format::probe(path).unwrap(), Qcow2Options::default()).unwrap()
}

#[test]
fn block_status_is_qemu_img_map() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let (top, c) = chain(dir.path());
    for path in [&top, &c] {
        let ch = open(path);
        assert_eq!(ch.block_status(0, ch.size()).unwrap(), qemu_status(path));
    }
    let ch = open(&top);
    assert_eq!(ch.layers().len(), 3);
    assert_eq!(
        ch.layers().iter().map(|l| l.format()).collect::<Vec<_>>(),
        [Format::Qcow2, Format::Qcow2, Format::Raw]
    );
    // A range inside the image starts and ends where asked.
    let st = ch.block_status(70_000, 100_000).unwrap();
    assert_eq!(st.first().unwrap().start, 70_000);
    let last = st.last().unwrap();
    assert_eq!(last.start + last.length, 170_000);
}

#[test]
fn compare_finds_what_qemu_img_compare_finds() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let (top, c) = chain(dir.path());
    let flat = dir.path().join("flat.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&top), p(&flat)]);
    let r = compare(&open(&top), &open(&flat), false, &mut |_| {}).unwrap();
    assert_eq!((r.difference, r.sizes_differ), (None, false));
    let r = compare(&open(&c), &open(&top), false, &mut |_| {}).unwrap();
    assert_eq!(r.difference, None);
    // One byte changed: the sector qemu-img names.
    qemu_io("raw", &flat, &["write -P 9 1234567 1"]);
    let o = run("qemu-img", &["compare", p(&top), p(&flat)]);
    assert_eq!(o.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&o.stdout).into_owned();
    let r = compare(&open(&top), &open(&flat), false, &mut |_| {}).unwrap();
    let Some(Difference::Content {
        offset,
        past_end: false,
    }) = r.difference
    else {
        panic!("{r:?}")
    };
    assert_eq!(msg, format!("Content mismatch at offset {offset}!\n"));
    // Progress is reported up to the end.
    let mut last = 0.0;
    compare(&open(&top), &open(&top), false, &mut |f| last = f).unwrap();
    assert_eq!(last, 1.0);
}

#[test]
fn measure_is_qemu_img_measure() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let (top, c) = chain(dir.path());
    let q = |o: CreateOptions, pre| Target::Qcow2(o, pre);
    let targets = [
        ("raw", "", Target::Raw),
        ("qcow2", "", q(CreateOptions::default(), Preallocation::Off)),
        (
            "qcow2",
            "cluster_size=4k,refcount_bits=1",
            q(
                CreateOptions {
                    cluster_size: 4096,
                    refcount_bits: 1,
                    ..Default::default()
                },
                Preallocation::Off,
            ),
        ),
        (
            "qcow2",
            "preallocation=falloc",
            q(CreateOptions::default(), Preallocation::Falloc),
        ),
    ];
    for path in [&top, &c] {
        for (fmt, opts, t) in &targets {
            let mut args = vec!["measure", "--output=json", "-O", fmt];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.push(p(path));
            let v: serde_json::Value = serde_json::from_str(&ok("qemu-img", &args)).unwrap();
            let m = measure(t, Source::Image(&open(path))).unwrap();
            assert_eq!(m.required, v["required"].as_u64().unwrap(), "{args:?}");
            assert_eq!(
                m.fully_allocated,
                v["fully-allocated"].as_u64().unwrap(),
                "{args:?}"
            );
            assert_eq!(
                m.bitmaps,
                v.get("bitmaps").and_then(|b| b.as_u64()),
                "{args:?}"
            );
        }
    }
}

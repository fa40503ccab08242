//! map, measure, compare, info --backing-chain and convert -B/-p with qemu-img 10 as
//! the oracle: the same command line run by both tools on the same images (made by
//! qemu-img and qemu-io, and by keel-img) prints the same and exits the same.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// An image to run the verbs on: name, path, format.
struct Img {
    name: &'static str,
    path: PathBuf,
    fmt: &'static str,
}

/// Images of every kind the verbs must agree on: raw with holes; qcow2 with data,
/// zero, discarded, partial and preallocated-zero clusters; a chain of three (its top
/// larger than its base); a raw-backed overlay; compressed clusters; extended L2
/// subclusters; metadata preallocation; and images keel-img wrote itself.
fn fixtures(dir: &Path) -> Vec<Img> {
    let at = |n: &str| dir.join(n);
    let img = |name, path, fmt| Img { name, path, fmt };
    let mut v = Vec::new();

    let raw = at("disk.raw");
    create_image("qemu-img", "raw", &[], &raw, Some("4M"));
    qemu_io(
        "raw",
        &raw,
        &["write -P 1 0 128k", "write -P 2 1M 4k", "write -P 3 3M 1M"],
    );
    v.push(img("raw", raw, "raw"));

    let q = at("plain.qcow2");
    create_image("qemu-img", "qcow2", &[], &q, Some("4M"));
    qemu_io(
        "qcow2",
        &q,
        &[
            "write -P 1 0 192k",
            "write -z 256k 64k",
            "write -P 2 1M 4k",
            "write -z 64k 64k",
            "discard 128k 64k",
            "write -P 3 2M 8k",
            "write -P 4 3M 64k",
            "write -z -u 3M 32k",
        ],
    );
    v.push(img("qcow2", q, "qcow2"));

    let base = at("base.qcow2");
    let mid = at("mid.qcow2");
    let top = at("top.qcow2");
    create_image("qemu-img", "qcow2", &[], &base, Some("4M"));
    qemu_io(
        "qcow2",
        &base,
        &[
            "write -P 1 0 128k",
            "write -z 256k 64k",
            "write -P 2 1M 64k",
        ],
    );
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        &mid,
        None,
    );
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 3 64k 64k", "discard 1M 64k", "write -P 5 3M 4k"],
    );
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "mid.qcow2", "-F", "qcow2"],
        &top,
        Some("6M"),
    );
    qemu_io(
        "qcow2",
        &top,
        &["write -P 4 2M 8k", "write -z 3M 64k", "write -P 6 5M 64k"],
    );
    v.push(img("chain top", top, "qcow2"));
    v.push(img("chain mid", mid, "qcow2"));

    let rbase = at("rbase.raw");
    let over = at("over.qcow2");
    create_image("qemu-img", "raw", &[], &rbase, Some("2M"));
    qemu_io("raw", &rbase, &["write -P 7 512k 256k"]);
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "rbase.raw", "-F", "raw"],
        &over,
        None,
    );
    qemu_io("qcow2", &over, &["write -P 8 600k 4k"]);
    v.push(img("raw-backed overlay", over, "qcow2"));

    let c = at("compressed.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            p(&v[1].path),
            p(&c),
        ],
    );
    v.push(img("compressed", c, "qcow2"));

    let x = at("extl2.qcow2");
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "extended_l2=on"],
        &x,
        Some("4M"),
    );
    qemu_io(
        "qcow2",
        &x,
        &[
            "write -P 1 4k 2k",
            "write -z 8k 4k",
            "write -P 2 64k 64k",
            "write -P 3 1M 2k",
        ],
    );
    v.push(img("extended L2", x, "qcow2"));

    let m = at("prealloc.qcow2");
    create_image(
        "qemu-img",
        "qcow2",
        &["-o", "preallocation=metadata"],
        &m,
        Some("4M"),
    );
    qemu_io("qcow2", &m, &["write -P 1 64k 4k"]);
    v.push(img("metadata preallocation", m, "qcow2"));

    let k = at("keel.qcow2");
    create_image(KEEL_IMG, "qcow2", &[], &k, Some("4M"));
    ok(KEEL_IMG, &["write", "-P", "0x11", p(&k), "100k", "200k"]);
    ok(KEEL_IMG, &["write", "-z", p(&k), "1M", "128k"]);
    ok(KEEL_IMG, &["discard", p(&k), "128k", "64k"]);
    ok(KEEL_IMG, &["write", "-P", "0x22", p(&k), "3M", "12k"]);
    let kc = at("keel-compressed.qcow2");
    ok(KEEL_IMG, &["convert", "-c", "-O", "qcow2", p(&k), p(&kc)]);
    v.push(img("keel-made", k, "qcow2"));
    v.push(img("keel-compressed", kc, "qcow2"));
    v
}

/// Runs `args` with both tools: asserts the same exit code and stdout; returns the
/// output.
fn same(args: &[&str]) -> String {
    let q = run("qemu-img", args);
    let k = run(KEEL_IMG, args);
    let (qo, ko) = (
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&k.stdout),
    );
    assert_eq!(
        k.status.code(),
        q.status.code(),
        "{args:?}: exit codes differ\nqemu-img: {qo}{}\nkeel-img: {ko}{}",
        String::from_utf8_lossy(&q.stderr),
        String::from_utf8_lossy(&k.stderr)
    );
    assert_eq!(
        ko, qo,
        "{args:?}: keel-img (left) and qemu-img (right) print"
    );
    ko.into_owned()
}

/// Runs `args` (which ask for JSON) with both tools: both succeed and print equal
/// JSON; returns it.
fn same_json(args: &[&str]) -> serde_json::Value {
    let parse = |tool: &str| -> serde_json::Value {
        let out = ok(tool, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{tool} {args:?}: {e}: {out}"))
    };
    let (q, k) = (parse("qemu-img"), parse(KEEL_IMG));
    assert_eq!(k, q, "{args:?}: keel-img (left) and qemu-img (right)");
    k
}

#[test]
fn map_reports_what_qemu_img_map_reports() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let imgs = fixtures(dir.path());
    for i in &imgs {
        let f = p(&i.path);
        let v = same_json(&["map", "--output=json", "-f", i.fmt, f]);
        assert!(!v.as_array().unwrap().is_empty(), "{}", i.name);
        // The exact text too, and the human form (which fails, exit 1, on compressed
        // clusters in both).
        same(&["map", "--output=json", "-f", i.fmt, f]);
        same(&["map", "-f", i.fmt, f]);
        same(&["map", "--output=human", f]);
        same(&["map", "-U", "--output=json", f]);
        for (start, len) in [("0", "1"), ("70000", "100000"), ("1M", "2M"), ("3M", "0")] {
            same(&[
                "map",
                "--output=json",
                "--start-offset",
                start,
                "--max-length",
                len,
                f,
            ]);
        }
        same(&["map", "--output=json", "--start-offset", "5000000", f]);
        same(&["map", "--start-offset=1M", f]);
    }
    // The chain's top reads through all three layers, at depths 0 to 2, and past the
    // base's end.
    let top = &imgs.iter().find(|i| i.name == "chain top").unwrap().path;
    let v = same_json(&["map", "--output=json", p(top)]);
    let depths: std::collections::BTreeSet<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["depth"].as_u64().unwrap())
        .collect();
    assert_eq!(depths.into_iter().collect::<Vec<_>>(), [0, 1, 2], "{v}");
    // Errors: both exit 1, bad command lines too.
    same(&["map", p(&dir.path().join("missing.qcow2"))]);
    same(&["map"]);
    same(&["map", "--bogus", p(top)]);
    same(&["compare", p(top)]);
    same(&["info"]);
    same(&["map", "-f", "qcow2", p(&imgs[0].path)]);
}

#[test]
fn measure_gives_qemu_img_sizes() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let imgs = fixtures(dir.path());
    let targets: [&[&str]; 8] = [
        &[],
        &["-O", "raw"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
        &["-O", "qcow2", "-o", "compat=0.10"],
        &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"],
        &["-O", "qcow2", "-o", "preallocation=full"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,refcount_bits=64,preallocation=metadata",
        ],
    ];
    // A persistent bitmap counts where both sides can hold one.
    let bm = dir.path().join("bitmap.qcow2");
    std::fs::copy(&imgs[1].path, &bm).unwrap();
    ok(
        "qemu-img",
        &["bitmap", "--add", "-g", "4k", p(&bm), "dirty0"],
    );
    ok(
        "qemu-img",
        &["bitmap", "--add", p(&bm), "a-longer-bitmap-name"],
    );
    let mut sources: Vec<(&str, &Path, &str)> = imgs
        .iter()
        .map(|i| (i.name, i.path.as_path(), i.fmt))
        .collect();
    sources.push(("bitmaps", &bm, "qcow2"));
    for (name, path, fmt) in sources {
        for t in targets {
            let mut args = vec!["measure", "--output=json", "-f", fmt];
            args.extend_from_slice(t);
            args.push(p(path));
            let v = same_json(&args);
            assert!(v["required"].as_u64().unwrap() > 0, "{name} {t:?}");
            args.remove(1);
            same(&args);
        }
    }
    let v = same_json(&["measure", "--output=json", "-O", "qcow2", p(&bm)]);
    assert!(v["bitmaps"].as_u64().unwrap() > 0, "{v}");
    for size in ["0", "1000", "1G", "100G", "3T"] {
        for t in targets {
            let mut args = vec!["measure", "--output=json", "--size", size];
            args.extend_from_slice(t);
            same_json(&args);
            args.remove(1);
            same(&args);
        }
    }
    // Errors: both exit 1.
    same(&["measure"]);
    same(&["measure", "-U", "-O", "qcow2", p(&imgs[2].path)]);
    same(&["measure", "--size", "1G", p(&imgs[0].path)]);
    same(&["measure", p(&dir.path().join("missing.raw"))]);
}

#[test]
fn compare_agrees_with_qemu_img_compare() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let imgs = fixtures(dir.path());
    let at = |n: &str| dir.path().join(n);
    let mut cases: Vec<Vec<String>> = Vec::new();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    for i in &imgs {
        // Identical: the image and its raw and qcow2 copies (a chain against its
        // flattened form).
        let flat_raw = at(&format!("{}.flat.raw", i.name.replace(' ', "-")));
        let flat_q = at(&format!("{}.flat.qcow2", i.name.replace(' ', "-")));
        ok(
            "qemu-img",
            &["convert", "-O", "raw", p(&i.path), p(&flat_raw)],
        );
        ok(
            "qemu-img",
            &["convert", "-O", "qcow2", p(&i.path), p(&flat_q)],
        );
        cases.push(s(&["compare", p(&i.path), p(&flat_raw)]));
        cases.push(s(&[
            "compare",
            "-f",
            i.fmt,
            "-F",
            "qcow2",
            p(&i.path),
            p(&flat_q),
        ]));
        cases.push(s(&["compare", "-q", p(&flat_q), p(&i.path)]));
        // Strict mode on an identical copy of the same format.
        let copy = at(&format!("{}.copy", i.name.replace(' ', "-")));
        std::fs::copy(&i.path, &copy).unwrap();
        if i.name != "chain top" && i.name != "chain mid" && i.name != "raw-backed overlay" {
            cases.push(s(&[
                "compare",
                "-s",
                "-f",
                i.fmt,
                "-F",
                i.fmt,
                p(&i.path),
                p(&copy),
            ]));
        }
        cases.push(s(&["compare", "-s", p(&i.path), p(&flat_raw)]));
        // Different: one byte changed in an odd place, in the data and in a hole.
        for (k, (off, byte)) in [("1000000", "9"), ("1900001", "0"), ("1", "1")]
            .iter()
            .enumerate()
        {
            let changed = at(&format!("{}.changed{k}.raw", i.name.replace(' ', "-")));
            std::fs::copy(&flat_raw, &changed).unwrap();
            qemu_io("raw", &changed, &[&format!("write -P {byte} {off} 3")]);
            cases.push(s(&["compare", p(&i.path), p(&changed)]));
            cases.push(s(&["compare", p(&changed), p(&i.path)]));
        }
        // Sizes that differ: a zero tail is equal (not in strict mode), data there is
        // not.
        let grown = at(&format!("{}.grown.qcow2", i.name.replace(' ', "-")));
        std::fs::copy(&flat_q, &grown).unwrap();
        ok("qemu-img", &["resize", "-q", p(&grown), "+3M"]);
        cases.push(s(&["compare", p(&i.path), p(&grown)]));
        cases.push(s(&["compare", "-s", p(&i.path), p(&grown)]));
        // 1 MiB + 1 KiB past the smaller image's end.
        let info: serde_json::Value =
            serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(&i.path)])).unwrap();
        let size = info["virtual-size"].as_u64().unwrap();
        let w = format!("write -P 5 {} 1k", size + (1 << 20) + 1024);
        qemu_io("qcow2", &grown, &[&w]);
        cases.push(s(&["compare", p(&grown), p(&i.path)]));
    }
    // Errors: exit 2.
    cases.push(s(&["compare", p(&imgs[0].path), p(&at("missing"))]));
    cases.push(s(&[
        "compare",
        "-f",
        "qcow2",
        p(&imgs[0].path),
        p(&imgs[1].path),
    ]));
    for c in &cases {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        same(&args);
    }
    // Each outcome was exercised.
    let codes: std::collections::BTreeSet<i32> = cases
        .iter()
        .map(|c| {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            run(KEEL_IMG, &args).status.code().unwrap()
        })
        .collect();
    assert_eq!(codes.into_iter().collect::<Vec<_>>(), [0, 1, 2]);
}

#[test]
fn info_backing_chain_matches_qemu_img_info() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let imgs = fixtures(dir.path());
    let bm = dir.path().join("bitmap.qcow2");
    std::fs::copy(&imgs[1].path, &bm).unwrap();
    ok("qemu-img", &["bitmap", "--add", p(&bm), "b0"]);
    ok("qemu-img", &["bitmap", "--add", "--disable", p(&bm), "b1"]);
    // Internal snapshots: listed in both forms.
    let sn = dir.path().join("snapshots.qcow2");
    std::fs::copy(&imgs[1].path, &sn).unwrap();
    ok("qemu-img", &["snapshot", "-c", "first", p(&sn)]);
    qemu_io("qcow2", &sn, &["write -P 9 0 64k"]);
    ok("qemu-img", &["snapshot", "-c", "second", p(&sn)]);
    let mut paths: Vec<&Path> = imgs.iter().map(|i| i.path.as_path()).collect();
    paths.push(&bm);
    paths.push(&sn);
    for path in paths {
        let v = same_json(&["info", "--output=json", "--backing-chain", p(path)]);
        assert!(v.is_array(), "{v}");
        same_json(&["info", "--output=json", p(path)]);
        same(&["info", "--backing-chain", p(path)]);
        same(&["info", p(path)]);
        same(&["info", "--force-share", "--backing-chain", p(path)]);
    }
    let v = same_json(&["info", "--output=json", p(&sn)]);
    assert_eq!(v["snapshots"].as_array().map(Vec::len), Some(2), "{v}");
    let top = &imgs.iter().find(|i| i.name == "chain top").unwrap().path;
    let v = same_json(&["info", "--output=json", "--backing-chain", p(top)]);
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    // The chain named by an absolute path: backing files shown with their actual path.
    let abs = std::fs::canonicalize(top).unwrap();
    same(&["info", "--backing-chain", p(&abs)]);
    same(&["info", p(&dir.path().join("missing.qcow2"))]);
}

/// The progress lines `-p` prints: `    (0.00/100%)\r`, increasing values, and
/// `    (100.00/100%)\r` last before the newline.
fn assert_progress(out: &str, what: &str) {
    let body = out
        .strip_suffix("\r\n")
        .unwrap_or_else(|| panic!("{what}: {out:?}"));
    let vals: Vec<f64> = body
        .split('\r')
        .map(|l| {
            let v = l
                .strip_prefix("    (")
                .and_then(|l| l.strip_suffix("/100%)"))
                .unwrap_or_else(|| panic!("{what}: line {l:?} in {out:?}"));
            assert_eq!(v.split('.').nth(1).map(str::len), Some(2), "{what}: {v}");
            v.parse().unwrap()
        })
        .collect();
    assert_eq!(vals.first(), Some(&0.0), "{what}: {out:?}");
    assert_eq!(vals.last(), Some(&100.0), "{what}: {out:?}");
    assert!(vals.windows(2).all(|w| w[0] <= w[1]), "{what}: {out:?}");
}

#[test]
fn convert_builds_overlays_and_shows_progress_like_qemu_img() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let imgs = fixtures(dir.path());
    let at = |n: &str| dir.path().join(n);
    let top = &imgs.iter().find(|i| i.name == "chain top").unwrap().path;
    // A volume built from another: the chain's top as an overlay of mid.qcow2 (what
    // its own backing chain reads as), by both tools.
    let (k, q) = (at("k-over.qcow2"), at("q-over.qcow2"));
    let args = |out: &Path| {
        vec![
            "convert".to_string(),
            "-B".into(),
            "mid.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
            "-O".into(),
            "qcow2".into(),
            p(top).into(),
            p(out).into(),
        ]
    };
    let a: Vec<String> = args(&k);
    ok(KEEL_IMG, &a.iter().map(String::as_str).collect::<Vec<_>>());
    let a: Vec<String> = args(&q);
    ok(
        "qemu-img",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // qemu-img reads keel's result: clean, the same contents, mid.qcow2 as backing.
    assert_eq!(qemu_check(&k), (0, 0, 0, 0));
    ok("qemu-img", &["compare", p(top), p(&k)]);
    ok("qemu-img", &["compare", p(&q), p(&k)]);
    let info: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["info", "--output=json", p(&k)])).unwrap();
    assert_eq!(info["backing-filename"], "mid.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    // keel-img reads qemu's.
    ok(KEEL_IMG, &["compare", p(top), p(&q)]);
    same(&["compare", p(&k), p(&q)]);
    same_json(&["map", "--output=json", p(&q)]);
    same_json(&["map", "--output=json", p(&k)]);
    // Only what differs from mid.qcow2 is in the overlay: the top layer's clusters.
    let top_map: serde_json::Value =
        serde_json::from_str(&ok(KEEL_IMG, &["map", "--output=json", p(top)])).unwrap();
    let own = |v: &serde_json::Value| -> u64 {
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0 && e["present"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    };
    let k_map: serde_json::Value =
        serde_json::from_str(&ok("qemu-img", &["map", "--output=json", p(&k)])).unwrap();
    assert_eq!(own(&k_map), own(&top_map), "{k_map}");
    // Over a backing file that differs from the input's, the overlay still reads as
    // the input.
    let other = at("k-over-base.qcow2");
    ok(
        KEEL_IMG,
        &[
            "convert",
            "-B",
            "compressed.qcow2",
            "-F",
            "qcow2",
            "-O",
            "qcow2",
            p(top),
            p(&other),
        ],
    );
    ok("qemu-img", &["compare", p(top), p(&other)]);
    assert_eq!(qemu_check(&other), (0, 0, 0, 0));
    // -B needs -F, as in qemu-img 10: both refuse, exit 1.
    same(&[
        "convert",
        "-B",
        "mid.qcow2",
        "-O",
        "qcow2",
        p(top),
        p(&at("x.qcow2")),
    ]);

    // -p prints the same progress lines.
    for tool in ["qemu-img", KEEL_IMG] {
        let out = at(&format!("{}.raw", tool.len()));
        let o = ok(tool, &["convert", "-p", "-O", "raw", p(top), p(&out)]);
        assert_progress(&o, tool);
        ok("qemu-img", &["compare", p(top), p(&out)]);
    }
}

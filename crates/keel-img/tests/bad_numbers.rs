//! Numbers at the edges of their types get an error or wrap as documented, never a panic:
//! `measure` checks its options and size as `create` does (a cluster size of 3 divided by
//! zero, a size of 2^64 - 1 overflowed), and `bench` refuses a request larger than the
//! image before allocating a buffer per request, and wraps an offset or step past 2^64;
//! `write` refuses a range past the image's end before it writes any of it.

mod common;

use std::process::Command;

use common::{create_image, p, require_qemu, KEEL_IMG};

/// Runs keel-img with `args` in `dir`; its exit code and standard error.
fn run(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(KEEL_IMG)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running keel-img");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    (o.status.code(), err)
}

#[test]
fn measure_and_bench_refuse_or_wrap_numbers_at_the_edges() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("m.qcow2");
    create_image("qemu-img", "qcow2", &[], &img, Some("1M"));
    let max = u64::MAX.to_string();
    for (args, says) in [
        (
            vec!["measure", "--size", &max, "-O", "qcow2"],
            "too large for 65536-byte clusters",
        ),
        (
            vec![
                "measure",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=3",
                "--size",
                "1G",
            ],
            "cluster size 3 must be a power of two",
        ),
        (
            vec!["bench", "-s", &max, p(&img)],
            "is larger than the image (1048576 bytes)",
        ),
        // A write past the end is refused whole (it wrote up to the end, then failed).
        (
            vec!["write", p(&img), "0", "2M"],
            "2097152 bytes at offset 0 do not lie within the image (1048576 bytes)",
        ),
        (
            vec!["write", p(&img), "1", &max],
            "do not lie within the image",
        ),
    ] {
        let before = std::fs::read(&img).unwrap();
        let (code, err) = run(dir.path(), &args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{args:?} changed the image"
        );
    }
    for args in [
        vec!["bench", "-q", "-c", "3", "-o", &max, p(&img)],
        vec!["bench", "-q", "-c", "3", "-S", &max, p(&img)],
    ] {
        let (code, err) = run(dir.path(), &args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
    }
}

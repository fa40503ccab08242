//! An error about an image names it: a header keel-img refuses (cluster_bits 0) is
//! reported with the file's name by every command that opens it, the second of two
//! images included (`compare` said only "invalid image: cluster_bits 0 outside 9..=21").

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{create_image, require_qemu, KEEL_IMG};

#[test]
fn every_command_names_the_image_it_refuses() {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = (dir.path().join("good.qcow2"), dir.path().join("bad.qcow2"));
    create_image("qemu-img", "qcow2", &[], &good, Some("1M"));
    create_image("qemu-img", "qcow2", &[], &bad, Some("1M"));
    // cluster_bits (header offset 20) = 0.
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.write_all_at(&[0; 4], 20).unwrap();
    for args in [
        &["info", "bad.qcow2"][..],
        &["check", "bad.qcow2"],
        &["map", "bad.qcow2"],
        &["read", "bad.qcow2", "0", "512"],
        &["compare", "good.qcow2", "bad.qcow2"],
        &["convert", "-O", "raw", "bad.qcow2", "out.raw"],
        &["snapshot", "-l", "bad.qcow2"],
        &["measure", "-O", "qcow2", "bad.qcow2"],
    ] {
        let o = Command::new(KEEL_IMG)
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        // qemu-img's codes: compare's errors are 2 (1 means "different").
        let code = if args[0] == "compare" { 2 } else { 1 };
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            err.contains("bad.qcow2") && err.contains("cluster_bits 0"),
            "{args:?}: {err}"
        );
    }
}

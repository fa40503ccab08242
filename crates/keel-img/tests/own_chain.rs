//! Writing a file an image reads from destroys what it reads: keel-img refuses, before it
//! writes anything, a `convert` whose output is the input (by name or through a symlink) or
//! a file of its backing chain, a `create` or `convert -B` that would make an image its own
//! backing file, and a safe `rebase` onto a chain that reads the image. The cases run
//! under qemu-img too where it refuses them (exit 1: its image locks, a backing name equal to
//! the image's); every file keeps its bytes. And a resize whose chain cannot open changes
//! nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{create_image, qio, require_qemu, KEEL_IMG};

/// The files of `dir`, name and bytes, sorted by name.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.is_symlink())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

/// A directory with `base.qcow2` (1 MiB) and `top.qcow2` over it, and their paths.
fn base_and_top() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    create_image("qemu-img", "qcow2", &[], &base, Some("1M"));
    create_image(
        "qemu-img",
        "qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        &top,
        None,
    );
    (dir, base, top)
}

/// In a directory holding `base.qcow2` (data) and `top.qcow2` (data, over `base.qcow2`),
/// and `link.qcow2` a symlink to `top.qcow2`: runs `args` with `tool`, which must fail
/// (exit 1) and leave every file as it was; returns its standard error.
fn refused(tool: &str, args: &[&str]) -> String {
    let (dir, base, top) = base_and_top();
    qio(&base, "write -P 0x5a 0 64k");
    qio(&top, "write -P 0xa5 64k 64k");
    std::os::unix::fs::symlink("top.qcow2", dir.path().join("link.qcow2")).unwrap();
    let before = snapshot(dir.path());
    let o = Command::new(tool)
        .args(args)
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("running {tool}: {e}"));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{tool} {args:?}: {err}");
    assert!(
        snapshot(dir.path()) == before,
        "{tool} {args:?} changed a file; stderr: {err}"
    );
    err
}

/// Both tools refuse `args`; keel-img's message contains `says`.
fn both_refuse(args: &[&str], says: &str) {
    require_qemu();
    refused("qemu-img", args);
    let err = refused(KEEL_IMG, args);
    assert!(err.contains(says), "keel-img {args:?}: {err}");
}

#[test]
fn convert_refuses_an_output_the_input_reads() {
    let input = "is the input image or in its backing chain";
    both_refuse(&["convert", "-O", "qcow2", "top.qcow2", "top.qcow2"], input);
    both_refuse(&["convert", "-O", "raw", "top.qcow2", "link.qcow2"], input);
    both_refuse(&["convert", "-O", "raw", "top.qcow2", "base.qcow2"], input);
}

#[test]
fn an_image_is_never_made_its_own_backing_file() {
    let own = "would be in its own backing chain";
    let create = |backing, image| ["create", "-f", "qcow2", "-b", backing, "-F", "qcow2", image];
    both_refuse(&create("top.qcow2", "top.qcow2"), own);
    // Through a symlink, and base.qcow2 over top.qcow2 (which reads base.qcow2): qemu-img
    // 10 compares the names only, and makes the loop (exit 0, the old image's data gone);
    // keel-img compares files and follows the new backing file's chain.
    for args in [
        create("link.qcow2", "top.qcow2"),
        create("top.qcow2", "base.qcow2"),
    ] {
        let err = refused(KEEL_IMG, &args);
        assert!(err.contains(own), "{err}");
    }
    // convert -B naming the output itself: qemu-img fails too, but leaves the new file.
    let err = refused(
        KEEL_IMG,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "new.qcow2",
            "-F",
            "qcow2",
            "base.qcow2",
            "new.qcow2",
        ],
    );
    assert!(err.contains(own), "{err}");
}

#[test]
fn a_safe_rebase_refuses_a_chain_that_reads_the_image() {
    let looped = "is this image or has it in its backing chain";
    both_refuse(
        &["rebase", "-b", "top.qcow2", "-F", "qcow2", "top.qcow2"],
        looped,
    );
    both_refuse(
        &["rebase", "-b", "top.qcow2", "-F", "qcow2", "base.qcow2"],
        looped,
    );
}

/// A resize of an image whose backing file is missing fails before it changes anything
/// (it had already written the new size when the chain failed to open), as qemu-img's.
#[test]
fn a_resize_that_cannot_open_the_chain_changes_nothing() {
    require_qemu();
    for tool in ["qemu-img", KEEL_IMG] {
        let (dir, base, _) = base_and_top();
        std::fs::remove_file(&base).unwrap();
        let before = snapshot(dir.path());
        let o = Command::new(tool)
            .args(["resize", "top.qcow2", "+1M"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{tool}: {err}");
        assert!(err.contains("base.qcow2"), "{tool}: {err}");
        assert!(
            snapshot(dir.path()) == before,
            "{tool} changed top.qcow2: {err}"
        );
    }
}

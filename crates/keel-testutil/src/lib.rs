//! Helpers for Keel's tests: detect `/dev/kvm` (and print the one skip line without it) and
//! assemble small guests from GNU assembler source at test time, so every test guest is
//! readable source rather than opaque bytes. Needs binutils (`as`, `ld`).
#![deny(missing_docs)]

pub mod netns;

use std::path::PathBuf;
use std::process::Command;

/// Whether `/dev/kvm` can be opened read-write: keel-kvm's check, the one every Keel test,
/// example and benchmark uses.
pub use keel_kvm::kvm_available;

/// Returns from the calling test, printing `skipped: /dev/kvm unavailable`, when KVM is
/// absent. Where it is present the test runs.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            println!("skipped: /dev/kvm unavailable");
            return;
        }
    };
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "keel-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).expect("create temp dir");
        TempDir(d)
    }
    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (install binutils: apt-get install -y binutils)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assemble_object(src: &str, dir: &TempDir) -> PathBuf {
    let s = dir.path().join("guest.S");
    let o = dir.path().join("guest.o");
    std::fs::write(&s, src).expect("write source");
    run(Command::new("as").arg("--64").arg("-o").arg(&o).arg(&s));
    o
}

/// Assembles `src` (AT&T syntax) linked to run at `origin` and returns the flat binary of
/// its `.text`.
pub fn assemble(src: &str, origin: u64) -> Vec<u8> {
    let dir = TempDir::new("asm");
    let o = assemble_object(src, &dir);
    let bin = dir.path().join("guest.bin");
    run(Command::new("ld")
        .arg(format!("-Ttext={origin:#x}"))
        .args(["--oformat", "binary", "-e", "0", "-o"])
        .arg(&bin)
        .arg(&o));
    std::fs::read(&bin).expect("read binary")
}

/// The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY) and the 32-bit entry label every small PVH
/// guest starts with.
const PVH_HEADER: &str = r#"
    .section .note.pvh, "a"
    .p2align 2
    .long 4, 4, 18              # namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long _start
    .text
    .code32
    .globl _start
_start:
"#;

/// Assembles a PVH guest, linked at 1 MiB, whose 32-bit entry code is `body` (AT&T
/// syntax), and writes the ELF to `out`.
pub fn assemble_pvh(body: &str, out: &std::path::Path) {
    assemble_elf(&format!("{PVH_HEADER}{body}"), 0x10_0000, out);
}

/// Assembles `src` into an ELF64 executable whose `.text` is linked at `origin`, entry
/// `_start`, and writes it to `out`. A PVH guest puts its note in a section named
/// `.note.pvh` (allocated, `"a"`); the linker keeps it.
pub fn assemble_elf(src: &str, origin: u64, out: &std::path::Path) {
    let dir = TempDir::new("asm");
    let o = assemble_object(src, &dir);
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-e", "_start"])
        .arg(format!("-Ttext={origin:#x}"))
        .arg("-o")
        .arg(out)
        .arg(&o));
}

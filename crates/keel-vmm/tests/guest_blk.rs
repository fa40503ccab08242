//! virtio-blk end to end with the test guest (crates/keel-test-guest, scenarios `blk`,
//! `blk-ro`, `blk-bench`, `blk-mq` and `blk-qcow2-header`): under QEMU (the peer; virtio-blk-pci and
//! virtio-blk-device) and under keel (`--disk`, virtio-pci and `--transport mmio`), on raw
//! and qcow2 images.
//!
//! Every image starts as `initial_byte` everywhere. After `blk` passes, the image must hold
//! exactly the content the guest's README documents (`final_byte`): `qemu-img check` finds
//! no errors (qcow2) and `qemu-img compare` against a raw reference built here says the
//! images are identical.
//!
//! keel also runs `blk` as an unprivileged user (uid/gid 65534, no capabilities) with
//! access to /dev/kvm and its images only.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keel_testutil::require_kvm;
use support::{assert_pass, run_keel, Outcome, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

/// The image: 16 MiB, so that the 8 MiB the guest writes are followed by 8 MiB it must
/// not touch.
const DISK_BYTES: usize = 16 << 20;
const BLOCK: usize = 4096;
/// `blk` writes blocks 0-2047 (the first 8 MiB).
const PATTERN_BLOCKS: usize = 2048;
/// The ID QEMU's device gets (`serial=`); keel names its first disk `keel-disk0`.
const QEMU_SERIAL: &str = "keel-blk-test";

/// Every byte of 4 KiB block `b` before the guest runs: 0xfc-0xff, values the guest's
/// pattern (1-251) and zeroes never take.
fn initial_byte(b: usize) -> u8 {
    0xfc | (b & 3) as u8
}

/// Every byte of block `b` after `blk` (crates/keel-test-guest/README.md, "virtio-blk"):
/// `b % 251 + 1` in the first 8 MiB, except blocks 16-31 and 48-63 which are zero; the
/// rest untouched.
fn final_byte(b: usize) -> u8 {
    if b >= PATTERN_BLOCKS {
        initial_byte(b)
    } else if (16..32).contains(&b) || (48..64).contains(&b) {
        0
    } else {
        (b % 251 + 1) as u8
    }
}

fn write_image(path: &Path, byte: impl Fn(usize) -> u8) {
    let mut data = vec![0u8; DISK_BYTES];
    for (b, block) in data.chunks_mut(BLOCK).enumerate() {
        block.fill(byte(b));
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Runs `qemu-img` and returns its stdout; panics with everything if it fails.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img (Debian package qemu-utils): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// An image in `format` holding `byte(b)` in every block, and a raw reference holding
/// what it must hold after the run (`expected`).
struct Disk {
    _dir: TempDir,
    image: PathBuf,
    reference: PathBuf,
    format: &'static str,
}

impl Disk {
    fn new(
        tag: &str,
        format: &'static str,
        byte: fn(usize) -> u8,
        expected: fn(usize) -> u8,
    ) -> Disk {
        let dir = TempDir::new(tag);
        let raw = dir.path().join("initial.raw");
        write_image(&raw, byte);
        let image = match format {
            "raw" => raw,
            "qcow2" => {
                let q = dir.path().join("disk.qcow2");
                qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
                std::fs::remove_file(&raw).unwrap();
                q
            }
            _ => unreachable!("format {format}"),
        };
        let reference = dir.path().join("reference.raw");
        write_image(&reference, expected);
        Disk {
            _dir: dir,
            image,
            reference,
            format,
        }
    }

    /// `qemu-img check` (qcow2) is clean and `qemu-img compare` finds the image identical
    /// to the reference.
    fn assert_content(&self) {
        if self.format == "qcow2" {
            let out = qemu_img(&["check", "-f", "qcow2", s(&self.image)]);
            assert!(
                out.contains("No errors were found on the image."),
                "qemu-img check:\n{out}"
            );
        }
        let out = qemu_img(&[
            "compare",
            "-f",
            self.format,
            "-F",
            "raw",
            s(&self.image),
            s(&self.reference),
        ]);
        assert!(
            out.contains("Images are identical."),
            "qemu-img compare:\n{out}"
        );
    }
}

/// Each of `lines` begins a line `keel-test: SCENARIO: ...`; one ending in `$` is the
/// whole line.
fn assert_lines(out: &Outcome, scenario: &str, lines: &[&str]) {
    for l in lines {
        let (l, whole) = match l.strip_suffix('$') {
            Some(l) => (l, true),
            None => (*l, false),
        };
        let l = format!("keel-test: {scenario}: {l}");
        let found = out.stdout.lines().map(str::trim_end).any(|x| {
            if whole {
                x == l
            } else {
                x.starts_with(&l)
            }
        });
        assert!(found, "missing {l:?} in:\n{}", out.stdout);
    }
}

/// What `blk` prints whatever the VMM, for a 16 MiB disk with a 256-entry queue and
/// DISCARD and WRITE_ZEROES offered.
const BLK_LINES: &[&str] = &[
    "capacity 32768 sectors (16 MiB), blk_size 512,",
    "wrote blocks 0-63 at depth 1: 64 requests, at most 1 in flight,",
    "wrote blocks 64-2047 at depth 256: 1984 requests, at most 256 in flight, 1984 through indirect tables",
    "read back and verified blocks 0-2047 at depth 256: 2048 requests,",
    "FLUSH: OK$",
    "DISCARD blocks 16-31: OK",
    "WRITE_ZEROES blocks 16-31 with UNMAP and 48-63 without: OK",
    "blocks 16-31 and 48-63 read back as zeroes",
    "FLUSH: OK (again)",
    "request type 0xff: UNSUPP",
    "IN of 4 KiB at sector 32768 (past the end): IOERR",
    "IN of 4 KiB at sector 32767 (across the end): IOERR",
    "block 0 still reads back after the errors",
    "queue interrupt arrived when asked for",
    "reset: status reads 0",
];

/// What `blk-ro` prints on the disk `blk` leaves.
const BLK_RO_LINES: &[&str] = &[
    "read blocks 0-63 and 2047: the content blk leaves",
    "OUT to block 0: IOERR",
    "blocks 0-64 unchanged after the refused writes",
    "reset: status reads 0",
];

// ---------------------------------------------------------------------
// QEMU: the peer, which checks the guest's driver.

/// QEMU's machine and device for a transport.
fn qemu_transport(mmio: bool) -> (&'static str, Vec<&'static str>) {
    if mmio {
        (
            "microvm,acpi=off",
            vec![
                "-global",
                "virtio-mmio.force-legacy=false",
                "-device",
                "virtio-blk-device,drive=d0,serial=keel-blk-test",
            ],
        )
    } else {
        (
            "microvm,pcie=on",
            vec!["-device", "virtio-blk-pci,drive=d0,serial=keel-blk-test"],
        )
    }
}

fn qemu_blk(cmdline: &str, disk: &Disk, mmio: bool, read_only: bool) -> Outcome {
    let (machine, device) = qemu_transport(mmio);
    let drive = format!(
        "file={},if=none,id=d0,format={},cache=none,aio=io_uring{}",
        s(&disk.image),
        disk.format,
        if read_only { ",readonly=on" } else { "" }
    );
    let mut extra = vec!["-drive", &drive];
    extra.extend(device);
    support::qemu_guest_cmdline(cmdline, machine, 1, true, &extra, LIMIT)
}

fn qemu_blk_case(mmio: bool, format: &'static str) {
    let disk = Disk::new("blk-qemu", format, initial_byte, final_byte);
    let out = qemu_blk("keel.test=blk", &disk, mmio, false);
    assert_pass(&out, "blk", 1);
    let found = if mmio {
        "found virtio-mmio version 2 at "
    } else {
        "found 1af4:1001 at 00:01.0 (device type 0x2)"
    };
    let id = format!("ID \"{QEMU_SERIAL}\"");
    let mut lines = vec![found, id.as_str(), "writeback toggled to 0 and back to 1"];
    lines.extend_from_slice(BLK_LINES);
    assert_lines(&out, "blk", &lines);
    disk.assert_content();
}

#[test]
fn blk_passes_under_qemu_virtio_pci_raw() {
    require_kvm!();
    qemu_blk_case(false, "raw");
}

#[test]
fn blk_passes_under_qemu_virtio_pci_qcow2() {
    require_kvm!();
    qemu_blk_case(false, "qcow2");
}

#[test]
fn blk_passes_under_qemu_virtio_mmio_raw() {
    require_kvm!();
    qemu_blk_case(true, "raw");
}

#[test]
fn blk_passes_under_qemu_virtio_mmio_qcow2() {
    require_kvm!();
    qemu_blk_case(true, "qcow2");
}

/// `blk-ro` against QEMU's read-only drive (which completes a DISCARD without effect).
#[test]
fn blk_ro_passes_under_qemu_over_both_transports() {
    require_kvm!();
    for (mmio, format) in [(false, "raw"), (true, "qcow2")] {
        let disk = Disk::new("blk-ro-qemu", format, final_byte, final_byte);
        let out = qemu_blk("keel.test=blk-ro", &disk, mmio, true);
        assert_pass(&out, "blk-ro", 1);
        assert_lines(&out, "blk-ro", BLK_RO_LINES);
        assert_lines(&out, "blk-ro", &["WRITE_ZEROES of block 64: IOERR"]);
        disk.assert_content();
    }
}

/// Every row of `blk-bench` runs (a few requests each; the figures are for benchmarks).
#[test]
fn blk_bench_runs_every_row_under_qemu() {
    require_kvm!();
    let disk = Disk::new("blk-bench-qemu", "raw", initial_byte, initial_byte);
    let out = qemu_blk("keel.test=blk-bench keel.blk_n=300", &disk, false, false);
    assert_pass(&out, "blk-bench", 1);
    assert_bench_rows(&out, 300);
}

fn assert_bench_rows(out: &Outcome, n: u32) {
    let rows: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| {
            l.starts_with("keel-test: blk-bench: begin ")
                || l.starts_with("keel-test: blk-bench: end ")
        })
        .collect();
    let mut want = Vec::new();
    for (kind, depth) in [
        ("randread", 1),
        ("randwrite", 1),
        ("randread", 32),
        ("randwrite", 32),
    ] {
        want.push(format!("keel-test: blk-bench: begin {kind} depth {depth}"));
        want.push(format!(
            "keel-test: blk-bench: end {kind} depth {depth} requests {n}"
        ));
    }
    assert_eq!(rows, want, "stdout:\n{}", out.stdout);
}

// ---------------------------------------------------------------------
// keel.

fn keel_blk(cmdline: &str, disk_opts: &str, mmio: bool) -> Outcome {
    let mut args = vec!["--memory", "128", "--cmdline", cmdline, "--disk", disk_opts];
    if mmio {
        args.extend(["--transport", "mmio"]);
    }
    run_keel(&args, LIMIT)
}

fn keel_blk_case(mmio: bool, format: &'static str) {
    let disk = Disk::new("blk-keel", format, initial_byte, final_byte);
    let opts = format!("path={},format={format}", s(&disk.image));
    let out = keel_blk("keel.test=blk", &opts, mmio);
    assert_pass(&out, "blk", 0);
    let found = if mmio {
        "found virtio-mmio version 2 at "
    } else {
        "found 1af4:1042 at 00:01.0 (device type 0x2)"
    };
    let mut lines = vec![
        found,
        "ID \"keel-disk0\"",
        "writeback toggled to 0 and back to 1",
    ];
    lines.extend_from_slice(BLK_LINES);
    assert_lines(&out, "blk", &lines);
    disk.assert_content();
}

#[test]
fn blk_passes_under_keel_virtio_pci_raw() {
    require_kvm!();
    keel_blk_case(false, "raw");
}

#[test]
fn blk_passes_under_keel_virtio_pci_qcow2() {
    require_kvm!();
    keel_blk_case(false, "qcow2");
}

#[test]
fn blk_passes_under_keel_virtio_mmio_raw() {
    require_kvm!();
    keel_blk_case(true, "raw");
}

#[test]
fn blk_passes_under_keel_virtio_mmio_qcow2() {
    require_kvm!();
    keel_blk_case(true, "qcow2");
}

#[test]
fn blk_ro_passes_under_keel_over_both_transports() {
    require_kvm!();
    for mmio in [false, true] {
        let disk = Disk::new("blk-ro-keel", "raw", final_byte, final_byte);
        let opts = format!("path={},format=raw,readonly=on", s(&disk.image));
        let out = keel_blk("keel.test=blk-ro", &opts, mmio);
        assert_pass(&out, "blk-ro", 0);
        assert_lines(&out, "blk-ro", BLK_RO_LINES);
        disk.assert_content();
    }
}

#[test]
fn blk_bench_runs_every_row_under_keel() {
    require_kvm!();
    let disk = Disk::new("blk-bench-keel", "raw", initial_byte, initial_byte);
    let opts = format!("path={},format=raw", s(&disk.image));
    let out = keel_blk("keel.test=blk-bench keel.blk_n=300", &opts, false);
    assert_pass(&out, "blk-bench", 0);
    assert_bench_rows(&out, 300);
}

/// `blk` with guest memory registered with io_uring (`memory=registered`, `O_DIRECT`):
/// the same lines and the same image as request by request.
#[test]
fn blk_passes_under_keel_with_registered_guest_memory() {
    require_kvm!();
    for format in ["raw", "qcow2"] {
        let disk = Disk::new(
            &format!("blk-registered-{format}"),
            format,
            initial_byte,
            final_byte,
        );
        let opts = format!(
            "path={},format={format},cache=none,memory=registered",
            s(&disk.image)
        );
        let out = keel_blk("keel.test=blk", &opts, false);
        assert_pass(&out, "blk", 0);
        assert_lines(&out, "blk", BLK_LINES);
        disk.assert_content();
    }
}

/// `memory=registered` beside a balloon is refused before the guest starts, saying why.
#[test]
fn registered_guest_memory_is_refused_with_a_balloon() {
    require_kvm!();
    let disk = Disk::new("blk-registered-balloon", "raw", initial_byte, initial_byte);
    let opts = format!("path={},format=raw,memory=registered", s(&disk.image));
    let out = run_keel(
        &[
            "--memory",
            "128",
            "--cmdline",
            "keel.test=blk",
            "--disk",
            &opts,
            "--balloon",
        ],
        LIMIT,
    );
    assert_ne!(out.code(), Some(0), "keel must refuse: {}", out.stderr);
    assert!(
        out.stderr
            .contains("memory=registered cannot be used with --balloon"),
        "stderr: {}",
        out.stderr
    );
    assert!(!out.stdout.contains("keel-test:"), "the guest must not run");
    disk.assert_content();
}

// ---------------------------------------------------------------------
// keel as an unprivileged user.

/// The unprivileged user and group (nobody, nogroup).
const NOBODY: u32 = 65534;

/// `blk` under keel run as uid/gid 65534 with no capabilities and no supplementary
/// groups, with access to /dev/kvm and its images and nothing else: in a private mount
/// namespace a device node for KVM (char 10:232) that the user owns is bind-mounted over
/// /dev/kvm (root:root 0600 here, left alone), and setpriv drops to the user. The serial
/// log is a file keel creates, so its owner shows who keel ran as.
fn keel_blk_as_nobody(format: &'static str) {
    let disk = Disk::new(
        &format!("blk-nobody-{format}"),
        format,
        initial_byte,
        final_byte,
    );
    let dir = disk.image.parent().unwrap().to_path_buf();
    for p in [&dir, &disk.image] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let node = dir.join("kvm");
    let serial = dir.join("serial.log");
    let setup = format!(
        "mknod {node} c 10 232 && chown {NOBODY}:{NOBODY} {node} && chmod 0600 {node} \
         && mount --bind {node} /dev/kvm \
         && exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups \
            --inh-caps=-all --bounding-set=-all \"$@\"",
        node = s(&node)
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &setup,
        "sh",
    ])
    .arg(env!("CARGO_BIN_EXE_keel"))
    .args([
        "--debug-exit",
        "--memory",
        "128",
        "--cmdline",
        "keel.test=blk",
    ])
    .arg(format!("--serial=file={}", s(&serial)))
    .arg(format!("--disk=path={},format={format}", s(&disk.image)));
    let run = support::Running::start(cmd).finish(LIMIT);
    let out = Outcome {
        status: run.status,
        stdout: std::fs::read_to_string(&serial).unwrap_or_default(),
        stderr: run.stderr,
    };
    assert_pass(&out, "blk", 0);
    assert_lines(&out, "blk", BLK_LINES);
    let log = std::fs::metadata(&serial).unwrap();
    assert_eq!(
        (log.uid(), log.gid()),
        (NOBODY, NOBODY),
        "keel ran as someone else"
    );
    disk.assert_content();
}

/// Setting up the namespace and the node takes root (CAP_SYS_ADMIN, CAP_MKNOD); the
/// test says so rather than skipping.
fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test runs keel as uid {NOBODY} in a private mount namespace and must start as root"
    );
}

#[test]
fn blk_passes_under_keel_as_an_unprivileged_user_raw() {
    require_kvm!();
    assert_root();
    keel_blk_as_nobody("raw");
}

#[test]
fn blk_passes_under_keel_as_an_unprivileged_user_qcow2() {
    require_kvm!();
    assert_root();
    keel_blk_as_nobody("qcow2");
}

// ---------------------------------------------------------------------
// blk-mq: queues 0 and 1 of a multi-queue device at once.

/// `blk-mq` writes blocks 0-511 (the first 2 MiB): the even ones through queue 0, the odd
/// ones through queue 1, then reads every block back through the other queue.
const MQ_BLOCKS: usize = 512;
const SECTOR: usize = 512;

/// Every byte of 512-byte sector `s` of the first 2 MiB after `blk-mq`
/// (crates/keel-test-guest/README.md, "blk-mq"): `s % 251 + 1`.
fn mq_byte(s: usize) -> u8 {
    (s % 251 + 1) as u8
}

/// An image holding `initial_byte` and a raw reference of what `blk-mq` leaves: the
/// sector pattern over the first 2 MiB, the rest untouched.
fn mq_disk(tag: &str) -> Disk {
    let disk = Disk::new(tag, "raw", initial_byte, initial_byte);
    let mut data = vec![0u8; DISK_BYTES];
    for (b, block) in data.chunks_mut(BLOCK).enumerate() {
        block.fill(initial_byte(b));
    }
    for (sector, bytes) in data[..MQ_BLOCKS * BLOCK].chunks_mut(SECTOR).enumerate() {
        bytes.fill(mq_byte(sector));
    }
    std::fs::write(&disk.reference, data).expect("write the blk-mq reference");
    disk
}

/// What `blk-mq` prints whatever the VMM and transport.
const BLK_MQ_LINES: &[&str] = &[
    "capacity 32768 sectors (16 MiB), blk_size 512,",
    "queue 1: 64 entries",
    "wrote blocks 0-511: the even ones through queue 0 (256 requests, at most 16 in flight), the odd ones through queue 1 (256 requests, at most 16 in flight); at most 32 in flight on both together$",
    "2 queues; queue 0: 512 requests, queue 1: 512 requests, at most 16 and 16 in flight at once$",
    "every block read back through the other queue$",
    "reset: status reads 0",
];

/// The lines that differ by transport: each queue's own MSI-X vector, or the one line.
fn mq_transport_lines(mmio: bool) -> &'static [&'static str] {
    if mmio {
        &[
            "queue 0 interrupt arrived when asked for (vector 0x52)$",
            "queue 1 interrupt arrived when asked for (vector 0x52)$",
        ]
    } else {
        &[
            "MSI-X entry 2 -> vector 0x53 (queue 1)$",
            "queue 0 interrupt arrived when asked for (vector 0x51)$",
            "queue 1 interrupt arrived when asked for (vector 0x53)$",
        ]
    }
}

fn assert_mq_lines(out: &Outcome, mmio: bool) {
    assert_lines(out, "blk-mq", BLK_MQ_LINES);
    assert_lines(out, "blk-mq", mq_transport_lines(mmio));
    // The num_queues field shows in the configuration line.
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("keel-test: blk-mq: capacity ")
                && l.trim_end().ends_with(", num_queues 2")),
        "num_queues 2 missing in:\n{}",
        out.stdout
    );
}

fn keel_blk_mq_case(mmio: bool) {
    let disk = mq_disk("blk-mq-keel");
    let opts = format!("path={},format=raw,queues=2", s(&disk.image));
    let out = keel_blk("keel.test=blk-mq", &opts, mmio);
    assert_pass(&out, "blk-mq", 0);
    assert_mq_lines(&out, mmio);
    disk.assert_content();
}

#[test]
fn blk_mq_passes_under_keel_virtio_pci() {
    require_kvm!();
    keel_blk_mq_case(false);
}

#[test]
fn blk_mq_passes_under_keel_virtio_mmio() {
    require_kvm!();
    keel_blk_mq_case(true);
}

fn qemu_blk_mq_case(mmio: bool) {
    let disk = mq_disk("blk-mq-qemu");
    let drive = format!(
        "file={},if=none,id=d0,format=raw,cache=none,aio=io_uring",
        s(&disk.image)
    );
    let (machine, device) = if mmio {
        (
            "microvm,acpi=off",
            "virtio-blk-device,drive=d0,num-queues=2",
        )
    } else {
        ("microvm,pcie=on", "virtio-blk-pci,drive=d0,num-queues=2")
    };
    let mut extra = vec!["-drive", drive.as_str(), "-device", device];
    if mmio {
        extra.extend(["-global", "virtio-mmio.force-legacy=false"]);
    }
    let out = support::qemu_guest_cmdline("keel.test=blk-mq", machine, 1, true, &extra, LIMIT);
    assert_pass(&out, "blk-mq", 1);
    assert_mq_lines(&out, mmio);
    disk.assert_content();
}

#[test]
fn blk_mq_passes_under_qemu_virtio_pci() {
    require_kvm!();
    qemu_blk_mq_case(false);
}

#[test]
fn blk_mq_passes_under_qemu_virtio_mmio() {
    require_kvm!();
    qemu_blk_mq_case(true);
}

/// Without MQ (one queue), `blk-mq` fails and says why.
#[test]
fn blk_mq_fails_clearly_without_mq_under_keel() {
    require_kvm!();
    let disk = Disk::new("blk-mq-1q", "raw", initial_byte, initial_byte);
    let opts = format!("path={},format=raw", s(&disk.image));
    let out = keel_blk("keel.test=blk-mq", &opts, false);
    let v = support::verdict(&out);
    assert!(
        v.len() == 1
            && v[0]
                .starts_with("keel-test: FAIL blk-mq: the device does not offer VIRTIO_BLK_F_MQ"),
        "verdict {v:?} in:\n{}",
        out.stdout
    );
    assert_eq!(out.code(), Some(1), "stdout:\n{}", out.stdout);
    disk.assert_content();
}

// ---------------------------------------------------------------------
// blk-qcow2-header: a guest writes a qcow2 header over sector 0 of a raw disk. On an
// image whose format was probed QEMU refuses it (so that the guest cannot choose the
// image's format for the next start), and so must keel; with format=raw both take it.

/// What `blk-qcow2-header` writes over block 0 first (crates/keel-test-guest/README.md).
const HEADER_BEFORE: u8 = 0x11;

/// Byte `i` of the block `blk-qcow2-header` then tries to write over block 0: a qcow2
/// version 3 header of a 1 TiB image with 64 KiB clusters, zeroes to byte 104, 0x22 after.
fn qcow2_header_byte(i: usize) -> u8 {
    const HEAD: [u8; 32] = [
        b'Q', b'F', b'I', 0xfb, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0,
        1, 0, 0, 0, 0, 0,
    ];
    match i {
        0..32 => HEAD[i],
        32..104 => 0,
        _ => 0x22,
    }
}

/// A raw image of `initial_byte` blocks, and its reference: block 0 as the guest leaves
/// it (`HEADER_BEFORE`, or the header when `taken`), the rest untouched.
fn header_disk(tag: &str, taken: bool) -> Disk {
    let disk = Disk::new(tag, "raw", initial_byte, initial_byte);
    let mut data = std::fs::read(&disk.reference).expect("read the reference");
    for (i, x) in data[..BLOCK].iter_mut().enumerate() {
        *x = if taken {
            qcow2_header_byte(i)
        } else {
            HEADER_BEFORE
        };
    }
    std::fs::write(&disk.reference, data).expect("write the reference");
    disk
}

/// What `blk-qcow2-header` prints when the header is refused or `taken`.
fn assert_header_lines(out: &Outcome, taken: bool) {
    let (status, block0) = if taken {
        ("OK", "block 0 reads back as the header$")
    } else {
        ("IOERR", "block 0 reads back unchanged$")
    };
    let sector = format!("OUT of a qcow2 header over sector 0 (512 bytes): {status}$");
    let block = format!("OUT of a qcow2 header over block 0 (4 KiB): {status}$");
    assert_lines(
        out,
        "blk-qcow2-header",
        &[
            "OUT of an ordinary block 0: OK$",
            &sector,
            &block,
            block0,
            "reset: status reads 0",
        ],
    );
}

/// The image, read by a host tool that probes: raw (the header was refused) or holding
/// the header's magic (it was taken; its tables are nonsense, so qemu-img would not
/// open it, but it would try as qcow2).
fn assert_header_outcome(disk: &Disk, taken: bool) {
    disk.assert_content();
    if taken {
        let data = std::fs::read(&disk.image).unwrap();
        assert_eq!(&data[..4], b"QFI\xfb");
    } else {
        let out = qemu_img(&["info", "--output=json", s(&disk.image)]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img info JSON");
        assert_eq!(v["format"], "raw", "qemu-img info:\n{out}");
        assert_eq!(
            v["virtual-size"], DISK_BYTES as u64,
            "qemu-img info:\n{out}"
        );
    }
}

fn keel_header_case(format: Option<&str>) {
    let taken = format.is_some();
    let disk = header_disk("blk-hdr-keel", taken);
    let mut opts = format!("path={}", s(&disk.image));
    if let Some(f) = format {
        opts += &format!(",format={f}");
    }
    let out = keel_blk("keel.test=blk-qcow2-header", &opts, false);
    assert_pass(&out, "blk-qcow2-header", 0);
    assert_header_lines(&out, taken);
    assert_header_outcome(&disk, taken);
}

#[test]
fn blk_qcow2_header_is_refused_on_a_probed_raw_disk_under_keel() {
    require_kvm!();
    keel_header_case(None);
}

#[test]
fn blk_qcow2_header_is_taken_with_format_raw_under_keel() {
    require_kvm!();
    keel_header_case(Some("raw"));
}

fn qemu_header_case(format: Option<&str>) {
    let taken = format.is_some();
    let disk = header_disk("blk-hdr-qemu", taken);
    let drive = format!(
        "file={},if=none,id=d0,cache=none,aio=io_uring{}",
        s(&disk.image),
        format.map(|f| format!(",format={f}")).unwrap_or_default()
    );
    let (machine, device) = qemu_transport(false);
    let mut extra = vec!["-drive", drive.as_str()];
    extra.extend(device);
    let out = support::qemu_guest_cmdline(
        "keel.test=blk-qcow2-header",
        machine,
        1,
        true,
        &extra,
        LIMIT,
    );
    assert_pass(&out, "blk-qcow2-header", 1);
    assert_header_lines(&out, taken);
    assert_header_outcome(&disk, taken);
}

/// The peer: QEMU refuses the header on a drive whose format it probed...
#[test]
fn blk_qcow2_header_is_refused_on_a_probed_raw_disk_under_qemu() {
    require_kvm!();
    qemu_header_case(None);
}

/// ... and takes it with format=raw.
#[test]
fn blk_qcow2_header_is_taken_with_format_raw_under_qemu() {
    require_kvm!();
    qemu_header_case(Some("raw"));
}

//! virtio-blk benchmark: keel against QEMU on the same images, the project's test guest
//! running its `blk-bench` scenario (4 KiB random reads and writes, depth 1 and 32,
//! polled at CPL3) in both.
//!
//! `cargo bench -p keel-vmm --bench blk [-- REQUESTS [RUNS]]` (default 20000 requests per
//! row, 3 runs; the median is reported)
//!
//! Images: a raw and a qcow2 image of 256 MiB, fully written first (so reads hit data,
//! not holes), in target/bench-blk. keel: `--disk path=IMG,format=F,cache=none` (virtio-pci,
//! io_uring). QEMU: `-M microvm,pcie=on`, `-drive ...,cache=none,aio=io_uring` with
//! `virtio-blk-pci` on an iothread (`-object iothread,id=io0`, `iothread=io0`: QEMU's
//! dataplane, which it recommends for I/O). Each row is timed on the host from the arrival of the guest's
//! `begin`/`end` lines on the serial console; the guest's own TSC-timed figure is shown
//! beside it where it could calibrate its TSC.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: [&str; 4] = [
    "randread depth 1",
    "randwrite depth 1",
    "randread depth 32",
    "randwrite depth 32",
];

/// Host-timed and guest-timed IOPS of each row.
type Result4 = [(f64, Option<f64>); 4];

fn sh(cmd: &mut Command) {
    let st = cmd.status().expect("run");
    assert!(st.success(), "{cmd:?} failed");
}

fn image(dir: &Path, fmt: &str) -> PathBuf {
    let p = dir.join(format!("disk.{fmt}"));
    if !p.exists() {
        sh(Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(&p)
            .arg("256M"));
        sh(Command::new("qemu-io")
            .args(["-f", fmt, "-c", "write -P 0x5a 0 256M"])
            .arg(&p)
            .stdout(Stdio::null()));
    }
    p
}

fn run(mut cmd: Command, requests: u64) -> Result4 {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut begin = [None; 4];
    let mut result: Result4 = [(0.0, None); 4];
    let mut log = String::new();
    for line in out.lines() {
        let line = line.unwrap();
        let now = Instant::now();
        log.push_str(&line);
        log.push('\n');
        let Some(rest) = line.strip_prefix("keel-test: blk-bench: ") else {
            continue;
        };
        for (i, row) in ROWS.iter().enumerate() {
            if rest == format!("begin {row}") {
                begin[i] = Some(now);
            } else if rest == format!("end {row} requests {requests}") {
                let t: Duration = now - begin[i].expect("end before begin");
                result[i].0 = requests as f64 / t.as_secs_f64();
            } else if let Some(v) = rest
                .strip_prefix(&format!("{row}: "))
                .and_then(|r| r.strip_suffix(" IOPS"))
                .and_then(|r| r.rsplit(' ').next())
            {
                result[i].1 = v.parse().ok();
            }
        }
    }
    let _ = child.wait();
    assert!(
        log.contains("keel-test: PASS blk-bench"),
        "the guest failed:\n{log}"
    );
    result
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let requests: u64 = args.first().map_or(20000, |a| a.parse().expect("REQUESTS"));
    let runs: usize = args.get(1).map_or(3, |a| a.parse().expect("RUNS"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/bench-blk");
    std::fs::create_dir_all(&dir).unwrap();
    let guest = env!("KEEL_TEST_GUEST");
    let cmdline = format!("keel.test=blk-bench keel.blk_n={requests}");
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 --version");
    let qemu = String::from_utf8_lossy(&qemu.stdout);
    println!("blk-bench, {requests} requests per row, median of {runs} runs");
    println!("peer: {}", qemu.lines().next().unwrap_or("unknown QEMU"));
    println!("| format | row | keel IOPS (host-timed) | QEMU IOPS (host-timed) | keel / QEMU | keel (guest TSC) | QEMU (guest TSC) |");
    println!("|---|---|--:|--:|--:|--:|--:|");
    for fmt in ["raw", "qcow2"] {
        let img = image(&dir, fmt);
        let mut keel_runs = Vec::new();
        let mut qemu_runs = Vec::new();
        for _ in 0..runs {
            let mut k = Command::new(env!("CARGO_BIN_EXE_keel"));
            k.args([
                "--debug-exit",
                "--memory",
                "256",
                "--serial",
                "stdio",
                "--cmdline",
                &cmdline,
            ])
            .arg("--disk")
            .arg(format!("path={},format={fmt},cache=none", img.display()));
            keel_runs.push(run(k, requests));
            let mut q = Command::new("qemu-system-x86_64");
            q.args([
                "-enable-kvm",
                "-M",
                "microvm,pcie=on",
                "-cpu",
                "kvm64",
                "-m",
                "256",
                "-smp",
                "1",
                "-display",
                "none",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel",
                guest,
                "-append",
                &cmdline,
                "-drive",
            ])
            .arg(format!(
                "file={},if=none,id=d0,format={fmt},cache=none,aio=io_uring",
                img.display()
            ))
            .args(["-object", "iothread,id=io0"])
            .args(["-device", "virtio-blk-pci,drive=d0,iothread=io0"]);
            qemu_runs.push(run(q, requests));
        }
        for (i, row) in ROWS.iter().enumerate() {
            let k = median(keel_runs.iter().map(|r| r[i].0).collect());
            let q = median(qemu_runs.iter().map(|r| r[i].0).collect());
            let guest_fig = |runs: &[Result4]| {
                let v: Vec<f64> = runs.iter().filter_map(|r| r[i].1).collect();
                if v.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", median(v))
                }
            };
            println!(
                "| {fmt} | {row} | {k:.0} | {q:.0} | {:.2} | {} | {} |",
                k / q,
                guest_fig(&keel_runs),
                guest_fig(&qemu_runs)
            );
        }
    }
}

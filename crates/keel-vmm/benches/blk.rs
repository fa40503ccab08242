//! virtio-blk benchmark: keel against QEMU on the same images, the project's test guest
//! running its `blk-bench` scenario (4 KiB random reads and writes, depth 1 and 32,
//! polled at CPL3) in both.
//!
//! `cargo bench -p keel-vmm --bench blk [-- REQUESTS [RUNS]] [--place VCPU:IO]` (default
//! 20000 requests per row, 3 runs; the median is reported). `--place`: both VMMs' vCPU on
//! host CPU VCPU and their disk I/O thread on IO (keel `--vcpu-affinity`, `affinity=`;
//! QEMU's threads moved by name), e.g. IO the CPU that takes the host disk's interrupts.
//!
//! Images: a raw and a qcow2 image of 256 MiB, fully written first (so reads hit data,
//! not holes), in target/bench-blk. keel: `--disk path=IMG,format=F,cache=none` (virtio-pci,
//! io_uring). QEMU: `-M microvm,pcie=on`, `-drive ...,cache=none,aio=io_uring` with
//! `virtio-blk-pci` on an iothread (`-object iothread,id=io0`, `iothread=io0`: QEMU's
//! dataplane, which it recommends for I/O). Each row is timed on the host from the arrival of the
//! guest's `begin`/`end` lines on the serial console; the guest's own TSC-timed figure is
//! shown beside it where it could calibrate its TSC (see `measure::blk`).

mod measure;

use measure::blk::{self, RunIops, ROWS};
use measure::median;

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let place = all.iter().position(|a| a == "--place").map(|i| {
        all.get(i + 1)
            .and_then(|p| blk::Place::parse(p))
            .expect("--place takes VCPU:IO, two host CPU numbers")
    });
    let args: Vec<String> = all
        .iter()
        .enumerate()
        // Positional: neither a flag nor --place's value.
        .filter(|&(i, a)| !a.starts_with('-') && (i == 0 || all[i - 1] != "--place"))
        .map(|(_, a)| a.clone())
        .collect();
    let requests: u64 = args.first().map_or(20000, |a| a.parse().expect("REQUESTS"));
    let runs: usize = args.get(1).map_or(3, |a| a.parse().expect("RUNS"));
    let dir = blk::image_dir();
    println!("blk-bench, {requests} requests per row, median of {runs} runs");
    if let Some(p) = place {
        println!(
            "threads placed: vCPU on CPU {}, disk I/O thread on CPU {}",
            p.vcpu, p.io
        );
    }
    println!("peer: {}", measure::qemu_version());
    println!("| format | row | keel IOPS (host-timed) | QEMU IOPS (host-timed) | keel / QEMU | keel (guest TSC) | QEMU (guest TSC) |");
    println!("|---|---|--:|--:|--:|--:|--:|");
    for fmt in blk::FORMATS {
        let img = blk::image(&dir, fmt);
        let mut keel_runs = Vec::new();
        let mut qemu_runs = Vec::new();
        for _ in 0..runs {
            keel_runs.push(blk::run(
                blk::keel(&img, fmt, requests, place),
                requests,
                None,
            ));
            qemu_runs.push(blk::run(blk::qemu(&img, fmt, requests), requests, place));
        }
        for (i, row) in ROWS.iter().enumerate() {
            let k = median(keel_runs.iter().map(|r| r[i].host).collect());
            let q = median(qemu_runs.iter().map(|r| r[i].host).collect());
            let guest_fig = |runs: &[RunIops]| {
                let v: Vec<f64> = runs.iter().filter_map(|r| r[i].guest).collect();
                if v.is_empty() {
                    "-".to_string()
                } else {
                    format!("{:.0}", median(v))
                }
            };
            println!(
                "| {fmt} | {} | {k:.0} | {q:.0} | {:.2} | {} | {} |",
                row.name(),
                k / q,
                guest_fig(&keel_runs),
                guest_fig(&qemu_runs)
            );
        }
    }
}

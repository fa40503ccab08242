//! virtio-net benchmark: keel against QEMU with the same guest (the project's test guest,
//! scenarios `net-bench` then `net-serve`) on the same tap, in one run, interleaved (keel,
//! QEMU, keel, QEMU, ...; one VM a run; the median of the runs is reported):
//!
//! * guest to host, UDP packets/s with 64-byte payloads (counted on the host as they arrive,
//!   timed from the first to the last);
//! * host to guest, UDP packets/s with 64-byte payloads (sent by the host as fast as it can
//!   to the guest's discard port; counted by the guest, read from its statistics port);
//! * TCP Gbit/s, host to guest (discard, port 9) and guest to host (chargen, port 19).
//!
//! `sudo cargo bench -p keel-vmm --bench net [-- DATAGRAMS [RUNS [MIB]]]` (default 100000
//! datagrams each way, 5 runs, 64 MiB each way over TCP). It needs root (a network
//! namespace of its own with a tap, `ip netns add`, as tests/guest_net.rs) and /dev/kvm.
//!
//! keel: `--net tap=tap0` (virtio-pci). QEMU: `-M microvm,pcie=on`, `virtio-net-pci` on
//! `-netdev tap,...,vhost=off` (userspace virtio-net; these machines have no
//! /dev/vhost-net). See `measure::net` for how each figure is taken.

mod measure;

use measure::median;
use measure::net::{self, NetRun};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: u64 = args
        .first()
        .map_or(100_000, |a| a.parse().expect("DATAGRAMS"));
    let runs: usize = args.get(1).map_or(5, |a| a.parse().expect("RUNS"));
    let mib: usize = args.get(2).map_or(64, |a| a.parse().expect("MIB"));
    if !measure::kvm_available() || !keel_testutil::netns::netns_available() {
        eprintln!("net bench: needs /dev/kvm and root (network namespaces, taps)");
        std::process::exit(1);
    }
    println!(
        "net-bench: {n} datagrams of {} bytes each way, {mib} MiB each way over TCP, median of {runs} runs",
        net::UDP_SIZE
    );
    println!(
        "peer: {}, virtio-net-pci, vhost=off",
        measure::qemu_version()
    );
    let (keel, qemu) = net::compare(runs, n, mib << 20);
    print_table(&keel, &qemu);
}

fn print_table(keel: &[NetRun], qemu: &[NetRun]) {
    println!("| row | unit | keel | QEMU | keel / QEMU | goal met |");
    println!("|---|---|--:|--:|--:|:-:|");
    for (name, unit, f) in net::ROWS {
        let k = median(keel.iter().map(f).collect());
        let q = median(qemu.iter().map(f).collect());
        let prec = if unit == "Gbit/s" { 3 } else { 0 };
        let want = net::goal(unit);
        println!(
            "| {name} | {unit} | {k:.prec$} | {q:.prec$} | {:.2} | >= {want}: {} |",
            k / q,
            if k / q >= want { "yes" } else { "no" }
        );
    }
    let lost = |v: &[NetRun], f: fn(&NetRun) -> u64| v.iter().map(f).sum::<u64>();
    let guest = |v: &[NetRun]| {
        let g: Vec<f64> = v.iter().filter_map(|r| r.tx_pps_guest).collect();
        if g.is_empty() {
            "-".to_string()
        } else {
            format!("{:.0}", median(g))
        }
    };
    println!(
        "datagrams lost over all runs, guest to host / host to guest: keel {} / {}, QEMU {} / {}",
        lost(keel, |r| r.tx_lost),
        lost(keel, |r| r.rx_lost),
        lost(qemu, |r| r.tx_lost),
        lost(qemu, |r| r.rx_lost)
    );
    println!(
        "guest to host as the guest timed it (guest TSC, packets/s): keel {}, QEMU {}",
        guest(keel),
        guest(qemu)
    );
}

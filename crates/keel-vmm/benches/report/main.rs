//! The benchmark report: every keel-vs-QEMU comparison in one sitting, with fio as the
//! machine's own I/O limit, written as a Markdown table and SVG charts into
//! target/bench-report/.
//!
//! `cargo bench -p keel-vmm --bench report -- [--quick] [--runs N] [--place VCPU:IO] [--publish]`
//!
//! - boot: the trivial PVH guest (prints a line, exits), 1 vCPU, 128 MiB: start
//!   to first serial output, start to exit, peak RSS (`measure::boot`);
//! - blk: the test guest's blk-bench on a raw and a qcow2 image, every row keel against
//!   QEMU with its iothread, and fio (io_uring, O_DIRECT) on the raw image file at the row's
//!   depth (`measure::blk`, `measure::fio`);
//! - density: 32 idle VMs of 128 MiB at once, time until all run, RSS and PSS
//!   (`measure::density`);
//! - net: the test guest on a tap in a network namespace of its own, UDP packets/s with
//!   64-byte payloads both ways and TCP Gbit/s both ways, keel against QEMU's
//!   virtio-net-pci with vhost=off (`measure::net`; needs root, else the section says it
//!   was skipped).
//!
//! Runs are interleaved (keel, QEMU, keel, ...) so that a change in the host's load
//! touches both alike; every figure is the median of its runs. Default: boot 20 runs,
//! blk 3 runs of 20000 requests per row, density 3 runs (13 minutes on the project's
//! 2-core machine at a load average of 10, nearly all in the depth-1 blk rows), net 3 runs
//! of 100000 datagrams each way and 64 MiB each way over TCP.
//! `--quick`: boot 5, blk 1 run of 5000 requests, density 1 run (76 s at that load), net
//! 1 run of 20000 datagrams and 16 MiB.
//! `--place VCPU:IO` runs the blk rows with both VMMs' vCPU on host CPU VCPU and their disk
//! I/O thread on IO (see `measure::blk::Place`; fio is not placed). `--runs N` sets every
//! run count. `--publish` also copies the table and the charts into benches/report/ and
//! replaces the README's Performance figures (between its `bench-report` markers) with
//! the new ones.

#[path = "../measure/mod.rs"]
mod measure;

mod chart;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chart::{Panel, Series};
use measure::blk::{self, ROWS};
use measure::boot;
use measure::density;
use measure::net::{self, NetRun};
use measure::{fio, median};

/// How much to run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    boot_runs: usize,
    blk_runs: usize,
    blk_requests: u64,
    density_runs: usize,
    net_runs: usize,
    net_datagrams: u64,
    net_mib: usize,
    quick: bool,
    /// `--place VCPU:IO`: where both VMMs' vCPU and disk I/O thread run in the blk rows.
    place: Option<blk::Place>,
    /// `--runs N`, if given.
    runs: Option<usize>,
}

impl Plan {
    fn from_args() -> (Plan, bool) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick");
        let publish = args.iter().any(|a| a == "--publish");
        let runs: Option<usize> = args.iter().position(|a| a == "--runs").map(|i| {
            args.get(i + 1)
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0)
                .expect("--runs takes a positive number")
        });
        let mut plan = if quick {
            Plan {
                boot_runs: 5,
                blk_runs: 1,
                blk_requests: 5000,
                density_runs: 1,
                net_runs: 1,
                net_datagrams: 20_000,
                net_mib: 16,
                quick,
                place: None,
                runs,
            }
        } else {
            Plan {
                boot_runs: 20,
                blk_runs: 3,
                blk_requests: 20000,
                density_runs: 3,
                net_runs: 3,
                net_datagrams: 100_000,
                net_mib: 64,
                quick,
                place: None,
                runs,
            }
        };
        plan.place = args.iter().position(|a| a == "--place").map(|i| {
            args.get(i + 1)
                .and_then(|p| blk::Place::parse(p))
                .expect("--place takes VCPU:IO, two host CPU numbers")
        });
        if let Some(n) = runs {
            plan.boot_runs = n;
            plan.blk_runs = n;
            plan.density_runs = n;
            plan.net_runs = n;
        }
        (plan, publish)
    }
}

/// Medians of the boot comparison.
struct BootFigures {
    keel: boot::Medians,
    qemu: boot::Medians,
}

/// Medians of one blk row.
struct BlkRow {
    format: &'static str,
    row: blk::Row,
    keel: f64,
    qemu: f64,
    fio: f64,
}

/// Medians of the net comparison, a row each (`net::ROWS`): (keel, QEMU). None when
/// this process cannot make network namespaces.
type NetFigures = Option<Vec<(f64, f64)>>;

/// Medians of the density comparison: (all running, total RSS KiB, total PSS KiB).
struct DensityFigures {
    keel: (Duration, u64, u64),
    qemu: (Duration, u64, u64),
}

fn main() {
    if !measure::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    let (plan, publish) = Plan::from_args();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("target/bench-report");
    std::fs::create_dir_all(&out).expect("create target/bench-report");
    let began = Instant::now();
    let load_before = loadavg();
    let qemu = measure::qemu_version();

    eprintln!("boot: {} runs each", plan.boot_runs);
    let boot = boot_figures(plan.boot_runs);
    eprintln!(
        "blk: {} runs, {} requests per row",
        plan.blk_runs, plan.blk_requests
    );
    let blk = blk_figures(plan.blk_runs, plan.blk_requests, plan.place);
    eprintln!("density: {} runs", plan.density_runs);
    let density = density_figures(plan.density_runs);
    let net = net_figures(&plan);
    let took = began.elapsed();

    let mut md = String::new();
    let header = Header {
        plan,
        qemu: &qemu,
        load_before,
        load_after: loadavg(),
        took,
    };
    header.write(&mut md);
    write_goals(&mut md, &boot);
    write_boot(&mut md, &boot, &qemu);
    write_blk(&mut md, &blk, plan.place);
    write_density(&mut md, &density);
    write_net(&mut md, &net, &plan);
    std::fs::write(out.join("report.md"), &md).expect("write report.md");
    charts(&out, &boot, &blk, &density, &net).expect("write the charts");
    println!("{md}");
    println!(
        "written: {}",
        out.canonicalize().unwrap_or(out.clone()).display()
    );
    if publish {
        publish_report(&root, &out, &md);
    }
}

fn boot_figures(runs: usize) -> BootFigures {
    let dir = keel_testutil::TempDir::new("keel-bench-report");
    let guest = boot::trivial_guest(dir.path());
    let guest = guest.to_str().unwrap();
    let (mut keel, mut qemu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        keel.push(boot::run(
            &mut boot::keel("split", "on", guest, ""),
            boot::TRIVIAL_EXPECT,
        ));
        qemu.push(boot::run(&mut boot::qemu(guest, ""), boot::TRIVIAL_EXPECT));
    }
    BootFigures {
        keel: boot::Medians::of(&keel),
        qemu: boot::Medians::of(&qemu),
    }
}

fn blk_figures(runs: usize, requests: u64, place: Option<blk::Place>) -> Vec<BlkRow> {
    let dir = blk::image_dir();
    let raw = blk::image(&dir, "raw");
    // The limit: fio on the raw image's file (it writes into it as the guests do; a qcow2
    // file would lose its metadata), once per run, interleaved with the VMMs.
    let mut fio_runs = Vec::new();
    let mut rows = Vec::new();
    for fmt in blk::FORMATS {
        let img = blk::image(&dir, fmt);
        let (mut keel, mut qemu) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            eprintln!("blk: {fmt}, run {run} of {runs}");
            keel.push(blk::run(
                blk::keel(&img, fmt, requests, place),
                requests,
                None,
            ));
            qemu.push(blk::run(blk::qemu(&img, fmt, requests), requests, place));
            fio_runs.push(ROWS.map(|row| fio::iops(&raw, row, requests)));
        }
        for (i, row) in ROWS.iter().enumerate() {
            rows.push(BlkRow {
                format: fmt,
                row: *row,
                keel: median(keel.iter().map(|r| r[i].host).collect()),
                qemu: median(qemu.iter().map(|r| r[i].host).collect()),
                fio: 0.0,
            });
        }
    }
    for r in &mut rows {
        let i = ROWS.iter().position(|x| x.name() == r.row.name()).unwrap();
        r.fio = median(fio_runs.iter().map(|f| f[i]).collect());
    }
    rows
}

fn density_figures(runs: usize) -> DensityFigures {
    let dir = keel_testutil::TempDir::new("keel-bench-report-density");
    let guest = density::idle_guest(dir.path());
    let (mut keel, mut qemu) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        eprintln!("density: run {run} of {runs}");
        keel.push(density::run(density::VMS, || density::keel(&guest)));
        qemu.push(density::run(density::VMS, || density::qemu(&guest)));
    }
    let m = |s: &[density::Sample]| {
        (
            median(s.iter().map(|x| x.all_running).collect()),
            median(s.iter().map(|x| x.rss_kib).collect()),
            median(s.iter().map(|x| x.pss_kib).collect()),
        )
    };
    DensityFigures {
        keel: m(&keel),
        qemu: m(&qemu),
    }
}

fn net_figures(plan: &Plan) -> NetFigures {
    if !keel_testutil::netns::netns_available() {
        eprintln!("net: skipped (needs root for a network namespace and a tap)");
        return None;
    }
    eprintln!(
        "net: {} runs, {} datagrams, {} MiB",
        plan.net_runs, plan.net_datagrams, plan.net_mib
    );
    let (keel, qemu) = net::compare(plan.net_runs, plan.net_datagrams, plan.net_mib << 20);
    let m = |v: &[NetRun], f: fn(&NetRun) -> f64| median(v.iter().map(f).collect());
    Some(
        net::ROWS
            .iter()
            .map(|&(_, _, f)| (m(&keel, f), m(&qemu, f)))
            .collect(),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: impl Into<f64>) -> f64 {
    kib.into() / 1024.0
}

struct Header<'a> {
    plan: Plan,
    qemu: &'a str,
    load_before: String,
    load_after: String,
    took: Duration,
}

impl Header<'_> {
    fn write(&self, md: &mut String) {
        let p = &self.plan;
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        // The command as given, but --publish.
        let mut flags = String::new();
        if p.quick {
            flags.push_str(" --quick");
        }
        if let Some(n) = p.runs {
            let _ = write!(flags, " --runs {n}");
        }
        if let Some(pl) = p.place {
            let _ = write!(flags, " --place {}:{}", pl.vcpu, pl.io);
        }
        let mode = if flags.is_empty() {
            String::new()
        } else {
            format!(" --{flags}")
        };
        let _ = writeln!(
            md,
            "Made by `cargo bench -p keel-vmm --bench report{mode}` in {:.0} s: boot {} runs, \
             blk {} runs of {} requests per row, density {} runs, net {} runs of {} datagrams \
             and {} MiB; medians, runs interleaved. \
             Host: {cpus} CPUs, Linux {}, load average {} before and {} after. \
             Peer: {}; {}.\n",
            self.took.as_secs_f64(),
            p.boot_runs,
            p.blk_runs,
            p.blk_requests,
            p.density_runs,
            p.net_runs,
            p.net_datagrams,
            p.net_mib,
            kernel.trim(),
            self.load_before,
            self.load_after,
            self.qemu,
            fio::version(),
        );
    }
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "no"
    }
}

fn write_goals(md: &mut String, boot: &BootFigures) {
    let _ = writeln!(md, "### Goals (issue 18)\n");
    let _ = writeln!(md, "| goal | figure | met |\n|---|--:|:-:|");
    let exit = ms(boot.keel.exit);
    let _ = writeln!(
        md,
        "| trivial guest start to exit ≤ 5 ms | {exit:.2} ms | {} |",
        yes(exit <= 5.0)
    );
    let rss = mib(boot.keel.max_rss_kib as f64);
    let _ = writeln!(
        md,
        "| its peak RSS ≤ 2.5 MiB | {rss:.2} MiB | {} |",
        yes(rss <= 2.5)
    );
    let _ = writeln!(
        md,
        "\nThe block I/O goals (≥ 0.85 × fio on every row; ≥ 1.5 × QEMU with its iothread at \
         depth 1, ≥ 1.2 × at depth 32) are in the block I/O table.\n"
    );
}

fn write_boot(md: &mut String, b: &BootFigures, qemu: &str) {
    let _ = writeln!(
        md,
        "### Boot: trivial PVH guest (prints a line, exits), 1 vCPU, {} MiB\n",
        boot::MEMORY_MIB
    );
    let _ = writeln!(
        md,
        "| VMM | start to first output (ms) | start to exit (ms) | peak RSS (MiB) |\n|---|--:|--:|--:|"
    );
    for (name, m) in [
        ("keel", &b.keel),
        (&*format!("QEMU {} microvm", short_version(qemu)), &b.qemu),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {:.2} | {:.2} | {:.2} |",
            ms(m.first_byte),
            ms(m.exit),
            mib(m.max_rss_kib as f64)
        );
    }
    let _ = writeln!(md);
}

fn write_blk(md: &mut String, rows: &[BlkRow], place: Option<blk::Place>) {
    let _ = writeln!(
        md,
        "### Block I/O: test guest blk-bench, 4 KiB random requests on a 256 MiB image (IOPS, host-timed)\n"
    );
    if let Some(p) = place {
        let _ = writeln!(
            md,
            "Threads placed (`--place {}:{}`): each VMM's vCPU on host CPU {}, its disk I/O \
             thread (keel's queue worker, QEMU's iothread) on CPU {}; fio is not placed.\n",
            p.vcpu, p.io, p.vcpu, p.io
        );
    }
    let _ = writeln!(
        md,
        "| format | row | keel | QEMU (iothread) | fio (io_uring, O_DIRECT) | keel / QEMU | goal met | keel / fio | goal met |\n|---|---|--:|--:|--:|--:|:-:|--:|:-:|"
    );
    for r in rows {
        let want = if r.row.depth == 1 { 1.5 } else { 1.2 };
        let (of_qemu, of_fio) = (r.keel / r.qemu, r.keel / r.fio);
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {of_qemu:.2} | ≥ {want}: {} | {of_fio:.2} | ≥ 0.85: {} |",
            r.format,
            r.row.name(),
            r.keel,
            r.qemu,
            r.fio,
            yes(of_qemu >= want),
            yes(of_fio >= 0.85),
        );
    }
    let _ = writeln!(
        md,
        "\nfio runs on the raw image's file (for the qcow2 rows too: the host's limit is the same).\n"
    );
}

fn write_density(md: &mut String, d: &DensityFigures) {
    let n = density::VMS;
    let _ = writeln!(
        md,
        "### Density: {n} VMs of {} MiB started at once, idle guest\n",
        density::MEMORY_MIB
    );
    let _ = writeln!(
        md,
        "| VMM | all {n} running (ms) | total RSS (MiB) | total PSS (MiB) | per-VM RSS (MiB) | per-VM PSS (MiB) |\n|---|--:|--:|--:|--:|--:|"
    );
    for (name, (t, rss, pss)) in [("keel", d.keel), ("QEMU microvm", d.qemu)] {
        let _ = writeln!(
            md,
            "| {name} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} |",
            ms(t),
            mib(rss as f64),
            mib(pss as f64),
            mib(rss as f64) / n as f64,
            mib(pss as f64) / n as f64
        );
    }
    let _ = writeln!(
        md,
        "\nRSS counts every resident page a process maps, the shared binary and libraries in \
         full in each; PSS divides shared pages among the processes that map them.\n"
    );
}

fn write_net(md: &mut String, net: &NetFigures, plan: &Plan) {
    let _ = writeln!(
        md,
        "### Network: test guest on a tap, keel `--net tap=` against QEMU virtio-net-pci (vhost=off)\n"
    );
    let Some(rows) = net else {
        let _ = writeln!(
            md,
            "Skipped: making a network namespace and a tap needs root.\n"
        );
        return;
    };
    let _ = writeln!(
        md,
        "| row | unit | keel | QEMU | keel / QEMU | goal met |\n|---|---|--:|--:|--:|:-:|"
    );
    for (&(name, unit, _), &(k, q)) in net::ROWS.iter().zip(rows) {
        let prec = if unit == "Gbit/s" { 3 } else { 0 };
        let want = net::goal(unit);
        let _ = writeln!(
            md,
            "| {name} | {unit} | {k:.prec$} | {q:.prec$} | {:.2} | ≥ {want}: {} |",
            k / q,
            yes(k / q >= want)
        );
    }
    let _ = writeln!(
        md,
        "\n{} datagrams each way, {} MiB each way over TCP (`cargo bench -p keel-vmm --bench net` \
         for the datagrams lost and the guest's own figure).\n",
        plan.net_datagrams, plan.net_mib
    );
}

/// `10.0.2` out of `QEMU emulator version 10.0.2 (Debian ...)`.
fn short_version(qemu: &str) -> &str {
    qemu.split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or("")
}

fn charts(
    out: &Path,
    boot: &BootFigures,
    blk: &[BlkRow],
    d: &DensityFigures,
    net: &NetFigures,
) -> Result<(), Box<dyn std::error::Error>> {
    chart::write(
        &out.join("boot.svg"),
        960,
        380,
        &[
            Panel {
                title: "Boot, trivial guest: time (lower is better)",
                y_desc: "ms",
                groups: vec!["start to first output".into(), "start to exit".into()],
                series: vec![
                    Series {
                        name: "keel",
                        color: chart::KEEL,
                        values: vec![ms(boot.keel.first_byte), ms(boot.keel.exit)],
                    },
                    Series {
                        name: "QEMU microvm",
                        color: chart::QEMU,
                        values: vec![ms(boot.qemu.first_byte), ms(boot.qemu.exit)],
                    },
                ],
                decimals: 1,
            },
            Panel {
                title: "Boot: peak RSS (lower is better)",
                y_desc: "MiB",
                groups: vec!["peak RSS".into()],
                series: vec![
                    Series {
                        name: "keel",
                        color: chart::KEEL,
                        values: vec![mib(boot.keel.max_rss_kib as f64)],
                    },
                    Series {
                        name: "QEMU microvm",
                        color: chart::QEMU,
                        values: vec![mib(boot.qemu.max_rss_kib as f64)],
                    },
                ],
                decimals: 1,
            },
        ],
    )?;
    let kiops = |f: fn(&BlkRow) -> f64| blk.iter().map(|r| f(r) / 1e3).collect::<Vec<_>>();
    chart::write(
        &out.join("blk.svg"),
        1100,
        420,
        &[Panel {
            title: "virtio-blk, 4 KiB random I/O (higher is better)",
            y_desc: "thousand IOPS",
            groups: blk
                .iter()
                .map(|r| {
                    format!(
                        "{} {} QD{}",
                        r.format,
                        r.row.op.trim_start_matches("rand"),
                        r.row.depth
                    )
                })
                .collect(),
            series: vec![
                Series {
                    name: "keel",
                    color: chart::KEEL,
                    values: kiops(|r| r.keel),
                },
                Series {
                    name: "QEMU (iothread)",
                    color: chart::QEMU,
                    values: kiops(|r| r.qemu),
                },
                Series {
                    name: "fio on the host",
                    color: chart::LIMIT,
                    values: kiops(|r| r.fio),
                },
            ],
            decimals: 1,
        }],
    )?;
    let n = density::VMS as f64;
    chart::write(
        &out.join("density.svg"),
        960,
        380,
        &[
            Panel {
                title: "32 idle VMs: time until all run (lower is better)",
                y_desc: "s",
                groups: vec!["all running".into()],
                series: vec![
                    Series {
                        name: "keel",
                        color: chart::KEEL,
                        values: vec![d.keel.0.as_secs_f64()],
                    },
                    Series {
                        name: "QEMU microvm",
                        color: chart::QEMU,
                        values: vec![d.qemu.0.as_secs_f64()],
                    },
                ],
                decimals: 2,
            },
            Panel {
                title: "32 idle VMs: host memory per VM (lower is better)",
                y_desc: "MiB",
                groups: vec!["RSS".into(), "PSS".into()],
                series: vec![
                    Series {
                        name: "keel",
                        color: chart::KEEL,
                        values: vec![mib(d.keel.1 as f64) / n, mib(d.keel.2 as f64) / n],
                    },
                    Series {
                        name: "QEMU microvm",
                        color: chart::QEMU,
                        values: vec![mib(d.qemu.1 as f64) / n, mib(d.qemu.2 as f64) / n],
                    },
                ],
                decimals: 2,
            },
        ],
    )?;
    if let Some(rows) = net {
        // The rates as a share of QEMU's: packets/s and Gbit/s on one axis.
        let panel = |title, unit: &'static str, scale: f64, decimals| {
            let pick = |side: fn(&(f64, f64)) -> f64| {
                net::ROWS
                    .iter()
                    .zip(rows)
                    .filter(|(r, _)| r.1 == unit)
                    .map(|(_, v)| side(v) / scale)
                    .collect::<Vec<_>>()
            };
            Panel {
                title,
                y_desc: if unit == "Gbit/s" {
                    "Gbit/s"
                } else {
                    "thousand packets/s"
                },
                groups: net::ROWS
                    .iter()
                    .filter(|r| r.1 == unit)
                    .map(|r| r.0.to_string())
                    .collect(),
                series: vec![
                    Series {
                        name: "keel",
                        color: chart::KEEL,
                        values: pick(|v| v.0),
                    },
                    Series {
                        name: "QEMU (vhost=off)",
                        color: chart::QEMU,
                        values: pick(|v| v.1),
                    },
                ],
                decimals,
            }
        };
        chart::write(
            &out.join("net.svg"),
            1100,
            400,
            &[
                panel(
                    "virtio-net, UDP 64 B (higher is better)",
                    "packets/s",
                    1e3,
                    1,
                ),
                panel("virtio-net, TCP (higher is better)", "Gbit/s", 1.0, 2),
            ],
        )?;
    } else {
        // No stale chart from an earlier run with root.
        let _ = std::fs::remove_file(out.join("net.svg"));
    }
    Ok(())
}

const BEGIN: &str = "<!-- bench-report:begin -->";
const END: &str = "<!-- bench-report:end -->";

/// Copies the table and charts into benches/report/ and puts the table into the README
/// between its markers.
fn publish_report(root: &Path, out: &Path, md: &str) {
    let dest = root.join("benches/report");
    std::fs::create_dir_all(&dest).expect("create benches/report");
    let net_chart = out.join("net.svg").exists();
    let files = ["report.md", "boot.svg", "blk.svg", "density.svg", "net.svg"];
    for f in files.iter().filter(|f| net_chart || **f != "net.svg") {
        std::fs::copy(out.join(f), dest.join(f))
            .unwrap_or_else(|e| panic!("copy {f} to benches/report: {e}"));
    }
    let readme = root.join("README.md");
    let text = std::fs::read_to_string(&readme).expect("read README.md");
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        panic!("README.md has no {BEGIN} ... {END} section to replace");
    };
    let section = format!(
        "{BEGIN}\n{md}\n![boot](benches/report/boot.svg)\n![block I/O](benches/report/blk.svg)\n![density](benches/report/density.svg)\n{}{END}",
        if net_chart {
            "![network](benches/report/net.svg)\n"
        } else {
            ""
        }
    );
    let new = format!("{}{section}{}", &text[..b], &text[e + END.len()..]);
    std::fs::write(&readme, new).expect("write README.md");
    println!("published: benches/report/ and README.md's Performance figures");
}

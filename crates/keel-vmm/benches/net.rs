//! virtio-net benchmark: keel against QEMU 10 (`virtio-net-pci`, `-netdev tap,vhost=off`:
//! this machine has no /dev/vhost-net) with the same test guest and the same tap set-up,
//! in one run. Needs root (it makes a network namespace and a tap per run).
//!
//! `cargo bench -p keel-vmm --bench net [-- RUNS]` (default 3 runs; medians reported)
//!
//! Rows, each timed on the host:
//! - guest to host, 64-byte UDP payloads: the guest's `net-bench` sends 200000 datagrams
//!   to a host socket; packets/s from the first to the last arrival.
//! - host to guest, 64-byte UDP payloads: the host sends datagrams to the guest's UDP
//!   discard port (9) for 2 s; packets/s from the guest's own count (its statistics port).
//! - host to guest, TCP: 64 MiB to the guest's discard port (9), connect to the guest's
//!   close; Gbit/s.
//! - guest to host, TCP: 64 MiB from the guest's chargen port (19); Gbit/s.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GUEST_IP: &str = "10.0.2.15";
const HOST_IP: &str = "10.0.2.2";
const GUEST: &str = env!("KEEL_TEST_GUEST");
const DATAGRAMS: u32 = 200_000;
const BULK: usize = 64 << 20;

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {}", args.join(" "));
}

/// A namespace with tap0 at 10.0.2.2/24; deleted on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("keel-bench-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Ns(name);
        let n = ns.0.as_str();
        ip(&["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", n, "addr", "add", "10.0.2.2/24", "dev", "tap0"]);
        ip(&["-n", n, "link", "set", "tap0", "up"]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open the namespace");
            // SAFETY: setns(2) on a namespace file we hold open: it moves this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("a thread in the namespace")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Keel,
    Qemu,
}

/// The VMM, started in the namespace; its serial lines arrive on the channel.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Vm {
    fn start(ns: &Ns, vmm: Vmm, cmdline: &str) -> Vm {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.0]);
        let cmdline = format!("{cmdline} keel.ip={GUEST_IP}/24 keel.gw={HOST_IP}");
        match vmm {
            Vmm::Keel => {
                c.arg(env!("CARGO_BIN_EXE_keel"))
                    .args(["--memory", "128", "--net", "tap=tap0"])
                    .args(["--cmdline", &cmdline]);
            }
            Vmm::Qemu => {
                c.args(["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,pcie=on"])
                    .args([
                        "-cpu", "kvm64", "-m", "128", "-smp", "1", "-display", "none",
                    ])
                    .args(["-no-reboot", "-nodefaults", "-serial", "stdio"])
                    .args(["-kernel", GUEST, "-append", &cmdline])
                    .args([
                        "-netdev",
                        "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                        "-device",
                        "virtio-net-pci,netdev=n0",
                    ]);
            }
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the VMM");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Vm { child, lines }
    }

    fn wait_line(&self, prefix: &str) -> String {
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) if l.contains("keel-test: FAIL") => panic!("{l}"),
                Ok(_) => {}
                Err(_) => panic!("no line {prefix:?}"),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run of every row under `vmm`: (guest-to-host pps, host-to-guest pps,
/// host-to-guest Gbit/s, guest-to-host Gbit/s).
fn run(vmm: Vmm) -> [f64; 4] {
    let ns = Ns::new(match vmm {
        Vmm::Keel => "keel",
        Vmm::Qemu => "qemu",
    });
    // Guest to host: the sink binds before the guest starts sending.
    let (ready_tx, ready_rx) = mpsc::channel();
    let path = format!("/var/run/netns/{}", ns.0);
    let sink = std::thread::spawn(move || {
        let f = File::open(&path).unwrap();
        // SAFETY: as in `Ns::run`.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let s = UdpSocket::bind((HOST_IP, 5556)).unwrap();
        let big: libc::c_int = 64 << 20;
        // SAFETY: setsockopt on our own socket with a c_int value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        let mut first = None;
        let mut last = Instant::now();
        let mut got = 0u32;
        while got < DATAGRAMS {
            if s.recv(&mut buf).is_err() {
                break;
            }
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            got += 1;
        }
        let secs = first.map_or(1.0, |f| last.duration_since(f).as_secs_f64());
        f64::from(got.saturating_sub(1)) / secs.max(1e-9)
    });
    ready_rx.recv().unwrap();
    let vm = Vm::start(
        &ns,
        vmm,
        &format!(
            "keel.test=net-bench keel.peer={HOST_IP}:5556 keel.net_n={DATAGRAMS} keel.net_size=64"
        ),
    );
    vm.wait_line("keel-test: net-bench: end udp datagrams");
    let g2h_pps = sink.join().unwrap();
    vm.wait_line("keel-test: net-bench: ready");

    // Host to guest, UDP: blast the discard port for 2 s; the guest counts.
    let h2g_pps = ns.run(|| {
        let s = UdpSocket::bind((HOST_IP, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let stats = |s: &UdpSocket| -> u64 {
            let mut buf = [0u8; 4096];
            for _ in 0..5 {
                s.send_to(b"stats", (GUEST_IP, 7007)).unwrap();
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    let t = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let v = t
                        .split_once("udp discard ")
                        .and_then(|(_, r)| r.split_whitespace().next())
                        .and_then(|n| n.parse().ok());
                    return v.expect("the guest's discard count");
                }
            }
            panic!("no statistics from the guest");
        };
        let before = stats(&s);
        let payload = [0x5au8; 64];
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            for _ in 0..64 {
                let _ = s.send_to(&payload, (GUEST_IP, 9));
            }
        }
        let secs = start.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(300));
        (stats(&s) - before) as f64 / secs
    });

    // TCP both ways.
    let h2g_gbps = ns.run(|| {
        let mut c = TcpStream::connect((GUEST_IP, 9)).expect("discard");
        let chunk = vec![0xa5u8; 256 * 1024];
        let start = Instant::now();
        for _ in 0..BULK / chunk.len() {
            c.write_all(&chunk).unwrap();
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        (BULK * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    });
    let g2h_gbps = ns.run(|| {
        let mut c = TcpStream::connect((GUEST_IP, 19)).expect("chargen");
        let mut buf = vec![0u8; 256 * 1024];
        let start = Instant::now();
        let mut at = 0;
        while at < BULK {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "chargen closed");
            at += n;
        }
        (BULK * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
    });
    drop(vm);
    [g2h_pps, h2g_pps, h2g_gbps, g2h_gbps]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let mut keel = Vec::new();
    let mut qemu = Vec::new();
    for i in 0..runs {
        // Interleaved, so that both see the same machine load.
        keel.push(run(Vmm::Keel));
        qemu.push(run(Vmm::Qemu));
        eprintln!("run {}: keel {:?}, qemu {:?}", i + 1, keel[i], qemu[i]);
    }
    let rows = [
        ("guest to host, UDP 64-byte payload", "packets/s"),
        ("host to guest, UDP 64-byte payload", "packets/s"),
        ("host to guest, TCP 64 MiB", "Gbit/s"),
        ("guest to host, TCP 64 MiB", "Gbit/s"),
    ];
    println!("| row | unit | keel | QEMU 10 (virtio-net-pci, vhost=off) | keel / QEMU |");
    println!("|---|---|--:|--:|--:|");
    for (i, (row, unit)) in rows.iter().enumerate() {
        let k = median(keel.iter().map(|r| r[i]).collect());
        let q = median(qemu.iter().map(|r| r[i]).collect());
        let fmt = |x: f64| {
            if *unit == "Gbit/s" {
                format!("{x:.3}")
            } else {
                format!("{x:.0}")
            }
        };
        println!(
            "| {row} | {unit} | {} | {} | {:.2} |",
            fmt(k),
            fmt(q),
            k / q
        );
    }
}

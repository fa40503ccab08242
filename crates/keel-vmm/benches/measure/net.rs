//! virtio-net runs: the test guest on a tap in a network namespace of its own (as
//! tests/guest_net.rs sets it up: `ip netns add`, a tap `tap0` at 10.0.2.2/24, the VMM
//! started with `ip netns exec`, the host's side of every measurement on a thread that
//! entered the namespace with setns(2)), one VM a run:
//!
//! 1. guest to host, UDP: the guest's `net-bench` scenario sends `n` datagrams of 64 bytes
//!    to 10.0.2.2:5556 as fast as it can; the host counts what arrives and times it from
//!    the first datagram to the last;
//! 2. host to guest, UDP: then serving (as `net-serve` does), the guest counts the datagrams its
//!    discard port (UDP 9) receives, and tells on its statistics port (UDP 7007); the host
//!    sends `n` datagrams of 64 bytes as fast as it can and times from the first send
//!    until the guest's count stops growing;
//! 3. TCP: `bulk` bytes from the host to the guest's discard port (TCP 9), timed from
//!    connect to the guest's close (it closes once it has read everything), then `bulk`
//!    bytes read from its chargen port (TCP 19).
//!
//! keel: `--net tap=tap0` (virtio-pci). QEMU: `-M microvm,pcie=on`, `virtio-net-pci` on
//! `-netdev tap,ifname=tap0,script=no,downscript=no,vhost=off` (QEMU's userspace
//! virtio-net; no /dev/vhost-net here).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use keel_testutil::netns::HOST_IP;
use keel_testutil::netns::{NetNs, TapOpts};

use super::{KEEL, QEMU, TEST_GUEST};

/// The guest's address (the host's, `HOST_IP`, is keel-testutil's tap address).
pub const GUEST_IP: &str = "10.0.2.15";
/// The host port the guest's stream goes to.
const SINK_PORT: u16 = 5556;
/// The UDP payload of both packet-rate rows, in bytes.
pub const UDP_SIZE: usize = 64;
/// Guest RAM, in MiB.
const MEMORY_MIB: u32 = 128;
/// How long a VMM may take to boot the guest and have it sending or serving.
const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// The VMMs compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    Keel,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Keel => "keel",
            Vmm::Qemu => "QEMU",
        }
    }
}

/// The figures of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetRun {
    /// Guest to host: datagrams a second that arrived on the host.
    pub tx_pps: f64,
    /// Guest to host: datagrams lost of those the guest sent.
    pub tx_lost: u64,
    /// Guest to host: the guest's own figure (datagrams a second handed to its queue,
    /// guest TSC).
    pub tx_pps_guest: Option<f64>,
    /// Host to guest: datagrams a second that the guest counted.
    pub rx_pps: f64,
    /// Host to guest: datagrams lost (sent by the host, not counted by the guest).
    pub rx_lost: u64,
    /// TCP, host to guest (discard), Gbit/s.
    pub tcp_in_gbps: f64,
    /// TCP, guest to host (chargen), Gbit/s.
    pub tcp_out_gbps: f64,
}

/// A row's figure, taken from a run.
pub type Figure = fn(&NetRun) -> f64;

/// The rows of the comparison: name, unit, the figure of a run.
pub const ROWS: [(&str, &str, Figure); 4] = [
    ("UDP guest to host, 64 B", "packets/s", |r| r.tx_pps),
    ("UDP host to guest, 64 B", "packets/s", |r| r.rx_pps),
    ("TCP host to guest (discard)", "Gbit/s", |r| r.tcp_in_gbps),
    ("TCP guest to host (chargen)", "Gbit/s", |r| r.tcp_out_gbps),
];

/// The goal of issue 12 for a row's unit: keel / QEMU at least this.
pub fn goal(unit: &str) -> f64 {
    if unit == "Gbit/s" {
        1.2
    } else {
        1.5
    }
}

/// `runs` runs under each VMM, interleaved (keel, QEMU, keel, ...) in one namespace:
/// (keel's, QEMU's).
pub fn compare(runs: usize, n: u64, bulk: usize) -> (Vec<NetRun>, Vec<NetRun>) {
    let ns = NetNs::new("netbench", TapOpts::default());
    let (mut keel, mut qemu) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        for (vmm, v) in [(Vmm::Keel, &mut keel), (Vmm::Qemu, &mut qemu)] {
            let r = run(&ns, vmm, n, bulk);
            eprintln!("net: run {i} of {runs}, {}: {r:?}", vmm.name());
            v.push(r);
        }
    }
    (keel, qemu)
}

/// The guest's command line: `net-bench` sending `n` datagrams to the host's sink.
fn cmdline(n: u64) -> String {
    format!(
        "keel.test=net-bench keel.peer={HOST_IP}:{SINK_PORT} keel.net_n={n} \
         keel.net_size={UDP_SIZE} keel.ip={GUEST_IP}/24 keel.gw={HOST_IP}"
    )
}

/// The VMM's command, run inside `ns`, with the test guest on `tap0`.
pub fn command(ns: &NetNs, vmm: Vmm, n: u64) -> Command {
    let mem = MEMORY_MIB.to_string();
    match vmm {
        Vmm::Keel => {
            let mut c = ns.command(KEEL);
            c.args([
                "--memory", &mem, "--serial", "stdio", "--kernel", TEST_GUEST,
            ])
            .args(["--cmdline", &cmdline(n)])
            .args(["--net", "tap=tap0"]);
            c
        }
        Vmm::Qemu => {
            let mut c = ns.command(QEMU);
            c.args(["-enable-kvm", "-M", "microvm,pcie=on", "-cpu", "kvm64"])
                .args(["-m", &mem, "-smp", "1"])
                .args(["-display", "none", "-no-reboot", "-nodefaults"])
                .args(["-serial", "stdio"])
                .args(["-kernel", TEST_GUEST, "-append", &cmdline(n)])
                .args([
                    "-netdev",
                    "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                    "-device",
                    "virtio-net-pci,netdev=n0",
                ]);
            c
        }
    }
}

/// A running VMM and its console, line by line.
struct Vm {
    child: Child,
    lines: Receiver<String>,
    log: String,
}

impl Vm {
    fn start(mut cmd: Command) -> Vm {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Vm {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Waits for a line starting with `prefix` and returns it.
    fn wait_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.log.push_str(&l);
                    self.log.push('\n');
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(e) => panic!("no {prefix:?} line ({e}); console:\n{}", self.log),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // `ip netns exec` execs the VMM: the child is the VMM itself.
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// One run under `vmm`: the three measurements on one VM, `n` datagrams each way and
/// `bulk` bytes each way over TCP.
pub fn run(ns: &NetNs, vmm: Vmm, n: u64, bulk: usize) -> NetRun {
    let sink = ns.spawn(move || udp_sink(n));
    // Let the sink bind before the guest sends.
    std::thread::sleep(Duration::from_millis(200));
    let mut vm = Vm::start(command(ns, vmm, n));
    ns.wait_carrier(BOOT_LIMIT);
    vm.wait_line("keel-test: net-bench: begin udp", BOOT_LIMIT);
    vm.wait_line("keel-test: net-bench: end udp", Duration::from_secs(120));
    let guest = vm.wait_line("keel-test: net-bench: ", Duration::from_secs(10));
    let tx_pps_guest = guest
        .strip_suffix(" datagrams/s")
        .and_then(|r| r.rsplit(' ').next())
        .and_then(|r| r.parse().ok());
    let (got, secs) = sink.join().expect("the sink");
    vm.wait_line("keel-test: net-bench: ready", Duration::from_secs(30));
    let (rx_pps, rx_lost) = udp_to_guest(ns, n);
    let tcp_in_gbps = tcp_discard(ns, bulk);
    let tcp_out_gbps = tcp_chargen(ns, bulk);
    NetRun {
        tx_pps: got as f64 / secs,
        tx_lost: n - got,
        tx_pps_guest,
        rx_pps,
        rx_lost,
        tcp_in_gbps,
        tcp_out_gbps,
    }
}

/// Counts the guest's datagrams on 10.0.2.2:5556: (how many, seconds from the first to
/// the last). Stops at `n` or 2 s after the last.
fn udp_sink(n: u64) -> (u64, f64) {
    let s = UdpSocket::bind((HOST_IP, SINK_PORT)).expect("bind the sink");
    // A large receive buffer: the host must not drop what the tap delivers.
    let big: libc::c_int = 64 << 20;
    // SAFETY: setsockopt on our own socket with a c_int option value of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    s.set_read_timeout(Some(BOOT_LIMIT + Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let (len, _) = s.recv_from(&mut buf).expect("the guest's first datagram");
    assert_eq!(len, UDP_SIZE, "datagram size");
    let first = Instant::now();
    let mut last = first;
    let mut got = 1;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    while got < n {
        let Ok((len, _)) = s.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(len, UDP_SIZE, "datagram size");
        last = Instant::now();
        got += 1;
    }
    (got, (last - first).as_secs_f64())
}

/// The guest's count of datagrams on its UDP discard port (from UDP 7007).
fn discard_count(s: &UdpSocket) -> u64 {
    let mut buf = [0u8; 4096];
    for _ in 0..10 {
        s.send_to(b"stats", (GUEST_IP, 7007)).unwrap();
        if let Ok((len, _)) = s.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..len]);
            return text
                .split_once("udp discard ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("no udp discard count in {text:?}"));
        }
    }
    panic!("no answer from the guest's statistics port");
}

/// Sends `n` datagrams of `UDP_SIZE` bytes to the guest's discard port as fast as the
/// host can; (datagrams a second the guest counted, datagrams lost).
fn udp_to_guest(ns: &NetNs, n: u64) -> (f64, u64) {
    ns.run(move || {
        let stats = UdpSocket::bind((HOST_IP, 0)).unwrap();
        stats
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let before = discard_count(&stats);
        let s = UdpSocket::bind((HOST_IP, 0)).unwrap();
        s.connect((GUEST_IP, 9)).unwrap();
        let p = [0x5au8; UDP_SIZE];
        let start = Instant::now();
        for _ in 0..n {
            // A full tap queue drops (the host does not wait for the guest): what the
            // guest counts is the figure.
            let _ = s.send(&p);
        }
        // Until the count stops growing (checked every 20 ms).
        let mut count = discard_count(&stats);
        let mut at = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let c = discard_count(&stats);
            if c == count {
                break;
            }
            count = c;
            at = Instant::now();
        }
        let got = count - before;
        (got as f64 / (at - start).as_secs_f64(), n - got.min(n))
    })
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 * 8.0 / t.as_secs_f64() / 1e9
}

/// `bulk` bytes to the guest's TCP discard port; Gbit/s from connect to the guest's close.
fn tcp_discard(ns: &NetNs, bulk: usize) -> f64 {
    ns.run(move || {
        let chunk = vec![0x6bu8; 256 * 1024];
        let start = Instant::now();
        let mut c = TcpStream::connect((GUEST_IP, 9)).expect("connect to discard (9)");
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut left = bulk;
        while left > 0 {
            let k = left.min(chunk.len());
            c.write_all(&chunk[..k]).expect("write to discard");
            left -= k;
        }
        c.shutdown(Shutdown::Write).unwrap();
        // The guest closes its side once it has read everything.
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("discard's close");
        gbps(bulk, start.elapsed())
    })
}

/// `bulk` bytes read from the guest's chargen port; Gbit/s from connect to the last byte.
fn tcp_chargen(ns: &NetNs, bulk: usize) -> f64 {
    ns.run(move || {
        let start = Instant::now();
        let mut c = TcpStream::connect((GUEST_IP, 19)).expect("connect to chargen (19)");
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut at = 0;
        while at < bulk {
            let want = buf.len().min(bulk - at);
            let k = c.read(&mut buf[..want]).expect("read from chargen");
            assert!(k > 0, "chargen closed after {at} bytes");
            at += k;
        }
        gbps(bulk, start.elapsed())
    })
}

//! virtio-net end to end with the test guest (crates/keel-test-guest, scenarios `net`,
//! `net-serve`, `net-bench` and `net-ping`), checked from the host side with the host's
//! own tools and sockets.
//!
//! Each test builds its own network namespace holding a tap (`ip netns add`,
//! `ip -n NS tuntap add dev tap0 mode tap`, 10.0.2.2/24 on the host side), runs the VMM
//! inside it (`ip netns exec`), and talks to the guest (10.0.2.15) from threads that
//! entered the namespace (setns). The namespace is deleted when the test ends, however
//! it ends.
//!
//! The VMM is a parameter ([`Vmm`]): QEMU 10 (`virtio-net-pci` on `-M microvm,pcie=on`,
//! `virtio-net-device` on `-M microvm,acpi=off`, `-netdev tap,...,vhost=off`) is the peer
//! that proves the guest's driver; keel (`--net tap=tap0`) runs the same checks.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use keel_testutil::netns::{NetNs, TapOpts, HOST_IP};
use keel_testutil::require_kvm;
use support::{Running, TempDir, GUEST};

/// The guest's address (the host's, `HOST_IP`, is keel-testutil's tap address).
const GUEST_IP: &str = "10.0.2.15";
/// How long a VMM may take to boot the guest and have it serving.
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// The bytes of each bulk TCP transfer.
const BULK: usize = 64 << 20;

// ---------------------------------------------------------------------
// The namespace and its tap.

/// `ping -c COUNT` the guest from the host side; panics unless every reply came. With a
/// deadline (`-w`) ping waits for every reply, not only twice the slowest round trip.
fn ping(ns: &NetNs, count: u32, size: usize) {
    let out = ns
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.2", "-w", "30"])
        .args(["-s", &size.to_string(), GUEST_IP])
        .output()
        .expect("cannot run ping (Debian package iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let want = format!("{count} packets transmitted, {count} received, 0% packet loss");
    assert!(
        out.status.success() && text.contains(&want),
        "ping -c {count} -s {size} {GUEST_IP}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------
// The VMM.

/// Which VMM runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Qemu,
    /// keel (`--net tap=tap0`).
    Keel,
}

/// The virtio transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Pci,
    Mmio,
}

/// The guest's network device.
#[derive(Clone, Copy)]
struct NetOpts {
    transport: Transport,
    /// Queue pairs (2 needs a multi-queue tap).
    queues: u16,
    /// The MTU the device reports (VIRTIO_NET_F_MTU), if any.
    mtu: Option<u16>,
}

impl NetOpts {
    fn new(transport: Transport) -> NetOpts {
        NetOpts {
            transport,
            queues: 1,
            mtu: None,
        }
    }
}

/// A guest running in a namespace, with its scratch directory (the QMP socket). A guest
/// still running when this is dropped (a failed check) is killed.
struct Guest {
    vm: Option<Running>,
    dir: TempDir,
    vmm: Vmm,
}

impl Guest {
    fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    fn vm(&mut self) -> &mut Running {
        self.vm.as_mut().expect("the VMM is running")
    }

    /// Waits until the guest printed `line` (a prefix of one of its lines).
    fn wait_line(&mut self, line: &str, limit: Duration) {
        let l = line.to_string();
        self.vm().wait_for(line, limit, move |out| {
            out.lines().any(|x| x.starts_with(l.as_str()))
        });
    }

    /// Stops the VMM and returns everything it printed.
    fn stop(mut self) -> String {
        let vm = self.vm.take().expect("the VMM is running");
        vm.signal(libc::SIGTERM);
        vm.finish(Duration::from_secs(30)).stdout
    }

    /// Waits for the VMM to end on its own and returns its outcome.
    fn finish(mut self, limit: Duration) -> support::Outcome {
        self.vm.take().expect("the VMM is running").finish(limit)
    }

    /// The guest's PASS status for this VMM (QEMU's isa-debug-exit makes 0 into 1).
    fn pass_status(&self) -> i32 {
        match self.vmm {
            Vmm::Qemu => 1,
            Vmm::Keel => 0,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(vm) = &self.vm {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(vm.pid() as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Boots the test guest with `cmdline` under `vmm` inside `ns`, with one virtio-net
/// device on `tap0` as `opts` says, and a QMP socket.
fn run_net_guest(ns: &NetNs, vmm: Vmm, opts: NetOpts, cmdline: &str) -> Guest {
    let dir = TempDir::new("net");
    let qmp = dir.path().join("qmp.sock");
    let cmdline = format!("{cmdline} keel.ip={GUEST_IP}/24 keel.gw={HOST_IP}");
    let cmd = match vmm {
        Vmm::Qemu => qemu_command(ns, opts, &cmdline, &qmp),
        Vmm::Keel => keel_command(ns, opts, &cmdline, &qmp),
    };
    let g = Guest {
        vm: Some(Running::start(cmd)),
        dir,
        vmm,
    };
    // Whatever the host sends before the tap's carrier is up is lost.
    ns.wait_carrier(BOOT_LIMIT);
    g
}

fn qemu_command(ns: &NetNs, opts: NetOpts, cmdline: &str, qmp: &Path) -> Command {
    let mut c = ns.command("qemu-system-x86_64");
    let machine = match opts.transport {
        Transport::Pci => "microvm,pcie=on",
        Transport::Mmio => "microvm,acpi=off",
    };
    c.args([
        "-enable-kvm",
        "-M",
        machine,
        "-cpu",
        "kvm64",
        "-m",
        "128",
        "-smp",
        "1",
    ])
    .args([
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    .args(["-kernel", GUEST, "-append", cmdline])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    let mut netdev = "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off".to_string();
    let mut device = match opts.transport {
        Transport::Pci => "virtio-net-pci,netdev=n0".to_string(),
        Transport::Mmio => {
            c.args(["-global", "virtio-mmio.force-legacy=false"]);
            "virtio-net-device,netdev=n0".to_string()
        }
    };
    if opts.queues > 1 {
        netdev += &format!(",queues={}", opts.queues);
        device += ",mq=on";
        if opts.transport == Transport::Pci {
            device += &format!(",vectors={}", 2 * opts.queues + 2);
        }
    }
    if let Some(mtu) = opts.mtu {
        device += &format!(",host_mtu={mtu}");
    }
    c.args(["-netdev", &netdev, "-device", &device]);
    c
}

fn keel_command(ns: &NetNs, opts: NetOpts, cmdline: &str, qmp: &Path) -> Command {
    let mut c = ns.command(env!("CARGO_BIN_EXE_keel"));
    c.args(["--debug-exit", "--memory", "128", "--cmdline", cmdline])
        .arg("--qmp")
        .arg(qmp);
    // QEMU's default MAC, which the guest's report is checked against.
    let mut net = "tap=tap0,mac=52:54:00:12:34:56".to_string();
    if opts.queues > 1 {
        net += &format!(",queues={}", opts.queues);
    }
    if let Some(mtu) = opts.mtu {
        net += &format!(",mtu={mtu}");
    }
    c.args(["--net", &net]);
    if opts.transport == Transport::Mmio {
        c.args(["--transport", "mmio"]);
    }
    c
}

// ---------------------------------------------------------------------
// QMP (QEMU's `set_link`).

/// Sends one QMP command on a fresh connection and returns its reply line.
fn qmp_command(path: &Path, command: &str) -> String {
    let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("QMP {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).expect("QMP greeting");
    assert!(line.contains("\"QMP\""), "QMP greeting: {line}");
    let mut reply = |w: &mut UnixStream, cmd: &str| -> String {
        w.write_all(cmd.as_bytes()).unwrap();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).expect("QMP reply");
            assert!(!l.is_empty(), "QMP closed before replying to {cmd}");
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return l;
            }
        }
    };
    let caps = reply(&mut w, r#"{"execute":"qmp_capabilities"}"#);
    assert!(caps.contains("\"return\""), "qmp_capabilities: {caps}");
    reply(&mut w, command)
}

fn set_link(g: &Guest, up: bool) {
    // QEMU names the link by its netdev's id, keel by the device's place in `--net` order.
    let name = match g.vmm {
        Vmm::Qemu => "n0",
        Vmm::Keel => "net0",
    };
    let r = qmp_command(
        &g.qmp_path(),
        &format!(r#"{{"execute":"set_link","arguments":{{"name":"{name}","up":{up}}}}}"#),
    );
    assert!(r.contains("\"return\""), "set_link up={up}: {r}");
}

// ---------------------------------------------------------------------
// Host-side peers and clients (run inside the namespace).

/// A UDP echo peer on 10.0.2.2:`port` until `stop`.
fn udp_echo_peer(ns: &NetNs, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    // Bound before the guest starts (a socket stays in the namespace it was made in).
    let s = ns.run(move || UdpSocket::bind((HOST_IP, port)).expect("bind the UDP echo peer"));
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = vec![0u8; 65536];
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Ok((len, from)) = s.recv_from(&mut buf) {
                s.send_to(&buf[..len], from).expect("echo back");
                n += 1;
            }
        }
        n
    })
}

/// The payload of the `n`-byte datagram (any byte values, different per size).
fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 131 + n * 7 + 1) as u8).collect()
}

/// UDP echo (port 7) of every payload size in `sizes`, byte-exact.
fn udp_echo_sizes(ns: &NetNs, sizes: std::ops::RangeInclusive<usize>) {
    udp_echo_sizes_from(ns, 0, sizes);
}

/// `udp_echo_sizes` from local port `port` (0: any).
fn udp_echo_sizes_from(ns: &NetNs, port: u16, sizes: std::ops::RangeInclusive<usize>) {
    ns.run(move || {
        let s = UdpSocket::bind((HOST_IP, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 65536];
        for n in sizes {
            let p = payload(n);
            // A reply can be lost to nothing on a private tap; one retry covers a
            // guest still resolving our address.
            let mut got = None;
            for _ in 0..2 {
                s.send_to(&p, (GUEST_IP, 7)).unwrap();
                if let Ok((len, _)) = s.recv_from(&mut buf) {
                    got = Some(len);
                    break;
                }
            }
            let len = got.unwrap_or_else(|| panic!("no UDP echo of {n} bytes"));
            assert_eq!(&buf[..len], &p[..], "UDP echo of {n} bytes differs");
        }
    });
}

/// Sends `n` datagrams of `size` bytes to the guest's UDP discard port, paced so that
/// none is lost on the way, and checks the guest's count (UDP 7007) went up by `n`.
fn udp_discard(ns: &NetNs, n: u64, size: usize) {
    let count = |s: &str| -> (u64, u64) {
        let rest = s
            .split_once("udp discard ")
            .unwrap_or_else(|| panic!("no udp discard count in {s:?}"))
            .1;
        let mut w = rest.split_whitespace();
        let d = w.next().and_then(|x| x.parse().ok()).expect("datagrams");
        let b = w.nth(1).and_then(|x| x.parse().ok()).expect("bytes");
        (d, b)
    };
    let before = count(&guest_stats(ns));
    ns.run(move || {
        let s = UdpSocket::bind((HOST_IP, 0)).unwrap();
        let p = payload(size);
        for i in 0..n {
            s.send_to(&p, (GUEST_IP, 9)).unwrap();
            if i % 32 == 31 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = count(&guest_stats(ns));
        if now == (before.0 + n, before.1 + n * size as u64) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline && now.0 <= before.0 + n,
            "UDP discard: the guest counts {now:?}, {before:?} before {n} datagrams of {size} bytes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's per-queue-pair counters (UDP 7007).
fn guest_stats(ns: &NetNs) -> String {
    ns.run(|| {
        let s = UdpSocket::bind((HOST_IP, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..3 {
            s.send_to(b"stats", (GUEST_IP, 7007)).unwrap();
            if let Ok((len, _)) = s.recv_from(&mut buf) {
                return String::from_utf8_lossy(&buf[..len]).into_owned();
            }
        }
        panic!("no answer from the guest's statistics port");
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, b: &[u8]) -> u64 {
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// RFC 864's pattern as the guest's chargen sends it (crates/keel-test-guest/README.md).
fn chargen_byte(pos: usize) -> u8 {
    let pos = pos % (95 * 74);
    let (line, col) = (pos / 74, pos % 74);
    match col {
        72 => b'\r',
        73 => b'\n',
        _ => b' ' + ((line + col) % 95) as u8,
    }
}

/// Sends `BULK` pseudo-random bytes to the guest's discard port; returns their FNV-1a.
fn tcp_discard(ns: &NetNs, seed: u64) -> u64 {
    ns.run(move || {
        let mut c = TcpStream::connect((GUEST_IP, 9)).expect("connect to discard (9)");
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut x = seed;
        let mut h = FNV_OFFSET;
        let mut chunk = vec![0u8; 64 * 1024];
        for _ in 0..BULK / chunk.len() {
            for b in chunk.iter_mut() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *b = (x >> 56) as u8;
            }
            h = fnv(h, &chunk);
            c.write_all(&chunk).expect("write to discard");
        }
        c.shutdown(Shutdown::Write).unwrap();
        // The guest closes its side once it has read everything.
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("discard's close");
        assert!(rest.is_empty(), "discard sent {} bytes", rest.len());
        h
    })
}

/// Reads `BULK` bytes from the guest's chargen port and checks every one.
fn tcp_chargen(ns: &NetNs) -> usize {
    ns.run(|| {
        let mut c = TcpStream::connect((GUEST_IP, 19)).expect("connect to chargen (19)");
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut at = 0usize;
        while at < BULK {
            let want = buf.len().min(BULK - at);
            let n = c.read(&mut buf[..want]).expect("read from chargen");
            assert!(n > 0, "chargen closed after {at} bytes");
            for (i, &b) in buf[..n].iter().enumerate() {
                if b != chargen_byte(at + i) {
                    panic!(
                        "chargen byte {} is {b:#x}, not {:#x}",
                        at + i,
                        chargen_byte(at + i)
                    );
                }
            }
            at += n;
        }
        at
    })
}

/// TCP echo (port 7) of `len` bytes, byte-exact.
fn tcp_echo(ns: &NetNs, len: usize) {
    ns.run(move || {
        let c = TcpStream::connect((GUEST_IP, 7)).expect("connect to echo (7)");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let data = payload(len);
        let mut w = c.try_clone().unwrap();
        let d = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&d).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&c).read_to_end(&mut back).expect("read the echo");
        writer.join().unwrap();
        assert!(
            back == data,
            "TCP echo of {len} bytes differs ({} back)",
            back.len()
        );
    });
}

/// The line the guest prints when a discard connection ends:
/// (received bytes, fnv1a64).
fn discard_report(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| l.split_once("tcp discard (port 9): connection closed; received "))
        .filter_map(|(_, rest)| {
            let (n, rest) = rest.split_once(" bytes (fnv1a64 ")?;
            let (h, _) = rest.split_once(')')?;
            Some((n.parse().ok()?, u64::from_str_radix(h, 16).ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------
// The checks, for any VMM.

/// `net-serve`: ping, UDP echo of 1-1472 bytes, TCP echo, 64 MiB to discard (the guest's
/// count and checksum compared) and from chargen (every byte checked).
fn serve_case(vmm: Vmm, transport: Transport) {
    let ns = NetNs::new("serve", TapOpts::default());
    let mut g = run_net_guest(&ns, vmm, NetOpts::new(transport), "keel.test=net-serve");
    g.wait_line("keel-test: net-serve: ready", BOOT_LIMIT);
    ping(&ns, 20, 56);
    udp_echo_sizes(&ns, 1..=1472);
    udp_discard(&ns, 1000, 64);
    tcp_echo(&ns, 256 * 1024);
    let h = tcp_discard(&ns, 0x6b65656c);
    let got = tcp_chargen(&ns);
    assert_eq!(got, BULK);
    let l = "keel-test: net-serve: tcp discard (port 9): connection closed";
    g.wait_line(l, Duration::from_secs(30));
    let out = g.stop();
    assert_eq!(
        discard_report(&out),
        vec![(BULK as u64, h)],
        "the guest's discard count and checksum; stdout:\n{out}"
    );
}

/// `net`: the self-test against a UDP echo peer on the host; with `link`, the link is
/// taken down and up through QMP's `set_link` while the guest waits for it.
fn self_test_case(vmm: Vmm, opts: NetOpts, tap: TapOpts, link: bool) {
    let ns = NetNs::new("selftest", tap);
    let stop = Arc::new(AtomicBool::new(false));
    let peer = udp_echo_peer(&ns, 5555, stop.clone());
    let cmdline = format!(
        "keel.test=net keel.peer=10.0.2.2:5555 keel.net_link={}",
        u8::from(link)
    );
    let mut g = run_net_guest(&ns, vmm, opts, &cmdline);
    if link {
        g.wait_line(
            "keel-test: net: link: waiting for the host to set the link down",
            BOOT_LIMIT,
        );
        set_link(&g, false);
        g.wait_line(
            "keel-test: net: link: waiting for the host to set the link up",
            Duration::from_secs(30),
        );
        set_link(&g, true);
    }
    let status = g.pass_status();
    let out = g.finish(BOOT_LIMIT);
    stop.store(true, Ordering::Relaxed);
    let echoed = peer.join().expect("the echo peer");
    support::assert_pass(&out, "net", status);
    let mut lines = vec![
        "keel-test: net: control queue: ",
        "keel-test: net: UDP echo of every frame size from 60 to ",
        "keel-test: net: transmitted frames by layout: ",
        "keel-test: net: checksums: ",
        "keel-test: net: reset with ",
        "keel-test: net: after the reset: UDP echo works again",
        "keel-test: net: VERSION_1 alone, receive buffers as two descriptors (header, data): UDP echo of 18, 100, 1000 and 1472 bytes;",
    ];
    // Checksums computed by the guest are tried when the transmit offload is in use.
    if out.stdout.contains("|CSUM|") {
        lines.push("keel-test: net: checksums computed by the guest: ");
    }
    if link {
        lines.push("keel-test: net: link down: configuration interrupt, status 0x0");
        lines.push("keel-test: net: link up: configuration interrupt, status 0x1");
    }
    for l in lines {
        assert!(
            out.stdout.lines().any(|x| x.starts_with(l)),
            "missing {l:?} in:\n{}",
            out.stdout
        );
    }
    assert!(echoed > 1400, "the peer echoed only {echoed} datagrams");
}

/// The self-test on two queue pairs (a multi-queue tap) at a 9000-byte MTU, link toggled.
fn jumbo_self_test_case(vmm: Vmm) {
    let opts = NetOpts {
        transport: Transport::Pci,
        queues: 2,
        mtu: Some(9000),
    };
    let tap = TapOpts {
        multi_queue: true,
        mtu: Some(9000),
    };
    self_test_case(vmm, opts, tap, true);
}

/// Two queue pairs (a multi-queue tap, `queues=2`) carrying traffic at once: several
/// TCP and UDP flows in parallel; the guest's counters show frames both ways on both
/// pairs. With a 9000-byte MTU, so large frames take merged receive buffers.
fn two_pairs_case(vmm: Vmm, transport: Transport) {
    let tap = TapOpts {
        multi_queue: true,
        mtu: Some(9000),
    };
    let ns = NetNs::new("mq", tap);
    let opts = NetOpts {
        transport,
        queues: 2,
        mtu: Some(9000),
    };
    let mut g = run_net_guest(&ns, vmm, opts, "keel.test=net-serve");
    g.wait_line("keel-test: net-serve: ready", BOOT_LIMIT);
    g.wait_line(
        "keel-test: net-serve: MAC 52:54:00:12:34:56, status 1, MTU 9000, max_virtqueue_pairs 2; 2 queue pair(s)",
        Duration::from_secs(1),
    );
    ping(&ns, 5, 8000);
    let ns = Arc::new(ns);
    let mut flows = Vec::new();
    // The guest puts a TCP/UDP flow on pair (source port + destination port) % 2: the
    // UDP flows from ports 50000 and 50001 take one pair each; the TCP flows' ports are
    // the kernel's.
    for k in 0..4u16 {
        let ns2 = ns.clone();
        flows.push(std::thread::spawn(move || {
            if k % 2 == 0 {
                tcp_echo(&ns2, 4 << 20);
            } else {
                udp_echo_sizes_from(&ns2, 50000 + k / 2, 1..=8972);
            }
        }));
    }
    for f in flows {
        f.join().expect("a flow failed");
    }
    let stats = guest_stats(&ns);
    let out = g.stop();
    // "pairs 2 | pair 0: rx N frames ..., tx N frames ... | pair 1: ..."
    let pairs: Vec<(u64, u64, u64)> = stats
        .split(" | ")
        .skip(1)
        .map(|p| {
            let num = |key: &str| -> u64 {
                p.split_once(key)
                    .and_then(|(_, r)| r.split_whitespace().next())
                    .and_then(|n| n.trim_end_matches(',').parse().ok())
                    .unwrap_or_else(|| panic!("no {key:?} in {p:?}"))
            };
            (num(" rx "), num(" tx "), num("rx merged "))
        })
        .collect();
    assert_eq!(pairs.len(), 2, "stats: {stats}\nstdout:\n{out}");
    for (i, &(rx, tx, _)) in pairs.iter().enumerate() {
        assert!(
            rx >= 1000 && tx >= 1000,
            "pair {i} carried {rx} received and {tx} sent frames: {stats}"
        );
    }
    assert!(
        pairs.iter().map(|p| p.2).sum::<u64>() > 0,
        "no merged receive buffers with a 9000-byte MTU: {stats}"
    );
}

/// `net-bench`: the guest sends `n` datagrams of `size` bytes to a host port, then
/// serves; every datagram arrives, in order of its sequence number.
fn bench_case(vmm: Vmm, transport: Transport) {
    let n = 5000u32;
    let ns = NetNs::new("bench", TapOpts::default());
    // Bound before the guest starts (a socket stays in the namespace it was made in).
    let s = ns.run(|| UdpSocket::bind((HOST_IP, 5556)).expect("bind the sink"));
    let sink = std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        // A large receive buffer: the host must not drop what the tap delivers.
        let big: libc::c_int = 32 << 20;
        // SAFETY: setsockopt on our own socket with a c_int option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let mut seen = vec![false; n as usize];
        let mut buf = [0u8; 2048];
        let mut got = 0;
        while got < n {
            let Ok((len, _)) = s.recv_from(&mut buf) else {
                break;
            };
            assert_eq!(len, 18, "datagram size");
            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert!(seq < seen.len() && !seen[seq], "sequence number {seq}");
            seen[seq] = true;
            got += 1;
        }
        got
    });
    let cmdline =
        format!("keel.test=net-bench keel.peer=10.0.2.2:5556 keel.net_n={n} keel.net_size=18");
    let mut g = run_net_guest(&ns, vmm, NetOpts::new(transport), &cmdline);
    g.wait_line("keel-test: net-bench: ready", BOOT_LIMIT);
    let got = sink.join().expect("the sink");
    ping(&ns, 3, 56);
    let out = g.stop();
    assert!(
        out.contains(&format!(
            "keel-test: net-bench: end udp datagrams {n} size 18"
        )),
        "stdout:\n{out}"
    );
    assert_eq!(got, n, "datagrams received on the host; stdout:\n{out}");
}

/// `net-ping`: the guest pings the host's side of the tap (10.0.2.2) 20 times, no loss.
fn ping_host_case(vmm: Vmm, transport: Transport) {
    let ns = NetNs::new("ping", TapOpts::default());
    let g = run_net_guest(
        &ns,
        vmm,
        NetOpts::new(transport),
        "keel.test=net-ping keel.ping=10.0.2.2 keel.ping_n=20",
    );
    let status = g.pass_status();
    let out = g.finish(BOOT_LIMIT);
    support::assert_pass(&out, "net-ping", status);
    assert!(
        out.stdout.contains(
            "keel-test: net-ping: 20 echo requests to 10.0.2.2, 20 replies, no loss; rtt avg "
        ),
        "stdout:\n{}",
        out.stdout
    );
}

// ---------------------------------------------------------------------
// Under QEMU (the peer that proves the guest's driver).

#[test]
fn net_serve_under_qemu_virtio_pci() {
    require_kvm!();
    serve_case(Vmm::Qemu, Transport::Pci);
}

#[test]
fn net_serve_under_qemu_virtio_mmio() {
    require_kvm!();
    serve_case(Vmm::Qemu, Transport::Mmio);
}

#[test]
fn net_self_test_under_qemu_virtio_pci() {
    require_kvm!();
    self_test_case(
        Vmm::Qemu,
        NetOpts::new(Transport::Pci),
        TapOpts::default(),
        true,
    );
}

#[test]
fn net_self_test_under_qemu_virtio_mmio() {
    require_kvm!();
    self_test_case(
        Vmm::Qemu,
        NetOpts::new(Transport::Mmio),
        TapOpts::default(),
        true,
    );
}

/// The self-test with two queue pairs (the control queue's VQ_PAIRS_SET) and a
/// 9000-byte MTU (every frame size to 9014 bytes, merged receive buffers).
#[test]
fn net_self_test_under_qemu_two_pairs_mtu_9000() {
    require_kvm!();
    jumbo_self_test_case(Vmm::Qemu);
}

#[test]
fn two_queue_pairs_carry_traffic_under_qemu_virtio_pci() {
    require_kvm!();
    two_pairs_case(Vmm::Qemu, Transport::Pci);
}

#[test]
fn two_queue_pairs_carry_traffic_under_qemu_virtio_mmio() {
    require_kvm!();
    two_pairs_case(Vmm::Qemu, Transport::Mmio);
}

#[test]
fn net_bench_under_qemu() {
    require_kvm!();
    bench_case(Vmm::Qemu, Transport::Pci);
}

/// Bad input on the command line and a missing device give a clear FAIL line.
#[test]
fn net_scenarios_fail_clearly_without_a_peer_or_a_device() {
    require_kvm!();
    for (cmdline, scenario, reason) in [
        (
            "keel.test=net",
            "net",
            "net needs keel.peer=ADDRESS:PORT (a host UDP echo peer)",
        ),
        (
            "keel.test=net-bench keel.peer=10.0.2.2",
            "net-bench",
            "keel.peer=10.0.2.2: not ADDRESS:PORT (e.g. 10.0.2.2:5555)",
        ),
        (
            "keel.test=net-serve keel.ip=10.0.2.300/24",
            "net-serve",
            "keel.ip=10.0.2.300/24: not ADDRESS/PREFIX (e.g. 10.0.2.15/24)",
        ),
        (
            "keel.test=net-serve",
            "net-serve",
            "no virtio-net device: none on PCI bus 0 (1af4:1041, 1af4:1000) nor among the 0 virtio_mmio.device= entries (keel: --net)",
        ),
    ] {
        let out = support::qemu_guest_cmdline(
            cmdline,
            "microvm,acpi=off",
            1,
            true,
            &[],
            Duration::from_secs(60),
        );
        assert_eq!(
            support::verdict(&out),
            vec![format!("keel-test: FAIL {scenario}: {reason}").as_str()],
            "{cmdline}; stdout:\n{}",
            out.stdout
        );
        assert_eq!(out.code(), Some(3), "{cmdline}: QEMU's status for FAIL");
    }
}

#[test]
fn net_ping_reaches_the_host_under_qemu_virtio_pci() {
    require_kvm!();
    ping_host_case(Vmm::Qemu, Transport::Pci);
}

#[test]
fn net_ping_reaches_the_host_under_qemu_virtio_mmio() {
    require_kvm!();
    ping_host_case(Vmm::Qemu, Transport::Mmio);
}

/// Two QEMU VMs linked by a pair of Unix datagram sockets (`-netdev dgram`: one frame a
/// datagram, as keel's socket backend) ping each other with `net-ping`, 20 times each,
/// no loss; no namespace and no tap needed. The second starts 4 s after the first
/// begins pinging, as a peer that is slow to come up.
#[test]
fn two_qemu_vms_ping_each_other_over_unix_datagram_sockets() {
    require_kvm!();
    let dir = TempDir::new("net-dgram");
    let sock = |n: &str| dir.path().join(n).display().to_string();
    let vm = |me: &str, peer: &str, local: &str, remote: &str, mac: &str| {
        let netdev = format!(
            "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            sock(local),
            sock(remote)
        );
        let device = format!("virtio-net-pci,netdev=n0,mac={mac}");
        let cmdline = format!("keel.test=net-ping keel.ip={me}/24 keel.ping={peer} keel.ping_n=20");
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-enable-kvm",
            "-M",
            "microvm,pcie=on",
            "-cpu",
            "kvm64",
            "-m",
            "128",
        ])
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-kernel", GUEST, "-append", &cmdline])
        .args(["-netdev", &netdev, "-device", &device]);
        Running::start(c)
    };
    let mut a = vm(
        "10.0.2.15",
        "10.0.2.16",
        "a.sock",
        "b.sock",
        "52:54:00:00:00:0a",
    );
    // The second starts late: the first's requests wait for its address and
    // fill the socket (16 of them in 3.2 s), and it must keep asking.
    a.wait_for("the first VM pinging", BOOT_LIMIT, |out| {
        out.contains("net-ping: address 10.0.2.15/24; pinging")
    });
    std::thread::sleep(Duration::from_secs(4));
    let b = vm(
        "10.0.2.16",
        "10.0.2.15",
        "b.sock",
        "a.sock",
        "52:54:00:00:00:0b",
    );
    for (vm, me, peer) in [(a, "10.0.2.15", "10.0.2.16"), (b, "10.0.2.16", "10.0.2.15")] {
        let out = vm.finish(BOOT_LIMIT);
        support::assert_pass(&out, "net-ping", 1);
        let l = format!("keel-test: net-ping: 20 echo requests to {peer}, 20 replies, no loss;");
        assert!(out.stdout.contains(&l), "{me}: stdout:\n{}", out.stdout);
    }
}

// ---------------------------------------------------------------------
// Under keel (`--net tap=tap0`): the same checks.

#[test]
fn net_serve_under_keel_virtio_pci() {
    require_kvm!();
    serve_case(Vmm::Keel, Transport::Pci);
}

#[test]
fn net_serve_under_keel_virtio_mmio() {
    require_kvm!();
    serve_case(Vmm::Keel, Transport::Mmio);
}

#[test]
fn net_self_test_under_keel_virtio_pci() {
    require_kvm!();
    self_test_case(
        Vmm::Keel,
        NetOpts::new(Transport::Pci),
        TapOpts::default(),
        true,
    );
}

#[test]
fn net_self_test_under_keel_virtio_mmio() {
    require_kvm!();
    self_test_case(
        Vmm::Keel,
        NetOpts::new(Transport::Mmio),
        TapOpts::default(),
        true,
    );
}

/// The self-test with two queue pairs (the control queue's VQ_PAIRS_SET) and a
/// 9000-byte MTU (every frame size to 9014 bytes, merged receive buffers).
#[test]
fn net_self_test_under_keel_two_pairs_mtu_9000() {
    require_kvm!();
    jumbo_self_test_case(Vmm::Keel);
}

#[test]
fn two_queue_pairs_carry_traffic_under_keel_virtio_pci() {
    require_kvm!();
    two_pairs_case(Vmm::Keel, Transport::Pci);
}

#[test]
fn two_queue_pairs_carry_traffic_under_keel_virtio_mmio() {
    require_kvm!();
    two_pairs_case(Vmm::Keel, Transport::Mmio);
}

#[test]
fn net_bench_under_keel() {
    require_kvm!();
    bench_case(Vmm::Keel, Transport::Pci);
}

#[test]
fn net_ping_reaches_the_host_under_keel_virtio_pci() {
    require_kvm!();
    ping_host_case(Vmm::Keel, Transport::Pci);
}

#[test]
fn net_ping_reaches_the_host_under_keel_virtio_mmio() {
    require_kvm!();
    ping_host_case(Vmm::Keel, Transport::Mmio);
}

/// Two keel VMs linked by the socket backend (`--net socket=PATH`: the first binds the
/// path, the second connects to it), no tap and no namespace: they ping each other with
/// `net-ping`, 20 times each, no loss; one on virtio-pci, one on virtio-mmio. The second
/// starts 4 s after the first begins pinging.
#[test]
fn two_keel_vms_ping_each_other_over_a_socket() {
    require_kvm!();
    let dir = TempDir::new("netlink");
    let sock = dir.path().join("link.sock");
    let vm = |me: &str, peer: &str, mac: &str, transport: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
        c.args(["--debug-exit", "--memory", "128", "--transport", transport])
            .arg("--net")
            .arg(format!("socket={},mac={mac}", sock.display()))
            .arg("--cmdline")
            .arg(format!(
                "keel.test=net-ping keel.ip={me}/24 keel.ping={peer} keel.ping_n=20"
            ));
        Running::start(c)
    };
    let mut a = vm("10.0.2.15", "10.0.2.16", "52:54:00:00:00:0a", "pci");
    // The second VM connects to the path the first bound, 4 s after the first began
    // pinging: until then the first's frames have no peer and are dropped.
    a.wait_for("the first VM pinging", BOOT_LIMIT, |out| {
        out.contains("net-ping: address 10.0.2.15/24; pinging")
    });
    assert!(sock.exists(), "the first VM bound {}", sock.display());
    std::thread::sleep(Duration::from_secs(4));
    let b = vm("10.0.2.16", "10.0.2.15", "52:54:00:00:00:0b", "mmio");
    for (vm, me, peer) in [(a, "10.0.2.15", "10.0.2.16"), (b, "10.0.2.16", "10.0.2.15")] {
        let out = vm.finish(BOOT_LIMIT);
        support::assert_pass(&out, "net-ping", 0);
        let l = format!("keel-test: net-ping: 20 echo requests to {peer}, 20 replies, no loss;");
        assert!(out.stdout.contains(&l), "{me}: stdout:\n{}", out.stdout);
    }
    assert!(!sock.exists(), "the bound path is removed when its VM ends");
}

/// A namespace of its own (named after `tag`) with keel serving in it: `net-serve` on
/// virtio-pci, ready.
fn keel_serving(tag: &str) -> (NetNs, Guest) {
    let ns = NetNs::new(tag, TapOpts::default());
    let mut g = run_net_guest(
        &ns,
        Vmm::Keel,
        NetOpts::new(Transport::Pci),
        "keel.test=net-serve",
    );
    g.wait_line("keel-test: net-serve: ready", BOOT_LIMIT);
    (ns, g)
}

/// `system_reset` builds the VM again: the main thread opens the tap again under its
/// seccomp filter (TUNSETIFF, the interface lookup), and the guest, booted again, answers
/// ping as before.
#[test]
fn keel_reopens_the_tap_after_system_reset() {
    require_kvm!();
    let (ns, mut g) = keel_serving("reset");
    ping(&ns, 3, 56);
    let r = qmp_command(&g.qmp_path(), r#"{"execute":"system_reset"}"#);
    assert!(r.contains("\"return\""), "system_reset: {r}");
    g.vm.as_mut()
        .expect("running")
        .wait_for("a second boot", BOOT_LIMIT, |out| {
            out.matches("keel-test: net-serve: ready").count() == 2
        });
    // The reset closed the tap and opened it again.
    ns.wait_carrier(BOOT_LIMIT);
    ping(&ns, 20, 56);
    g.stop();
}

/// The tap's counters as the host keeps them (`ip -s -j link show tap0`): (packets,
/// bytes) the host received from the VMM and (packets, bytes) it handed the VMM.
fn tap_counters(ns: &NetNs) -> ((u64, u64), (u64, u64)) {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-s", "-j", "link", "show", "tap0"])
        .output()
        .expect("cannot run ip (Debian package iproute2)");
    assert!(out.status.success(), "ip -s link show tap0: {}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip's JSON");
    let dir = |d: &str| {
        let s = &v[0]["stats64"][d];
        let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{d}.{k} in {v}"));
        (n("packets"), n("bytes"))
    };
    (dir("rx"), dir("tx"))
}

/// keel's `x-query-net-stats` of `net0`, parsed.
fn keel_net_stats(g: &Guest) -> serde_json::Value {
    let r = qmp_command(
        &g.qmp_path(),
        r#"{"execute":"x-query-net-stats","arguments":{"name":"net0"}}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&r).expect("QMP reply");
    assert!(v["return"].is_array(), "x-query-net-stats: {r}");
    v["return"][0].clone()
}

/// `x-query-net-stats` on the control socket: the device's counters agree, frame for
/// frame and byte for byte, with the host's own count of the tap: every frame the tap
/// handed keel reached the guest, every frame the guest sent reached the tap. Unknown
/// names get QEMU's DeviceNotFound.
#[test]
fn keel_counts_frames_as_the_host_does() {
    require_kvm!();
    let (ns, g) = keel_serving("stats");
    ping(&ns, 20, 56);
    udp_echo_sizes(&ns, 1..=300);
    // The host's own stack may still be talking (IPv6 neighbour discovery): compare once
    // the tap's counters stand still across the query.
    let start = std::time::Instant::now();
    let (tap, dev) = loop {
        let before = tap_counters(&ns);
        let dev = keel_net_stats(&g);
        std::thread::sleep(Duration::from_millis(200));
        if tap_counters(&ns) == before {
            break (before, dev);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the tap never went quiet"
        );
    };
    let ((from_guest, from_guest_bytes), (to_guest, to_guest_bytes)) = tap;
    assert_eq!(dev["name"], "net0", "{dev}");
    assert_eq!(dev["mac"], "52:54:00:12:34:56", "{dev}");
    assert_eq!(dev["link"], true, "{dev}");
    let queues = dev["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 1, "{dev}");
    let (rx, tx) = (&queues[0]["rx"], &queues[0]["tx"]);
    // 20 pings and 300 echoes each way at least.
    assert!(rx["frames"].as_u64().unwrap() >= 320, "{dev}");
    assert_eq!(
        rx["frames"].as_u64(),
        Some(to_guest),
        "frames to the guest: {dev}"
    );
    assert_eq!(
        rx["bytes"].as_u64(),
        Some(to_guest_bytes),
        "bytes to the guest: {dev}"
    );
    assert_eq!(
        tx["frames"].as_u64(),
        Some(from_guest),
        "frames from the guest: {dev}"
    );
    assert_eq!(
        tx["bytes"].as_u64(),
        Some(from_guest_bytes),
        "bytes from the guest: {dev}"
    );
    for d in [rx, tx] {
        assert_eq!(d["drops"], 0, "{dev}");
        assert_eq!(d["errors"], 0, "{dev}");
    }
    assert_eq!(dev["control"]["errors"], 0, "{dev}");
    // Every device without a name; a name that is none: QEMU's error class.
    let all = qmp_command(&g.qmp_path(), r#"{"execute":"x-query-net-stats"}"#);
    assert!(
        all.contains("\"name\": \"net0\"") || all.contains("\"name\":\"net0\""),
        "{all}"
    );
    let e = qmp_command(
        &g.qmp_path(),
        r#"{"execute":"x-query-net-stats","arguments":{"name":"net7"}}"#,
    );
    assert!(e.contains("\"DeviceNotFound\""), "{e}");
    g.stop();
}

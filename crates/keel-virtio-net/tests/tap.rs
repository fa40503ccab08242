//! The device on a real tap, in a network namespace of its own (needs root: `ip netns
//! add`): frames the driver sends reach the host's stack (the host answers ARP and ping,
//! and counts the frames in `ip -s link`), the answers land in the driver's buffers, over
//! both transports; a missing tap is a clear error.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use keel_memory::GuestMemoryMmap;
use keel_virtio::testing::*;
use keel_virtio_net::backend::{Backend, Tap, TapError};
use keel_virtio_net::{MacAddr, Net, NetOptions};
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const TAP: &str = "kntap0";
const Q: u16 = 64;

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with a tap `TAP` at HOST_IP/24, removed on drop.
struct Namespace(String);

impl Namespace {
    fn new(tag: &str) -> Namespace {
        let name = format!("knet-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Namespace(name);
        let n = ns.0.as_str();
        // No IPv6: the host's neighbour discovery and multicast reports would take the
        // buffers the tests post.
        for key in ["all", "default"] {
            let st = Command::new("ip")
                .args(["netns", "exec", n, "sysctl", "-qw"])
                .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
                .status()
                .expect("run sysctl");
            assert!(st.success(), "sysctl in {n}");
        }
        ip(&["-n", n, "tuntap", "add", TAP, "mode", "tap", "vnet_hdr"]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "set", TAP, "up"]);
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", TAP]);
        ns
    }

    /// Runs `f` on a thread inside the namespace (setns: only that thread moves).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open the namespace");
                // SAFETY: setns on a namespace descriptor this thread holds; it moves only
                // the calling thread.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace")
        })
    }

    /// Waits until the tap's carrier is up as the host's stack sees it (`operstate` UP).
    /// The carrier comes with the first open queue, but the kernel turns the tap's
    /// queueing discipline on later, from its link-watch work (later still while other
    /// namespaces are torn down): what the host sends before that is dropped silently.
    fn wait_carrier(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let out = ip(&["-n", &self.0, "-j", "link", "show", TAP]);
            if out.contains("\"operstate\":\"UP\"") {
                return;
            }
            assert!(Instant::now() < end, "the tap's carrier is not up: {out}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The tap's RX packet count as the host sees it (frames from the guest).
    fn tap_rx_packets(&self) -> u64 {
        let out = ip(&["-n", &self.0, "-s", "-j", "link", "show", TAP]);
        let at = out.find("\"rx\":{").expect("rx stats in ip's JSON");
        let rest = &out[at..];
        let p = rest.find("\"packets\":").expect("packets") + 10;
        rest[p..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// <linux/ethtool.h>: read the TX checksum and TSO offload settings.
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_GTSO: u32 = 0x1e;

/// An ethtool query of the tap as the host's stack sees it (what `ethtool -k` shows):
/// `cmd` is ETHTOOL_GTXCSUM or ETHTOOL_GTSO; answers whether the offload is on.
fn host_offload(cmd: u32) -> bool {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut v = EthtoolValue { cmd, data: 0 };
    // SAFETY: an all-zero ifreq is valid; the name is NUL-terminated (shorter than
    // IFNAMSIZ), and ifru_data points at `v`, which outlives the ioctl.
    let r = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(TAP.bytes()) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
        let sock = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(sock >= 0);
        let r = libc::ioctl(sock, libc::SIOCETHTOOL, &mut req);
        libc::close(sock);
        r
    };
    assert_eq!(r, 0, "SIOCETHTOOL: {}", std::io::Error::last_os_error());
    v.data != 0
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&HOST_IP);
    f.resize(60, 0);
    f
}

fn ping(host_mac: [u8; 6], payload: &[u8], seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(payload);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut iph = vec![0x45, 0];
    iph.extend_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
    iph.extend_from_slice(&GUEST_IP);
    iph.extend_from_slice(&HOST_IP);
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = host_mac.to_vec();
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&iph);
    f.extend_from_slice(&icmp);
    f
}

/// A device on the namespace's tap (one queue pair), as the tests' driver expects it;
/// call on a thread inside the namespace.
fn tap_device() -> Net {
    let backends: Vec<Box<dyn Backend>> = Tap::open(TAP, 1)
        .expect("open the tap")
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn Backend>)
        .collect();
    let opts = NetOptions {
        mac: MAC,
        queue_size: Q,
        ..NetOptions::default()
    };
    Net::new(backends, opts).expect("a device on the tap")
}

fn ring(mem: &GuestMemoryMmap, i: u64) -> Ring<'_> {
    Ring::at(mem, RING_BASE + 0x4000 * i, Q)
}

/// Sends `frame` (plain header) on TX and waits for it to be used.
fn transmit(d: &dyn Driver, mem: &GuestMemoryMmap, tx: &mut Ring, frame: &[u8], at: u64) {
    let mut all = vec![0u8; 12];
    all.extend_from_slice(frame);
    mem.write_slice(&all, GuestAddress(at)).unwrap();
    let used = tx.used_idx();
    let h = tx.add_descriptors(&[(at, 12, 0), (at + 12, frame.len() as u32, 0)]);
    tx.publish(h);
    d.notify(1);
    tx.wait_used(used + 1);
}

/// The next frame the driver receives in buffer `i` of 2048 bytes from DATA_BASE (the
/// host may send other frames first, IPv6 router solicitations say: skipped until `want`
/// accepts one).
fn receive(
    rx: &Ring,
    mem: &GuestMemoryMmap,
    next: &mut u16,
    want: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    loop {
        // The host may send several frames at once: the used index may pass next + 1.
        let n = *next;
        eventually("a received frame", || {
            rx.used_idx().wrapping_sub(n) as i16 > 0
        });
        let (id, len) = rx.used_elem(*next);
        assert!(
            id < u32::from(Q) && len <= 2048,
            "used element {next}: ({id}, {len})"
        );
        *next += 1;
        let got = read_bytes(mem, DATA_BASE + 2048 * u64::from(id), len as usize);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        if want(&got[12..]) {
            return got[12..].to_vec();
        }
    }
}

fn exchange(d: &dyn Driver, ns: &Namespace) {
    let mem = d.mem().clone();
    let (mut rx, mut tx) = (ring(&mem, 0), ring(&mem, 1));
    let f = VERSION_1 | EVENT_IDX | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MRG_RXBUF);
    assert_ne!(d.negotiate(f) & FEATURES_OK, 0);
    for (i, r) in [&rx, &tx].iter().enumerate() {
        d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
        d.enable_queue(i as u16);
    }
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    for i in 0..Q {
        let h = rx.add_descriptors(&[(DATA_BASE + 2048 * u64::from(i), 2048, VRING_DESC_F_WRITE)]);
        rx.publish(h);
    }
    d.notify(0);
    ns.wait_carrier();
    let before = ns.tap_rx_packets();
    let mut next = 0;
    // ARP: the host answers with its MAC.
    transmit(d, &mem, &mut tx, &arp_request(), DATA_BASE + 0x8_0000);
    let reply = receive(&rx, &mem, &mut next, |f| {
        f.len() >= 42 && f[12..14] == [8, 6] && f[21] == 2
    });
    assert_eq!(&reply[..6], &MAC.0, "the ARP reply is for the device's MAC");
    assert_eq!(&reply[28..32], &HOST_IP);
    let host_mac: [u8; 6] = reply[22..28].try_into().unwrap();
    // Pings of several sizes: echoed byte for byte.
    for (seq, len) in [(1u16, 0usize), (2, 56), (3, 1000), (4, 1472)] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + usize::from(seq)) as u8).collect();
        transmit(
            d,
            &mem,
            &mut tx,
            &ping(host_mac, &payload, seq),
            DATA_BASE + 0x8_0000,
        );
        let r = receive(&rx, &mem, &mut next, |f| {
            f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1
        });
        assert_eq!(r[34], 0, "an echo reply");
        assert_eq!(&r[38..42], &[0x12, 0x34, (seq >> 8) as u8, seq as u8]);
        assert_eq!(&r[42..], &payload[..], "ping {seq} echoed");
    }
    let after = ns.tap_rx_packets();
    assert!(
        after >= before + 5,
        "the host counted {} frames from the guest, not 5",
        after - before
    );
    d.set_status(0);
}

#[test]
fn a_tap_in_a_namespace_carries_arp_and_ping_both_ways() {
    let ns = Namespace::new("tap");
    for pci in [false, true] {
        ns.run(|| {
            let net = Box::new(tap_device());
            if pci {
                exchange(&PciDriver::new(net), &ns);
            } else {
                exchange(&MmioDriver::new(net), &ns);
            }
        });
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The offloads the driver negotiates are the tap's, as the host's stack sees them (what
/// `ethtool -k` shows): on with GUEST_CSUM and GUEST_TSO4/6, off for a driver that
/// negotiates none; set again at every activation.
#[test]
fn the_tap_takes_the_offloads_the_driver_negotiated() {
    let ns = Namespace::new("offload");
    ns.run(|| {
        let net = tap_device();
        assert!(
            !host_offload(ETHTOOL_GTXCSUM) && !host_offload(ETHTOOL_GTSO),
            "plain at open"
        );
        let d = PciDriver::new(Box::new(net));
        let mem = d.mem().clone();
        let (rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        let start = |features: u64| {
            assert_ne!(d.negotiate(features) & FEATURES_OK, 0);
            for (i, r) in [&rx, &tx].iter().enumerate() {
                d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
                d.enable_queue(i as u16);
            }
            d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
            assert_eq!(d.status() & DRIVER_OK, DRIVER_OK);
        };
        let offloads = VERSION_1
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6);
        start(offloads);
        assert!(
            host_offload(ETHTOOL_GTXCSUM),
            "checksum offload after GUEST_CSUM"
        );
        assert!(host_offload(ETHTOOL_GTSO), "TSO after GUEST_TSO4/6");
        d.set_status(0);
        start(VERSION_1);
        assert!(
            !host_offload(ETHTOOL_GTXCSUM),
            "checksum offload without GUEST_CSUM"
        );
        assert!(!host_offload(ETHTOOL_GTSO), "TSO without GUEST_TSO4/6");
        d.set_status(0);
        // Checksums alone.
        start(VERSION_1 | (1 << VIRTIO_NET_F_GUEST_CSUM));
        assert!(host_offload(ETHTOOL_GTXCSUM));
        assert!(!host_offload(ETHTOOL_GTSO));
    });
}

/// A frame longer than the buffer the driver posted is dropped and counted, not cut (a
/// tap returns only what it copied: the backend reads the rest into a spill buffer to
/// tell), and the buffer takes the next frame that fits.
#[test]
fn a_frame_too_long_for_the_buffer_is_dropped_whole() {
    let ns = Namespace::new("cut");
    ip(&[
        "-n",
        &ns.0,
        "neigh",
        "add",
        "10.77.0.2",
        "lladdr",
        "52:54:00:12:34:56",
        "dev",
        TAP,
    ]);
    let udp = |len: usize| {
        let p = format!("/run/netns/{}", ns.0);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&p).unwrap();
            // SAFETY: setns on a namespace descriptor this thread holds.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let s = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
            s.send_to(&vec![0x77; len], "10.77.0.2:9").unwrap();
        })
        .join()
        .unwrap();
    };
    ns.run(|| {
        let net = tap_device();
        let h = net.handle();
        let d = MmioDriver::new(Box::new(net));
        let mem = d.mem().clone();
        let (mut rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        assert_ne!(d.negotiate(VERSION_1) & FEATURES_OK, 0);
        for (i, r) in [&rx, &tx].iter().enumerate() {
            d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
            d.enable_queue(i as u16);
        }
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        // One buffer of 200 bytes.
        let b = rx.add_descriptors(&[(DATA_BASE, 200, VRING_DESC_F_WRITE)]);
        rx.publish(b);
        d.notify(0);
        ns.wait_carrier();
        udp(1000);
        eventually("the long frame dropped", || {
            h.stats().queues[0].rx.drops >= 1
        });
        assert_eq!(rx.used_idx(), 0, "a cut frame was delivered");
        udp(50);
        rx.wait_used(1);
        let (_, len) = rx.used_elem(0);
        // 12 + 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 50.
        assert_eq!(len, 104);
        assert_eq!(read_bytes(&mem, DATA_BASE + 12 + 42, 50), vec![0x77; 50]);
    });
}

#[test]
fn a_missing_tap_is_a_clear_error() {
    let ns = Namespace::new("missing");
    ns.run(|| {
        let e = Tap::open("nosuchtap9", 1).unwrap_err();
        assert!(matches!(e, TapError::NoSuchInterface(_)), "{e:?}");
        assert!(e.to_string().contains("nosuchtap9"), "{e}");
        // A single-queue tap refuses a second queue.
        assert!(matches!(Tap::open(TAP, 2), Err(TapError::Attach { .. })));
        assert!(matches!(Tap::open("", 1), Err(TapError::Name(_))));
    });
}

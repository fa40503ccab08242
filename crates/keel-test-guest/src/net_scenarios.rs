//! Scenarios on the virtio-net driver (net.rs) with smoltcp as the IP
//! stack, on the first virtio-net device (PCI bus 0, else virtio-mmio
//! from the command line):
//!
//! * `net`: a self-test against a host peer that echoes UDP (`keel.peer=`):
//!   configuration (MAC, status, MTU), control-queue commands, every frame
//!   size from 60 bytes to the MTU both ways, checksum offload both ways,
//!   a link-status change (`keel.net_link=1`: the host toggles the link),
//!   and a reset in the middle of traffic.
//! * `net-serve`: ARP, ICMP echo, UDP echo (7) and discard (9), TCP echo
//!   (7), discard (9) and chargen (19), and a statistics port (UDP 7007),
//!   until the VM is stopped.
//! * `net` also checks the link-status interrupt, a reset in the middle of
//!   traffic and a pass with VERSION_1 alone.
//! * `net-bench`: `keel.net_n=N` UDP datagrams of `keel.net_size=BYTES`
//!   payload to `keel.peer=IP:PORT`, then `net-serve`.
//! * `net-ping`: ICMP echo requests to `keel.ping=ADDRESS`, no loss.
//!
//! The data path is polled at CPL3; when nothing has moved for a
//! millisecond the guest asks for a receive interrupt and waits (`hlt`),
//! woken by it or by a 10 ms LAPIC timer.

use core::cell::{RefCell, UnsafeCell};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use smoltcp::iface::{Config as IfConfig, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::{icmp, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpEndpoint,
    Ipv4Address,
};

use crate::acpi::Acpi;
use crate::arch::{self, rdtsc};
use crate::idt::VEC_TIMER;
use crate::irq::{self, lapic_write};
use crate::net::{
    self, ctrl, Net, PairStats, TxLayout, F_CSUM, F_CTRL_VQ, F_GUEST_CSUM, F_MQ, F_STATUS,
};
use crate::pit;
use crate::pvh::BootInfo;
use crate::text::Text;
use crate::virtio::{self, F_INDIRECT_DESC, INT_CONFIG};
use crate::virtio_scenarios::{self as vs, Ctx, Irqs};
use crate::Outcome;

macro_rules! say {
    ($name:expr, $($arg:tt)*) => {
        println!("keel-test: {}: {}", $name, format_args!($($arg)*))
    };
}

type Res<T> = Result<T, Text<160>>;

// ---------------------------------------------------------------------
// The command line.

/// `keel.KEY=VALUE` words this file reads.
struct Params {
    ip: Ipv4Address,
    prefix: u8,
    gw: Option<Ipv4Address>,
    peer: Option<(Ipv4Address, u16)>,
    pairs: usize,
    n: u32,
    size: usize,
    link: bool,
    offload: bool,
    /// `net-ping`: the address to ping and how many times.
    ping: Option<Ipv4Address>,
    ping_n: u32,
}

fn word<'c>(cmdline: &'c str, key: &str) -> Option<&'c str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("keel."))
        .filter_map(|w| w.strip_prefix(key))
        .find_map(|w| w.strip_prefix('='))
}

fn parse_ip(s: &str) -> Option<Ipv4Address> {
    let mut b = [0u8; 4];
    let mut it = s.split('.');
    for x in b.iter_mut() {
        *x = it.next()?.parse().ok()?;
    }
    it.next().is_none().then(|| Ipv4Address::from(b))
}

impl Params {
    fn parse(cmdline: &str) -> Res<Params> {
        let mut p = Params {
            ip: Ipv4Address::new(10, 0, 2, 15),
            prefix: 24,
            gw: None,
            peer: None,
            pairs: 2,
            n: 100_000,
            size: 18,
            link: false,
            offload: true,
            ping: None,
            ping_n: 20,
        };
        if let Some(v) = word(cmdline, "ip") {
            let (a, m) = v.split_once('/').unwrap_or((v, "24"));
            match (parse_ip(a), m.parse::<u8>()) {
                (Some(a), Ok(m)) if m <= 32 => (p.ip, p.prefix) = (a, m),
                _ => crate::fail!("keel.ip={v}: not ADDRESS/PREFIX (e.g. 10.0.2.15/24)"),
            }
        }
        if let Some(v) = word(cmdline, "gw") {
            let Some(a) = parse_ip(v) else {
                crate::fail!("keel.gw={v}: not an IPv4 address");
            };
            p.gw = Some(a);
        }
        if let Some(v) = word(cmdline, "peer") {
            match v
                .split_once(':')
                .map(|(a, port)| (parse_ip(a), port.parse::<u16>()))
            {
                Some((Some(a), Ok(port))) => p.peer = Some((a, port)),
                _ => crate::fail!("keel.peer={v}: not ADDRESS:PORT (e.g. 10.0.2.2:5555)"),
            }
        }
        let num = |key: &str, lo: u64, hi: u64| -> Res<Option<u64>> {
            match word(cmdline, key) {
                None => Ok(None),
                Some(v) => match v.parse::<u64>() {
                    Ok(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                    _ => crate::fail!("keel.{key}={v}: not a number from {lo} to {hi}"),
                },
            }
        };
        if let Some(x) = num("net_pairs", 1, net::MAX_PAIRS as u64)? {
            p.pairs = x as usize;
        }
        if let Some(x) = num("net_n", 1, u64::from(u32::MAX))? {
            p.n = x as u32;
        }
        if let Some(x) = num("net_size", 1, 8972)? {
            p.size = x as usize;
        }
        p.link = num("net_link", 0, 1)? == Some(1);
        if let Some(v) = word(cmdline, "ping") {
            let Some(a) = parse_ip(v) else {
                crate::fail!("keel.ping={v}: not an IPv4 address");
            };
            p.ping = Some(a);
        }
        if let Some(x) = num("ping_n", 1, 100_000)? {
            p.ping_n = x as u32;
        }
        p.offload = num("net_offload", 0, 1)? != Some(0);
        Ok(p)
    }
}

// ---------------------------------------------------------------------
// The device as smoltcp sees it.

/// The driver behind a RefCell (the receive and transmit tokens both
/// reach it), the first error the data path met, and the TSC rate.
struct Phy<'n, 'a> {
    net: RefCell<&'n mut Net<'a>>,
    err: RefCell<Option<Text<160>>>,
    offload: bool,
    mtu: usize,
}

impl Phy<'_, '_> {
    fn fail(&self, e: Text<160>) {
        let mut err = self.err.borrow_mut();
        if err.is_none() {
            *err = Some(e);
        }
    }
    fn check(&self) -> Res<()> {
        match self.err.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct Rx<'p, 'n, 'a> {
    phy: &'p Phy<'n, 'a>,
    frame: net::RxFrame,
}

struct Tx<'p, 'n, 'a> {
    phy: &'p Phy<'n, 'a>,
}

impl phy::RxToken for Rx<'_, '_, '_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(self.frame.bytes());
        if let Err(e) = self.phy.net.borrow_mut().recycle(self.frame) {
            self.phy.fail(e);
        }
        r
    }
}

/// Scratch for one outgoing frame (the queue pair is chosen from its
/// flow once it is written).
struct Scratch(UnsafeCell<[u8; net::MAX_FRAME]>);
// SAFETY: only `Tx::consume` uses it, on the one CPU that runs the stack,
// never reentrantly (it is claimed through SCRATCH_BUSY).
unsafe impl Sync for Scratch {}
static SCRATCH: Scratch = Scratch(UnsafeCell::new([0; net::MAX_FRAME]));
static SCRATCH_BUSY: AtomicBool = AtomicBool::new(false);

/// The queue pair of a frame: TCP/UDP over IPv4 by the sum of the ports
/// (the same both ways), anything else on pair 0.
fn flow_pair(f: &[u8], active: usize) -> usize {
    if active < 2 || f.len() < 38 || f[12..14] != [0x08, 0x00] {
        return 0;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    if !matches!(f[23], 6 | 17) || f.len() < 14 + ihl + 4 {
        return 0;
    }
    let l4 = 14 + ihl;
    let sp = u16::from_be_bytes([f[l4], f[l4 + 1]]);
    let dp = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
    (usize::from(sp) + usize::from(dp)) % active
}

impl phy::TxToken for Tx<'_, '_, '_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let len = len.min(net::MAX_FRAME);
        if SCRATCH_BUSY.swap(true, Ordering::Acquire) {
            panic!("transmit scratch buffer used twice at once");
        }
        // SAFETY: claimed through SCRATCH_BUSY just above.
        let scratch = unsafe { &mut *SCRATCH.0.get() };
        let r = f(&mut scratch[..len]);
        let mut net = self.phy.net.borrow_mut();
        let p = flow_pair(&scratch[..len], net.active);
        let res = match net.tx_slot(p) {
            Ok(Some((slot, buf))) => {
                buf[..len].copy_from_slice(&scratch[..len]);
                net.tx_put(p, slot, len, self.phy.offload)
            }
            Ok(None) => Err(text("a transmit token was given with the queue full")),
            Err(e) => Err(e),
        };
        SCRATCH_BUSY.store(false, Ordering::Release);
        drop(net);
        if let Err(e) = res {
            self.phy.fail(e);
        }
        r
    }
}

fn text(s: &str) -> Text<160> {
    let mut t = Text::new();
    t.push_str(s);
    t
}

impl<'n, 'a> phy::Device for Phy<'n, 'a> {
    type RxToken<'p>
        = Rx<'p, 'n, 'a>
    where
        Self: 'p;
    type TxToken<'p>
        = Tx<'p, 'n, 'a>
    where
        Self: 'p;

    fn receive(&mut self, _: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if !self.tx_room() {
            return None;
        }
        let got = self.net.borrow_mut().recv();
        match got {
            Ok(Some(frame)) => Some((Rx { phy: self, frame }, Tx { phy: self })),
            Ok(None) => None,
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    fn transmit(&mut self, _: Instant) -> Option<Self::TxToken<'_>> {
        self.tx_room().then_some(Tx { phy: self })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = None;
        let mut c = ChecksumCapabilities::default();
        if self.offload && self.net.borrow().has(F_CSUM) {
            // The device fills TCP and UDP checksums (NEEDS_CSUM).
            c.tcp = Checksum::Rx;
            c.udp = Checksum::Rx;
        }
        caps.checksum = c;
        caps
    }
}

impl Phy<'_, '_> {
    /// Every active transmit queue has room for a frame.
    fn tx_room(&self) -> bool {
        let mut net = self.net.borrow_mut();
        for p in 0..net.active {
            match net.tx_slot(p) {
                Ok(Some(_)) => {}
                Ok(None) => return false,
                Err(e) => {
                    drop(net);
                    self.fail(e);
                    return false;
                }
            }
        }
        true
    }
}

// ---------------------------------------------------------------------
// The stack: the interface and sockets in static memory.

const TCP_BUF: usize = 64 * 1024;
/// TCP sockets per service (echo, discard, chargen).
const TCP_PER_SERVICE: usize = 2;
const TCP_SOCKETS: usize = 3 * TCP_PER_SERVICE;
const UDP_BUF: usize = 128 * 1024;
const UDP_META: usize = 256;
/// UDP echo and discard, the statistics port and the self-test/benchmark
/// socket.
const UDP_SOCKETS: usize = 4;
const UDP_ECHO: u16 = 7;
const UDP_DISCARD: u16 = 9;
const TCP_ECHO: u16 = 7;
const TCP_DISCARD: u16 = 9;
const TCP_CHARGEN: u16 = 19;
const UDP_STATS: u16 = 7007;
const ICMP_BUF: usize = 16 * 1024;
const ICMP_META: usize = 16;
/// The identifier of `net-ping`'s echo requests.
const PING_IDENT: u16 = 0x6b6c;
/// Most interface polls between two publications of the transmit queues.
const POLL_BATCH: usize = 64;
/// The local port of the self-test's and the benchmark's datagrams.
const UDP_CLIENT: u16 = 40007;

/// The sockets' storage and packet metadata (not all-zero: in `.data`).
struct StackMem {
    sockets: [SocketStorage<'static>; TCP_SOCKETS + UDP_SOCKETS + 1],
    udp_meta: [[udp::PacketMetadata; UDP_META]; 2 * UDP_SOCKETS],
    icmp_meta: [[icmp::PacketMetadata; ICMP_META]; 2],
}

/// The sockets' byte buffers (zero: in `.bss`).
struct StackBufs {
    tcp: [[[u8; TCP_BUF]; 2]; TCP_SOCKETS],
    udp: [[u8; UDP_BUF]; 2 * UDP_SOCKETS],
    icmp: [[u8; ICMP_BUF]; 2],
}

struct StackCell(UnsafeCell<StackMem>);
struct BufsCell(UnsafeCell<StackBufs>);
// SAFETY: handed out once, as `&'static mut`, through STACK_CLAIMED.
unsafe impl Sync for StackCell {}
// SAFETY: as StackCell.
unsafe impl Sync for BufsCell {}

// Two statics: the zeroed buffers stay out of the image's `.data`.
static STACK_MEM: StackCell = StackCell(UnsafeCell::new(StackMem {
    sockets: [SocketStorage::EMPTY; TCP_SOCKETS + UDP_SOCKETS + 1],
    udp_meta: [[udp::PacketMetadata::EMPTY; UDP_META]; 2 * UDP_SOCKETS],
    icmp_meta: [[icmp::PacketMetadata::EMPTY; ICMP_META]; 2],
}));
static STACK_BUFS: BufsCell = BufsCell(UnsafeCell::new(StackBufs {
    tcp: [[[0; TCP_BUF]; 2]; TCP_SOCKETS],
    udp: [[0; UDP_BUF]; 2 * UDP_SOCKETS],
    icmp: [[0; ICMP_BUF]; 2],
}));
static STACK_CLAIMED: AtomicBool = AtomicBool::new(false);

/// What a TCP service socket does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Service {
    Echo,
    Discard,
    Chargen,
}

struct Conn {
    handle: SocketHandle,
    service: Service,
    port: u16,
    /// Bytes received / sent on the current connection.
    rx: u64,
    tx: u64,
    /// FNV-1a 64 of what was received (discard).
    hash: u64,
    open: bool,
}

struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: [Conn; TCP_SOCKETS],
    udp_echo: SocketHandle,
    udp_discard: SocketHandle,
    udp_stats: SocketHandle,
    udp_client: SocketHandle,
    icmp: SocketHandle,
    /// Datagrams and bytes UDP discard took.
    discarded: (u64, u64),
    /// The self-test's echoes: the number of the next datagram `echo_once` sends, and
    /// how many copies it sent that were not needed (their echoes may still come).
    echo_seq: u32,
    echo_spare: u32,
    hz: u64,
    t0: u64,
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

/// RFC 864's character generator pattern: line `i` (from 0) is the 72
/// printable characters starting at `' ' + i % 95`, cycling through the
/// 95, then CR LF; the pattern repeats after 95 lines.
const CHARGEN_LINE: usize = 74;
const CHARGEN_PERIOD: usize = 95 * CHARGEN_LINE;

fn chargen_byte(pos: usize) -> u8 {
    let pos = pos % CHARGEN_PERIOD;
    let (line, col) = (pos / CHARGEN_LINE, pos % CHARGEN_LINE);
    match col {
        72 => b'\r',
        73 => b'\n',
        _ => b' ' + ((line + col) % 95) as u8,
    }
}

impl Stack {
    fn new(net: &mut Net, p: &Params, hz: u64, offload: bool) -> Res<Stack> {
        if STACK_CLAIMED.swap(true, Ordering::AcqRel) {
            crate::fail!("the IP stack's memory is already in use");
        }
        // SAFETY: claimed once just above; never released.
        let (mem, bufs): (&'static mut StackMem, &'static mut StackBufs) =
            unsafe { (&mut *STACK_MEM.0.get(), &mut *STACK_BUFS.0.get()) };
        let mac = EthernetAddress(net.mac);
        let mut cfg = IfConfig::new(HardwareAddress::Ethernet(mac));
        cfg.random_seed = rdtsc();
        let t0 = rdtsc();
        let mtu = net.max_frame() - 14;
        let mut phy = Phy {
            net: RefCell::new(net),
            err: RefCell::new(None),
            offload,
            mtu,
        };
        let mut iface = Interface::new(cfg, &mut phy, Instant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(p.ip), p.prefix));
        });
        if let Some(gw) = p.gw {
            if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
                crate::fail!("cannot add the default route via {gw}");
            }
        }
        let StackMem {
            sockets,
            udp_meta,
            icmp_meta,
        } = mem;
        let StackBufs {
            tcp: tcpm,
            udp: udpm,
            icmp: icmpm,
        } = bufs;
        let mut set = SocketSet::new(&mut sockets[..]);
        let mut tcp_iter = tcpm.iter_mut();
        let services = [
            (Service::Echo, TCP_ECHO),
            (Service::Discard, TCP_DISCARD),
            (Service::Chargen, TCP_CHARGEN),
        ];
        let mut conns: [Option<Conn>; TCP_SOCKETS] = Default::default();
        for (i, c) in conns.iter_mut().enumerate() {
            let [rxb, txb] = tcp_iter.next().expect("one buffer pair per socket");
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(&mut rxb[..]),
                tcp::SocketBuffer::new(&mut txb[..]),
            );
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
            let (service, port) = services[i / TCP_PER_SERVICE];
            if s.listen(port).is_err() {
                crate::fail!("TCP listen on port {port} failed");
            }
            *c = Some(Conn {
                handle: set.add(s),
                service,
                port,
                rx: 0,
                tx: 0,
                hash: FNV_OFFSET,
                open: false,
            });
        }
        let mut udp_iter = udpm.chunks_mut(2).zip(udp_meta.chunks_mut(2));
        let mut udp_socket = |port: u16| -> Res<SocketHandle> {
            let (b, m) = udp_iter.next().expect("one buffer pair per socket");
            let (b0, b1) = b.split_at_mut(1);
            let (m0, m1) = m.split_at_mut(1);
            let mut s = udp::Socket::new(
                udp::PacketBuffer::new(&mut m0[0][..], &mut b0[0][..]),
                udp::PacketBuffer::new(&mut m1[0][..], &mut b1[0][..]),
            );
            if s.bind(port).is_err() {
                crate::fail!("UDP bind to port {port} failed");
            }
            Ok(set.add(s))
        };
        let udp_echo = udp_socket(UDP_ECHO)?;
        let udp_discard = udp_socket(UDP_DISCARD)?;
        let udp_stats = udp_socket(UDP_STATS)?;
        let udp_client = udp_socket(UDP_CLIENT)?;
        let [m0, m1] = icmp_meta;
        let [b0, b1] = icmpm;
        let mut s = icmp::Socket::new(
            icmp::PacketBuffer::new(&mut m0[..], &mut b0[..]),
            icmp::PacketBuffer::new(&mut m1[..], &mut b1[..]),
        );
        if s.bind(icmp::Endpoint::Ident(PING_IDENT)).is_err() {
            crate::fail!("cannot bind the ICMP socket");
        }
        let icmp = set.add(s);
        phy.check()?;
        Ok(Stack {
            iface,
            sockets: set,
            conns: conns.map(|c| c.expect("filled above")),
            udp_echo,
            udp_discard,
            udp_stats,
            udp_client,
            icmp,
            discarded: (0, 0),
            echo_seq: 0,
            echo_spare: 0,
            hz,
            t0,
        })
    }

    fn now(&self) -> Instant {
        let d = rdtsc().wrapping_sub(self.t0);
        Instant::from_micros((u128::from(d) * 1_000_000 / u128::from(self.hz)) as i64)
    }

    /// One round: the interface until it moves no more frames (smoltcp
    /// sends at most one packet a socket per poll) or `POLL_BATCH` polls,
    /// then publish what it queued with one notification a queue at most
    /// (a full transmit queue is published on the way).
    fn poll(&mut self, phy: &mut Phy) -> Res<()> {
        for _ in 0..POLL_BATCH {
            let before = activity(phy);
            let now = self.now();
            self.iface.poll(now, phy, &mut self.sockets);
            phy.check()?;
            if activity(phy) == before {
                break;
            }
        }
        phy.net.borrow_mut().kick_all();
        Ok(())
    }

    /// Serve the UDP echo, discard and statistics ports and the TCP
    /// services.
    fn serve(&mut self, name: &str, stats: &[PairStats], active: usize) {
        let s = self.sockets.get_mut::<udp::Socket>(self.udp_echo);
        let mut buf = [0u8; 9000];
        while s.can_send() {
            let Ok((n, meta)) = s.recv_slice(&mut buf) else {
                break;
            };
            let _ = s.send_slice(&buf[..n], meta.endpoint);
        }
        let s = self.sockets.get_mut::<udp::Socket>(self.udp_discard);
        while let Ok((b, _)) = s.recv() {
            self.discarded.0 += 1;
            self.discarded.1 += b.len() as u64;
        }
        let s = self.sockets.get_mut::<udp::Socket>(self.udp_stats);
        while s.can_send() {
            let Ok((_, meta)) = s.recv_slice(&mut buf) else {
                break;
            };
            let mut t = Text::<600>::new();
            let _ = write!(
                t,
                "pairs {active}, udp discard {} datagrams {} bytes",
                self.discarded.0, self.discarded.1
            );
            for (p, q) in stats.iter().enumerate().take(active) {
                let _ = write!(
                    t,
                    " | pair {p}: rx {} frames {} bytes, tx {} frames {} bytes, rx NEEDS_CSUM {}, rx DATA_VALID {}, rx merged {}, tx offloaded {}",
                    q.rx_frames, q.rx_bytes, q.tx_frames, q.tx_bytes, q.rx_needs_csum, q.rx_data_valid, q.rx_merged, q.tx_offloaded
                );
            }
            let _ = s.send_slice(t.as_str().as_bytes(), meta.endpoint);
        }
        for c in self.conns.iter_mut() {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if s.is_active() && !c.open {
                c.open = true;
                c.rx = 0;
                c.tx = 0;
                c.hash = FNV_OFFSET;
            }
            match c.service {
                Service::Echo => {
                    while s.can_recv() && s.send_queue() < s.send_capacity() {
                        let room = (s.send_capacity() - s.send_queue()).min(buf.len());
                        let Ok(n) = s.recv_slice(&mut buf[..room]) else {
                            break;
                        };
                        if n == 0 {
                            break;
                        }
                        c.rx += n as u64;
                        c.tx += s.send_slice(&buf[..n]).unwrap_or(0) as u64;
                    }
                }
                Service::Discard => {
                    while s.can_recv() {
                        let r = s.recv(|b| {
                            c.hash = fnv(c.hash, b);
                            (b.len(), b.len())
                        });
                        match r {
                            Ok(n) if n > 0 => c.rx += n as u64,
                            _ => break,
                        }
                    }
                }
                Service::Chargen => {
                    while s.can_send() {
                        let pos = c.tx;
                        let r = s.send(|b| {
                            for (i, x) in b.iter_mut().enumerate() {
                                *x = chargen_byte(pos as usize + i);
                            }
                            (b.len(), b.len())
                        });
                        match r {
                            Ok(n) if n > 0 => c.tx += n as u64,
                            _ => break,
                        }
                    }
                }
            }
            // The peer finished sending: finish ours and close.
            if s.state() == tcp::State::CloseWait && s.send_queue() == 0 {
                s.close();
            }
            if !s.is_open() {
                if c.open {
                    c.open = false;
                    let what = match c.service {
                        Service::Echo => "echo",
                        Service::Discard => "discard",
                        Service::Chargen => "chargen",
                    };
                    say!(
                        name,
                        "tcp {what} (port {}): connection closed; received {} bytes (fnv1a64 {:016x}), sent {} bytes",
                        c.port,
                        c.rx,
                        if c.service == Service::Discard { c.hash } else { 0 },
                        c.tx
                    );
                }
                let _ = s.listen(c.port);
            }
        }
    }
}

// ---------------------------------------------------------------------
// Finding the device.

fn with_device(
    name: &'static str,
    boot: &BootInfo,
    acpi: &Acpi,
    body: impl FnOnce(&Ctx) -> Outcome,
) -> Outcome {
    let want = vs::Wanted {
        device_type: net::NET_TYPE,
        what: "virtio-net",
        pci_ids: "1af4:1041, 1af4:1000",
        keel_option: "--net",
    };
    vs::with_device(name, boot, acpi, &want, body)
}

fn tsc_hz() -> Res<u64> {
    match pit::tsc_hz_tries() {
        Some(hz) => Ok(hz),
        None => crate::fail!("cannot calibrate the TSC against the PIT (5 tries)"),
    }
}

const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const LVT_PERIODIC: u32 = 1 << 17;

/// A 10 ms periodic LAPIC timer that bounds each idle wait.
fn start_wake_timer() {
    lapic_write(LAPIC_TIMER_DIV, 0b1011);
    lapic_write(LAPIC_LVT_TIMER, u32::from(VEC_TIMER) | LVT_PERIODIC);
    lapic_write(LAPIC_TIMER_INIT, 10_000_000);
}

fn open<'a>(c: &Ctx<'a>, p: &Params) -> Res<Net<'a>> {
    open_with(c, net::F_WANTED, p.pairs, false)
}

/// `open` asking for `want` (of what the device offers) and `pairs`.
fn open_with<'a>(c: &Ctx<'a>, want: u64, pairs: usize, rx_split: bool) -> Res<Net<'a>> {
    let pci = c.irqs == Irqs::Pci;
    let n = Net::open(
        c.t,
        want,
        pairs,
        rx_split,
        pci.then_some(0),
        vs::queue_vector(c),
    )?;
    say!(
        c.name,
        "features {} (offered {:#x})",
        net::feature_names(n.features),
        n.offered
    );
    let m = n.mac;
    say!(
        c.name,
        "MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}{}, status {}, MTU {}, max_virtqueue_pairs {}; {} queue pair(s) of {}/{} entries{}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        if n.has(net::F_MAC) { "" } else { " (made up: no VIRTIO_NET_F_MAC)" },
        Opt(n.cfg.status),
        Opt(n.cfg.mtu),
        Opt(n.cfg.max_pairs),
        n.pairs,
        n.rxq(0).size,
        n.txq(0).size,
        if n.has(F_CTRL_VQ) { ", control queue" } else { "" }
    );
    Ok(n)
}

/// `Some(v)` as a number, `None` as "not offered".
struct Opt<T>(Option<T>);

impl<T: core::fmt::Display> core::fmt::Display for Opt<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("not offered"),
        }
    }
}

// ---------------------------------------------------------------------
// net-serve and net-bench

pub fn scenario_serve(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let p = Params::parse(boot.cmdline())?;
    with_device("net-serve", boot, acpi, |c| serve(c, &p, false))
}

pub fn scenario_bench(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let p = Params::parse(boot.cmdline())?;
    if p.peer.is_none() {
        crate::fail!("net-bench needs keel.peer=ADDRESS:PORT");
    }
    with_device("net-bench", boot, acpi, |c| serve(c, &p, true))
}

fn serve(c: &Ctx, p: &Params, bench: bool) -> Outcome {
    let hz = tsc_hz()?;
    let mut net = open(c, p)?;
    let mut stack = Stack::new(&mut net, p, hz, p.offload)?;
    say!(
        c.name,
        "address {}/{}{}; serving ICMP echo, UDP echo (7) and discard (9), TCP echo (7), discard (9) and chargen (19), statistics (UDP {UDP_STATS})",
        p.ip,
        p.prefix,
        GwText(p.gw)
    );
    start_wake_timer();
    let mut phy = Phy {
        net: RefCell::new(&mut net),
        err: RefCell::new(None),
        offload: p.offload,
        mtu: 0,
    };
    phy.mtu = phy.net.borrow().max_frame() - 14;
    if bench {
        bench_send(c, &mut stack, &mut phy, p)?;
    }
    say!(c.name, "ready");
    let idle_after = hz / 1000;
    let mut last_activity = rdtsc();
    loop {
        let before = activity(&phy);
        stack.poll(&mut phy)?;
        let (stats, active) = {
            let n = phy.net.borrow();
            (n.stats, n.active)
        };
        stack.serve(c.name, &stats, active);
        stack.poll(&mut phy)?;
        if activity(&phy) != before {
            last_activity = rdtsc();
            continue;
        }
        if rdtsc().wrapping_sub(last_activity) < idle_after {
            core::hint::spin_loop();
            continue;
        }
        // Nothing moved for a millisecond: wait for a frame (or the timer).
        {
            let n = phy.net.borrow();
            if c.irqs == Irqs::Mmio {
                let s = c.t.interrupt_status();
                if s != 0 {
                    c.t.ack(s);
                }
            }
            n.arm_rx(true);
            if !n.rx_pending() {
                arch::idle_wait();
            }
            n.arm_rx(false);
        }
    }
}

struct GwText(Option<Ipv4Address>);
impl core::fmt::Display for GwText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(g) => write!(f, ", gateway {g}"),
            None => Ok(()),
        }
    }
}

fn activity(phy: &Phy) -> u64 {
    let n = phy.net.borrow();
    n.stats.iter().map(|s| s.rx_frames + s.tx_frames).sum()
}

fn bench_send(c: &Ctx, stack: &mut Stack, phy: &mut Phy, p: &Params) -> Outcome {
    let (ip, port) = p.peer.expect("checked by the caller");
    let to = IpEndpoint::new(IpAddress::Ipv4(ip), port);
    let mut payload = [0u8; 8972];
    let size = p.size.min(phy.mtu - 28);
    say!(
        c.name,
        "begin udp to {ip}:{port}: {} datagrams of {size} bytes",
        p.n
    );
    let start = rdtsc();
    let mut sent = 0u32;
    let deadline = 60 * stack.hz;
    while sent < p.n {
        let s = stack.sockets.get_mut::<udp::Socket>(stack.udp_client);
        while sent < p.n && s.can_send() {
            payload[..4].copy_from_slice(&sent.to_be_bytes());
            if s.send_slice(&payload[..size], to).is_err() {
                break;
            }
            sent += 1;
        }
        stack.poll(phy)?;
        if rdtsc().wrapping_sub(start) > deadline {
            crate::fail!("net-bench: only {sent} of {} datagrams left in 60 s", p.n);
        }
    }
    // Let the socket drain.
    let s = stack.udp_client;
    while stack.sockets.get::<udp::Socket>(s).send_queue() > 0 {
        stack.poll(phy)?;
        if rdtsc().wrapping_sub(start) > deadline {
            crate::fail!("net-bench: the last datagrams did not leave in 60 s");
        }
    }
    let us = u128::from(rdtsc().wrapping_sub(start)) * 1_000_000 / u128::from(stack.hz);
    say!(c.name, "end udp datagrams {sent} size {size}");
    say!(
        c.name,
        "{sent} datagrams in {us} us (guest TSC), {} datagrams/s",
        u128::from(sent) * 1_000_000 / us.max(1)
    );
    Ok(())
}

// ---------------------------------------------------------------------
// net-ping

/// Scenario `net-ping`: ICMP echo requests to `keel.ping=` (answering
/// everything `net-serve` answers meanwhile).
pub fn scenario_ping(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let p = Params::parse(boot.cmdline())?;
    if p.ping.is_none() {
        crate::fail!("net-ping needs keel.ping=ADDRESS");
    }
    with_device("net-ping", boot, acpi, |c| ping(c, &p))
}

const PING_DATA: [u8; 56] = [0x6b; 56];

/// Queue echo request `seq` to `to`; false when the socket has no room.
/// Requests wait in the socket until the peer's MAC address is known, so
/// while the peer is not up yet they fill it.
fn queue_echo(stack: &mut Stack, to: Ipv4Address, seq: u16) -> bool {
    let repr = Icmpv4Repr::EchoRequest {
        ident: PING_IDENT,
        seq_no: seq,
        data: &PING_DATA,
    };
    let s = stack.sockets.get_mut::<icmp::Socket>(stack.icmp);
    let Ok(buf) = s.send(repr.buffer_len(), IpAddress::Ipv4(to)) else {
        return false;
    };
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(buf),
        &ChecksumCapabilities::default(),
    );
    true
}

/// Wait until `limit` cycles after `start` for the reply to echo request
/// `seq` from `to`, serving meanwhile; the cycles it took. Replies to
/// earlier requests are skipped.
fn await_echo(
    c: &Ctx,
    stack: &mut Stack,
    phy: &mut Phy,
    to: Ipv4Address,
    seq: u16,
    start: u64,
    limit: u64,
) -> Res<Option<u64>> {
    while rdtsc().wrapping_sub(start) < limit {
        stack.poll(phy)?;
        let (stats, active) = {
            let n = phy.net.borrow();
            (n.stats, n.active)
        };
        stack.serve(c.name, &stats, active);
        let s = stack.sockets.get_mut::<icmp::Socket>(stack.icmp);
        while let Ok((b, from)) = s.recv() {
            let Ok(pkt) = Icmpv4Packet::new_checked(b) else {
                continue;
            };
            let Ok(r) = Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::default()) else {
                continue;
            };
            if let Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data: d,
            } = r
            {
                if from == IpAddress::Ipv4(to) && ident == PING_IDENT && seq_no == seq {
                    if d != PING_DATA {
                        crate::fail!("echo reply {seq} from {to} carries other data");
                    }
                    return Ok(Some(rdtsc().wrapping_sub(start)));
                }
            }
        }
    }
    Ok(None)
}

fn ping(c: &Ctx, p: &Params) -> Outcome {
    let to = p.ping.expect("checked by the caller");
    let hz = tsc_hz()?;
    let mut net = open(c, p)?;
    let mut stack = Stack::new(&mut net, p, hz, p.offload)?;
    let mtu = net.max_frame() - 14;
    let mut phy = Phy {
        net: RefCell::new(&mut net),
        err: RefCell::new(None),
        offload: p.offload,
        mtu,
    };
    say!(c.name, "address {}/{}; pinging {to}", p.ip, p.prefix);
    // The peer may still be starting: up to 30 s for a first reply.
    let mut seq = 0u16;
    let first = rdtsc();
    // Until its address is known the requests wait in the socket; once that
    // is full, keep serving and asking for the address without queueing more.
    let mut queued = 0u32;
    loop {
        let start = rdtsc();
        if queue_echo(&mut stack, to, seq) {
            queued += 1;
        }
        if await_echo(c, &mut stack, &mut phy, to, seq, start, hz / 5)?.is_some() {
            break;
        }
        seq = seq.wrapping_add(1);
        if rdtsc().wrapping_sub(first) > 30 * hz {
            crate::fail!("no echo reply from {to} within 30 s ({queued} requests queued)");
        }
    }
    say!(
        c.name,
        "{to} answers (after {queued} requests, {} s)",
        rdtsc().wrapping_sub(first) / hz
    );
    let mut total = 0u64;
    let mut worst = 0u64;
    for i in 0..p.ping_n {
        seq = seq.wrapping_add(1);
        let start = rdtsc();
        if !queue_echo(&mut stack, to, seq) {
            crate::fail!("cannot queue echo request {i} of {} to {to}", p.ping_n);
        }
        let Some(t) = await_echo(c, &mut stack, &mut phy, to, seq, start, hz)? else {
            crate::fail!(
                "echo request {i} of {} to {to}: no reply within 1 s",
                p.ping_n
            );
        };
        total += t;
        worst = worst.max(t);
    }
    let us = |t: u64| u128::from(t) * 1_000_000 / u128::from(hz);
    say!(
        c.name,
        "{} echo requests to {to}, {} replies, no loss; rtt avg {} us, max {} us",
        p.ping_n,
        p.ping_n,
        us(total / u64::from(p.ping_n)),
        us(worst)
    );
    // Keep answering for 3 s: a peer pinging this guest may have started
    // later.
    let linger = rdtsc();
    while rdtsc().wrapping_sub(linger) < 3 * hz {
        stack.poll(&mut phy)?;
        let (stats, active) = {
            let n = phy.net.borrow();
            (n.stats, n.active)
        };
        stack.serve(c.name, &stats, active);
    }
    Ok(())
}

// ---------------------------------------------------------------------
// net: the self-test

pub fn scenario_net(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let p = Params::parse(boot.cmdline())?;
    if p.peer.is_none() {
        crate::fail!("net needs keel.peer=ADDRESS:PORT (a host UDP echo peer)");
    }
    with_device("net", boot, acpi, |c| self_test(c, &p))
}

fn pattern(size: usize, i: usize) -> u8 {
    (i.wrapping_mul(7) ^ size) as u8
}

/// The tag (first four bytes) of the datagrams of the burst before a reset.
const BURST_TAG: u32 = u32::MAX;

/// Send one datagram of `size` bytes (at least 4) to the peer and wait for it
/// back, byte-exact. Its first four bytes number it. Sent again every 0.5 s
/// while nothing comes back (the first one after boot or a reset waits for
/// the peer's address, and a host that is slow to put its tap up drops the
/// answer), for up to 10 s. An echo of an earlier datagram is skipped only
/// as one of the copies sent that were not needed; the burst's, always.
/// Anything else that comes back fails the test: a frame the device
/// delivered twice, a stale buffer, a truncated datagram.
fn echo_once(stack: &mut Stack, phy: &mut Phy, to: IpEndpoint, size: usize) -> Outcome {
    let mut buf = [0u8; 9000];
    let h = stack.udp_client;
    let seq = stack.echo_seq;
    stack.echo_seq += 1;
    let start = rdtsc();
    let resend = stack.hz / 2;
    let limit = 10 * stack.hz;
    let mut sent = 0u32;
    let mut last_send = None;
    let fill = |buf: &mut [u8]| {
        for (i, b) in buf[..size].iter_mut().enumerate() {
            *b = pattern(size, i);
        }
        buf[..4].copy_from_slice(&seq.to_le_bytes());
    };
    loop {
        let now = rdtsc();
        if last_send.is_none_or(|t: u64| now.wrapping_sub(t) > resend) {
            fill(&mut buf);
            let s = stack.sockets.get_mut::<udp::Socket>(h);
            // A full socket (copies waiting for the peer's address) takes
            // none: the next try comes after another half second.
            if s.send_slice(&buf[..size], to).is_ok() {
                sent += 1;
            }
            last_send = Some(now);
        }
        stack.poll(phy)?;
        let s = stack.sockets.get_mut::<udp::Socket>(h);
        while let Ok((n, meta)) = s.recv_slice(&mut buf) {
            if meta.endpoint != to {
                continue;
            }
            if n < 4 {
                crate::fail!("sent {size} bytes to the peer, {n} came back");
            }
            let tag = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            if tag == BURST_TAG {
                continue;
            }
            if tag < seq && stack.echo_spare > 0 {
                stack.echo_spare -= 1;
                continue;
            }
            if tag != seq {
                crate::fail!(
                    "waiting for the echo of datagram {seq} ({size} bytes), datagram {tag} ({n} bytes) came back"
                );
            }
            if n != size {
                crate::fail!("sent {size} bytes to the peer, {n} came back");
            }
            if let Some(i) = (4..size).find(|&i| buf[i] != pattern(size, i)) {
                crate::fail!(
                    "a {size}-byte datagram came back with byte {i} {:#x}, not {:#x}",
                    buf[i],
                    pattern(size, i)
                );
            }
            stack.echo_spare += sent - 1;
            return Ok(());
        }
        if rdtsc().wrapping_sub(start) > limit {
            crate::fail!(
                "no echo of a {size}-byte datagram from {to} within 10 s ({sent} copies sent)"
            );
        }
    }
}

fn totals(n: &Net) -> PairStats {
    let mut t = PairStats::default();
    for s in &n.stats[..n.pairs] {
        t.rx_frames += s.rx_frames;
        t.tx_frames += s.tx_frames;
        t.rx_bytes += s.rx_bytes;
        t.tx_bytes += s.tx_bytes;
        t.rx_needs_csum += s.rx_needs_csum;
        t.rx_data_valid += s.rx_data_valid;
        t.rx_merged += s.rx_merged;
        t.tx_offloaded += s.tx_offloaded;
    }
    t
}

fn self_test(c: &Ctx, p: &Params) -> Outcome {
    let name = c.name;
    let hz = tsc_hz()?;
    let (ip, port) = p.peer.expect("checked by the caller");
    let to = IpEndpoint::new(IpAddress::Ipv4(ip), port);
    let mut net = open(c, p)?;

    // 1. Configuration.
    if net.has(net::F_MAC) {
        let m = net.mac;
        if m[0] & 1 != 0 || m == [0; 6] {
            crate::fail!("the device's MAC {m:02x?} is multicast or zero");
        }
    }
    if let Some(s) = net.cfg.status {
        if s & net::S_LINK_UP == 0 {
            crate::fail!("status {s:#x}: the link is down at start");
        }
        say!(name, "status {s:#x}: link up");
    }
    let mtu = net.max_frame() - 14;
    if mtu < 68 {
        crate::fail!("MTU {mtu}");
    }

    // 2. The control queue.
    if net.has(F_CTRL_VQ) {
        let mut done = Text::<160>::new();
        let mut cmd = |net: &mut Net, what: &str, class: u8, c: u8, data: &[u8], want: u8| {
            let ack = net.ctrl(class, c, data)?;
            if ack != want {
                crate::fail!("control command {what}: ack {ack}, expected {want}");
            }
            done.push_str(what);
            done.push_str(" ");
            Ok(())
        };
        if net.has(net::F_CTRL_RX) {
            for (what, c, v) in [
                ("PROMISC=1", ctrl::RX_PROMISC, 1u8),
                ("PROMISC=0", ctrl::RX_PROMISC, 0),
                ("ALLMULTI=1", ctrl::RX_ALLMULTI, 1),
                ("ALLMULTI=0", ctrl::RX_ALLMULTI, 0),
            ] {
                cmd(&mut net, what, ctrl::CLASS_RX, c, &[v], ctrl::OK)?;
            }
            // Two empty tables (unicast, multicast): le32 entries each.
            cmd(
                &mut net,
                "MAC_TABLE_SET",
                ctrl::CLASS_MAC,
                ctrl::MAC_TABLE_SET,
                &[0; 8],
                ctrl::OK,
            )?;
        }
        if net.has(net::F_CTRL_MAC_ADDR) {
            let mac = net.mac;
            cmd(
                &mut net,
                "MAC_ADDR_SET",
                ctrl::CLASS_MAC,
                ctrl::MAC_ADDR_SET,
                &mac,
                ctrl::OK,
            )?;
        }
        if net.has(F_MQ) {
            let pairs = (net.pairs as u16).to_le_bytes();
            cmd(
                &mut net,
                "VQ_PAIRS_SET",
                ctrl::CLASS_MQ,
                ctrl::MQ_VQ_PAIRS_SET,
                &pairs,
                ctrl::OK,
            )?;
            // 0 pairs is out of range (5.1.6.5.5).
            cmd(
                &mut net,
                "VQ_PAIRS_SET(0)=ERR",
                ctrl::CLASS_MQ,
                ctrl::MQ_VQ_PAIRS_SET,
                &[0, 0],
                ctrl::ERR,
            )?;
        }
        cmd(&mut net, "class-0x7f=ERR", 0x7f, 0, &[], ctrl::ERR)?;
        say!(name, "control queue: {}", done.as_str().trim_end());
    } else {
        say!(name, "control queue: not offered");
    }

    // 3. Every frame size both ways, against the peer's echo.
    let mut stack = Stack::new(&mut net, p, hz, p.offload)?;
    let mut phy = Phy {
        net: RefCell::new(&mut net),
        err: RefCell::new(None),
        offload: p.offload,
        mtu,
    };
    let (lo, hi) = (60 - 42, mtu - 28);
    // The transmit layouts take turns: one descriptor, three, three
    // through an indirect table.
    for size in lo..=hi {
        phy.net.borrow_mut().tx_layout = TxLayout::ALL[size % 3];
        echo_once(&mut stack, &mut phy, to, size)?;
    }
    phy.net.borrow_mut().tx_layout = TxLayout::Single;
    let t = totals(&phy.net.borrow());
    let [single, split, indirect] = phy.net.borrow().tx_by_layout;
    say!(
        name,
        "UDP echo of every frame size from 60 to {} bytes both ways: {} datagrams ({lo}-{hi} bytes) byte-exact",
        hi + 42,
        hi - lo + 1
    );
    say!(
        name,
        "transmitted frames by layout: {single} in one descriptor, {split} in three, {indirect} in three through an indirect table{}",
        if phy.net.borrow().has(F_INDIRECT_DESC) {
            ""
        } else {
            " (INDIRECT_DESC not offered: those went as three)"
        }
    );

    // 4. Checksum offload, both ways.
    let (csum, guest_csum) = {
        let n = phy.net.borrow();
        (n.has(F_CSUM), n.has(F_GUEST_CSUM))
    };
    say!(
        name,
        "checksums: {} frames sent with NEEDS_CSUM (device-completed){}; received {} with NEEDS_CSUM (completed here), {} with DATA_VALID{}",
        t.tx_offloaded,
        if csum { "" } else { " (CSUM not offered)" },
        t.rx_needs_csum,
        t.rx_data_valid,
        if guest_csum { "" } else { " (GUEST_CSUM not offered)" }
    );
    if csum && p.offload && t.tx_offloaded == 0 {
        crate::fail!("CSUM negotiated but no frame went out with NEEDS_CSUM");
    }

    // Software checksums (no NEEDS_CSUM on the way out): every 61st size.
    if csum && p.offload {
        phy.offload = false;
        let before = totals(&phy.net.borrow()).tx_offloaded;
        let mut k = 0;
        for size in (lo..=hi).step_by(61) {
            echo_once(&mut stack, &mut phy, to, size)?;
            k += 1;
        }
        let after = totals(&phy.net.borrow()).tx_offloaded;
        if after != before {
            crate::fail!(
                "{} frames went out with NEEDS_CSUM with offload off",
                after - before
            );
        }
        phy.offload = true;
        say!(
            name,
            "checksums computed by the guest: {k} datagrams ({lo}-{hi} bytes, every 61st size) byte-exact"
        );
    }

    // 5. The link status interrupt, when the host toggles the link.
    if p.link {
        let n = phy.net.borrow();
        link_toggle(c, &n, hz)?;
    }

    // 6. Reset in the middle of traffic: a burst on its way out and its
    // echoes on their way in.
    let h = stack.udp_client;
    let burst = 64;
    for i in 0..burst {
        let mut b = [i as u8; 512];
        b[..4].copy_from_slice(&BURST_TAG.to_le_bytes());
        let _ = stack.sockets.get_mut::<udp::Socket>(h).send_slice(&b, to);
    }
    stack.poll(&mut phy)?;
    let in_flight = phy.net.borrow().tx_in_flight();
    c.t.reset()?;
    say!(
        name,
        "reset with {in_flight} frames in flight on the transmit queues: status reads 0"
    );
    drop(net);
    let mut net = open(c, p)?;
    let mut phy = Phy {
        net: RefCell::new(&mut net),
        err: RefCell::new(None),
        offload: p.offload,
        mtu,
    };
    // Drop what was left of the burst (and its echoes).
    let _ = stack.poll(&mut phy);
    while stack.sockets.get_mut::<udp::Socket>(h).recv().is_ok() {}
    let settle = rdtsc();
    while rdtsc().wrapping_sub(settle) < hz / 10 {
        stack.poll(&mut phy)?;
        while stack.sockets.get_mut::<udp::Socket>(h).recv().is_ok() {}
    }
    for size in [lo, 100, 1000, hi] {
        echo_once(&mut stack, &mut phy, to, size)?;
    }
    say!(
        name,
        "after the reset: UDP echo works again ({lo}, 100, 1000 and {hi} bytes)"
    );
    drop(net);

    // 7. VERSION_1 alone: one pair, no control queue, no merged buffers,
    // no offloads: plain frames both ways, no header flags from the device.
    let mut net = open_with(c, virtio::F_VERSION_1, 1, true)?;
    let mut phy = Phy {
        net: RefCell::new(&mut net),
        err: RefCell::new(None),
        offload: false,
        mtu: 1500,
    };
    let settle = rdtsc();
    while rdtsc().wrapping_sub(settle) < hz / 20 {
        stack.poll(&mut phy)?;
        while stack.sockets.get_mut::<udp::Socket>(h).recv().is_ok() {}
    }
    for size in [lo, 100, 1000, 1472] {
        echo_once(&mut stack, &mut phy, to, size)?;
    }
    let t = totals(&phy.net.borrow());
    if t.rx_needs_csum + t.rx_data_valid != 0 {
        crate::fail!(
            "without GUEST_CSUM the device marked {} frames NEEDS_CSUM and {} DATA_VALID",
            t.rx_needs_csum,
            t.rx_data_valid
        );
    }
    say!(
        name,
        "VERSION_1 alone, receive buffers as two descriptors (header, data): UDP echo of {lo}, 100, 1000 and 1472 bytes; {} frames received, none with header flags",
        t.rx_frames
    );
    drop(net);
    Ok(())
}

/// Wait for the host to take the link down and up again: a
/// configuration interrupt each time and `status` following.
fn link_toggle(c: &Ctx, n: &Net, hz: u64) -> Outcome {
    if !n.has(F_STATUS) {
        crate::fail!("keel.net_link=1 but VIRTIO_NET_F_STATUS is not offered");
    }
    let counter = match c.irqs {
        Irqs::Pci => 0,
        Irqs::Mmio => 2,
    };
    for (what, up) in [("down", false), ("up", true)] {
        // Count (and clear a stale virtio-mmio status) before saying so:
        // the host acts on the line at once.
        let before = irq::vec_count(counter);
        let pending = c.t.interrupt_status();
        if pending != 0 {
            c.t.ack(pending);
        }
        say!(c.name, "link: waiting for the host to set the link {what}");
        let ok = arch::wait_for(30 * hz, || {
            irq::vec_count(counter) > before
                && n.link_status()
                    .is_some_and(|s| (s & net::S_LINK_UP != 0) == up)
        });
        if !ok {
            crate::fail!(
                "link {what}: no configuration interrupt with status {} within 30 s (interrupts {} -> {}, status {:#x}, InterruptStatus {pending:#x} -> {:#x})",
                if up { "LINK_UP" } else { "not LINK_UP" },
                before,
                irq::vec_count(counter),
                n.link_status().unwrap_or(0),
                c.t.interrupt_status()
            );
        }
        if c.irqs == Irqs::Mmio {
            let s = c.t.interrupt_status();
            if s & INT_CONFIG == 0 {
                crate::fail!("link {what}: InterruptStatus {s:#x} without the configuration bit");
            }
            c.t.ack(s);
        }
        say!(
            c.name,
            "link {what}: configuration interrupt, status {:#x}",
            n.link_status().unwrap_or(0)
        );
    }
    Ok(())
}

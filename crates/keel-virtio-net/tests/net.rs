//! The virtio-net device driven from the driver side (keel-virtio's test harness) over
//! both transports, with socket backends whose other end the test holds: TX and RX byte
//! for byte, merged RX buffers, the control queue, multi-queue, link status, every kind
//! of malformed input (counted, and the device goes on), and rate limits.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use keel_memory::GuestMemoryMmap;
use keel_virtio::testing::*;
use keel_virtio_net::backend::{Backend, HeaderSocket, SocketBackend};
use keel_virtio_net::{MacAddr, Net, NetHandle, NetOptions, RateLimit};
use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress};

const W: u16 = VRING_DESC_F_WRITE;
const Q: u16 = 64;
const HDR: usize = 12;
const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

fn bit(b: u32) -> u64 {
    1 << b
}

const BASE: u64 = VERSION_1 | EVENT_IDX | INDIRECT;

fn ctrl_features() -> u64 {
    BASE | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
}

/// A device with `pairs` socket backends; returns it, its handle and the peers.
fn device(
    pairs: usize,
    opts: NetOptions,
    header: bool,
) -> (Box<Net>, NetHandle, Vec<UnixDatagram>) {
    let mut backends: Vec<Box<dyn Backend>> = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..pairs {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if header {
            a.set_nonblocking(true).unwrap();
            backends.push(Box::new(HeaderSocket::new(a)));
        } else {
            backends.push(Box::new(SocketBackend::new(a).unwrap()));
        }
        peers.push(b);
    }
    let net = Net::new(
        backends,
        NetOptions {
            mac: MAC,
            queue_size: Q,
            ..opts
        },
    )
    .unwrap();
    let h = net.handle();
    (Box::new(net), h, peers)
}

fn opts() -> NetOptions {
    NetOptions::default()
}

/// Runs `test` over virtio-mmio and virtio-pci, each with a fresh device.
fn both(
    pairs: usize,
    opts: NetOptions,
    header: bool,
    test: impl Fn(&dyn Driver, &NetHandle, &[UnixDatagram]),
) {
    let (n, h, p) = device(pairs, opts, header);
    test(&MmioDriver::new(n), &h, &p);
    let (n, h, p) = device(pairs, opts, header);
    test(&PciDriver::new(n), &h, &p);
}

/// Ring `i` of a test (queue i's rings, clear of each other and of the data).
fn ring(mem: &GuestMemoryMmap, i: u64) -> Ring<'_> {
    Ring::at(mem, RING_BASE + 0x4000 * i, Q)
}

/// Negotiates `features`, sets up `rings` as queues 0.. and sets DRIVER_OK.
fn start(d: &dyn Driver, features: u64, rings: &[&Ring]) {
    assert_ne!(
        d.negotiate(features) & FEATURES_OK,
        0,
        "FEATURES_OK refused"
    );
    for (i, r) in rings.iter().enumerate() {
        d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
        d.enable_queue(i as u16);
    }
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(d.status() & DRIVER_OK, DRIVER_OK);
}

/// An Ethernet frame to `dst` of `len` bytes with a recognisable payload.
fn frame(dst: MacAddr, len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

/// Puts a TX chain in `ring`: `hdr` then `payload` at `at`, split in `pieces` readable
/// descriptors (the header split too when pieces > 1).
fn send(
    mem: &GuestMemoryMmap,
    ring: &mut Ring,
    hdr: [u8; HDR],
    payload: &[u8],
    at: u64,
    pieces: usize,
) {
    let mut all = hdr.to_vec();
    all.extend_from_slice(payload);
    mem.write_slice(&all, GuestAddress(at)).unwrap();
    let step = all.len().div_ceil(pieces.max(1)).max(1);
    let descs: Vec<_> = (0..all.len())
        .step_by(step)
        .map(|o| (at + o as u64, step.min(all.len() - o) as u32, 0))
        .collect();
    let h = ring.add_descriptors(&descs);
    ring.publish(h);
}

/// Posts `n` RX buffers of `size` bytes from `at`.
fn post(ring: &mut Ring, n: usize, size: u32, at: u64) {
    for i in 0..n {
        let h = ring.add_descriptors(&[(at + i as u64 * u64::from(size), size, W)]);
        ring.publish(h);
    }
}

fn recv(peer: &UnixDatagram) -> Vec<u8> {
    let mut buf = vec![0u8; 70000];
    let n = peer.recv(&mut buf).expect("a frame from the device");
    buf.truncate(n);
    buf
}

#[test]
fn configuration_shows_mac_status_pairs_and_mtu() {
    both(
        2,
        NetOptions {
            mtu: 9000,
            ..opts()
        },
        false,
        |d, h, _| {
            let f = d.device_features();
            for b in [
                VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_STATUS,
                VIRTIO_NET_F_MTU,
                VIRTIO_NET_F_MRG_RXBUF,
                VIRTIO_NET_F_CTRL_VQ,
                VIRTIO_NET_F_CTRL_RX,
                VIRTIO_NET_F_CTRL_MAC_ADDR,
                VIRTIO_NET_F_MQ,
            ] {
                assert_ne!(f & bit(b), 0, "feature {b} not offered");
            }
            // A socket carries no virtio-net header: no offloads.
            for b in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
            ] {
                assert_eq!(f & bit(b), 0, "feature {b} offered over a socket");
            }
            let mut c = [0u8; 12];
            d.read_config(0, &mut c);
            assert_eq!(&c[..6], &MAC.0);
            assert_eq!(
                u16::from_le_bytes([c[6], c[7]]),
                VIRTIO_NET_S_LINK_UP as u16
            );
            assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
            assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
            assert_eq!(h.mac(), MAC);
        },
    );
    // A tap-like backend: every offload is offered.
    let (n, _, _) = device(1, opts(), true);
    let f = keel_virtio::device::VirtioDevice::features(&*n);
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
    ] {
        assert_ne!(
            f & bit(b),
            0,
            "feature {b} not offered with a tap-like backend"
        );
    }
}

#[test]
fn tx_frames_reach_the_backend_byte_exact() {
    both(1, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let (rx, mut tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE, &[&rx, &tx]);
        for (i, (len, pieces)) in [(60, 1), (1514, 4), (100, 7), (1514, 1)].iter().enumerate() {
            let f = frame(MacAddr([2, 0, 0, 0, 0, 1]), *len, i as u8);
            send(
                &mem,
                &mut tx,
                [0; HDR],
                &f,
                DATA_BASE + 0x1000 * i as u64,
                *pieces,
            );
            d.notify(1);
            assert_eq!(recv(&peers[0]), f, "frame {i}");
        }
        tx.wait_used(4);
        let s = h.stats().queues[0].tx;
        assert_eq!(
            (s.frames, s.bytes, s.errors, s.drops),
            (4, 60 + 1514 + 100 + 1514, 0, 0)
        );
    });
}

#[test]
fn rx_frames_land_byte_exact_one_buffer_each() {
    both(1, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let (mut rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE, &[&rx, &tx]);
        post(&mut rx, 4, 2048, DATA_BASE);
        d.notify(0);
        let sizes = [60usize, 1514, 800, 64];
        for (i, len) in sizes.iter().enumerate() {
            let f = frame(MAC, *len, i as u8);
            peers[0].send(&f).unwrap();
            rx.wait_used(i as u16 + 1);
            let (id, used) = rx.used_elem(i as u16);
            assert_eq!(id, i as u32);
            assert_eq!(used as usize, HDR + len);
            let at = DATA_BASE + 2048 * i as u64;
            let got = read_bytes(&mem, at, HDR + len);
            let mut hdr = [0u8; HDR];
            hdr[10] = 1; // num_buffers
            assert_eq!(&got[..HDR], &hdr, "header of frame {i}");
            assert_eq!(&got[HDR..], &f[..], "frame {i}");
        }
        let s = h.stats().queues[0].rx;
        assert_eq!(
            (s.frames, s.bytes, s.drops, s.errors),
            (4, 60 + 1514 + 800 + 64, 0, 0)
        );
    });
}

#[test]
fn merged_buffers_carry_a_frame_and_count_num_buffers() {
    both(1, opts(), false, |d, _, peers| {
        let mem = d.mem().clone();
        let (mut rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE | bit(VIRTIO_NET_F_MRG_RXBUF), &[&rx, &tx]);
        post(&mut rx, 8, 512, DATA_BASE);
        d.notify(0);
        let f = frame(MAC, 1500, 7);
        peers[0].send(&f).unwrap();
        rx.wait_used(3);
        // 1512 bytes with the header: 512 + 512 + 488.
        let lens: Vec<u32> = (0..3).map(|i| rx.used_elem(i).1).collect();
        assert_eq!(lens, [512, 512, 488]);
        let got = read_bytes(&mem, DATA_BASE, 1512);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[HDR..], &f[..]);
        // The next frame starts in the fourth buffer.
        let g = frame(MAC, 100, 9);
        peers[0].send(&g).unwrap();
        rx.wait_used(4);
        assert_eq!(rx.used_elem(3), (3, 112));
        let got = read_bytes(&mem, DATA_BASE + 3 * 512, 112);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(&got[HDR..], &g[..]);
    });
}

#[test]
fn without_buffers_frames_wait_in_the_backend() {
    both(1, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let (mut rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE, &[&rx, &tx]);
        let frames: Vec<_> = (0..3).map(|i| frame(MAC, 200, i)).collect();
        for f in &frames {
            peers[0].send(f).unwrap();
        }
        settle();
        assert_eq!(rx.used_idx(), 0);
        assert_eq!(h.stats().queues[0].rx.drops, 0, "nothing may be lost");
        post(&mut rx, 3, 2048, DATA_BASE);
        d.notify(0);
        rx.wait_used(3);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(&read_bytes(&mem, DATA_BASE + 2048 * i as u64 + 12, 200), f);
        }
    });
}

/// Sends a control command; returns the ack.
fn command(
    d: &dyn Driver,
    mem: &GuestMemoryMmap,
    ctrl: &mut Ring,
    q: u16,
    cmd: &[u8],
    at: u64,
) -> u8 {
    mem.write_slice(cmd, GuestAddress(at)).unwrap();
    mem.write_obj(0xaau8, GuestAddress(at + 0x800)).unwrap();
    let used = ctrl.used_idx();
    let h = ctrl.add_descriptors(&[(at, cmd.len() as u32, 0), (at + 0x800, 1, W)]);
    ctrl.publish(h);
    d.notify(q);
    ctrl.wait_used(used.wrapping_add(1));
    mem.read_obj(GuestAddress(at + 0x800)).unwrap()
}

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

fn cmd(class: u32, command: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![class as u8, command as u8];
    v.extend_from_slice(data);
    v
}

#[test]
fn control_queue_sets_the_receive_filter_and_the_mac() {
    both(1, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let (mut rx, tx, mut ctrl) = (ring(&mem, 0), ring(&mem, 1), ring(&mem, 2));
        start(d, ctrl_features(), &[&rx, &tx, &ctrl]);
        let c = DATA_BASE + 0x8_0000;
        post(&mut rx, 8, 2048, DATA_BASE);
        d.notify(0);
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 0x77]);
        // Promiscuous at reset: a frame to another address arrives.
        peers[0].send(&frame(other, 100, 1)).unwrap();
        rx.wait_used(1);
        assert_eq!(
            command(
                d,
                &mem,
                &mut ctrl,
                2,
                &cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
                c
            ),
            OK
        );
        peers[0].send(&frame(other, 100, 2)).unwrap();
        peers[0].send(&frame(MAC, 100, 3)).unwrap();
        rx.wait_used(2);
        settle();
        assert_eq!(
            rx.used_idx(),
            2,
            "the frame to another address was delivered"
        );
        assert_eq!(
            read_bytes(&mem, DATA_BASE + 2048 + 12, 100),
            frame(MAC, 100, 3)
        );
        assert_eq!(h.stats().queues[0].rx.drops, 1);
        // Multicast: refused, then accepted by the table, then by allmulti.
        let mc = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        peers[0].send(&frame(mc, 100, 4)).unwrap();
        let mut table = 0u32.to_le_bytes().to_vec();
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&mc.0);
        assert_eq!(
            command(
                d,
                &mem,
                &mut ctrl,
                2,
                &cmd(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &table),
                c
            ),
            OK
        );
        peers[0].send(&frame(mc, 100, 5)).unwrap();
        rx.wait_used(3);
        assert_eq!(
            read_bytes(&mem, DATA_BASE + 2 * 2048 + 12, 100),
            frame(mc, 100, 5)
        );
        // A new MAC: the configuration shows it and frames to it arrive.
        let new = MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(
            command(
                d,
                &mem,
                &mut ctrl,
                2,
                &cmd(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &new.0),
                c
            ),
            OK
        );
        let mut m = [0u8; 6];
        d.read_config(0, &mut m);
        assert_eq!(m, new.0);
        assert_eq!(h.mac(), new);
        peers[0].send(&frame(new, 100, 6)).unwrap();
        rx.wait_used(4);
        // Garbage: every one answered ERR, counted, and the queue goes on.
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![VIRTIO_NET_CTRL_RX as u8],
            cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[]),
            cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[1, 1]),
            cmd(VIRTIO_NET_CTRL_RX, 99, &[1]),
            cmd(99, 0, &[1]),
            cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_ADDR_SET,
                &[1, 2, 3],
            ),
            cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_ADDR_SET,
                &[1, 0, 0, 0, 0, 1],
            ),
            cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &u32::MAX.to_le_bytes(),
            ),
            cmd(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &[0, 0, 0, 0, 0, 0, 0, 0, 9],
            ),
            cmd(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &[1, 0]),
        ];
        let before = h.stats().ctrl;
        for g in &garbage {
            assert_eq!(command(d, &mem, &mut ctrl, 2, g, c), ERR, "{g:?}");
        }
        // No room for the ack: used with nothing written, counted.
        let used = ctrl.used_idx();
        let hd = ctrl.add_descriptors(&[(c, 3, 0)]);
        ctrl.publish(hd);
        d.notify(2);
        ctrl.wait_used(used + 1);
        let after = h.stats().ctrl;
        assert_eq!(after.errors - before.errors, garbage.len() as u64 + 1);
        assert_eq!(after.ok, before.ok);
        assert_eq!(
            command(
                d,
                &mem,
                &mut ctrl,
                2,
                &cmd(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[1]),
                c
            ),
            OK
        );
    });
}

#[test]
fn the_driver_chooses_how_many_pairs_carry_traffic() {
    both(2, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let rings: Vec<Ring> = (0..5).map(|i| ring(&mem, i)).collect();
        let mut rings = rings;
        let feats = ctrl_features() | bit(VIRTIO_NET_F_MQ);
        start(d, feats, &rings.iter().collect::<Vec<_>>());
        post(&mut rings[0], 4, 2048, DATA_BASE);
        post(&mut rings[2], 4, 2048, DATA_BASE + 0x4000);
        d.notify(0);
        d.notify(2);
        // Only pair 0 until the driver says otherwise.
        peers[1].send(&frame(MAC, 100, 1)).unwrap();
        settle();
        assert_eq!(rings[2].used_idx(), 0, "pair 1 used before VQ_PAIRS_SET");
        let c = DATA_BASE + 0x8_0000;
        let (bad0, bad3) = (
            cmd(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &0u16.to_le_bytes(),
            ),
            cmd(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &3u16.to_le_bytes(),
            ),
        );
        let mut ctrl = std::mem::replace(&mut rings[4], ring(&mem, 9));
        assert_eq!(command(d, &mem, &mut ctrl, 4, &bad0, c), ERR);
        assert_eq!(command(d, &mem, &mut ctrl, 4, &bad3, c), ERR);
        let two = cmd(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &2u16.to_le_bytes(),
        );
        assert_eq!(command(d, &mem, &mut ctrl, 4, &two, c), OK);
        rings[2].wait_used(1);
        assert_eq!(
            read_bytes(&mem, DATA_BASE + 0x4000 + 12, 100),
            frame(MAC, 100, 1)
        );
        // Both pairs at once, each way.
        peers[0].send(&frame(MAC, 300, 2)).unwrap();
        peers[1].send(&frame(MAC, 400, 3)).unwrap();
        let mut tx0 = std::mem::replace(&mut rings[1], ring(&mem, 10));
        let mut tx1 = std::mem::replace(&mut rings[3], ring(&mem, 11));
        send(
            &mem,
            &mut tx0,
            [0; HDR],
            &frame(MacAddr([2, 0, 0, 0, 0, 1]), 500, 4),
            DATA_BASE + 0x10000,
            2,
        );
        send(
            &mem,
            &mut tx1,
            [0; HDR],
            &frame(MacAddr([2, 0, 0, 0, 0, 1]), 600, 5),
            DATA_BASE + 0x12000,
            3,
        );
        d.notify(1);
        d.notify(3);
        rings[0].wait_used(1);
        rings[2].wait_used(2);
        assert_eq!(recv(&peers[0]), frame(MacAddr([2, 0, 0, 0, 0, 1]), 500, 4));
        assert_eq!(recv(&peers[1]), frame(MacAddr([2, 0, 0, 0, 0, 1]), 600, 5));
        tx0.wait_used(1);
        tx1.wait_used(1);
        let s = h.stats();
        assert_eq!((s.queues[0].rx.frames, s.queues[1].rx.frames), (1, 2));
        assert_eq!((s.queues[0].tx.frames, s.queues[1].tx.frames), (1, 1));
    });
}

#[test]
fn link_down_raises_a_config_interrupt_and_stops_traffic() {
    both(1, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let (mut rx, mut tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE | bit(VIRTIO_NET_F_STATUS), &[&rx, &tx]);
        post(&mut rx, 4, 2048, DATA_BASE);
        d.notify(0);
        settle();
        let irqs = d.irqs();
        h.set_link(false);
        assert!(!h.link_up());
        eventually("a configuration interrupt", || d.irqs() > irqs);
        let mut st = [0u8; 2];
        d.read_config(6, &mut st);
        assert_eq!(u16::from_le_bytes(st), 0);
        // Nothing moves: TX dropped and counted, RX stays in the backend.
        send(
            &mem,
            &mut tx,
            [0; HDR],
            &frame(MAC, 100, 1),
            DATA_BASE + 0x10000,
            1,
        );
        d.notify(1);
        tx.wait_used(1);
        assert_eq!(h.stats().queues[0].tx.drops, 1);
        peers[0].send(&frame(MAC, 100, 2)).unwrap();
        settle();
        assert_eq!(rx.used_idx(), 0);
        h.set_link(true);
        d.read_config(6, &mut st);
        assert_eq!(u16::from_le_bytes(st), VIRTIO_NET_S_LINK_UP as u16);
        rx.wait_used(1);
        assert_eq!(read_bytes(&mem, DATA_BASE + 12, 100), frame(MAC, 100, 2));
    });
}

#[test]
fn malformed_tx_is_counted_and_the_device_goes_on() {
    let offloads =
        BASE | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
    both(1, opts(), true, |d, h, peers| {
        let mem = d.mem().clone();
        let (rx, mut tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, offloads, &[&rx, &tx]);
        let f = frame(MacAddr([2, 0, 0, 0, 0, 1]), 200, 1);
        let hdr = |flags: u8, gso: u8, hdr_len: u16, gso_size: u16, cs: u16, co: u16| {
            let mut h = [0u8; HDR];
            h[0] = flags;
            h[1] = gso;
            h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
            h[4..6].copy_from_slice(&gso_size.to_le_bytes());
            h[6..8].copy_from_slice(&cs.to_le_bytes());
            h[8..10].copy_from_slice(&co.to_le_bytes());
            h
        };
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        let tcp4 = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
        let mut used = 0;
        let mut errors = 0;
        // A chain shorter than the header.
        mem.write_slice(&[0u8; 8], GuestAddress(DATA_BASE)).unwrap();
        let hd = tx.add_descriptors(&[(DATA_BASE, 8, 0)]);
        tx.publish(hd);
        // A frame longer than 65550 bytes.
        let big = vec![0u8; 65551];
        send(&mem, &mut tx, [0; HDR], &big, DATA_BASE + 0x1000, 3);
        // Unknown GSO types, GSO_UDP (not offered), ECN not negotiated.
        for g in [
            2u8,
            VIRTIO_NET_HDR_GSO_UDP as u8,
            0x7f,
            tcp4 | VIRTIO_NET_HDR_GSO_ECN as u8,
        ] {
            send(
                &mem,
                &mut tx,
                hdr(csum, g, 54, 1448, 34, 16),
                &f,
                DATA_BASE + 0x2_0000,
                1,
            );
            errors += 1;
        }
        // hdr_len past the frame; checksum past the frame; an unknown flag; GSO without
        // a segment size.
        send(
            &mem,
            &mut tx,
            hdr(csum, tcp4, 201, 1448, 34, 16),
            &f,
            DATA_BASE + 0x2_1000,
            2,
        );
        send(
            &mem,
            &mut tx,
            hdr(csum, 0, 0, 0, 190, 16),
            &f,
            DATA_BASE + 0x2_2000,
            1,
        );
        send(
            &mem,
            &mut tx,
            hdr(0x80, 0, 0, 0, 0, 0),
            &f,
            DATA_BASE + 0x2_3000,
            1,
        );
        send(
            &mem,
            &mut tx,
            hdr(csum, tcp4, 54, 0, 34, 16),
            &f,
            DATA_BASE + 0x2_4000,
            1,
        );
        // A writable buffer in a TX chain; a buffer outside guest memory.
        let hd = tx.add_descriptors(&[(DATA_BASE, 12, 0), (DATA_BASE + 0x100, 200, W)]);
        tx.publish(hd);
        let hd = tx.add_descriptors(&[(DATA_BASE, 12, 0), (0x4000_0000, 200, 0)]);
        tx.publish(hd);
        errors += 2 + 4 + 2;
        used += errors;
        d.notify(1);
        tx.wait_used(used);
        assert_eq!(h.stats().queues[0].tx.errors, u64::from(errors));
        assert_eq!(h.stats().queues[0].tx.frames, 0);
        // Still working: a valid offloaded frame goes through, header and all.
        let good = hdr(csum, tcp4, 54, 1448, 34, 16);
        send(&mem, &mut tx, good, &f, DATA_BASE + 0x3_0000, 2);
        d.notify(1);
        let got = recv(&peers[0]);
        assert_eq!(&got[..HDR], &good);
        assert_eq!(&got[HDR..], &f[..]);
        eventually("the frame counted", || h.stats().queues[0].tx.frames == 1);
        assert_eq!(d.status() & NEEDS_RESET, 0);
    });
}

#[test]
fn malformed_rx_buffers_are_counted_and_the_device_goes_on() {
    both(1, opts(), false, |d, h, peers| {
        let mem = d.mem().clone();
        let (mut rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE, &[&rx, &tx]);
        // A readable buffer, a buffer outside memory, then a good one.
        let a = rx.add_descriptors(&[(DATA_BASE, 2048, 0)]);
        rx.publish(a);
        let b = rx.add_descriptors(&[(0x4000_0000, 2048, W)]);
        rx.publish(b);
        // Too small for the frame: it is dropped, the buffer given back.
        let c = rx.add_descriptors(&[(DATA_BASE + 0x1000, 100, W)]);
        rx.publish(c);
        d.notify(0);
        peers[0].send(&frame(MAC, 1000, 1)).unwrap();
        rx.wait_used(2);
        eventually("the drop", || h.stats().queues[0].rx.drops == 1);
        assert_eq!(h.stats().queues[0].rx.errors, 2);
        // The small buffer still takes a small frame.
        peers[0].send(&frame(MAC, 60, 2)).unwrap();
        rx.wait_used(3);
        assert_eq!(rx.used_elem(2), (u32::from(c), 72));
        assert_eq!(
            read_bytes(&mem, DATA_BASE + 0x1000 + 12, 60),
            frame(MAC, 60, 2)
        );
    });
}

#[test]
fn frames_per_second_are_limited() {
    let limit = NetOptions {
        tx_limit: RateLimit {
            packets_per_sec: 20,
            bytes_per_sec: 0,
        },
        ..opts()
    };
    both(1, limit, false, |d, h, peers| {
        let mem = d.mem().clone();
        let (rx, mut tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE, &[&rx, &tx]);
        let start_t = Instant::now();
        for i in 0..12u8 {
            send(
                &mem,
                &mut tx,
                [0; HDR],
                &frame(MAC, 100, i),
                DATA_BASE + 0x1000 * u64::from(i),
                1,
            );
        }
        d.notify(1);
        for i in 0..12u8 {
            assert_eq!(recv(&peers[0]), frame(MAC, 100, i));
        }
        // A burst of 2, then one every 50 ms: at least 9 intervals.
        let t = start_t.elapsed();
        assert!(
            t >= Duration::from_millis(440),
            "12 frames at 20/s took {t:?}"
        );
        eventually("12 frames counted", || h.stats().queues[0].tx.frames == 12);
        assert_eq!(h.limits().1.packets_per_sec, 20);
    });
}

/// Two devices on one socket path (`socket=PATH` for two VMs): the first binds it, the
/// second connects and greets it; frames go both ways, the bound side may speak first,
/// and the path is gone once the first is dropped.
#[test]
fn two_devices_share_a_socket_path() {
    let dir = std::env::temp_dir().join(format!("keel-net-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("link.sock");
    let mk = |mac: MacAddr| -> Box<Net> {
        let b: Box<dyn Backend> = Box::new(SocketBackend::at_path(&path).unwrap());
        Box::new(
            Net::new(
                vec![b],
                NetOptions {
                    mac,
                    queue_size: Q,
                    ..opts()
                },
            )
            .unwrap(),
        )
    };
    let (mac_a, mac_b) = (MAC, MacAddr([0x52, 0x54, 0, 0, 0, 0xb]));
    let na = mk(mac_a);
    let ha = na.handle();
    let a = MmioDriver::new(na);
    assert!(path.exists(), "the first device binds the path");
    let b = PciDriver::new(mk(mac_b));
    let (ma, mb) = (a.mem().clone(), b.mem().clone());
    let (mut rxa, mut txa) = (ring(&ma, 0), ring(&ma, 1));
    let (mut rxb, mut txb) = (ring(&mb, 0), ring(&mb, 1));
    start(&a, BASE, &[&rxa, &txa]);
    start(&b, BASE, &[&rxb, &txb]);
    post(&mut rxa, 4, 2048, DATA_BASE);
    post(&mut rxb, 4, 2048, DATA_BASE);
    a.notify(0);
    b.notify(0);
    // A, the bound side, speaks first: B's greeting told it where B is. Then B answers.
    let fa = frame(mac_b, 1514, 2);
    send(&ma, &mut txa, [0; HDR], &fa, DATA_BASE + 0x10000, 3);
    a.notify(1);
    rxb.wait_used(1);
    assert_eq!(read_bytes(&mb, DATA_BASE + HDR as u64, 1514), fa);
    let fb = frame(mac_a, 300, 1);
    send(&mb, &mut txb, [0; HDR], &fb, DATA_BASE + 0x10000, 2);
    b.notify(1);
    rxa.wait_used(1);
    assert_eq!(read_bytes(&ma, DATA_BASE + HDR as u64, 300), fb);
    // The greeting is no frame.
    assert_eq!(ha.stats().queues[0].rx.frames, 1);
    assert_eq!(ha.stats().queues[0].rx.drops, 0);
    drop(a);
    assert!(!path.exists(), "the bound path is removed with its device");
    drop(b);
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn bytes_per_second_to_the_guest_are_limited() {
    let limit = NetOptions {
        rx_limit: RateLimit {
            packets_per_sec: 0,
            bytes_per_sec: 20_000,
        },
        ..opts()
    };
    both(1, limit, false, |d, h, peers| {
        let mem = d.mem().clone();
        let (mut rx, tx) = (ring(&mem, 0), ring(&mem, 1));
        start(d, BASE, &[&rx, &tx]);
        post(&mut rx, 10, 2048, DATA_BASE);
        d.notify(0);
        let start_t = Instant::now();
        for i in 0..10u8 {
            peers[0].send(&frame(MAC, 1000, i)).unwrap();
        }
        rx.wait_used(10);
        // A burst of 2000 bytes, then 20000 a second: 10000 bytes take at least 0.35 s
        // (the last frame is admitted while the bucket is still in debt).
        let t = start_t.elapsed();
        assert!(
            t >= Duration::from_millis(340),
            "10 kB at 20 kB/s took {t:?}"
        );
        for i in 0..10u8 {
            let at = DATA_BASE + 2048 * u64::from(i) + HDR as u64;
            assert_eq!(read_bytes(&mem, at, 1000), frame(MAC, 1000, i), "frame {i}");
        }
        assert_eq!(h.stats().queues[0].rx.drops, 0, "held back, never dropped");
    });
}

/// A driver that keeps the control queue full of commands cannot keep the worker from a
/// reset: the worker answers at most a queue's worth before it looks at its stop flag
/// again, so the reset (a status write on a vCPU, which waits for the worker) returns
/// while the flood goes on.
#[test]
fn a_reset_returns_while_the_driver_floods_the_control_queue() {
    // Large queues: the worker cannot answer a ringful before the driver refills it.
    const FLOOD: u16 = 4096;
    for mmio in [true, false] {
        let n = Box::new(
            Net::new(
                vec![Box::new(
                    SocketBackend::new(UnixDatagram::pair().unwrap().0).unwrap(),
                )],
                NetOptions {
                    mac: MAC,
                    queue_size: FLOOD,
                    ..opts()
                },
            )
            .unwrap(),
        );
        let d: Box<dyn Driver> = if mmio {
            Box::new(MmioDriver::new(n))
        } else {
            Box::new(PciDriver::new(n))
        };
        let mem = d.mem().clone();
        let rx = Ring::at(&mem, RING_BASE, FLOOD);
        let tx = Ring::at(&mem, RING_BASE + 0x2_0000, FLOOD);
        let mut ctrl = Ring::at(&mem, RING_BASE + 0x4_0000, FLOOD);
        start(&*d, ctrl_features(), &[&rx, &tx, &ctrl]);
        // An unknown class: answered VIRTIO_NET_ERR, again and again.
        let at = DATA_BASE;
        mem.write_slice(&cmd(0xee, 0, &[]), GuestAddress(at))
            .unwrap();
        let h = ctrl.add_descriptors(&[(at, 2, 0), (at + 0x800, 1, W)]);
        let flood = Flood::new(&ctrl, h, FLOOD);
        std::thread::scope(|s| {
            s.spawn(|| flood.run());
            eventually("the flood to get going", || {
                d.notify(2);
                flood.served() > 2 * usize::from(FLOOD)
            });
            d.set_status(0);
            assert!(
                flood.stop(),
                "the reset returned only once the driver stopped making commands available"
            );
        });
        assert_eq!(mem.read_obj::<u8>(GuestAddress(at + 0x800)).unwrap(), ERR);
        assert_eq!(d.status(), 0);
    }
}

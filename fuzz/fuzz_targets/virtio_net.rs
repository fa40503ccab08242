//! Arbitrary guest memory and host frames into the virtio-net device: TX chains, RX
//! buffer filling (merged or not) and the control queue, served inline by `SyncServer`.
//!
//! The first byte chooses the negotiated features (event index, merged RX buffers,
//! checksum and segmentation offloads with a backend that carries the virtio-net header,
//! the control queue with its RX, MAC and MQ commands); the second how many frames the
//! host has waiting, whose lengths (up to 2 KiB) come from the next bytes. The rest is
//! guest memory: two adjacent regions and a third behind a hole. RX has its rings at 0
//! (descriptors), 0x100 (available), 0x200 (used); TX at 0x400, 0x500, 0x600; the control
//! queue at 0x20000, 0x20100, 0x20200. Everything else is wherever the input points.
//!
//! Checks: nothing panics; every frame that reached the host's end of the backend was
//! counted as sent; the device never takes more host frames than were sent; unless the
//! device reports DEVICE_NEEDS_RESET (a broken ring), every chain it took off a ring was
//! used exactly once (RX gives back the buffers a frame did not need).
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{InterruptError, InterruptKind, NeedsReset, VirtioInterrupt};
use keel_virtio_net::backend::{Backend, HeaderSocket, SocketBackend};
use keel_virtio_net::{NetOptions, SyncQueues, SyncServer};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x20000, 0x8000)];
const RINGS: [(u64, u64, u64); 3] = [
    (0, 0x100, 0x200),
    (0x400, 0x500, 0x600),
    (0x20000, 0x20100, 0x20200),
];

struct Quiet;
impl VirtioInterrupt for Quiet {
    fn trigger(&self, _: InterruptKind) -> Result<(), InterruptError> {
        Ok(())
    }
}

fn queue(rings: (u64, u64, u64), event_idx: bool) -> Queue {
    keel_virtio::testing::ready_queue(QSIZE, rings, event_idx)
}

fn idx(mem: &GuestMemoryMmap, at: u64) -> u16 {
    mem.read_obj(GuestAddress(at + 2)).unwrap()
}

fn bit(b: u32) -> u64 {
    1 << b
}

fuzz_target!(|data: &[u8]| {
    let [flags, frames, rest @ ..] = data else {
        return;
    };
    let mut rest = rest;
    let event_idx = flags & 1 != 0;
    let header = flags & 2 != 0;
    let ctrl = flags & 4 != 0;
    let mut features = keel_virtio::VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MAC);
    if event_idx {
        features |= keel_virtio::VIRTIO_RING_F_EVENT_IDX;
    }
    if flags & 8 != 0 {
        features |= keel_virtio::VIRTIO_RING_F_INDIRECT_DESC;
    }
    if flags & 0x10 != 0 {
        features |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    if header && flags & 0x20 != 0 {
        for b in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
        ] {
            features |= bit(b);
        }
    }
    if header && flags & 0x40 != 0 {
        for b in [
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ] {
            features |= bit(b);
        }
    }
    if ctrl {
        for b in [
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ] {
            features |= bit(b);
        }
        if flags & 0x80 != 0 {
            features |= bit(VIRTIO_NET_F_MQ);
        }
    }

    // Frames waiting on the host side.
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let mac = NetOptions::default().mac.0;
    for i in 0..usize::from(frames % 8) {
        let Some((&len, more)) = rest.split_first() else {
            break;
        };
        rest = more;
        let len = (usize::from(len) * 8).min(2048);
        let mut f = vec![i as u8; len];
        if let Some(d) = f.get_mut(..6) {
            // To the device's MAC, or broadcast, or elsewhere.
            d.copy_from_slice(match i % 3 {
                0 => &mac,
                1 => &[0xff; 6],
                _ => &[0x52, 0x54, 0, 0, 0, 9],
            });
        }
        if theirs.send(&f).is_ok() {
            sent += 1;
        }
    }

    let mem = GuestMemoryMmap::from_ranges(
        &REGIONS
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for &(a, l) in &REGIONS {
        let n = rest.len().min(l);
        mem.write_slice(&rest[..n], GuestAddress(a)).unwrap();
        rest = &rest[n..];
    }
    let nq = if ctrl { 3 } else { 2 };
    for r in RINGS.iter().take(nq) {
        mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize + 2], GuestAddress(r.2))
            .unwrap();
        let i = idx(&mem, r.1) % (QSIZE + 1);
        mem.write_obj(i, GuestAddress(r.1 + 2)).unwrap();
    }

    let backend: Box<dyn Backend> = if header {
        Box::new(HeaderSocket::new(ours))
    } else {
        Box::new(SocketBackend::new(ours).unwrap())
    };
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(Quiet);
    let broken = Arc::new(AtomicBool::new(false));
    let mut server = SyncServer::new(
        mem.clone(),
        features,
        SyncQueues {
            rx: queue(RINGS[0], event_idx),
            tx: queue(RINGS[1], event_idx),
            ctrl: ctrl.then(|| queue(RINGS[2], event_idx)),
        },
        backend,
        NetOptions {
            queue_size: QSIZE,
            ..NetOptions::default()
        },
        interrupt.clone(),
        NeedsReset::new(broken.clone(), interrupt),
    )
    .unwrap();
    server.run(64);
    let stats = server.stats();
    let q = stats.queues[0];

    // What reached the host's end: every frame counted as sent, nothing else.
    let mut got = 0u64;
    let mut buf = [0u8; 70000];
    while theirs.recv(&mut buf).is_ok() {
        got += 1;
    }
    assert_eq!(got, q.tx.frames, "frames on the wire = frames counted as sent");
    // The host's frames were delivered, dropped, or left in the socket: never more.
    assert!(
        q.rx.frames + q.rx.drops <= sent as u64,
        "more frames taken ({} + {}) than the host sent ({sent})",
        q.rx.frames,
        q.rx.drops
    );
    // Every chain the device took was used exactly once (the rings' indices in guest
    // memory are the guest's business: the device's own writes may land on them).
    if !broken.load(Ordering::SeqCst) {
        let tx = server.tx_queue();
        assert_eq!(tx.next_used(), tx.next_avail(), "every TX chain taken used once");
        if let Some(c) = server.ctrl_queue() {
            assert_eq!(c.next_used(), c.next_avail(), "every control chain taken used once");
        }
        let rx = server.rx_queue();
        assert_eq!(rx.next_used(), rx.next_avail(), "RX uses what it takes");
    }
});

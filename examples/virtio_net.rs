//! The virtio-net device with no VM: over virtio-mmio (keel-virtio's driver-side test
//! harness), with a Unix datagram socket backend whose other end this program holds. One
//! frame goes out (TX), one comes in (RX) into a posted buffer, and the device's counters
//! show both.
//!
//! `cargo run -p keel-examples --example virtio_net`

use std::os::unix::net::UnixDatagram;

use keel_virtio::testing::*;
use keel_virtio_net::backend::{Backend, SocketBackend};
use keel_virtio_net::{MacAddr, Net, NetOptions};
use vm_memory::{Bytes, GuestAddress};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (ours, peer) = UnixDatagram::pair()?;
    let backend: Box<dyn Backend> = Box::new(SocketBackend::new(ours)?);
    let mac: MacAddr = "52:54:00:12:34:56".parse()?;
    let net = Net::new(
        vec![backend],
        NetOptions {
            mac,
            ..NetOptions::default()
        },
    )?;
    let handle = net.handle();
    let d = MmioDriver::new(Box::new(net));
    let mem = d.mem().clone();
    // Queue 0 receives, queue 1 transmits.
    let mut rx = Ring::at(&mem, RING_BASE, 64);
    let mut tx = Ring::at(&mem, RING_BASE + 0x4000, 64);
    assert_ne!(d.negotiate(VERSION_1) & FEATURES_OK, 0);
    for (i, r) in [&rx, &tx].iter().enumerate() {
        d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
        d.enable_queue(i as u16);
    }
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);

    // TX: a 12-byte virtio-net header (all zero: no offloads) and a broadcast frame.
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&[0x88, 0xb5]); // a local experimental EtherType
    frame.extend_from_slice(b"hello from the guest");
    mem.write_slice(&[0u8; 12], GuestAddress(DATA_BASE))?;
    mem.write_slice(&frame, GuestAddress(DATA_BASE + 12))?;
    let head = tx.add_descriptors(&[(DATA_BASE, 12 + frame.len() as u32, 0)]);
    tx.publish(head);
    d.notify(1);
    let mut buf = [0u8; 2048];
    let n = peer.recv(&mut buf)?;
    println!(
        "the host got {n} bytes: {:?}",
        String::from_utf8_lossy(&buf[14..n])
    );
    assert_eq!(&buf[..n], &frame[..]);

    // RX: a buffer for the driver, then a frame from the host.
    let head = rx.add_descriptors(&[(DATA_BASE + 0x1000, 2048, VRING_DESC_F_WRITE)]);
    rx.publish(head);
    d.notify(0);
    let mut reply = mac.0.to_vec();
    reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
    reply.extend_from_slice(b"hello from the host");
    peer.send(&reply)?;
    rx.wait_used(1);
    let (_, len) = rx.used_elem(0);
    let got = read_bytes(&mem, DATA_BASE + 0x1000, len as usize);
    println!(
        "the guest got {len} bytes (header, num_buffers {}): {:?}",
        u16::from_le_bytes([got[10], got[11]]),
        String::from_utf8_lossy(&got[12 + 14..])
    );
    assert_eq!(&got[12..], &reply[..]);

    let s = handle.stats().total();
    println!("counters: tx {:?}, rx {:?}", s.tx, s.rx);
    assert_eq!((s.tx.frames, s.rx.frames), (1, 1));
    Ok(())
}

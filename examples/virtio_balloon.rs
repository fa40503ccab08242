//! keel-virtio-balloon: a balloon over virtio-mmio, driven from the driver's side with
//! keel-virtio's harness. The host sets a target, the "guest" inflates the pages it wrote,
//! the host memory behind them is released (they read back as zeroes), and the counters
//! say what the device did.
//!
//! `cargo run -p keel-examples --example virtio_balloon`

use keel_virtio::testing::*;
use keel_virtio_balloon::spec::feature;
use keel_virtio_balloon::{Balloon, BalloonOptions};
use vm_memory::{Bytes, GuestAddress};

fn main() {
    let balloon = Balloon::new(BalloonOptions::default());
    let host = balloon.handle();
    let d = MmioDriver::new(Box::new(balloon));
    let mem = d.mem().clone();
    let rings: Vec<Ring> = (0..3)
        .map(|i| Ring::at(&mem, RING_BASE + 0x2000 * i, 16))
        .collect();
    d.negotiate(VERSION_1 | feature::STATS_VQ);
    for (i, r) in rings.iter().enumerate() {
        d.configure_queue(i as u16, r.size, r.desc, r.avail, r.used);
        d.enable_queue(i as u16);
    }
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);

    // The host asks for 16 pages; a configuration interrupt tells the driver.
    let irqs = d.irqs();
    host.set_target_pages(16);
    let mut num_pages = [0u8; 4];
    d.read_config(0, &mut num_pages);
    println!(
        "target {} pages (configuration interrupts: {})",
        u32::from_le_bytes(num_pages),
        d.irqs() - irqs
    );

    // The driver gives back PFNs 0x180-0x18f, which it had written.
    let first = 0x180u32;
    mem.write_slice(&[0xaa; 16 * 4096], GuestAddress(u64::from(first) << 12))
        .unwrap();
    let array: Vec<u8> = (first..first + 16).flat_map(u32::to_le_bytes).collect();
    mem.write_slice(&array, GuestAddress(DATA_BASE)).unwrap();
    let mut inflate = rings.into_iter().next().unwrap();
    let head = inflate.add_descriptors(&[(DATA_BASE, array.len() as u32, 0)]);
    inflate.publish(head);
    d.notify(0);
    inflate.wait_used(1);
    d.write_config(4, &16u32.to_le_bytes());

    let page = read_bytes(&mem, u64::from(first) << 12, 4096);
    println!(
        "page {first:#x} after inflating: {} (released to the host)",
        if page.iter().all(|&b| b == 0) {
            "zeroes"
        } else {
            "still data"
        }
    );
    let c = host.counters();
    println!(
        "actual {} pages; held {}, released {} KiB",
        host.actual_pages(),
        c.held_pages,
        c.released_bytes >> 10
    );
}

//! Both transports driven from the driver side (rings from virtio-queue's MockSplitQueue)
//! against the echo device: negotiation, data both ways, notification suppression both
//! ways, configuration changes, reset in the middle of I/O, malformed set-up and broken
//! rings. Every test runs over virtio-mmio and virtio-pci.

use keel_virtio::echo::Echo;
use keel_virtio::echo::ECHO_MAGIC;
use keel_virtio::testing::*;

/// Runs `test` once per transport.
fn both(test: impl Fn(&dyn Driver)) {
    test(&MmioDriver::new(Box::new(Echo::new())));
    test(&PciDriver::new(Box::new(Echo::new())));
}

#[test]
fn device_offers_version_1_and_describes_itself() {
    both(|d| {
        let f = d.device_features();
        assert_eq!(f, VERSION_1 | INDIRECT | EVENT_IDX, "{f:#x}");
        assert_eq!(d.queue_max(0), 256);
        assert_eq!(
            d.queue_max(1),
            0,
            "a queue that does not exist reads size 0"
        );
        let mut magic = [0u8; 4];
        d.read_config(0, &mut magic);
        assert_eq!(u32::from_le_bytes(magic), ECHO_MAGIC);
    });
}

#[test]
fn features_ok_is_refused_for_unoffered_bits_and_without_version_1() {
    both(|d| {
        // A bit the device never offered.
        let s = d.negotiate(VERSION_1 | 1);
        assert_eq!(s & FEATURES_OK, 0, "FEATURES_OK accepted with bit 0");
        // A legacy driver (no VERSION_1).
        let s = d.negotiate(EVENT_IDX);
        assert_eq!(s & FEATURES_OK, 0, "FEATURES_OK accepted without VERSION_1");
        // A high bit.
        let s = d.negotiate(VERSION_1 | (1 << 40));
        assert_eq!(s & FEATURES_OK, 0, "FEATURES_OK accepted with bit 40");
        // A subset is fine.
        let s = d.negotiate(VERSION_1);
        assert_eq!(s, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Features cannot change after FEATURES_OK: an attempt is ignored and DRIVER_OK
        // still starts the device with what was agreed.
        d.set_driver_features(VERSION_1 | 1);
        let mem = d.mem().clone();
        let ring = Ring::new(&mem, QUEUE_SIZE);
        d.configure_queue(0, ring.size, ring.desc, ring.avail, ring.used);
        d.enable_queue(0);
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(d.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        d.set_status(0);
        assert_eq!(d.status(), 0, "reset reads back 0");
    });
}

#[test]
fn driver_ok_without_features_ok_needs_reset() {
    both(|d| {
        d.set_status(0);
        d.set_status(ACKNOWLEDGE | DRIVER);
        d.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
        let s = d.status();
        assert_ne!(s & NEEDS_RESET, 0, "status {s:#x}");
        // The driver cannot clear bits other than by a reset, nor set NEEDS_RESET itself.
        d.set_status(ACKNOWLEDGE);
        assert_ne!(d.status() & NEEDS_RESET, 0);
        d.set_status(0);
        assert_eq!(d.status(), 0);
        d.set_status(ACKNOWLEDGE | NEEDS_RESET);
        assert_eq!(d.status(), ACKNOWLEDGE, "the driver set DEVICE_NEEDS_RESET");
    });
}

#[test]
fn data_flows_both_ways_over_split_and_indirect_chains() {
    both(|d| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1 | INDIRECT, &ring);
        let irqs = d.irqs();
        // Requests split 1, 2 and 3 ways.
        let mut expect = Vec::new();
        for (i, pieces) in [1usize, 2, 3].into_iter().enumerate() {
            let payload: Vec<u8> = (0..100 + 37 * i).map(|b| (b * 7 + i) as u8).collect();
            let at = DATA_BASE + 0x1000 * i as u64;
            let (head, out) = ring.request(&payload, pieces, 4096, at);
            expect.push((head, out, payload));
        }
        d.notify(0);
        ring.wait_used(3);
        for (n, (head, out, payload)) in expect.iter().enumerate() {
            let (id, len) = ring.used_elem(n as u16);
            assert_eq!(id, u32::from(*head));
            assert_eq!(len as usize, payload.len());
            assert_eq!(&read_bytes(&mem, *out, payload.len()), payload);
        }
        eventually("a used-buffer interrupt", || d.irqs() > irqs);
        assert_eq!(d.ack() & 1, 1, "the interrupt cause says used buffers");

        // Output larger than the writable room is cut to fit: used length says so.
        let payload = vec![0xabu8; 300];
        let (_, out) = ring.request(&payload, 2, 100, DATA_BASE + 0x8000);
        // An indirect table: two readable and one writable descriptor.
        let table = DATA_BASE + 0x9000;
        let body = DATA_BASE + 0xa000;
        mem_write(&mem, body, b"indirect!");
        let entries = [
            (body, 4u32, VRING_DESC_F_NEXT, 1u16),
            (body + 4, 5, VRING_DESC_F_NEXT, 2),
            (body + 0x100, 64, VRING_DESC_F_WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
            let at = table + 16 * i as u64;
            mem_write(&mem, at, &addr.to_le_bytes());
            mem_write(&mem, at + 8, &len.to_le_bytes());
            mem_write(&mem, at + 12, &flags.to_le_bytes());
            mem_write(&mem, at + 14, &next.to_le_bytes());
        }
        let head = ring.add_descriptors(&[(table, 48, VRING_DESC_F_INDIRECT)]);
        ring.publish(head);
        d.notify(0);
        ring.wait_used(5);
        assert_eq!(ring.used_elem(3).1, 100);
        assert_eq!(read_bytes(&mem, out, 100), vec![0xab; 100]);
        assert_eq!(ring.used_elem(4), (u32::from(head), 9));
        assert_eq!(read_bytes(&mem, body + 0x100, 9), b"indirect!");
        d.set_status(0);
    });
}

/// A driver that did not negotiate INDIRECT_DESC must not use indirect tables (virtio 1.2
/// 2.7.5.3.1): the device does not follow one, and asks for a reset instead.
#[test]
fn an_indirect_table_without_indirect_desc_is_refused() {
    both(|d| {
        let mem = d.mem().clone();
        let table = DATA_BASE + 0x9000;
        let body = DATA_BASE + 0xa000;
        let entries = [
            (body, 9u32, VRING_DESC_F_NEXT, 1u16),
            (body + 0x100, 16, VRING_DESC_F_WRITE, 0),
        ];
        for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
            let at = table + 16 * i as u64;
            mem_write(&mem, at, &addr.to_le_bytes());
            mem_write(&mem, at + 8, &len.to_le_bytes());
            mem_write(&mem, at + 12, &flags.to_le_bytes());
            mem_write(&mem, at + 14, &next.to_le_bytes());
        }
        // The indirect descriptor at the head, and behind a direct one.
        let chains: [&[(u64, u32, u16)]; 2] = [
            &[(table, 32, VRING_DESC_F_INDIRECT)],
            &[(body + 0x200, 4, 0), (table, 32, VRING_DESC_F_INDIRECT)],
        ];
        for chain in chains {
            mem_write(&mem, body, b"indirect!");
            mem_write(&mem, body + 0x100, &[0xee; 16]);
            let mut ring = Ring::new(&mem, QUEUE_SIZE);
            d.start(VERSION_1, &ring);
            let head = ring.add_descriptors(chain);
            ring.publish(head);
            d.notify(0);
            eventually("DEVICE_NEEDS_RESET", || d.status() & NEEDS_RESET != 0);
            assert_eq!(ring.used_idx(), 0, "the chain was used");
            assert_eq!(read_bytes(&mem, body + 0x100, 16), vec![0xee; 16]);
            d.set_status(0);
            assert_eq!(d.status(), 0);
        }
    });
}

#[test]
fn config_write_raises_a_config_interrupt_and_changes_the_generation() {
    both(|d| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        let (gen, irqs) = (d.config_generation(), d.irqs());
        d.ack();
        d.write_config(4, &[0x5a]);
        eventually("a config interrupt", || d.irqs() > irqs);
        assert_eq!(d.ack() & 2, 2, "the interrupt cause says configuration");
        assert_ne!(d.config_generation(), gen);
        let mut x = [0u8; 1];
        d.read_config(4, &mut x);
        assert_eq!(x[0], 0x5a);
        // The magic is read-only, and writing it raises nothing.
        let irqs = d.irqs();
        d.write_config(0, &[0, 0, 0, 0]);
        let mut m = [0u8; 4];
        d.read_config(0, &mut m);
        assert_eq!(u32::from_le_bytes(m), ECHO_MAGIC);
        // The new xor applies to the next request.
        let payload = b"config".to_vec();
        let (_, out) = ring.request(&payload, 1, 64, DATA_BASE);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(read_bytes(&mem, out, 6), xored(&payload, 0x5a));
        // The used index is published before the interrupt is raised.
        eventually("the used-buffer interrupt", || d.irqs() > irqs);
        settle();
        assert_eq!(d.irqs(), irqs + 1, "only the used-buffer interrupt");
        d.set_status(0);
    });
}

#[test]
fn used_event_and_no_interrupt_suppress_device_interrupts() {
    both(|d| {
        // EVENT_IDX: the driver asks for an interrupt only past used_event.
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1 | EVENT_IDX, &ring);
        ring.set_used_event(5);
        let irqs = d.irqs();
        for i in 0..3u64 {
            ring.request(b"quiet", 1, 16, DATA_BASE + 0x100 * i);
            d.notify(0);
            ring.wait_used(i as u16 + 1);
        }
        settle();
        assert_eq!(d.irqs(), irqs, "interrupted before used_event was passed");
        // used_event = 3: the 4th used buffer (index 3 -> 4) crosses it.
        ring.set_used_event(3);
        ring.request(b"loud", 1, 16, DATA_BASE + 0x1000);
        d.notify(0);
        ring.wait_used(4);
        eventually("the interrupt used_event asked for", || {
            d.irqs() == irqs + 1
        });
        d.set_status(0);

        // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT.
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        ring.set_avail_flags(1);
        let irqs = d.irqs();
        ring.request(b"quiet", 1, 16, DATA_BASE);
        d.notify(0);
        ring.wait_used(1);
        settle();
        assert_eq!(d.irqs(), irqs, "interrupted despite NO_INTERRUPT");
        ring.set_avail_flags(0);
        ring.request(b"loud", 1, 16, DATA_BASE + 0x100);
        d.notify(0);
        ring.wait_used(2);
        eventually("an interrupt once NO_INTERRUPT is clear", || {
            d.irqs() == irqs + 1
        });
        d.set_status(0);
    });
}

#[test]
fn the_device_tells_the_driver_when_to_notify() {
    both(|d| {
        // EVENT_IDX: after draining, avail_event asks for a kick at the next entry.
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1 | EVENT_IDX, &ring);
        for i in 0..4u16 {
            ring.request(b"kick", 1, 16, DATA_BASE + 0x100 * u64::from(i));
        }
        d.notify(0);
        ring.wait_used(4);
        eventually("avail_event at the next entry", || ring.avail_event() == 4);
        d.set_status(0);

        // Without EVENT_IDX: VRING_USED_F_NO_NOTIFY is clear once the device is idle, so
        // the driver knows it must kick.
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        ring.request(b"kick", 1, 16, DATA_BASE);
        d.notify(0);
        ring.wait_used(1);
        settle();
        assert_eq!(
            ring.used_flags() & 1,
            0,
            "NO_NOTIFY left set on an idle device"
        );
        d.set_status(0);
    });
}

#[test]
fn reset_in_the_middle_of_io_stops_the_device_and_it_starts_again_clean() {
    both(|d| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        d.write_config(4, &[0x11]);
        for i in 0..QUEUE_SIZE {
            ring.request(&[i as u8; 512], 2, 512, DATA_BASE + 0x1000 * u64::from(i));
        }
        d.notify(0);
        d.set_status(0);
        // Reset returns: the worker has stopped. Whatever it completed stays; nothing more.
        assert_eq!(d.status(), 0);
        assert!(!d.queue_enabled(0), "queue still enabled after reset");
        let mut x = [0u8; 1];
        d.read_config(4, &mut x);
        assert_eq!(x[0], 0, "device state survived the reset");
        let done = ring.used_idx();
        d.notify(0);
        settle();
        assert_eq!(ring.used_idx(), done, "the device worked after reset");
        // Negotiated features were forgotten: DRIVER_OK needs a new negotiation.
        d.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_ne!(d.status() & NEEDS_RESET, 0);
        // A fresh start on a fresh ring works.
        let fresh = DATA_BASE + 0x10_0000 - 0x2000;
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        let (_, out) = ring.request(b"again", 1, 16, fresh);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(read_bytes(&mem, out, 5), b"again");
        d.set_status(0);
    });
}

#[test]
fn malformed_queue_setup_is_refused_with_needs_reset() {
    let bad: [(&str, u16, u64, u64, u64); 5] = [
        ("size not a power of two", 12, RING_BASE, 0x2000, 0x3000),
        ("size above the maximum", 512, RING_BASE, 0x4000, 0x6000),
        (
            "descriptor table outside memory",
            16,
            1 << 40,
            0x2000,
            0x3000,
        ),
        ("misaligned used ring", 16, RING_BASE, 0x2000, 0x3002),
        (
            "used ring across the end of memory",
            16,
            RING_BASE,
            0x2000,
            MEM_SIZE as u64 - 8,
        ),
    ];
    both(|d| {
        for (what, size, desc, avail, used) in bad {
            assert_ne!(d.negotiate(VERSION_1) & FEATURES_OK, 0);
            d.configure_queue(0, size, desc, avail, used);
            d.enable_queue(0);
            d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
            let s = d.status();
            assert_ne!(s & NEEDS_RESET, 0, "{what}: status {s:#x}");
            d.notify(0);
            d.set_status(0);
        }
        // Still usable afterwards.
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        let (_, out) = ring.request(b"fine", 1, 16, DATA_BASE);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(read_bytes(&mem, out, 4), b"fine");
        d.set_status(0);
    });
}

#[test]
fn a_broken_ring_sets_needs_reset_and_raises_a_config_interrupt() {
    both(|d| {
        let mem = d.mem().clone();
        let ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        d.ack();
        let irqs = d.irqs();
        // The driver claims more available entries than the queue holds.
        ring.set_avail_idx(QUEUE_SIZE + 3);
        d.notify(0);
        eventually("DEVICE_NEEDS_RESET", || d.status() & NEEDS_RESET != 0);
        eventually("a config interrupt", || d.irqs() > irqs);
        assert_eq!(d.ack() & 2, 2);
        d.set_status(0);
        assert_eq!(d.status(), 0, "reset clears DEVICE_NEEDS_RESET");
    });
}

#[test]
fn malformed_chains_complete_empty_and_the_device_goes_on() {
    both(|d| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        // A readable buffer outside guest memory.
        let h1 = ring.add_descriptors(&[(1 << 40, 64, 0), (DATA_BASE, 64, VRING_DESC_F_WRITE)]);
        ring.publish(h1);
        // A writable buffer running past the end of memory.
        mem_write(&mem, DATA_BASE + 0x100, b"edge");
        let h2 = ring.add_descriptors(&[
            (DATA_BASE + 0x100, 4, 0),
            (MEM_SIZE as u64 - 2, 64, VRING_DESC_F_WRITE),
        ]);
        ring.publish(h2);
        // A good one after them.
        let (h3, out) = ring.request(b"after", 1, 16, DATA_BASE + 0x1000);
        d.notify(0);
        ring.wait_used(3);
        assert_eq!(ring.used_elem(0), (u32::from(h1), 0));
        assert_eq!(ring.used_elem(1).0, u32::from(h2));
        assert!(ring.used_elem(1).1 <= 2, "wrote past the end of memory");
        assert_eq!(ring.used_elem(2), (u32::from(h3), 5));
        assert_eq!(read_bytes(&mem, out, 5), b"after");
        assert_eq!(d.status() & NEEDS_RESET, 0);
        d.set_status(0);
    });
}

fn mem_write(mem: &keel_memory::GuestMemoryMmap, at: u64, data: &[u8]) {
    use vm_memory::Bytes;
    mem.write_slice(data, vm_memory::GuestAddress(at)).unwrap();
}

/// A chain whose descriptors name the same memory over and over describes far more bytes
/// than the guest has: the echo device echoes the first MiB and reports that in the used
/// element, and goes on serving.
#[test]
fn an_aliased_chain_is_echoed_up_to_a_mebibyte() {
    both(|d| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, QUEUE_SIZE);
        d.start(VERSION_1, &ring);
        // 4 readable and 4 writable descriptors, all over the same 512 KiB: 2 MiB each way.
        let at = DATA_BASE;
        let len = 512 * 1024;
        mem_write(&mem, at, &vec![0x5a; len as usize]);
        let mut descs = vec![(at, len, 0); 4];
        descs.extend([(at, len, VRING_DESC_F_WRITE); 4]);
        let head = ring.add_descriptors(&descs);
        ring.publish(head);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(ring.used_elem(0), (u32::from(head), 1 << 20));
        // Still serving.
        let (_, out) = ring.request(b"after", 1, 16, DATA_BASE + 0x9_0000);
        d.notify(0);
        ring.wait_used(2);
        assert_eq!(read_bytes(&mem, out, 5), b"after");
        d.set_status(0);
    });
}

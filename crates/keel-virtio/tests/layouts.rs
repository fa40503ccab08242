//! What is particular to each transport: the virtio-pci capabilities, MSI-X vector routing,
//! the ISR and doorbell relocation; the virtio-mmio identification registers, access
//! widths, QueueNotify ioeventfds and the command-line fragment.

use std::sync::atomic::Ordering;

use keel_bus::interrupt::{DataMatch, IoEventAddress};
use keel_bus::MmioDevice;
use keel_virtio::echo::Echo;
use keel_virtio::pci::{NO_VECTOR, VIRTIO_PCI_DEVICE_BASE, VIRTIO_PCI_VENDOR};
use keel_virtio::testing::*;

#[test]
fn pci_function_identifies_as_a_modern_virtio_device() {
    let d = PciDriver::new(Box::new(Echo::new()));
    let mut f = d.f.lock().unwrap();
    let mut id = [0u8; 4];
    f.config_read(0, &mut id);
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), VIRTIO_PCI_VENDOR);
    assert_eq!(
        u16::from_le_bytes([id[2], id[3]]),
        VIRTIO_PCI_DEVICE_BASE + 0x3f
    );
    let mut rev = [0u8; 1];
    f.config_read(8, &mut rev);
    assert_eq!(rev[0], 1, "modern devices have revision 1 or more");
    let caps = virtio_caps(&mut f);
    let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(
        types,
        [1, 2, 3, 4, 5],
        "common, notify, ISR, device, PCI access"
    );
    // Each structure lies inside BAR 0 and they do not overlap.
    let mut spans: Vec<(u32, u32)> = caps[..4].iter().map(|c| (c.2, c.2 + c.3)).collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "structures overlap: {spans:x?}");
    }
    assert!(spans.last().unwrap().1 <= 0x8000);
    let notify = caps[1];
    assert_eq!(notify.4, 4, "notify_off_multiplier");
    assert!(notify.3 >= 4, "the notify window holds queue 0's doorbell");
}

#[test]
fn pci_queue_and_config_interrupts_use_the_vectors_the_driver_chose() {
    let d = PciDriver::new(Box::new(Echo::new()));
    let mem = d.mem.clone();
    let mut ring = Ring::new(&mem, QUEUE_SIZE);
    d.start(VERSION_1, &ring);
    // The vectors read back; one past the table is refused (reads NO_VECTOR).
    d.w16(common_cfg::QUEUE_SELECT, 0);
    assert_eq!(d.r16(common_cfg::QUEUE_MSIX_VECTOR), 1);
    assert_eq!(d.r16(common_cfg::CONFIG_MSIX_VECTOR), 0);
    assert_eq!(d.r16(common_cfg::NUM_QUEUES), 1);

    ring.request(b"vector", 1, 16, DATA_BASE);
    d.notify(0);
    ring.wait_used(1);
    eventually("vector 1", || d.msi.count(1) == 1);
    assert_eq!(d.msi.count(0), 0);
    d.write_config(4, &[7]);
    eventually("vector 0", || d.msi.count(0) == 1);
    assert_eq!(d.msi.count(1), 1);
    // ISR: both causes recorded; reading clears it.
    assert_eq!(d.ack(), 3);
    assert_eq!(d.ack(), 0);

    // NO_VECTOR on the queue: no MSI, but the ISR still records the cause.
    d.w16(common_cfg::CONFIG_MSIX_VECTOR, 2);
    assert_eq!(d.r16(common_cfg::CONFIG_MSIX_VECTOR), NO_VECTOR);
    d.set_status(0);
    assert_eq!(
        d.r16(common_cfg::CONFIG_MSIX_VECTOR),
        0,
        "set again by the harness"
    );
    d.w16(common_cfg::QUEUE_SELECT, 0);
    assert_eq!(
        d.r16(common_cfg::QUEUE_MSIX_VECTOR),
        NO_VECTOR,
        "reset clears it"
    );
    let mut ring = Ring::new(&mem, QUEUE_SIZE);
    assert_ne!(d.negotiate(VERSION_1) & FEATURES_OK, 0);
    d.configure_queue(0, ring.size, ring.desc, ring.avail, ring.used);
    d.w16(common_cfg::QUEUE_MSIX_VECTOR, NO_VECTOR);
    d.enable_queue(0);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    ring.request(b"polled", 1, 16, DATA_BASE);
    d.notify(0);
    ring.wait_used(1);
    // The used index is published before the interrupt cause is set (reading it clears
    // it: gather what the reads return).
    let isr = std::cell::Cell::new(0);
    eventually("the queue interrupt cause", || {
        isr.set(isr.get() | d.ack());
        isr.get() != 0
    });
    settle();
    assert_eq!(
        d.msi.count(1),
        1,
        "an MSI was sent for a queue with no vector"
    );
    assert_eq!(isr.get() | d.ack(), 1);
}

#[test]
fn pci_queue_configuration_is_read_only_after_driver_ok() {
    let d = PciDriver::new(Box::new(Echo::new()));
    let mem = d.mem.clone();
    let ring = Ring::new(&mem, QUEUE_SIZE);
    d.start(VERSION_1, &ring);
    d.w16(common_cfg::QUEUE_SELECT, 0);
    d.w16(common_cfg::QUEUE_SIZE, 4);
    d.w64(common_cfg::QUEUE_DESC, 0x4000);
    assert_eq!(d.r16(common_cfg::QUEUE_SIZE), QUEUE_SIZE);
    assert_eq!(u64::from(d.r32(common_cfg::QUEUE_DESC)), ring.desc);
    // Out-of-range selectors read zeros and ignore writes.
    d.w16(common_cfg::QUEUE_SELECT, 9);
    assert_eq!(d.r16(common_cfg::QUEUE_SIZE), 0);
    assert_eq!(d.r16(common_cfg::QUEUE_MSIX_VECTOR), NO_VECTOR);
    d.w16(common_cfg::QUEUE_ENABLE, 1);
    assert_eq!(d.r16(common_cfg::QUEUE_ENABLE), 0);
    d.set_status(0);
}

#[test]
fn pci_doorbells_follow_the_bar_new_before_old() {
    let d = PciDriver::new(Box::new(Echo::new()));
    let mut f = d.f.lock().unwrap();
    f.device_mut().bar_moved(0, None, Some(0xc000_0000));
    f.device_mut()
        .bar_moved(0, Some(0xc000_0000), Some(0xd000_0000));
    f.device_mut().bar_moved(0, Some(0xd000_0000), None);
    let log = d.registrar.log.lock().unwrap().clone();
    let notify = |base: u64| IoEventAddress::Mmio(base + d.notify);
    assert_eq!(
        log,
        vec![
            (true, notify(0xc000_0000), DataMatch::Any),
            (true, notify(0xd000_0000), DataMatch::Any),
            (false, notify(0xc000_0000), DataMatch::Any),
            (false, notify(0xd000_0000), DataMatch::Any),
        ]
    );
}

#[test]
fn mmio_identifies_and_ignores_partial_register_accesses() {
    let d = MmioDriver::new(Box::new(Echo::new()));
    assert_eq!(d.r(mmio_reg::MAGIC), 0x7472_6976);
    assert_eq!(d.r(mmio_reg::VERSION), 2);
    assert_eq!(d.r(mmio_reg::DEVICE_ID), 0x3f);
    // Registers take 32-bit accesses only: narrower ones read 0 and write nothing.
    let mut b = [0xffu8; 2];
    d.dev.mmio_read(mmio_reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    d.dev.mmio_write(mmio_reg::STATUS, &[ACKNOWLEDGE]);
    assert_eq!(d.r(mmio_reg::STATUS), 0);
    d.dev.mmio_write(mmio_reg::STATUS + 1, &[1, 0, 0, 0]);
    assert_eq!(d.r(mmio_reg::STATUS), 0);
    // Configuration space takes any width.
    let mut m = [0u8; 1];
    d.dev.mmio_read(mmio_reg::CONFIG + 3, &mut m);
    assert_eq!(m[0], 0x4f);
}

#[test]
fn mmio_ioeventfds_match_the_queue_index_and_the_cmdline_names_the_device() {
    let d = MmioDriver::new(Box::new(Echo::new()));
    let reg = RecordingRegistrar::default();
    d.dev.register_ioeventfds(&reg).unwrap();
    assert_eq!(
        *reg.log.lock().unwrap(),
        vec![(
            true,
            IoEventAddress::Mmio(MmioDriver::BASE + mmio_reg::QUEUE_NOTIFY),
            DataMatch::U32(0)
        )]
    );
    assert_eq!(
        d.dev.cmdline_fragment(),
        format!("virtio_mmio.device=4K@{:#x}:5", MmioDriver::BASE)
    );
}

#[test]
fn mmio_interrupt_ack_clears_only_the_acknowledged_causes() {
    let d = MmioDriver::new(Box::new(Echo::new()));
    let mem = d.mem.clone();
    let mut ring = Ring::new(&mem, QUEUE_SIZE);
    d.start(VERSION_1, &ring);
    ring.request(b"x", 1, 16, DATA_BASE);
    d.notify(0);
    ring.wait_used(1);
    d.write_config(4, &[1]);
    eventually("two interrupts", || d.line.0.load(Ordering::SeqCst) == 2);
    assert_eq!(d.r(mmio_reg::INTERRUPT_STATUS), 3);
    d.w(mmio_reg::INTERRUPT_ACK, 1);
    assert_eq!(d.r(mmio_reg::INTERRUPT_STATUS), 2);
    d.w(mmio_reg::INTERRUPT_ACK, 2);
    assert_eq!(d.r(mmio_reg::INTERRUPT_STATUS), 0);
    d.set_status(0);
}

/// The PCI configuration access capability reaches BAR 0 through configuration space, as
/// firmware uses it: status written and read back, the magic read, the ISR cleared by a
/// read through the window; bad selections are ignored.
#[test]
fn pci_cfg_capability_reaches_the_bar_through_configuration_space() {
    let d = PciDriver::new(Box::new(Echo::new()));
    let cap = {
        let f = d.f.lock().unwrap();
        let mut ptr = f.config().read_u32(0x34) as usize & 0xfc;
        loop {
            let mut b = [0u8; 4];
            f.config().read(ptr, &mut b);
            if b[0] == 0x09 && b[3] == 5 {
                break ptr;
            }
            ptr = b[1] as usize & 0xfc;
            assert_ne!(ptr, 0, "no PCI configuration access capability");
        }
    };
    let select = |bar: u8, off: u32, len: u32| {
        let mut f = d.f.lock().unwrap();
        f.config_write(cap + 4, &[bar]);
        f.config_write(cap + 8, &off.to_le_bytes());
        f.config_write(cap + 12, &len.to_le_bytes());
    };
    let data_write = |v: &[u8]| {
        d.f.lock().unwrap().config_write(cap + 16, v);
    };
    let data_read = || {
        let mut b = [0u8; 4];
        d.f.lock().unwrap().config_read(cap + 16, &mut b);
        u32::from_le_bytes(b)
    };
    // Device status through the window.
    select(0, (d.common + common_cfg::DEVICE_STATUS) as u32, 1);
    data_write(&[ACKNOWLEDGE]);
    assert_eq!(d.status(), ACKNOWLEDGE);
    d.set_status(ACKNOWLEDGE | DRIVER);
    assert_eq!(data_read() & 0xff, u32::from(ACKNOWLEDGE | DRIVER));
    // A 4-byte read of the device configuration: the echo device's magic.
    select(0, d.device as u32, 4);
    assert_eq!(data_read(), keel_virtio::echo::ECHO_MAGIC);
    // Misaligned, a bad length, another BAR, past the BAR: ignored.
    let before = d.status();
    for (bar, off, len) in [
        (0, (d.common + common_cfg::DEVICE_STATUS) as u32 + 1, 2),
        (0, (d.common + common_cfg::DEVICE_STATUS) as u32, 3),
        (1, (d.common + common_cfg::DEVICE_STATUS) as u32, 1),
        (0, 0x10_0000, 4),
    ] {
        select(bar, off, len);
        data_write(&[0, 0, 0, 0]);
        assert_eq!(d.status(), before, "{bar} {off:#x} {len}");
    }
    d.set_status(0);
}

/// A configuration access that only partly overlaps pci_cfg_data is no access to it: it
/// neither writes through the window nor reads (and so clears) the ISR through it.
#[test]
fn pci_cfg_accesses_partly_overlapping_the_data_field_do_not_reach_the_bar() {
    let d = PciDriver::new(Box::new(Echo::new()));
    let cap = {
        let f = d.f.lock().unwrap();
        let mut ptr = f.config().read_u32(0x34) as usize & 0xfc;
        loop {
            let mut b = [0u8; 4];
            f.config().read(ptr, &mut b);
            if b[0] == 0x09 && b[3] == 5 {
                break ptr;
            }
            ptr = b[1] as usize & 0xfc;
            assert_ne!(ptr, 0, "no PCI configuration access capability");
        }
    };
    let select = |off: u64, len: u32| {
        let mut f = d.f.lock().unwrap();
        f.config_write(cap + 4, &[0]);
        f.config_write(cap + 8, &(off as u32).to_le_bytes());
        f.config_write(cap + 12, &len.to_le_bytes());
    };
    // A write of the data field's last two bytes with the status byte selected: the
    // window's byte (the field's first) must not be written to the status.
    select(d.common + common_cfg::DEVICE_STATUS, 1);
    d.f.lock().unwrap().config_write(cap + 16, &[ACKNOWLEDGE]);
    assert_eq!(d.status(), ACKNOWLEDGE);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.f.lock().unwrap().config_write(cap + 18, &[0, 0]);
    assert_eq!(
        d.status(),
        ACKNOWLEDGE | DRIVER,
        "partial write reached the BAR"
    );
    // A read straddling the field's start with the ISR selected: the ISR stays set.
    let ring = Ring::new(&d.mem, QUEUE_SIZE);
    d.start(VERSION_1, &ring);
    d.ack();
    let irqs = d.irqs();
    d.write_config(4, &[0x5a]);
    eventually("a config interrupt", || d.irqs() > irqs);
    select(d.isr, 1);
    let mut b = [0u8; 4];
    d.f.lock().unwrap().config_read(cap + 14, &mut b);
    d.f.lock().unwrap().config_read(cap + 17, &mut b[..2]);
    assert_eq!(d.ack() & 2, 2, "a partial read cleared the ISR");
    d.set_status(0);
}

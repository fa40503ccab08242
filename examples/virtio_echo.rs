//! A virtio device driven from the driver's side with no VM at all: keel-virtio's echo
//! device over virtio-mmio, a split virtqueue written by hand in guest memory, one request
//! echoed back XORed with the device's configured byte.
//!
//! `cargo run -p keel-examples --example virtio_echo`

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_bus::interrupt::{InterruptLine, Result as IrqResult};
use keel_bus::MmioDevice;
use keel_memory::GuestMemoryMmap;
use keel_virtio::echo::Echo;
use keel_virtio::mmio::reg;
use keel_virtio::state::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use keel_virtio::{VirtioMmio, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

struct PrintLine;
impl InterruptLine for PrintLine {
    fn trigger(&self) -> IrqResult<()> {
        println!("interrupt!");
        Ok(())
    }
    fn set_level(&self, _: bool) -> IrqResult<()> {
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let dev = VirtioMmio::new(
        Box::new(Echo::new()),
        mem.clone(),
        0xd000_0000,
        5,
        Arc::new(PrintLine),
    )?;
    let w = |off: u64, v: u32| dev.mmio_write(off, &v.to_le_bytes());
    let r = |off: u64| {
        let mut b = [0u8; 4];
        dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    };
    println!(
        "magic {:#x}, version {}, device type {:#x}",
        r(reg::MAGIC),
        r(reg::VERSION),
        r(reg::DEVICE_ID)
    );

    // Status: ACKNOWLEDGE, DRIVER; features: VERSION_1 (bit 32, the high word); FEATURES_OK.
    let status = |s: u8| w(reg::STATUS, u32::from(s));
    status(ACKNOWLEDGE);
    status(ACKNOWLEDGE | DRIVER);
    w(reg::DRIVER_FEATURES_SEL, 1);
    w(reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        r(reg::STATUS),
        u32::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
        "FEATURES_OK refused"
    );
    // Queue 0: 4 entries; descriptors at 0x1000, available ring at 0x2000, used at 0x3000.
    w(reg::QUEUE_SEL, 0);
    w(reg::QUEUE_NUM, 4);
    w(reg::QUEUE_DESC_LOW, 0x1000);
    w(reg::QUEUE_DRIVER_LOW, 0x2000);
    w(reg::QUEUE_DEVICE_LOW, 0x3000);
    w(reg::QUEUE_READY, 1);
    dev.mmio_write(reg::CONFIG + 4, &[0x20]); // the echo's xor byte: flip ASCII case
    status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);

    // One request: "hello" readable at 0x10000, 16 writable bytes at 0x11000.
    mem.write_slice(b"hello", GuestAddress(0x10000))?;
    let desc = |i: u64,
                addr: u64,
                len: u32,
                flags: u16,
                next: u16|
     -> Result<(), vm_memory::GuestMemoryError> {
        let at = GuestAddress(0x1000 + 16 * i);
        mem.write_obj(addr, at)?;
        mem.write_obj(len, GuestAddress(at.0 + 8))?;
        mem.write_obj(flags, GuestAddress(at.0 + 12))?;
        mem.write_obj(next, GuestAddress(at.0 + 14))
    };
    desc(0, 0x10000, 5, VRING_DESC_F_NEXT as u16, 1)?;
    desc(1, 0x11000, 16, VRING_DESC_F_WRITE as u16, 0)?;
    mem.write_obj(0u16, GuestAddress(0x2004))?; // ring[0] = head 0
    mem.write_obj(1u16, GuestAddress(0x2002))?; // avail idx = 1
    w(reg::QUEUE_NOTIFY, 0);

    let end = Instant::now() + Duration::from_secs(5);
    while mem.read_obj::<u16>(GuestAddress(0x3002))? != 1 {
        assert!(Instant::now() < end, "the device did not answer");
        std::thread::sleep(Duration::from_millis(1));
    }
    let len: u32 = mem.read_obj(GuestAddress(0x3008))?;
    let mut out = vec![0u8; len as usize];
    mem.read_slice(&mut out, GuestAddress(0x11000))?;
    println!("echoed {len} bytes: {}", String::from_utf8_lossy(&out));
    assert_eq!(out, b"HELLO");
    status(0); // reset: the device's worker stops
    Ok(())
}

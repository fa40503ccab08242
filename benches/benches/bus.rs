//! PIO and MMIO bus dispatch in keel-bus, with a few and with many devices.
//!
//! `cargo bench -p keel-benches --bench bus`
//!
//! What it measures: `Bus::read` and `Bus::write`, the path of every guest port or MMIO
//! exit from the vCPU loop to a device: take the bus's read lock, binary-search the
//! sorted ranges for the one holding the address, check the access fits in it, clone the
//! device's `Arc`, drop the lock and call the device (here one that does nothing, so the
//! figure is the bus's own cost). Every exit pays it on top of KVM's exit cost
//! (`vcpu.rs`'s `pio_exit`), so it must stay small and grow only with the logarithm of
//! the number of devices.
//!
//! Ids: `bus/{pio,mmio}/{8,256}/{read,write,unmapped}`: a bus holding 8 devices (a PC's
//! legacy ports, a few virtio-mmio windows) or 256 (a VM with many devices and BAR
//! windows); a 4-byte access to one device in the middle of the table, and a read of an
//! address no device holds (what a probing guest costs).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use keel_bus::{BusRange, Error, MmioBus, MmioDevice, PioBus, PioDevice};

/// A device that answers reads with a constant and ignores writes.
struct Idle;

impl PioDevice for Idle {
    fn pio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn pio_write(&self, _: u64, _: &[u8]) {}
}

impl MmioDevice for Idle {
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

/// `n` PIO ranges of 8 ports, 16 apart from 0x1000 (a gap between each).
fn pio_bus(n: u64) -> (PioBus, u64, u64) {
    let bus = PioBus::new();
    for i in 0..n {
        bus.insert(BusRange::new(0x1000 + 16 * i, 8).unwrap(), Arc::new(Idle))
            .unwrap();
    }
    let target = 0x1000 + 16 * (n / 2) + 4;
    let hole = 0x1000 + 16 * (n / 2) + 8;
    (bus, target, hole)
}

/// `n` MMIO windows of 4 KiB (a virtio-mmio window), 8 KiB apart from 0xd000_0000.
fn mmio_bus(n: u64) -> (MmioBus, u64, u64) {
    let bus = MmioBus::new();
    for i in 0..n {
        bus.insert(
            BusRange::new(0xd000_0000 + 0x2000 * i, 0x1000).unwrap(),
            Arc::new(Idle),
        )
        .unwrap();
    }
    let target = 0xd000_0000 + 0x2000 * (n / 2) + 0x50;
    let hole = 0xd000_0000 + 0x2000 * (n / 2) + 0x1000;
    (bus, target, hole)
}

fn bus(c: &mut Criterion) {
    let mut g = c.benchmark_group("bus");
    for n in [8u64, 256] {
        let (pio, target, hole) = pio_bus(n);
        let mut buf = [0u8; 4];
        pio.read(target, &mut buf).unwrap();
        assert_eq!(buf, [0xff; 4]);
        assert!(matches!(
            pio.read(hole, &mut buf),
            Err(Error::Unmapped { .. })
        ));
        g.bench_function(format!("pio/{n}/read"), |b| {
            b.iter(|| pio.read(std::hint::black_box(target), &mut buf))
        });
        g.bench_function(format!("pio/{n}/write"), |b| {
            b.iter(|| pio.write(std::hint::black_box(target), &[1, 2, 3, 4]))
        });
        g.bench_function(format!("pio/{n}/unmapped"), |b| {
            b.iter(|| pio.read(std::hint::black_box(hole), &mut buf))
        });

        let (mmio, target, hole) = mmio_bus(n);
        mmio.read(target, &mut buf).unwrap();
        assert_eq!(buf, [0xff; 4]);
        assert!(matches!(
            mmio.read(hole, &mut buf),
            Err(Error::Unmapped { .. })
        ));
        g.bench_function(format!("mmio/{n}/read"), |b| {
            b.iter(|| mmio.read(std::hint::black_box(target), &mut buf))
        });
        g.bench_function(format!("mmio/{n}/write"), |b| {
            b.iter(|| mmio.write(std::hint::black_box(target), &[1, 2, 3, 4]))
        });
        g.bench_function(format!("mmio/{n}/unmapped"), |b| {
            b.iter(|| mmio.read(std::hint::black_box(hole), &mut buf))
        });
    }
    g.finish();
}

criterion_group!(benches, bus);
criterion_main!(benches);

//! keel-bus: two devices on a port bus, dispatch by address, and what an unclaimed or
//! straddling access looks like.
//!
//! `cargo run -p keel-examples --example bus_dispatch`

use std::sync::{Arc, Mutex};

use keel_bus::{BusRange, MutPioDevice, PioBus};

/// Eight scratch registers, like the 16550's scratch byte but wider.
#[derive(Default)]
struct Scratch([u8; 8]);

impl MutPioDevice for Scratch {
    fn pio_read(&mut self, offset: u64, data: &mut [u8]) {
        let at = offset as usize;
        data.copy_from_slice(&self.0[at..at + data.len()]);
    }
    fn pio_write(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.0[at..at + data.len()].copy_from_slice(data);
    }
}

fn main() -> Result<(), keel_bus::Error> {
    let bus = PioBus::new();
    bus.insert(
        BusRange::new(0x3f8, 8)?,
        Arc::new(Mutex::new(Scratch::default())),
    )?;
    bus.insert(
        BusRange::new(0x2f8, 8)?,
        Arc::new(Mutex::new(Scratch::default())),
    )?;

    bus.write(0x3fa, &[0xaa, 0xbb])?;
    let mut two = [0u8; 2];
    bus.read(0x3fa, &mut two)?;
    println!("read back {two:02x?} from 0x3fa");

    println!(
        "overlap:    {}",
        bus.insert(
            BusRange::new(0x3fc, 8)?,
            Arc::new(Mutex::new(Scratch::default()))
        )
        .unwrap_err()
    );
    println!("unclaimed:  {}", bus.read(0x80, &mut two).unwrap_err());
    println!("straddling: {}", bus.write(0x3ff, &[1, 2]).unwrap_err());
    println!("devices at {:x?}", bus.ranges());
    Ok(())
}

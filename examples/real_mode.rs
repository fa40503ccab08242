//! keel-kvm: run 16 bytes of real-mode code. The guest adds two numbers, writes the sum to
//! port 0x10, reads port 0x11, and halts. Needs /dev/kvm.
//!
//! `cargo run -p keel-examples --example real_mode`

use std::sync::Arc;

use keel_bus::PioDevice;
use keel_kvm::{Buses, DirtyLog, Vm};
use keel_memory::{MemoryLayout, MemoryOptions, MIB};
use vm_memory::{Bytes, GuestAddress};

/// Prints what the guest writes and answers reads with 0x2a.
struct Console;

impl PioDevice for Console {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        println!("guest reads {} byte(s) at offset {offset}", data.len());
        data.fill(0x2a);
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        println!("guest writes {data:02x?} at offset {offset}");
    }
}

const CODE: [u8; 16] = [
    0xb0, 0x02, // mov $2, %al
    0x04, 0x03, // add $3, %al
    0xe6, 0x10, // out %al, $0x10
    0xe4, 0x11, // in $0x11, %al
    0x88, 0xc3, // mov %al, %bl
    0x90, 0x90, 0x90, 0x90, 0x90, // nop x5
    0xf4, // hlt
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !keel_kvm::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return Ok(());
    }
    let layout = MemoryLayout::new(2 * MIB)?;
    let opts = MemoryOptions::default();
    let mem = layout.create_guest_memory(&opts)?;
    mem.write_slice(&CODE, GuestAddress(0x1000))?;

    let vm = Vm::new()?;
    vm.register_memory(&mem, DirtyLog::Off)?;
    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.setup_real_mode(0x1000)?;

    let buses = Buses::default();
    buses.pio.insert(
        keel_bus::BusRange::new(0x10, 2)?,
        Arc::new(Console) as Arc<dyn PioDevice>,
    )?;
    let reason = vcpu.run(&buses)?;
    println!("vCPU exit: {reason:?}; BL = {:#x}", vcpu.regs()?.rbx & 0xff);
    Ok(())
}

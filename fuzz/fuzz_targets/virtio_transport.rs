//! Arbitrary sequences of virtio-mmio and virtio-pci register accesses, PCI configuration
//! accesses, guest-memory scribbles and device queue processing, against both transports
//! carrying a device that serves its queues synchronously (so runs are deterministic) with
//! descriptor chains taken from fuzzed guest memory.
//!
//! Checks: nothing panics; MSI-X vectors triggered are inside the table; a status write of
//! 0 always reads back 0; DEVICE_NEEDS_RESET only ever comes from the device side; every
//! used length fits the chain's writable capacity.
#![no_main]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use keel_bus::interrupt::{InterruptLine, MsiGroup, MsiMessage, Result as IrqResult};
use keel_bus::MmioDevice;
use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{ActivateContext, ActivateError, ActiveQueue, VirtioDevice};
use keel_virtio::worker::{drain_queue, IndirectDesc};
use keel_virtio::{virtio_pci_function, InterruptKind, VirtioMmio};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 0x1_0000;
const SIZES: [u16; 2] = [8, 4];

/// A device with two small queues that copies readable bytes to writable ones when told.
struct Sync {
    active: Arc<Mutex<Option<ActivateContext>>>,
}

impl VirtioDevice for Sync {
    fn device_type(&self) -> u32 {
        0x3f
    }
    fn features(&self) -> u64 {
        keel_virtio::VIRTIO_RING_F_EVENT_IDX | keel_virtio::VIRTIO_RING_F_INDIRECT_DESC
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) -> bool {
        offset == 4
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.is_empty() {
            return Err(ActivateError::MissingQueue(0));
        }
        *self.active.lock().unwrap() = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        *self.active.lock().unwrap() = None;
    }
    // Served on the fuzzer's thread: nothing runs on its own.
    fn pause(&mut self) {}
    fn resume(&mut self) {}
}

fn serve(active: &Mutex<Option<ActivateContext>>) {
    let mut guard = active.lock().unwrap();
    let Some(ctx) = guard.as_mut() else { return };
    let mem = ctx.mem.clone();
    let indirect = IndirectDesc::from_features(ctx.features);
    for ActiveQueue { index, queue, .. } in ctx.queues.iter_mut() {
        let r = drain_queue(queue, &mem, indirect, |chain| {
            let cap = chain
                .clone()
                .writer(&mem)
                .map(|w| w.available_bytes())
                .unwrap_or(0);
            let (Ok(mut r), Ok(mut w)) = (chain.clone().reader(&mem), chain.writer(&mem)) else {
                return 0;
            };
            let mut buf = vec![0u8; r.available_bytes().min(4096)];
            let n = r.read(&mut buf).unwrap_or(0);
            let wrote = w.write(&buf[..n]).unwrap_or(0);
            assert!(wrote <= cap, "wrote {wrote} into {cap} writable bytes");
            wrote as u32
        });
        match r {
            Ok(true) => {
                let _ = ctx.interrupt.trigger(InterruptKind::Queue(*index));
            }
            Ok(false) => {}
            Err(_) => ctx.needs_reset.report(),
        }
    }
}

struct Line;
impl InterruptLine for Line {
    fn trigger(&self) -> IrqResult<()> {
        Ok(())
    }
    fn set_level(&self, _: bool) -> IrqResult<()> {
        Ok(())
    }
}

struct Group(usize);
impl MsiGroup for Group {
    fn len(&self) -> usize {
        self.0
    }
    fn configure(&self, i: usize, _: MsiMessage, _: bool) -> IrqResult<()> {
        assert!(i < self.0);
        Ok(())
    }
    fn trigger(&self, i: usize) -> IrqResult<()> {
        assert!(i < self.0, "vector {i} outside a table of {}", self.0);
        Ok(())
    }
    fn is_pending(&self, i: usize) -> IrqResult<bool> {
        assert!(i < self.0);
        Ok(false)
    }
    fn notifier(&self, _: usize) -> Option<&EventFd> {
        None
    }
}

struct Input<'a>(&'a [u8]);
impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }
}

fn width(b: u8) -> usize {
    [1, 2, 4, 8][usize::from(b & 3)]
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mmio_active = Arc::new(Mutex::new(None));
    let pci_active = Arc::new(Mutex::new(None));
    let mmio = VirtioMmio::new(
        Box::new(Sync {
            active: mmio_active.clone(),
        }),
        mem.clone(),
        0xd000_0000,
        5,
        Arc::new(Line),
    )
    .unwrap();
    let mut pci = virtio_pci_function(
        Box::new(Sync {
            active: pci_active.clone(),
        }),
        mem.clone(),
        Arc::new(Group(SIZES.len() + 1)),
        None,
    )
    .unwrap();
    let mut inp = Input(data);
    while let Some(op) = inp.byte() {
        let Some(arg) = inp.byte() else { break };
        let Some(off) = inp.u16() else { break };
        let Some(v) = inp.u32() else { break };
        let n = width(arg);
        let bytes = u64::from(v).to_le_bytes();
        match op % 8 {
            0 => mmio.mmio_write(u64::from(off) & 0x1ff, &bytes[..n]),
            1 => mmio.mmio_read(u64::from(off) & 0x1ff, &mut [0u8; 8][..n]),
            2 => pci.bar_write(0, u64::from(off) & 0x7fff, &bytes[..n]),
            3 => pci.bar_read(0, u64::from(off) & 0x7fff, &mut [0u8; 8][..n]),
            4 => {
                pci.config_write(usize::from(off) & 0xfff, &bytes[..n.min(4)]);
            }
            5 => {
                let at = u64::from(off) % (MEM as u64 - 8);
                mem.write_slice(&bytes, GuestAddress(at)).unwrap();
            }
            6 => {
                serve(&mmio_active);
                serve(&pci_active);
            }
            _ => {
                // Reset through each transport: it always takes.
                mmio.mmio_write(0x70, &0u32.to_le_bytes());
                let mut s = [0u8; 4];
                mmio.mmio_read(0x70, &mut s);
                assert_eq!(s, [0; 4], "virtio-mmio status after reset");
                pci.bar_write(0, 0x14, &[0]);
                let mut s = [0u8; 1];
                pci.bar_read(0, 0x14, &mut s);
                assert_eq!(s[0], 0, "virtio-pci status after reset");
                assert!(mmio_active.lock().unwrap().is_none());
                assert!(pci_active.lock().unwrap().is_none());
            }
        }
    }
});

//! Arbitrary sequences of virtio-mmio and virtio-pci register accesses, PCI configuration
//! accesses (ECAM: BAR reprogramming, decode enables), guest-memory scribbles and device
//! queue processing, against both transports carrying a device that serves its queues
//! synchronously (so runs are deterministic) with descriptor chains taken from fuzzed
//! guest memory. The two virtio-pci functions sit on a PCI segment with a doorbell
//! (ioeventfd) registrar each, so BAR moves, collisions between the two functions'
//! BARs and failed moves all move doorbells.
//!
//! Checks: nothing panics; MSI-X vectors triggered are inside the table; a status write of
//! 0 always reads back 0; DEVICE_NEEDS_RESET only ever comes from the device side; every
//! used length fits the chain's writable capacity; each function's registered doorbells
//! are exactly one per queue inside its BAR 0 where the bus decodes it (none while it does
//! not), never registered twice nor unregistered unregistered.
#![no_main]

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};

use keel_bus::interrupt::{DataMatch, IoEventAddress, IoEventRegistrar, Result as IrqResult};
use keel_bus::{MmioBus, MmioDevice, PioBus};
use keel_fuzz::irq::{Group, NullLine};
use keel_memory::{GuestMemoryMmap, MemoryLayout, SystemAllocator, GIB};
use keel_pci::PciSegment;
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
            Ok(d) => {
                if d.interrupt {
                    let _ = ctx.interrupt.trigger(InterruptKind::Queue(*index));
                }
            }
            Err(_) => ctx.needs_reset.report(),
        }
    }
}

/// The doorbells registered now, by address (what KVM would hold).
#[derive(Default)]
struct Doorbells(Mutex<HashMap<u64, RawFd>>);

impl IoEventRegistrar for Doorbells {
    fn register(&self, evt: &EventFd, addr: IoEventAddress, dm: DataMatch) -> IrqResult<()> {
        let IoEventAddress::Mmio(a) = addr else {
            panic!("virtio-pci doorbells are MMIO, not {addr:?}");
        };
        assert_eq!(dm, DataMatch::Any);
        let old = self.0.lock().unwrap().insert(a, evt.as_raw_fd());
        assert!(old.is_none(), "doorbell at {a:#x} registered twice");
        Ok(())
    }
    fn unregister(&self, evt: &EventFd, addr: IoEventAddress, dm: DataMatch) -> IrqResult<()> {
        let IoEventAddress::Mmio(a) = addr else {
            panic!("virtio-pci doorbells are MMIO, not {addr:?}");
        };
        assert_eq!(dm, DataMatch::Any);
        let old = self.0.lock().unwrap().remove(&a);
        assert_eq!(
            old,
            Some(evt.as_raw_fd()),
            "unregistered doorbell at {a:#x}"
        );
        Ok(())
    }
}

const ECAM: u64 = 0xe000_0000;
/// Where virtio-pci's notification structure starts in BAR 0, and its stride.
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;

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
    let other_active = Arc::new(Mutex::new(None));
    let mmio = VirtioMmio::new(
        Box::new(Sync {
            active: mmio_active.clone(),
        }),
        mem.clone(),
        0xd000_0000,
        5,
        Arc::new(NullLine),
    )
    .unwrap();
    let (mmio_bus, pio_bus) = (Arc::new(MmioBus::new()), Arc::new(PioBus::new()));
    let seg = Arc::new(PciSegment::new(mmio_bus.clone(), pio_bus.clone(), ECAM));
    PciSegment::attach_config_access(&seg).unwrap();
    let mut alloc = SystemAllocator::new(&MemoryLayout::new(GIB).unwrap(), 5).unwrap();
    let mut slots = Vec::new();
    for active in [&pci_active, &other_active] {
        let bells = Arc::new(Doorbells::default());
        let f = virtio_pci_function(
            Box::new(Sync {
                active: active.clone(),
            }),
            mem.clone(),
            Arc::new(Group::strict(SIZES.len() + 1)),
            Some(bells.clone()),
        )
        .unwrap();
        slots.push((seg.add_device(f, &mut alloc).unwrap(), bells));
    }
    let slot = slots[0].0;
    // BAR 0 of `slot` wherever it decodes now.
    let bar0 = |slot: u8| seg.with_function(slot, |f| f.decoded()[0]).unwrap();
    let mut inp = Input(data);
    while let Some(op) = inp.byte() {
        let Some(arg) = inp.byte() else { break };
        let Some(off) = inp.u16() else { break };
        let Some(v) = inp.u32() else { break };
        let n = width(arg);
        let bytes = u64::from(v).to_le_bytes();
        // Which virtio-pci function a PCI access goes to.
        let target = slots[usize::from(arg >> 7)].0;
        match op % 11 {
            0 => mmio.mmio_write(u64::from(off) & 0x1ff, &bytes[..n]),
            1 => mmio.mmio_read(u64::from(off) & 0x1ff, &mut [0u8; 8][..n]),
            // BAR 0 through the bus, where it decodes now (or straight to the function
            // while it does not decode).
            2 => match bar0(target) {
                Some(base) => {
                    let _ = mmio_bus.write(base + (u64::from(off) & 0x7fff), &bytes[..n]);
                }
                None => {
                    seg.with_function(target, |f| {
                        f.bar_write(0, u64::from(off) & 0x7fff, &bytes[..n])
                    });
                }
            },
            3 => match bar0(target) {
                Some(base) => {
                    let _ = mmio_bus.read(base + (u64::from(off) & 0x7fff), &mut [0u8; 8][..n]);
                }
                None => {
                    seg.with_function(target, |f| {
                        f.bar_read(0, u64::from(off) & 0x7fff, &mut [0u8; 8][..n])
                    });
                }
            },
            4 => {
                let at = ECAM + (u64::from(target) << 15) + (u64::from(off) & 0xfff);
                let _ = mmio_bus.write(at, &bytes[..n.min(4)]);
            }
            8 => {
                let at = ECAM + (u64::from(target) << 15) + (u64::from(off) & 0xfff);
                let _ = mmio_bus.read(at, &mut [0u8; 8][..n.min(4)]);
            }
            9 => {
                // Reprogram BAR 0 (64-bit: low and high dwords): anywhere, onto the other
                // function's BAR 0, or onto ECAM.
                let other = slots[usize::from(arg >> 7) ^ 1].0;
                let addr = match arg >> 5 & 3 {
                    0 => bar0(other).unwrap_or(0) + (u64::from(off) & 0x3000),
                    1 => ECAM,
                    _ => (u64::from(v) << 12) & 0xffff_ffff,
                };
                let at = ECAM + (u64::from(target) << 15) + 0x10;
                let _ = mmio_bus.write(at, &(addr as u32).to_le_bytes());
                let _ = mmio_bus.write(at + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            10 => {
                // Command register: memory decoding on or off.
                let at = ECAM + (u64::from(target) << 15) + 4;
                let _ = mmio_bus.write(at, &u16::from(arg & 2 | 4).to_le_bytes());
            }
            5 => {
                let at = u64::from(off) % (MEM as u64 - 8);
                mem.write_slice(&bytes, GuestAddress(at)).unwrap();
            }
            6 => {
                serve(&mmio_active);
                serve(&pci_active);
                serve(&other_active);
            }
            _ => {
                // Reset through each transport: it always takes.
                mmio.mmio_write(0x70, &0u32.to_le_bytes());
                let mut s = [0u8; 4];
                mmio.mmio_read(0x70, &mut s);
                assert_eq!(s, [0; 4], "virtio-mmio status after reset");
                let s = seg
                    .with_function(slot, |f| {
                        f.bar_write(0, 0x14, &[0]);
                        let mut s = [0u8; 1];
                        f.bar_read(0, 0x14, &mut s);
                        s[0]
                    })
                    .unwrap();
                assert_eq!(s, 0, "virtio-pci status after reset");
                assert!(mmio_active.lock().unwrap().is_none());
                assert!(pci_active.lock().unwrap().is_none());
            }
        }
        for (slot, bells) in &slots {
            let decoded = bar0(*slot);
            if let Some(base) = decoded {
                assert!(
                    mmio_bus.ranges().iter().any(|r| r.base() == base),
                    "BAR 0 decodes at {base:#x} but the bus disagrees"
                );
            }
            let mut got: Vec<u64> = bells.0.lock().unwrap().keys().copied().collect();
            got.sort_unstable();
            let want: Vec<u64> = decoded
                .map(|b| {
                    (0..SIZES.len() as u64)
                        .map(|q| b + NOTIFY + NOTIFY_MULTIPLIER * q)
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(
                got, want,
                "doorbells of slot {slot} with BAR 0 at {decoded:#x?}"
            );
        }
    }
});

//! Arbitrary sequences of bus changes and guest accesses. Checks that the bus never panics,
//! never holds overlapping ranges, and dispatches an access exactly when one device's range
//! contains all of it, with the right offset.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel_bus::{BusRange, Error, PioBus, PioDevice};
use libfuzzer_sys::fuzz_target;

/// Remembers the last offset it saw, and the access length.
struct Probe {
    id: u64,
    last: AtomicU64,
}

impl PioDevice for Probe {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        self.last.store(offset, Ordering::Relaxed);
        data.fill(self.id as u8);
    }
    fn pio_write(&self, offset: u64, _data: &[u8]) {
        self.last.store(offset, Ordering::Relaxed);
    }
}

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let bus = PioBus::new();
    let mut model: Vec<(BusRange, Arc<Probe>)> = Vec::new();
    let mut next_id = 1;
    for op in data.chunks(18) {
        let kind = op[0] % 4;
        // Keep addresses in a small space so that collisions happen often, but also
        // exercise the top of the address space.
        let mut addr = u64_at(op, 1);
        if op.get(17).copied().unwrap_or(0) & 1 == 0 {
            addr %= 4096;
        }
        let len = u64_at(op, 9) % 300;
        match kind {
            0 => {
                let Ok(range) = BusRange::new(addr, len) else {
                    assert!(len == 0 || addr.checked_add(len - 1).is_none());
                    continue;
                };
                let dev = Arc::new(Probe {
                    id: next_id,
                    last: AtomicU64::new(u64::MAX),
                });
                next_id += 1;
                let clash = model.iter().any(|(r, _)| r.overlaps(&range));
                match bus.insert(range, dev.clone()) {
                    Ok(()) => {
                        assert!(!clash);
                        model.push((range, dev));
                    }
                    Err(Error::Overlap { .. }) => assert!(clash),
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            1 if !model.is_empty() => {
                let i = (addr as usize) % model.len();
                let (range, _) = model.remove(i);
                bus.remove(range.base()).expect("present");
            }
            2 if !model.is_empty() => {
                let i = (len as usize) % model.len();
                let Ok(to) = BusRange::new(addr, model[i].0.len()) else {
                    continue;
                };
                let clash = model
                    .iter()
                    .enumerate()
                    .any(|(j, (r, _))| j != i && r.overlaps(&to));
                match bus.relocate(model[i].0.base(), to) {
                    Ok(()) => {
                        assert!(!clash);
                        model[i].0 = to;
                    }
                    Err(_) => assert!(clash),
                }
            }
            _ => {
                let size = [1usize, 2, 4, 8][(len % 4) as usize];
                let mut buf = [0u8; 8];
                let owner = model.iter().find(|(r, _)| r.contains(addr));
                let res = if op[0] & 0x80 != 0 {
                    bus.write(addr, &buf[..size])
                } else {
                    bus.read(addr, &mut buf[..size])
                };
                match (owner, res) {
                    (Some((r, dev)), Ok(())) => {
                        let off = addr - r.base();
                        assert!(off + size as u64 <= r.len());
                        assert_eq!(dev.last.load(Ordering::Relaxed), off);
                    }
                    (Some((r, _)), Err(Error::Straddle { .. })) => {
                        assert!(addr - r.base() + size as u64 > r.len());
                    }
                    (None, Err(Error::Unmapped { .. })) => {}
                    (o, r) => panic!("owner {:?} but bus said {r:?}", o.map(|x| x.0)),
                }
            }
        }
        let ranges = bus.ranges();
        assert_eq!(ranges.len(), model.len());
        for w in ranges.windows(2) {
            assert!(w[0].last() < w[1].base(), "overlap or unsorted: {ranges:?}");
        }
    }
});

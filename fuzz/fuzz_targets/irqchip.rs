//! Arbitrary guest and device traffic into keel-irqchip's IOAPIC, 8259 pair and 8254 PIT.
//! Checks that nothing panics, that the IOAPIC sends only for unmasked pins and never
//! twice for a level pin between EOIs, and that its routes always match its entries.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keel_bus::interrupt::{MsiMessage, Result};
use keel_bus::MutMmioDevice;
use keel_irqchip::ioapic::{entry_message, Ioapic, MsiDelivery, NUM_PINS};
use keel_irqchip::pic::Pic;
use keel_irqchip::pit::{Clock, Pit};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Record {
    routes: Mutex<[Option<MsiMessage>; NUM_PINS]>,
    sent: Mutex<Vec<usize>>,
}

impl MsiDelivery for Record {
    fn route(&self, pin: usize, msg: Option<MsiMessage>) -> Result<()> {
        self.routes.lock().unwrap()[pin] = msg;
        Ok(())
    }
    fn deliver(&self, pin: usize, msg: MsiMessage) -> Result<()> {
        assert_eq!(
            self.routes.lock().unwrap()[pin],
            Some(msg),
            "sent off-route"
        );
        self.sent.lock().unwrap().push(pin);
        Ok(())
    }
}

#[derive(Clone, Default)]
struct FuzzClock(Arc<AtomicU64>);

impl Clock for FuzzClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fuzz_target!(|data: &[u8]| {
    let rec = Arc::new(Record::default());
    let mut ioapic = Ioapic::new(rec.clone());
    let mut pic = Pic::new();
    let clock = FuzzClock::default();
    let mut pit = Pit::new(clock.clone());
    for op in data.chunks(4) {
        let [kind, a, b, c] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        let pin = usize::from(a) % (NUM_PINS + 2);
        match kind % 12 {
            0 => ioapic.mmio_write(u64::from(b & 0x1f), &[a, c, b, a]),
            1 => {
                let mut d = [0u8; 4];
                ioapic.mmio_read(u64::from(b & 0x1f), &mut d[..usize::from(c % 5)]);
            }
            2 => ioapic.set_level(pin, b & 1 != 0),
            3 => ioapic.pulse(pin),
            4 => ioapic.end_of_interrupt(b),
            5 => pic.port_write(
                [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][usize::from(a) % 6],
                b,
            ),
            6 => {
                pic.port_read([0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][usize::from(a) % 6]);
            }
            7 => pic.set_irq(a % 18, b & 1 != 0),
            8 => {
                pic.acknowledge();
            }
            9 => pit.port_write(0x40 + u16::from(a % 4), b),
            10 => {
                pit.port_read([0x40, 0x41, 0x42, 0x43, 0x61][usize::from(a) % 5]);
                pit.port_write(0x61, c);
            }
            _ => {
                clock.0.fetch_add(
                    u64::from(u16::from_le_bytes([b, c])) * 997,
                    Ordering::Relaxed,
                );
                // The next IRQ 0 edge is always in the future.
                if let Some(t) = pit.next_irq() {
                    assert!(
                        t > clock.now_ns(),
                        "next edge {t} not after {}",
                        clock.now_ns()
                    );
                }
            }
        }
        // The IOAPIC's routes follow its entries (a pin never written has no route and is
        // masked, which agrees).
        let routes = *rec.routes.lock().unwrap();
        for (p, route) in routes.iter().enumerate() {
            let e = ioapic.entry(p).unwrap();
            let want = (e & (1 << 16) == 0).then(|| entry_message(e));
            assert_eq!(*route, want, "pin {p}");
        }
        // Only unmasked pins send.
        for p in rec.sent.lock().unwrap().drain(..) {
            assert_eq!(
                ioapic.entry(p).unwrap() & (1 << 16),
                0,
                "masked pin {p} sent"
            );
        }
    }
});

//! Virtqueue pop/push on the device side, through keel-virtio.
//!
//! `cargo bench -p keel-benches --bench virtqueue`
//!
//! What it measures: the host cost of a device worker serving requests, without the
//! thread wake-up: `keel_virtio::worker::drain_queue` (disable driver notifications, pop
//! every available chain, let the device read and write it through vm-memory, add it to
//! the used ring, re-enable notifications and check the ring once more) followed by its
//! decision whether to interrupt the driver. This is the per-request floor of every
//! virtio device (virtio-blk's I/O path runs it before any disk work), so it bounds the
//! request rate at depth 1 and shows what batching buys at depth 32.
//!
//! How: a small device model is activated through the virtio-mmio transport by the
//! `keel_virtio::testing` driver harness, exactly as a guest driver would start it
//! (features negotiated, queue configured and validated at DRIVER_OK). Its `activate`
//! keeps the queue it is handed instead of starting a thread, and the bench thread then
//! plays the worker. The driver side lays out 32 requests once; each iteration only
//! publishes `batch` of them (one store of the available index) and the device drains them.
//!
//! Ids: `virtqueue/{plain,event_idx}/{1desc,3desc,indirect3}/batch{1,32}`, where
//! * `plain` negotiates VERSION_1 and INDIRECT_DESC (notification suppression through the
//!   ring flags), `event_idx` adds VIRTIO_RING_F_EVENT_IDX (used_event/avail_event);
//! * `1desc` is one 512-byte device-writable buffer (an rx buffer); `3desc` is the
//!   virtio-blk read shape: a 16-byte readable header, 512 writable data bytes, one
//!   writable status byte; `indirect3` is the same three descriptors in an indirect table
//!   behind one INDIRECT descriptor;
//! * `batch` is the number of chains published before each drain (the queue depth).
//!
//! Throughput is in chains (elements) per second; the time is per drain of `batch` chains.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use keel_memory::GuestMemoryMmap;
use keel_virtio::testing::{
    Driver, MmioDriver, Ring, DATA_BASE, EVENT_IDX, INDIRECT, VERSION_1, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use keel_virtio::worker::{drain_queue, IndirectDesc};
use keel_virtio::{ActivateContext, ActivateError, VirtioDevice};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Queue size the bench device offers and the driver uses.
const QUEUE_SIZE: u16 = 256;
/// Distinct requests laid out in guest memory (at least the largest batch).
const CHAINS: u16 = 32;
/// Bytes of device-writable data per request.
const DATA_LEN: u32 = 512;
/// Bytes of the readable header of a 3-descriptor request (virtio_blk_outhdr).
const HEADER_LEN: u32 = 16;

/// A device that keeps the queue the transport activates it with, for the bench thread
/// to serve as its worker would.
struct Capture {
    slot: Arc<Mutex<Option<(Queue, GuestMemoryMmap, u64)>>>,
}

impl VirtioDevice for Capture {
    fn device_type(&self) -> u32 {
        keel_virtio::echo::ECHO_DEVICE_TYPE
    }
    fn features(&self) -> u64 {
        VERSION_1 | EVENT_IDX | INDIRECT
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let q = ctx
            .queues
            .into_iter()
            .find(|q| q.index == 0)
            .ok_or(ActivateError::MissingQueue(0))?;
        *self.slot.lock().unwrap() = Some((q.queue, ctx.mem, ctx.features));
        Ok(())
    }
    fn reset(&mut self) {
        *self.slot.lock().unwrap() = None;
    }
    fn pause(&mut self) {}
    fn resume(&mut self) {}
}

#[derive(Clone, Copy)]
enum Shape {
    One,
    Three,
    Indirect,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::One => "1desc",
            Shape::Three => "3desc",
            Shape::Indirect => "indirect3",
        }
    }
}

/// Where request `c`'s buffers live.
fn header_at(c: u16) -> u64 {
    DATA_BASE + u64::from(c) * 0x1000
}
fn data_at(c: u16) -> u64 {
    header_at(c) + 0x100
}
fn status_at(c: u16) -> u64 {
    header_at(c) + 0x80
}
fn table_at(c: u16) -> u64 {
    DATA_BASE + 0x8_0000 + u64::from(c) * 0x100
}

/// The descriptors of request `c`: (addr, len, flags), chained in order.
fn request(shape: Shape, c: u16) -> Vec<(u64, u32, u16)> {
    match shape {
        Shape::One => vec![(data_at(c), DATA_LEN, VRING_DESC_F_WRITE)],
        Shape::Three | Shape::Indirect => vec![
            (header_at(c), HEADER_LEN, 0),
            (data_at(c), DATA_LEN, VRING_DESC_F_WRITE),
            (status_at(c), 1, VRING_DESC_F_WRITE),
        ],
    }
}

/// One started device with [`CHAINS`] requests laid out, every available ring slot
/// naming one of them.
struct Setup {
    _driver: MmioDriver,
    queue: Queue,
    mem: GuestMemoryMmap,
    indirect: IndirectDesc,
    avail_addr: u64,
    used_addr: u64,
    avail_idx: u16,
}

fn setup(shape: Shape, features: u64) -> Setup {
    let slot = Arc::new(Mutex::new(None));
    let driver = MmioDriver::new(Box::new(Capture { slot: slot.clone() }));
    let mem = driver.mem().clone();
    let mut ring = Ring::new(&mem, QUEUE_SIZE);
    let mut heads = Vec::new();
    for c in 0..CHAINS {
        mem.write_slice(&[0x5a; HEADER_LEN as usize], GuestAddress(header_at(c)))
            .unwrap();
        let descs = request(shape, c);
        let head = match shape {
            Shape::One | Shape::Three => ring.add_descriptors(&descs),
            Shape::Indirect => {
                // An indirect table: the same descriptors, chained by index within it.
                for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                    let (flags, next) = if i + 1 < descs.len() {
                        (flags | VRING_DESC_F_NEXT, i as u16 + 1)
                    } else {
                        (flags, 0)
                    };
                    let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                    mem.write_obj(d, GuestAddress(table_at(c) + 16 * i as u64))
                        .unwrap();
                }
                ring.add_descriptors(&[(
                    table_at(c),
                    16 * descs.len() as u32,
                    VRING_DESC_F_INDIRECT,
                )])
            }
        };
        heads.push(head);
    }
    // Every available slot names a request, so publishing is one store of the index.
    for i in 0..QUEUE_SIZE {
        let at = ring.avail + 4 + 2 * u64::from(i);
        mem.write_obj(heads[usize::from(i % CHAINS)], GuestAddress(at))
            .unwrap();
    }
    let (avail_addr, used_addr) = (ring.avail, ring.used);
    driver.start(features, &ring);
    drop(ring);
    let (queue, dev_mem, negotiated) = slot.lock().unwrap().take().expect("activated");
    assert_eq!(negotiated & EVENT_IDX, features & EVENT_IDX);
    assert_eq!(queue.event_idx_enabled(), features & EVENT_IDX != 0);
    Setup {
        _driver: driver,
        queue,
        mem: dev_mem,
        indirect: IndirectDesc::from_features(negotiated),
        avail_addr,
        used_addr,
        avail_idx: 0,
    }
}

/// The device's work on one chain: read the readable bytes (the header), fill the
/// writable ones (data, then status), all through vm-memory. Returns the bytes written.
fn serve(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
    let mut header = [0u8; HEADER_LEN as usize];
    let fill = [0xa5u8; DATA_LEN as usize];
    let mut written = 0;
    for d in chain {
        let len = d.len() as usize;
        if d.is_write_only() {
            let n = len.min(fill.len());
            mem.write_slice(&fill[..n], d.addr()).unwrap();
            written += n as u32;
        } else {
            let n = len.min(header.len());
            mem.read_slice(&mut header[..n], d.addr()).unwrap();
        }
    }
    std::hint::black_box(header);
    written
}

impl Setup {
    /// Publishes `batch` requests (driver side: one store of avail.idx), then drains
    /// them as the device's worker does. Returns whether the driver is to be interrupted.
    fn round(&mut self, batch: u16) -> bool {
        self.avail_idx = self.avail_idx.wrapping_add(batch);
        self.mem
            .store(
                self.avail_idx,
                GuestAddress(self.avail_addr + 2),
                Ordering::Release,
            )
            .unwrap();
        let mem = &self.mem;
        let mut served = 0;
        let notify = drain_queue(&mut self.queue, mem, self.indirect, |chain| {
            served += 1;
            serve(chain, mem)
        })
        .expect("drain");
        debug_assert_eq!(served, batch);
        debug_assert!(!notify.more);
        notify.interrupt
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap()
    }
}

/// Checks once, before timing, that a round does what the bench claims.
fn check(shape: Shape, features: u64) {
    let mut s = setup(shape, features);
    s.mem
        .write_slice(&[0u8; DATA_LEN as usize], GuestAddress(data_at(0)))
        .unwrap();
    let notify = s.round(2);
    assert_eq!(s.used_idx(), 2, "two chains used");
    let mut data = [0u8; DATA_LEN as usize];
    s.mem
        .read_slice(&mut data, GuestAddress(data_at(0)))
        .unwrap();
    assert_eq!(data, [0xa5; DATA_LEN as usize], "the device wrote the data");
    let expected_len = match shape {
        Shape::One => DATA_LEN,
        _ => DATA_LEN + 1,
    };
    let len: u32 = s.mem.read_obj(GuestAddress(s.used_addr + 8)).unwrap();
    assert_eq!(len, expected_len, "used length");
    // Without EVENT_IDX and no NO_INTERRUPT the driver wants every batch; with EVENT_IDX
    // (used_event 0, crossed by the first used entry) too.
    assert!(notify);
    // A second drain with nothing new uses nothing and asks for no interrupt.
    let mem = s.mem.clone();
    let again = drain_queue(&mut s.queue, &mem, s.indirect, |c| serve(c, &mem)).unwrap();
    assert!(!again.interrupt && !again.more);
    assert_eq!(s.used_idx(), 2);
    // Rounds keep working past the end of the rings.
    for n in 1..=2 * QUEUE_SIZE {
        s.round(1);
        assert_eq!(s.used_idx(), 2 + n, "after {n} more rounds");
    }
}

fn virtqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtqueue");
    for (suppression, features) in [
        ("plain", VERSION_1 | INDIRECT),
        ("event_idx", VERSION_1 | INDIRECT | EVENT_IDX),
    ] {
        for shape in [Shape::One, Shape::Three, Shape::Indirect] {
            check(shape, features);
            for batch in [1u16, 32] {
                let mut s = setup(shape, features);
                g.throughput(Throughput::Elements(u64::from(batch)));
                let id = BenchmarkId::new(
                    format!("{suppression}/{}", shape.name()),
                    format!("batch{batch}"),
                );
                g.bench_function(id, |b| b.iter(|| s.round(batch)));
            }
        }
    }
    g.finish();
}

criterion_group!(benches, virtqueue);
criterion_main!(benches);

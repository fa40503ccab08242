//! Arbitrary guest memory (descriptor table at 0, available ring at 0x100, used ring at
//! 0x200, then anything: rings, request headers, segments and data)
//! into the virtio-blk request parser and executor, served synchronously against an
//! in-memory disk. Checks: nothing panics; the used index advances by exactly the
//! number of chains the driver made available (every chain gets an answer, none twice)
//! unless the ring is broken, when the device reports DEVICE_NEEDS_RESET; the disk never
//! changes size.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keel_block::{BlockBackend, MemBackend};
use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{InterruptError, InterruptKind, NeedsReset, VirtioInterrupt};
use keel_virtio_blk::{Disk, SyncServer};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 0x1_0000;
const DISK: usize = 0x8000;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

struct Quiet;
impl VirtioInterrupt for Quiet {
    fn trigger(&self, _: InterruptKind) -> Result<(), InterruptError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = rest.len().min(MEM);
    mem.write_slice(&rest[..n], GuestAddress(0)).unwrap();
    // The used ring starts clean; the avail index is what the input says, bounded so
    // the device does not see a broken ring every time.
    mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize + 2], GuestAddress(USED))
        .unwrap();
    let avail_idx: u16 = mem.read_obj::<u16>(GuestAddress(AVAIL + 2)).unwrap() % (QSIZE + 1);
    mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();

    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);

    let backend = Arc::new(if flags & 2 != 0 {
        MemBackend::read_only(vec![0x5a; DISK])
    } else {
        MemBackend::new(vec![0x5a; DISK])
    });
    let disk = Disk::synchronous(backend.clone()).with_id("fuzz");
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(Quiet);
    let broken = Arc::new(AtomicBool::new(false));
    let needs_reset = NeedsReset::new(broken.clone(), interrupt.clone());
    let mut server = SyncServer::new(q, mem.clone(), &disk, interrupt, needs_reset).unwrap();
    server.run_until_idle().unwrap();

    let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    // The device's own writes (status bytes, read data) may land in the rings, as the
    // guest's memory is the guest's business: compare with the available index as it
    // is now. A head index outside the table, or an index too far ahead, breaks the
    // ring: the device stops and says so.
    let avail_now: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    if !broken.load(Ordering::SeqCst) {
        assert_eq!(
            used, avail_now,
            "every available chain answered exactly once"
        );
    }
    assert_eq!(backend.size(), DISK as u64);
});

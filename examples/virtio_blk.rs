//! The virtio-blk device's request path with no VM and no transport: a split virtqueue
//! written by hand in guest memory, served on the calling thread by keel-virtio-blk's
//! `SyncServer` over a 64 KiB in-memory disk. Three requests: write a sector, read it
//! back elsewhere, and ask for the disk's ID.
//!
//! `cargo run -p keel-examples --example virtio_blk`

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use keel_block::{BlockBackend, MemBackend};
use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{InterruptError, InterruptKind, NeedsReset, VirtioInterrupt};
use keel_virtio_blk::{Disk, SyncServer};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

struct PrintInterrupt;
impl VirtioInterrupt for PrintInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        println!("interrupt: {kind:?}");
        Ok(())
    }
}

/// The driver's side: descriptors and the available ring, written into guest memory.
struct Driver {
    mem: GuestMemoryMmap,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// Adds a chain of `(address, length, device-writable)` buffers and makes it available.
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> Result<(), vm_memory::GuestMemoryError> {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc += 1;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            let at = DESC + 16 * u64::from(idx);
            self.mem.write_obj(addr, GuestAddress(at))?;
            self.mem.write_obj(len, GuestAddress(at + 8))?;
            self.mem.write_obj(flags as u16, GuestAddress(at + 12))?;
            self.mem.write_obj(idx + 1, GuestAddress(at + 14))?;
        }
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot))?;
        self.avail_idx += 1;
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
    }
}

/// Writes a request header (type, reserved, sector) at `at`.
fn header(
    mem: &GuestMemoryMmap,
    at: u64,
    kind: u32,
    sector: u64,
) -> vm_memory::GuestMemoryResult<()> {
    mem.write_obj(kind, GuestAddress(at))?;
    mem.write_obj(0u32, GuestAddress(at + 4))?;
    mem.write_obj(sector, GuestAddress(at + 8))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
    let backend = Arc::new(MemBackend::new(vec![0; 64 << 10]));
    let disk = Disk::synchronous(backend.clone()).with_id("keel-example-disk");

    let mut queue = Queue::new(QUEUE_SIZE)?;
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);

    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(PrintInterrupt);
    let broken = Arc::new(AtomicBool::new(false));
    let needs_reset = NeedsReset::new(broken, interrupt.clone());
    let mut server = SyncServer::new(queue, mem.clone(), &disk, interrupt, needs_reset)?;

    let mut driver = Driver {
        mem: mem.clone(),
        next_desc: 0,
        avail_idx: 0,
    };
    // OUT: write 512 bytes at sector 2 (header, data, status).
    let mut sector = [0u8; 512];
    sector[..17].copy_from_slice(b"hello, virtio-blk");
    mem.write_slice(&sector, GuestAddress(0x10000))?;
    header(&mem, 0x4000, VIRTIO_BLK_T_OUT, 2)?;
    driver.submit(&[
        (0x4000, 16, false),
        (0x10000, 512, false),
        (0x5000, 1, true),
    ])?;
    // IN: read sector 2 back into another buffer.
    header(&mem, 0x4010, VIRTIO_BLK_T_IN, 2)?;
    driver.submit(&[(0x4010, 16, false), (0x11000, 512, true), (0x5001, 1, true)])?;
    // GET_ID: the disk's ID, 20 bytes.
    header(&mem, 0x4020, VIRTIO_BLK_T_GET_ID, 0)?;
    let id_len = VIRTIO_BLK_ID_BYTES;
    driver.submit(&[
        (0x4020, 16, false),
        (0x12000, id_len, true),
        (0x5002, 1, true),
    ])?;

    server.run_until_idle()?;

    let used: u16 = mem.read_obj(GuestAddress(USED + 2))?;
    println!("{used} requests completed");
    for i in 0..3u64 {
        let status: u8 = mem.read_obj(GuestAddress(0x5000 + i))?;
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "request {i}");
    }
    let mut back = [0u8; 512];
    mem.read_slice(&mut back, GuestAddress(0x11000))?;
    println!("read back: {}", String::from_utf8_lossy(&back[..17]));
    assert_eq!(back, sector);
    let mut id = vec![0u8; id_len as usize];
    mem.read_slice(&mut id, GuestAddress(0x12000))?;
    println!(
        "disk id: {}",
        String::from_utf8_lossy(&id).trim_end_matches('\0')
    );
    let mut on_disk = [0u8; 512];
    backend.read_at(&mut on_disk, 2 * 512)?;
    assert_eq!(on_disk, sector);
    Ok(())
}

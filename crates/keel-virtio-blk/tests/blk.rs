//! The virtio-blk device driven from the driver side (keel-virtio's test harness, rings
//! from MockSplitQueue) over both transports: every request type, any descriptor split,
//! malformed requests, read-only disks, the write-cache toggle, several queues, real
//! files through io_uring, and throttling.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use keel_block::backend::{BlockBackend, Limits, WriteFlags};
use keel_block::{CacheMode, MemBackend, RawFile, RawOptions};
use keel_virtio::testing::*;
use keel_virtio_blk::{Block, BlockOptions, Disk, GuestMemoryAccess, IoError, IoOp};
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const W: u16 = VRING_DESC_F_WRITE;

const DISK: usize = 1 << 20;
/// Queue size of the test rings: room for every descriptor a test uses.
const Q: u16 = 256;

/// A backend that counts flushes.
struct Counting {
    inner: MemBackend,
    flushes: AtomicUsize,
}

impl BlockBackend for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_vectored_at(&self, b: &mut [IoSliceMut<'_>], o: u64) -> keel_block::Result<()> {
        self.inner.read_vectored_at(b, o)
    }
    fn write_vectored_at(
        &self,
        b: &[IoSlice<'_>],
        o: u64,
        f: WriteFlags,
    ) -> keel_block::Result<()> {
        self.inner.write_vectored_at(b, o, f)
    }
    fn flush(&self) -> keel_block::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, o: u64, l: u64) -> keel_block::Result<()> {
        self.inner.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> keel_block::Result<()> {
        self.inner.write_zeroes(o, l, u)
    }
}

fn counting(read_only: bool) -> Arc<Counting> {
    let inner = if read_only {
        MemBackend::read_only(vec![0x11; DISK])
    } else {
        MemBackend::new(vec![0x11; DISK])
    };
    Arc::new(Counting {
        inner,
        flushes: AtomicUsize::new(0),
    })
}

fn block(b: Arc<Counting>, opts: BlockOptions) -> Box<Block> {
    Box::new(Block::new(Disk::synchronous(b).with_id("keel-disk-0"), opts).unwrap())
}

/// Runs `test` over virtio-mmio and virtio-pci, each with a fresh disk.
fn both(opts: BlockOptions, read_only: bool, test: impl Fn(&dyn Driver, &Counting)) {
    let b = counting(read_only);
    test(&MmioDriver::new(block(b.clone(), opts)), &b);
    let b = counting(read_only);
    test(&PciDriver::new(block(b.clone(), opts)), &b);
}

fn header(mem: &keel_memory::GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

fn status(mem: &keel_memory::GuestMemoryMmap, at: u64) -> u8 {
    mem.read_obj(GuestAddress(at)).unwrap()
}

const FEATURES: u64 = VERSION_1 | EVENT_IDX | INDIRECT;
/// VIRTIO_BLK_F_CONFIG_WCE.
const WCE: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;

/// A malformed-request case: header type, sector, data descriptors, expected status.
type Case = (u32, u64, Vec<(u64, u32, u16)>, u8);

/// Publishes each case as one chain: its header at DATA_BASE + 0x10 * i, its data, and a
/// status byte at `st + i`.
fn publish_cases(mem: &keel_memory::GuestMemoryMmap, ring: &mut Ring, cases: &[Case], st: u64) {
    for (i, (kind, sector, data, _)) in cases.iter().enumerate() {
        let hdr = DATA_BASE + 0x10 * i as u64;
        header(mem, hdr, *kind, *sector);
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend(data.iter().copied());
        descs.push((st + i as u64, 1, W));
        let h = ring.add_descriptors(&descs);
        ring.publish(h);
    }
}

#[test]
fn configuration_describes_the_disk() {
    both(BlockOptions::default(), false, |d, _| {
        let f = d.device_features();
        for bit in [1, 2, 6, 9, 10, 11, 13, 14] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(f & (1 << 5), 0, "RO offered for a writable disk");
        assert_eq!(f & (1 << 12), 0, "MQ offered for one queue");
        let mut c = [0u8; 60];
        d.read_config(0, &mut c);
        let le32 = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (DISK / 512) as u64
        );
        assert_eq!(le32(12), 254, "seg_max");
        assert_eq!(le32(20), 512, "blk_size");
        assert_eq!(c[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 1, "num_queues");
        assert!(le32(36) > 0 && le32(40) > 0, "discard limits");
        assert!(
            le32(48) > 0 && le32(52) > 0 && c[56] == 1,
            "write-zeroes limits"
        );
        // Only the writeback byte is writable, once CONFIG_WCE is negotiated.
        d.negotiate(FEATURES | WCE);
        d.write_config(0, &[0xff; 8]);
        d.write_config(32, &[0]);
        d.read_config(0, &mut c);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (DISK / 512) as u64
        );
        assert_eq!(c[32], 0);
    });
}

#[test]
fn reads_and_writes_with_any_descriptor_split() {
    both(BlockOptions::default(), false, |d, b| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES, &ring);
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&data, GuestAddress(DATA_BASE + 0x1000))
            .unwrap();
        // OUT: header, data in two pieces, status.
        header(&mem, DATA_BASE, T_OUT, 16);
        let h = ring.add_descriptors(&[
            (DATA_BASE, 16, 0),
            (DATA_BASE + 0x1000, 1000, 0),
            (DATA_BASE + 0x1000 + 1000, 1048, 0),
            (DATA_BASE + 0x100, 1, W),
        ]);
        ring.publish(h);
        // OUT: header and data in one buffer.
        header(&mem, DATA_BASE + 0x4000, T_OUT, 40);
        mem.write_slice(&[0xcd; 512], GuestAddress(DATA_BASE + 0x4010))
            .unwrap();
        let h2 =
            ring.add_descriptors(&[(DATA_BASE + 0x4000, 16 + 512, 0), (DATA_BASE + 0x101, 1, W)]);
        ring.publish(h2);
        d.notify(0);
        ring.wait_used(2);
        assert_eq!(status(&mem, DATA_BASE + 0x100), S_OK);
        assert_eq!(status(&mem, DATA_BASE + 0x101), S_OK);
        assert_eq!(ring.used_elem(0), (u32::from(h), 1));
        let mut disk = vec![0u8; 2048];
        b.read_at(&mut disk, 16 * 512).unwrap();
        assert_eq!(disk, data);
        b.read_at(&mut disk[..512], 40 * 512).unwrap();
        assert_eq!(&disk[..512], &[0xcd; 512]);

        // IN: data and status in one writable buffer, header split in two.
        header(&mem, DATA_BASE + 0x200, T_IN, 16);
        let out = DATA_BASE + 0x8000;
        mem.write_slice(&[0xee; 2049 + 16], GuestAddress(out))
            .unwrap();
        let h = ring.add_descriptors(&[
            (DATA_BASE + 0x200, 6, 0),
            (DATA_BASE + 0x206, 10, 0),
            (out, 2049, W),
        ]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(3);
        assert_eq!(ring.used_elem(2), (u32::from(h), 2049));
        assert_eq!(read_bytes(&mem, out, 2048), data);
        assert_eq!(status(&mem, out + 2048), S_OK);
        // Nothing past the chain's end was touched.
        assert_eq!(read_bytes(&mem, out + 2049, 16), vec![0xee; 16]);
        d.set_status(0);
    });
}

#[test]
fn get_id_flush_discard_and_write_zeroes() {
    both(BlockOptions::default(), false, |d, b| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES, &ring);
        // Counted before anything is published: the worker may poll the ring and serve
        // requests as soon as they are published, before the notify.
        let flushes = b.flushes.load(Ordering::SeqCst);
        header(&mem, DATA_BASE, T_GET_ID, 0);
        let h = ring.add_descriptors(&[
            (DATA_BASE, 16, 0),
            (DATA_BASE + 0x100, 20, W),
            (DATA_BASE + 0x200, 1, W),
        ]);
        ring.publish(h);
        header(&mem, DATA_BASE + 0x10, T_FLUSH, 0);
        let h = ring.add_descriptors(&[(DATA_BASE + 0x10, 16, 0), (DATA_BASE + 0x201, 1, W)]);
        ring.publish(h);
        // Discard 4 KiB at sector 8; write-zeroes with UNMAP at sector 64 and without at
        // sector 128.
        header(&mem, DATA_BASE + 0x20, T_DISCARD, 0);
        mem.write_obj(8u64, GuestAddress(DATA_BASE + 0x300))
            .unwrap();
        mem.write_obj(8u32, GuestAddress(DATA_BASE + 0x308))
            .unwrap();
        mem.write_obj(0u32, GuestAddress(DATA_BASE + 0x30c))
            .unwrap();
        let h = ring.add_descriptors(&[
            (DATA_BASE + 0x20, 16, 0),
            (DATA_BASE + 0x300, 16, 0),
            (DATA_BASE + 0x202, 1, W),
        ]);
        ring.publish(h);
        header(&mem, DATA_BASE + 0x30, T_WRITE_ZEROES, 0);
        for (i, (sector, flags)) in [(64u64, 1u32), (128, 0)].into_iter().enumerate() {
            let at = DATA_BASE + 0x400 + 16 * i as u64;
            mem.write_obj(sector, GuestAddress(at)).unwrap();
            mem.write_obj(8u32, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        }
        let h = ring.add_descriptors(&[
            (DATA_BASE + 0x30, 16, 0),
            (DATA_BASE + 0x400, 32, 0),
            (DATA_BASE + 0x203, 1, W),
        ]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(4);
        assert_eq!(read_bytes(&mem, DATA_BASE + 0x100, 11), b"keel-disk-0");
        assert_eq!(ring.used_elem(0).1, 21);
        assert_eq!(read_bytes(&mem, DATA_BASE + 0x200, 4), vec![S_OK; 4]);
        assert_eq!(b.flushes.load(Ordering::SeqCst), flushes + 1);
        let mut buf = vec![0xffu8; 4096];
        for sector in [64u64, 128] {
            b.read_at(&mut buf, sector * 512).unwrap();
            assert!(buf.iter().all(|&x| x == 0), "sector {sector} not zeroed");
        }
        // Untouched neighbours.
        b.read_at(&mut buf[..512], 72 * 512).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 0x11));
        d.set_status(0);
    });
}

#[test]
fn malformed_requests_fail_cleanly_and_the_device_goes_on() {
    both(BlockOptions::default(), false, |d, b| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES, &ring);
        let st = DATA_BASE + 0x100;
        mem.write_slice(&[0xaa; 64], GuestAddress(st)).unwrap();
        // (header type, sector, data descriptors, expected status)
        let cases: [Case; 6] = [
            (0xff, 0, vec![], S_UNSUPP),
            (
                T_IN,
                (DISK / 512) as u64 - 1,
                vec![(DATA_BASE + 0x1000, 1024, W)],
                S_IOERR,
            ),
            (T_IN, 0, vec![(DATA_BASE + 0x1000, 100, W)], S_IOERR),
            (
                T_OUT,
                u64::MAX / 256,
                vec![(DATA_BASE + 0x1000, 512, 0)],
                S_IOERR,
            ),
            // Data outside guest memory.
            (T_IN, 0, vec![(MEM_SIZE as u64 - 256, 512, W)], S_IOERR),
            // Discard with UNMAP (a write-zeroes-only flag).
            (T_DISCARD, 0, vec![(DATA_BASE + 0x300, 16, 0)], S_UNSUPP),
        ];
        mem.write_obj(0u64, GuestAddress(DATA_BASE + 0x300))
            .unwrap();
        mem.write_obj(8u32, GuestAddress(DATA_BASE + 0x308))
            .unwrap();
        mem.write_obj(1u32, GuestAddress(DATA_BASE + 0x30c))
            .unwrap();
        publish_cases(&mem, &mut ring, &cases, st);
        // A chain with no writable byte at all: returned with nothing written.
        header(&mem, DATA_BASE + 0x80, T_IN, 0);
        let h = ring.add_descriptors(&[(DATA_BASE + 0x80, 16, 0)]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(7);
        for (i, (.., want)) in cases.iter().enumerate() {
            assert_eq!(status(&mem, st + i as u64), *want, "case {i}");
            assert_eq!(ring.used_elem(i as u16).1, 1, "case {i}");
        }
        assert_eq!(ring.used_elem(6), (u32::from(h), 0));
        assert_eq!(
            read_bytes(&mem, st + 6, 8),
            vec![0xaa; 8],
            "wrote past the statuses"
        );
        assert_eq!(d.status() & NEEDS_RESET, 0);
        // The disk is unchanged, and the device still works.
        let mut buf = vec![0u8; DISK];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0x11));
        header(&mem, DATA_BASE, T_IN, 0);
        let h = ring.add_descriptors(&[
            (DATA_BASE, 16, 0),
            (DATA_BASE + 0x1000, 512, W),
            (st + 20, 1, W),
        ]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(8);
        assert_eq!(status(&mem, st + 20), S_OK);
        d.set_status(0);
    });
}

#[test]
fn a_read_only_disk_offers_ro_and_refuses_writes() {
    both(BlockOptions::default(), true, |d, b| {
        let f = d.device_features();
        assert_ne!(f & (1 << 5), 0, "RO");
        assert_eq!(
            f & ((1 << 13) | (1 << 14)),
            0,
            "discard/write-zeroes offered"
        );
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES, &ring);
        header(&mem, DATA_BASE, T_OUT, 0);
        header(&mem, DATA_BASE + 0x10, T_IN, 0);
        header(&mem, DATA_BASE + 0x20, T_WRITE_ZEROES, 0);
        for (i, data) in [
            (DATA_BASE + 0x1000, 512, 0),
            (DATA_BASE + 0x2000, 512, W),
            (DATA_BASE + 0x3000, 16, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let hdr = DATA_BASE + 0x10 * i as u64;
            let h =
                ring.add_descriptors(&[(hdr, 16, 0), data, (DATA_BASE + 0x100 + i as u64, 1, W)]);
            ring.publish(h);
        }
        d.notify(0);
        ring.wait_used(3);
        assert_eq!(
            read_bytes(&mem, DATA_BASE + 0x100, 3),
            vec![S_IOERR, S_OK, S_UNSUPP]
        );
        assert_eq!(read_bytes(&mem, DATA_BASE + 0x2000, 512), vec![0x11; 512]);
        let mut buf = vec![0u8; 512];
        b.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, vec![0x11; 512]);
        d.set_status(0);
    });
}

#[test]
fn with_the_write_cache_off_every_write_is_flushed() {
    let opts = BlockOptions {
        writeback: false,
        ..Default::default()
    };
    both(opts, false, |d, b| {
        let mem = d.mem().clone();
        let mut c = [0u8; 1];
        d.read_config(32, &mut c);
        assert_eq!(c[0], 0);
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES | WCE, &ring);
        let before = b.flushes.load(Ordering::SeqCst);
        for i in 0..3u64 {
            header(&mem, DATA_BASE + 0x10 * i, T_OUT, i);
            let h = ring.add_descriptors(&[
                (DATA_BASE + 0x10 * i, 16, 0),
                (DATA_BASE + 0x1000, 512, 0),
                (DATA_BASE + 0x100 + i, 1, W),
            ]);
            ring.publish(h);
        }
        d.notify(0);
        ring.wait_used(3);
        assert_eq!(b.flushes.load(Ordering::SeqCst), before + 3);
        // The driver turns the cache on: no more flushes per write.
        d.write_config(32, &[1]);
        header(&mem, DATA_BASE, T_OUT, 9);
        let h = ring.add_descriptors(&[
            (DATA_BASE, 16, 0),
            (DATA_BASE + 0x1000, 512, 0),
            (DATA_BASE + 0x100, 1, W),
        ]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(4);
        assert_eq!(b.flushes.load(Ordering::SeqCst), before + 3);
        // Reset restores the configured state.
        d.set_status(0);
        d.read_config(32, &mut c);
        assert_eq!(c[0], 0);
    });
}

#[test]
fn several_queues_each_serve_their_own_requests() {
    let opts = BlockOptions {
        queues: 2,
        ..Default::default()
    };
    both(opts, false, |d, b| {
        assert_ne!(d.device_features() & (1 << 12), 0, "MQ");
        let mut c = [0u8; 2];
        d.read_config(34, &mut c);
        assert_eq!(u16::from_le_bytes(c), 2);
        let mem = d.mem().clone();
        let mut r0 = Ring::new(&mem, Q);
        let mut r1 = Ring::at(&mem, 0x8000, Q);
        assert_ne!(d.negotiate(FEATURES) & FEATURES_OK, 0);
        for (q, r) in [(0u16, &r0), (1, &r1)] {
            d.configure_queue(q, r.size, r.desc, r.avail, r.used);
            d.enable_queue(q);
        }
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(d.status() & NEEDS_RESET, 0);
        for (q, r) in [(0u64, &mut r0), (1, &mut r1)] {
            for i in 0..8u64 {
                let base = DATA_BASE + q * 0x8000 + i * 0x800;
                header(&mem, base, T_OUT, q * 64 + i);
                mem.write_slice(&[(q * 16 + i) as u8; 512], GuestAddress(base + 0x100))
                    .unwrap();
                let h = r.add_descriptors(&[
                    (base, 16, 0),
                    (base + 0x100, 512, 0),
                    (base + 0x400, 1, W),
                ]);
                r.publish(h);
            }
        }
        d.notify(0);
        d.notify(1);
        r0.wait_used(8);
        r1.wait_used(8);
        let mut buf = vec![0u8; 512];
        for q in 0..2u64 {
            for i in 0..8u64 {
                b.read_at(&mut buf, (q * 64 + i) * 512).unwrap();
                assert!(
                    buf.iter().all(|&x| x == (q * 16 + i) as u8),
                    "queue {q} request {i}"
                );
            }
        }
        d.set_status(0);
    });
}

#[test]
fn io_uring_on_a_real_file_completes_deep_queues() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    RawFile::create(&p, DISK as u64).unwrap();
    let raw = Arc::new(RawFile::open(&p, RawOptions::default()).unwrap());
    let d = MmioDriver::new(Box::new(
        Block::new(Disk::uring(raw.clone(), 64), BlockOptions::default()).unwrap(),
    ));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    let n = 64u64;
    for round in 0..4u64 {
        for i in 0..n {
            let base = DATA_BASE + i * 0x2000;
            header(&mem, base, T_OUT, (round * n + i) * 8);
            mem.write_slice(
                &[((round * n + i) % 250) as u8 + 1; 4096],
                GuestAddress(base + 0x1000),
            )
            .unwrap();
            let h = ring.add_descriptors(&[
                (base, 16, 0),
                (base + 0x1000, 4096, 0),
                (base + 0x20, 1, W),
            ]);
            ring.publish(h);
        }
        d.notify(0);
        ring.wait_used(((round + 1) * n) as u16);
    }
    for i in 0..4 * n {
        let mut buf = vec![0u8; 4096];
        raw.read_at(&mut buf, i * 4096).unwrap();
        assert!(buf.iter().all(|&x| x == (i % 250) as u8 + 1), "block {i}");
    }
    d.set_status(0);
}

/// Registered buffers of the process's io_uring instances (`UserBufs:` in their fdinfo).
fn registered_buffers() -> Vec<usize> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(e.path())
            .map_or(true, |t| t != std::path::Path::new("anon_inode:[io_uring]"))
        {
            continue;
        }
        // The ring may close meanwhile (another test's device reset).
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            e.file_name().to_string_lossy()
        )) else {
            continue;
        };
        if let Some(n) = info.lines().find_map(|l| l.strip_prefix("UserBufs:")) {
            out.push(n.trim().parse().unwrap());
        }
    }
    out
}

#[test]
fn io_uring_with_registered_guest_memory_moves_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    RawFile::create(&p, DISK as u64).unwrap();
    let direct = RawOptions {
        cache: CacheMode::None,
        ..Default::default()
    };
    let raw = Arc::new(RawFile::open(&p, direct).unwrap());
    let disk = Disk::uring(raw.clone(), 64).with_memory_access(GuestMemoryAccess::Registered);
    let d = MmioDriver::new(Box::new(Block::new(disk, BlockOptions::default()).unwrap()));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    let n = 32u64;
    // Writes of 4 KiB blocks from guest memory, then reads of them into other buffers.
    for (kind, round) in [(T_OUT, 0u64), (T_IN, 1)] {
        for i in 0..n {
            let base = DATA_BASE + (round * n + i) * 0x2000;
            header(&mem, base, kind, i * 8);
            if kind == T_OUT {
                mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(base + 0x1000))
                    .unwrap();
            }
            let flags = if kind == T_IN { W } else { 0 };
            let h = ring.add_descriptors(&[
                (base, 16, 0),
                (base + 0x1000, 4096, flags),
                (base + 0x20, 1, W),
            ]);
            ring.publish(h);
        }
        d.notify(0);
        ring.wait_used(((round + 1) * n) as u16);
        assert!(
            registered_buffers().iter().any(|&b| b > 0),
            "the queue's ring has guest memory registered"
        );
    }
    for i in 0..n {
        let mut buf = vec![0u8; 4096];
        raw.read_at(&mut buf, i * 4096).unwrap();
        assert!(buf.iter().all(|&x| x == i as u8 + 1), "block {i} on disk");
        let base = DATA_BASE + (n + i) * 0x2000;
        assert_eq!(read_bytes(&mem, base + 0x20, 1), [S_OK], "read {i} status");
        assert_eq!(
            read_bytes(&mem, base + 0x1000, 4096),
            vec![i as u8 + 1; 4096],
            "block {i} read into guest memory"
        );
    }
    d.set_status(0);
}

#[test]
fn iops_limits_hold_the_device_back() {
    let opts = BlockOptions {
        iops: 100,
        ..Default::default()
    };
    let d = MmioDriver::new(block(counting(false), opts));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    let start = Instant::now();
    // A burst of 10 (and one more on credit), then 9 more at 100/s: at least 0.09 s.
    for round in 0..2u16 {
        for i in 0..10u64 {
            header(&mem, DATA_BASE + i * 0x20, T_IN, i);
            let h = ring.add_descriptors(&[
                (DATA_BASE + i * 0x20, 16, 0),
                (DATA_BASE + 0x1000, 512, W),
                (DATA_BASE + 0x400 + i, 1, W),
            ]);
            ring.publish(h);
        }
        d.notify(0);
        ring.wait_used(10 * (round + 1));
    }
    let t = start.elapsed().as_secs_f64();
    assert!(t >= 0.085, "20 requests in {t:.3} s at 100 IOPS");
    d.set_status(0);
}

/// `writeback` is writable only when the driver negotiated CONFIG_WCE: not before
/// FEATURES_OK, not without the feature, and not after a reset.
#[test]
fn writeback_is_writable_only_with_config_wce() {
    both(BlockOptions::default(), false, |d, _| {
        let wce = |d: &dyn Driver| {
            let mut c = [0u8; 1];
            d.read_config(32, &mut c);
            c[0]
        };
        d.write_config(32, &[0]);
        assert_eq!(wce(d), 1, "written before FEATURES_OK");
        d.negotiate(FEATURES);
        d.write_config(32, &[0]);
        assert_eq!(wce(d), 1, "written without CONFIG_WCE");
        d.negotiate(FEATURES | WCE);
        d.write_config(32, &[0]);
        assert_eq!(wce(d), 0);
        d.set_status(0);
        d.write_config(32, &[1]);
        assert_eq!(wce(d), 0, "written after a reset");
    });
}

/// Waits up to `limit` for `f`; false if it never held.
fn within(limit: std::time::Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !f() {
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// A throttled request waits on a timer, not in a sleep: a reset while the bucket is
/// seconds in debt returns at once (the driver's status write runs on a vCPU and holds
/// the transport; it used to wait out the whole debt).
#[test]
fn a_reset_ends_a_throttle_wait_at_once() {
    let opts = BlockOptions {
        bps: 8192,
        ..Default::default()
    };
    for d in [
        Box::new(MmioDriver::new(block(counting(false), opts))) as Box<dyn Driver>,
        Box::new(PciDriver::new(block(counting(false), opts))),
    ] {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES, &ring);
        // 64 KiB on a full bucket (819 bytes): admitted, and the bucket is ~7.9 s in debt.
        header(&mem, DATA_BASE, T_IN, 0);
        let h = ring.add_descriptors(&[
            (DATA_BASE, 16, 0),
            (DATA_BASE + 0x1_0000, 0x1_0000, W),
            (DATA_BASE + 0x100, 1, W),
        ]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(status(&mem, DATA_BASE + 0x100), S_OK);
        // The next one has to wait for the debt.
        header(&mem, DATA_BASE + 0x20, T_IN, 0);
        let h = ring.add_descriptors(&[
            (DATA_BASE + 0x20, 16, 0),
            (DATA_BASE + 0x1000, 512, W),
            (DATA_BASE + 0x101, 1, W),
        ]);
        ring.publish(h);
        d.notify(0);
        settle();
        assert_eq!(ring.used_idx(), 1, "the second request was not held back");
        let start = Instant::now();
        d.set_status(0);
        let t = start.elapsed();
        assert!(
            t < std::time::Duration::from_millis(500),
            "reset took {t:?} with a throttled request waiting"
        );
        assert_eq!(d.status(), 0);
    }
}

/// The throttle charges a request only once it is known to be valid: a 1 GiB read into
/// memory the guest does not have fails (IOERR) without putting the bucket ~1000 s in
/// debt, so the next request runs at once.
#[test]
fn only_valid_requests_are_charged_to_the_throttle() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.raw");
    RawFile::create(&p, 2 << 30).unwrap();
    let raw = Arc::new(RawFile::open(&p, RawOptions::default()).unwrap());
    let opts = BlockOptions {
        bps: 1 << 20,
        ..Default::default()
    };
    let d = MmioDriver::new(Box::new(Block::new(Disk::synchronous(raw), opts).unwrap()));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    header(&mem, DATA_BASE, T_IN, 0);
    let h = ring.add_descriptors(&[
        (DATA_BASE, 16, 0),
        (1 << 32, 1 << 29, W),
        ((1 << 32) + (1 << 29), 1 << 29, W),
        (DATA_BASE + 0x100, 1, W),
    ]);
    ring.publish(h);
    header(&mem, DATA_BASE + 0x20, T_IN, 0);
    let h = ring.add_descriptors(&[
        (DATA_BASE + 0x20, 16, 0),
        (DATA_BASE + 0x1000, 512, W),
        (DATA_BASE + 0x101, 1, W),
    ]);
    ring.publish(h);
    d.notify(0);
    if !within(std::time::Duration::from_secs(2), || ring.used_idx() == 2) {
        // The worker is stuck behind the debt; a reset would wait for it too.
        std::mem::forget(d);
        panic!("a request that failed validation was charged to the throttle");
    }
    assert_eq!(status(&mem, DATA_BASE + 0x100), S_IOERR);
    assert_eq!(status(&mem, DATA_BASE + 0x101), S_OK);
    d.set_status(0);
}

/// A backend that takes at most 4 KiB a transfer (the device's size_max).
struct SmallTransfers(MemBackend);

impl BlockBackend for SmallTransfers {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn limits(&self) -> Limits {
        Limits {
            max_transfer: 4096,
            ..self.0.limits()
        }
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, b: &mut [IoSliceMut<'_>], o: u64) -> keel_block::Result<()> {
        self.0.read_vectored_at(b, o)
    }
    fn write_vectored_at(
        &self,
        b: &[IoSlice<'_>],
        o: u64,
        f: WriteFlags,
    ) -> keel_block::Result<()> {
        self.0.write_vectored_at(b, o, f)
    }
    fn flush(&self) -> keel_block::Result<()> {
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> keel_block::Result<()> {
        self.0.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> keel_block::Result<()> {
        self.0.write_zeroes(o, l, u)
    }
}

/// Writes an indirect table of `descs` at `table` (chained with NEXT).
fn indirect_table(mem: &keel_memory::GuestMemoryMmap, table: u64, descs: &[(u64, u32, u16)]) {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let at = table + 16 * i as u64;
        let (flags, next) = if i + 1 < descs.len() {
            (flags | VRING_DESC_F_NEXT, i as u16 + 1)
        } else {
            (flags, 0)
        };
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
}

/// The device enforces the limits it advertises: no data segment longer than size_max,
/// no more than seg_max data segments (an indirect table may hold thousands, each of
/// which would be a piece of I/O in flight). Requests beyond them fail with IOERR and
/// leave the disk alone; requests at the limits succeed.
#[test]
fn size_max_and_seg_max_are_enforced() {
    let disk = Arc::new(SmallTransfers(MemBackend::new(vec![0x11; DISK])));
    let d = MmioDriver::new(Box::new(
        Block::new(Disk::synchronous(disk.clone()), BlockOptions::default()).unwrap(),
    ));
    let mut c = [0u8; 16];
    d.read_config(0, &mut c);
    let size_max = u32::from_le_bytes(c[8..12].try_into().unwrap());
    let seg_max = u32::from_le_bytes(c[12..16].try_into().unwrap());
    assert_eq!((size_max, seg_max), (4096, u32::from(Q) - 2));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    let data = DATA_BASE + 0x2_0000;
    mem.write_slice(&vec![0x77; 0x4_0000], GuestAddress(data))
        .unwrap();
    // (segment length, segments, expected status)
    let cases = [
        (8192u32, 1u32, S_IOERR),
        (4096, 1, S_OK),
        (512, seg_max + 1, S_IOERR),
        (512, seg_max, S_OK),
    ];
    for (i, &(len, n, want)) in cases.iter().enumerate() {
        let hdr = DATA_BASE + 0x20 * i as u64;
        let st = DATA_BASE + 0x100 + i as u64;
        header(&mem, hdr, T_OUT, 256 * i as u64);
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend((0..u64::from(n)).map(|k| (data + k * u64::from(len), len, 0)));
        descs.push((st, 1, W));
        let table = DATA_BASE + 0x1000 + 0x1000 * i as u64;
        indirect_table(&mem, table, &descs);
        let h = ring.add_descriptors(&[(table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT)]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(i as u16 + 1);
        assert_eq!(status(&mem, st), want, "case {i}: {n} segments of {len}");
        let mut buf = vec![0u8; (len * n) as usize];
        disk.read_at(&mut buf, 256 * 512 * i as u64).unwrap();
        let byte = if want == S_OK { 0x77 } else { 0x11 };
        assert!(buf.iter().all(|&x| x == byte), "case {i}: disk content");
    }
    assert_eq!(d.status() & NEEDS_RESET, 0);
    d.set_status(0);
}

/// A disk whose second half is on a full host file system (writes there fail with
/// ENOSPC), whose last sector cannot be read (EIO), and whose flushes fail (EIO).
struct Failing(MemBackend);

impl Failing {
    fn err(errno: i32) -> keel_block::Error {
        keel_block::Error::io(
            "the test's failing disk",
            std::io::Error::from_raw_os_error(errno),
        )
    }
}

impl BlockBackend for Failing {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn limits(&self) -> Limits {
        self.0.limits()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, b: &mut [IoSliceMut<'_>], o: u64) -> keel_block::Result<()> {
        if o + 512 >= DISK as u64 {
            return Err(Self::err(libc::EIO));
        }
        self.0.read_vectored_at(b, o)
    }
    fn write_vectored_at(
        &self,
        b: &[IoSlice<'_>],
        o: u64,
        f: WriteFlags,
    ) -> keel_block::Result<()> {
        if o >= DISK as u64 / 2 {
            return Err(Self::err(libc::ENOSPC));
        }
        self.0.write_vectored_at(b, o, f)
    }
    fn flush(&self) -> keel_block::Result<()> {
        Err(Self::err(libc::EIO))
    }
    fn discard(&self, o: u64, l: u64) -> keel_block::Result<()> {
        self.0.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> keel_block::Result<()> {
        if o + l > DISK as u64 / 2 {
            return Err(Self::err(libc::ENOSPC));
        }
        self.0.write_zeroes(o, l, u)
    }
}

#[test]
fn requests_the_host_fails_are_reported_to_the_owner() {
    let disk = Disk::synchronous(Arc::new(Failing(MemBackend::new(vec![0; DISK]))));
    let block = Block::new(disk, BlockOptions::default()).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    block
        .handle()
        .set_io_error_sink(Some(Arc::new(move |e: &IoError| {
            s.lock().unwrap().push(*e)
        })));
    let d = MmioDriver::new(Box::new(block));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    let st = DATA_BASE + 0x100;
    let last = (DISK / 512) as u64 - 1;
    // (type, sector, data descriptors): a write that fits, one where the host is full,
    // a read of the bad sector, a flush, write-zeroes where the host is full, and the
    // guest's own mistake (past the end), which is not the host's failure.
    let cases: [Case; 6] = [
        (T_OUT, 0, vec![(DATA_BASE + 0x1000, 4096, 0)], S_OK),
        (
            T_OUT,
            2048 - 8,
            vec![(DATA_BASE + 0x1000, 4096, 0)],
            S_IOERR,
        ),
        (T_IN, last, vec![(DATA_BASE + 0x2000, 512, W)], S_IOERR),
        (T_FLUSH, 0, vec![], S_IOERR),
        (T_WRITE_ZEROES, 0, vec![(DATA_BASE + 0x300, 16, 0)], S_IOERR),
        (T_IN, last, vec![(DATA_BASE + 0x2000, 1024, W)], S_IOERR),
    ];
    mem.write_obj(1000u64, GuestAddress(DATA_BASE + 0x300))
        .unwrap();
    mem.write_obj(100u32, GuestAddress(DATA_BASE + 0x308))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(DATA_BASE + 0x30c))
        .unwrap();
    publish_cases(&mem, &mut ring, &cases, st);
    d.notify(0);
    ring.wait_used(cases.len() as u16);
    for (i, (.., want)) in cases.iter().enumerate() {
        assert_eq!(status(&mem, st + i as u64), *want, "case {i}");
    }
    let io = |op, errno| IoError { op, errno };
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            io(IoOp::Write, libc::ENOSPC),
            io(IoOp::Read, libc::EIO),
            io(IoOp::Flush, libc::EIO),
            io(IoOp::WriteZeroes, libc::ENOSPC),
        ]
    );
    assert!(seen[0].nospace() && !seen[1].nospace() && seen[1].op.is_read());
    assert_eq!(d.status() & NEEDS_RESET, 0, "the device goes on");
    d.set_status(0);
}

/// Without INDIRECT_DESC negotiated (virtio 1.2 2.7.5.3.1) a request in an indirect table
/// is not performed: IOERR in its status byte; with no status byte to report it in, the
/// device needs a reset.
#[test]
fn an_indirect_request_without_indirect_desc_fails() {
    both(BlockOptions::default(), false, |d, _| {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(VERSION_1 | EVENT_IDX, &ring);
        let (table, out, st) = (DATA_BASE + 0x2000, DATA_BASE + 0x1000, DATA_BASE + 0x100);
        header(&mem, DATA_BASE, T_IN, 0);
        mem.write_slice(&[0xee; 512], GuestAddress(out)).unwrap();
        mem.write_obj(0xaau8, GuestAddress(st)).unwrap();
        indirect_table(
            &mem,
            table,
            &[(DATA_BASE, 16, 0), (out, 512, W), (st, 1, W)],
        );
        let h = ring.add_descriptors(&[(table, 48, VRING_DESC_F_INDIRECT)]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(ring.used_elem(0), (u32::from(h), 1));
        assert_eq!(status(&mem, st), S_IOERR);
        assert_eq!(read_bytes(&mem, out, 512), vec![0xee; 512], "the read ran");
        assert_eq!(d.status() & NEEDS_RESET, 0);

        // The device goes on with direct chains.
        let h = ring.add_descriptors(&[(DATA_BASE, 16, 0), (out, 512, W), (st + 1, 1, W)]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(2);
        assert_eq!(status(&mem, st + 1), S_OK);
        assert_eq!(read_bytes(&mem, out, 512), vec![0x11; 512]);

        // No writable byte at all: nothing to report the error in.
        indirect_table(&mem, table, &[(DATA_BASE, 16, 0)]);
        let h = ring.add_descriptors(&[(table, 16, VRING_DESC_F_INDIRECT)]);
        ring.publish(h);
        d.notify(0);
        eventually("DEVICE_NEEDS_RESET", || d.status() & NEEDS_RESET != 0);
        d.set_status(0);
    });
}

/// A driver that keeps the ring full of requests that fail validation (they take no slot
/// and complete at once) cannot keep the worker from a reset: the worker takes at most a
/// queue's worth of chains before it looks at its stop flag, so the reset (a status write
/// on a vCPU, which waits for the worker) returns while the flood goes on.
#[test]
fn a_reset_returns_while_the_driver_floods_the_ring() {
    // A large queue: the worker cannot use a ringful before the driver refills it.
    const FLOOD: u16 = 4096;
    let opts = BlockOptions {
        queue_size: FLOOD,
        ..Default::default()
    };
    for d in [
        Box::new(MmioDriver::new(block(counting(false), opts))) as Box<dyn Driver>,
        Box::new(PciDriver::new(block(counting(false), opts))),
    ] {
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, FLOOD);
        d.start(FEATURES, &ring);
        // One chain of an unsupported type, made available again and again.
        header(&mem, DATA_BASE, 0xff, 0);
        let h = ring.add_descriptors(&[(DATA_BASE, 16, 0), (DATA_BASE + 0x100, 1, W)]);
        // The chain named by every entry, kept a ringful ahead of the device.
        let flood = Flood::new(&ring, h, FLOOD);
        std::thread::scope(|s| {
            s.spawn(|| flood.run());
            // The flood starts the worker (a kick), then keeps it busy: the ring never runs
            // dry, so the worker never goes back to waiting for a kick.
            eventually("the flood to get going", || {
                d.notify(0);
                flood.served() > 2 * usize::from(FLOOD)
            });
            d.set_status(0);
            assert!(
                flood.stop(),
                "the reset returned only once the driver stopped making requests available"
            );
        });
        assert_eq!(d.status(), 0);
    }
}

/// A disk of `size` bytes that reads as zeroes and stores nothing, counts the bytes it
/// reads or zeroes (`done`) and takes 1 ms per MiB for them (a slow host disk, without a
/// cheap way to zero).
struct SlowDisk {
    size: u64,
    done: std::sync::atomic::AtomicU64,
    /// Every read fails (after taking its time).
    failing: bool,
}

impl SlowDisk {
    fn new() -> Arc<SlowDisk> {
        Arc::new(SlowDisk {
            size: 256 << 20,
            done: Default::default(),
            failing: false,
        })
    }

    fn work(&self, n: u64) {
        std::thread::sleep(std::time::Duration::from_micros(n >> 10));
        self.done.fetch_add(n, Ordering::SeqCst);
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }
}

impl BlockBackend for SlowDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits::default()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_vectored_at(&self, b: &mut [IoSliceMut<'_>], _: u64) -> keel_block::Result<()> {
        let mut n = 0;
        for s in b.iter_mut() {
            s.fill(0);
            n += s.len() as u64;
        }
        self.work(n);
        if self.failing {
            return Err(keel_block::Error::io(
                "reading",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }
    fn write_vectored_at(
        &self,
        _: &[IoSlice<'_>],
        _: u64,
        _: WriteFlags,
    ) -> keel_block::Result<()> {
        Ok(())
    }
    fn flush(&self) -> keel_block::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> keel_block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, len: u64, _: bool) -> keel_block::Result<()> {
        self.work(len);
        Ok(())
    }
}

/// A driver (mmio or pci) of a block device on `disk`'s synchronous engine.
fn slow_driver(disk: &Arc<SlowDisk>, pci: bool) -> Box<dyn Driver> {
    let block =
        Box::new(Block::new(Disk::synchronous(disk.clone()), BlockOptions::default()).unwrap());
    if pci {
        Box::new(PciDriver::new(block))
    } else {
        Box::new(MmioDriver::new(block))
    }
}

/// Segments and segment size of [`publish_huge_reads`]'s requests: 64 MiB each.
const HUGE_SEGS: u64 = 128;
const HUGE_SEG: u64 = 512 << 10;

/// Publishes `n` reads of sector 0, each of [`HUGE_SEGS`] segments aliasing the last
/// [`HUGE_SEG`] bytes of guest memory (within seg_max and size_max), through indirect
/// tables; request `i`'s status byte (0xff until written) is at `huge_status(i)`.
fn publish_huge_reads(mem: &keel_memory::GuestMemoryMmap, ring: &mut Ring, n: u64) {
    let buf = 0x20_0000 - HUGE_SEG;
    for i in 0..n {
        let (hdr, table) = (DATA_BASE + 0x20 * i, DATA_BASE + 0x1000 * (i + 1));
        header(mem, hdr, T_IN, 0);
        mem.write_obj(0xffu8, GuestAddress(huge_status(i))).unwrap();
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend((0..HUGE_SEGS).map(|_| (buf, HUGE_SEG as u32, W)));
        descs.push((huge_status(i), 1, W));
        indirect_table(mem, table, &descs);
        let h = ring.add_descriptors(&[(table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT)]);
        ring.publish(h);
    }
}

fn huge_status(i: u64) -> u64 {
    DATA_BASE + 0x800 + i
}

/// Publishes `n` write-zeroes requests of 8 ranges of 64 MiB each (512 MiB a request);
/// request `i`'s status byte is at `huge_status(i)`.
fn publish_huge_write_zeroes(mem: &keel_memory::GuestMemoryMmap, ring: &mut Ring, n: u64) {
    for i in 0..n {
        let (hdr, ranges) = (DATA_BASE + 0x20 * i, DATA_BASE + 0x1000 * (i + 1));
        header(mem, hdr, T_WRITE_ZEROES, 0);
        mem.write_obj(0xffu8, GuestAddress(huge_status(i))).unwrap();
        for r in 0..8u64 {
            let at = ranges + 16 * r;
            mem.write_obj(r * (16 << 11), GuestAddress(at)).unwrap();
            mem.write_obj(64u32 << 11, GuestAddress(at + 8)).unwrap();
            mem.write_obj(0u32, GuestAddress(at + 12)).unwrap();
        }
        let h = ring.add_descriptors(&[(hdr, 16, 0), (ranges, 8 * 16, 0), (huge_status(i), 1, W)]);
        ring.publish(h);
    }
}

/// What a reset or a pause may wait for. The worker has at most a budget in flight, and
/// the test's synchronous engine runs a piece as it is handed out, so one more budget can
/// start before the worker looks; the rest is room for the test thread to be late (the
/// disk goes on at 1 MiB a millisecond between its reading the count and the reset).
/// Without the budget a reset here waits for gigabytes.
const WAIT_BOUND: u64 = 8 * keel_virtio_blk::BUDGET_BYTES;

/// A reset waits for the queue's budget of bytes in flight, not for the requests the
/// driver chose: 32 reads of 64 MiB each (128 segments aliasing one 512 KiB buffer, within
/// seg_max and size_max) or 8 write-zeroes of 512 MiB each are 2 or 4 GiB, seconds of
/// this disk; the reset comes once the first bytes are done, and little more is done after
/// it.
#[test]
fn a_reset_waits_for_the_budget_not_for_the_drivers_huge_requests() {
    // Reads: 32 of 64 MiB. Write-zeroes: 8 of 512 MiB.
    type Publish = fn(&keel_memory::GuestMemoryMmap, &mut Ring, u64);
    let cases: [(Publish, u64, u64); 2] = [
        (publish_huge_reads, 32, HUGE_SEGS * HUGE_SEG),
        (publish_huge_write_zeroes, 8, 512 << 20),
    ];
    for (publish, n, each) in cases {
        for pci in [false, true] {
            let disk = SlowDisk::new();
            let d = slow_driver(&disk, pci);
            let mem = d.mem().clone();
            let mut ring = Ring::new(&mem, Q);
            d.start(FEATURES, &ring);
            publish(&mem, &mut ring, n);
            d.notify(0);
            eventually("the first bytes done", || disk.done() > 0);
            let before = disk.done();
            d.set_status(0);
            let after = disk.done();
            assert!(
                after - before <= WAIT_BOUND,
                "the reset waited for {} MiB of I/O",
                (after - before) >> 20
            );
            assert!(
                after < n * each,
                "every request was served before the reset"
            );
            assert_eq!(d.status(), 0);
        }
    }
}

/// Reads and writes longer than a piece keep every byte in place: a write of three
/// segments of odd sizes (2.1 MiB, so its pieces split segments) lands where it should,
/// and a read of X four times and then Y (1.25 MiB) fills Y from the fifth quarter MiB
/// (the second piece) and X from one of the first four; with the synchronous engine and
/// with io_uring on a real file.
#[test]
fn requests_longer_than_a_piece_keep_every_byte_in_place() {
    const SIZE: usize = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    RawFile::create(&p, SIZE as u64).unwrap();
    let raw = Arc::new(RawFile::open(&p, RawOptions::default()).unwrap());
    let mem_disk = Arc::new(MemBackend::new(vec![0; SIZE]));
    let disks: [(Disk, Arc<dyn BlockBackend>); 2] = [
        (Disk::synchronous(mem_disk.clone()), mem_disk),
        (Disk::uring(raw.clone(), 64), raw),
    ];
    for (disk, backend) in disks {
        let d = MmioDriver::new(Box::new(Block::new(disk, BlockOptions::default()).unwrap()));
        let mem = d.mem().clone();
        let mut ring = Ring::new(&mem, Q);
        d.start(FEATURES, &ring);
        // The write: P (768 KiB), P + 4 KiB (500 KiB), P (768 KiB), P + 8 KiB (100 KiB).
        let (pat, plen) = (DATA_BASE + 0x4_0000, 768usize << 10);
        let bytes: Vec<u8> = (0..plen).map(|i| (i * 7 + i / 4096) as u8).collect();
        mem.write_slice(&bytes, GuestAddress(pat)).unwrap();
        let segs = [(0, plen), (4096, 500 << 10), (0, plen), (8192, 100 << 10)];
        header(&mem, DATA_BASE, T_OUT, 8);
        let mut descs = vec![(DATA_BASE, 16, 0)];
        descs.extend(segs.iter().map(|&(o, l)| (pat + o as u64, l as u32, 0)));
        descs.push((DATA_BASE + 0x100, 1, W));
        indirect_table(&mem, DATA_BASE + 0x1000, &descs);
        let h = ring.add_descriptors(&[(
            DATA_BASE + 0x1000,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT,
        )]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(1);
        assert_eq!(status(&mem, DATA_BASE + 0x100), S_OK);
        let want: Vec<u8> = segs
            .iter()
            .flat_map(|&(o, l)| bytes[o..o + l].to_vec())
            .collect();
        let mut got = vec![0u8; want.len()];
        backend.read_at(&mut got, 8 * 512).unwrap();
        assert!(got == want, "the written bytes are not where they belong");
        // The read: X four times (the first piece), then Y (the second), 256 KiB each.
        let (x, y, q) = (DATA_BASE + 0x4_0000, DATA_BASE + 0x8_0000, 256u32 << 10);
        header(&mem, DATA_BASE + 0x200, T_IN, 8);
        let mut descs = vec![(DATA_BASE + 0x200, 16, 0)];
        descs.extend([(x, q, W); 4]);
        descs.extend([(y, q, W), (DATA_BASE + 0x101, 1, W)]);
        indirect_table(&mem, DATA_BASE + 0x2000, &descs);
        let h = ring.add_descriptors(&[(
            DATA_BASE + 0x2000,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT,
        )]);
        ring.publish(h);
        d.notify(0);
        ring.wait_used(2);
        assert_eq!(status(&mem, DATA_BASE + 0x101), S_OK);
        let q = q as usize;
        assert!(
            read_bytes(&mem, y, q) == want[4 * q..5 * q],
            "Y: the second piece"
        );
        let gx = read_bytes(&mem, x, q);
        assert!(
            (0..4).any(|k| gx == want[k * q..(k + 1) * q]),
            "X: one of the first piece's quarters"
        );
        d.set_status(0);
    }
}

/// A pause (a VM stop) waits for the queue's budget of bytes in flight and keeps the rest:
/// 8 reads of 64 MiB, paused once the first bytes are read; while paused nothing more is
/// read and no request completes; after resume every request completes, OK, and the disk
/// was read exactly once per byte asked for (no piece lost or run twice).
#[test]
fn a_pause_waits_for_the_budget_and_resume_finishes_every_request() {
    const N: u64 = 8;
    let disk = SlowDisk::new();
    let shared = keel_virtio::shared::SharedDevice::new(Box::new(
        Block::new(Disk::synchronous(disk.clone()), BlockOptions::default()).unwrap(),
    ));
    let d = MmioDriver::new(Box::new(shared.clone()));
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    publish_huge_reads(&mem, &mut ring, N);
    d.notify(0);
    eventually("the first bytes read", || disk.done() > 0);
    let before = disk.done();
    shared.pause();
    let paused = disk.done();
    assert!(
        paused - before <= WAIT_BOUND,
        "the pause waited for {} MiB of reads",
        (paused - before) >> 20
    );
    let used = ring.used_idx();
    assert!(used < N as u16, "every request completed before the pause");
    settle();
    assert_eq!(disk.done(), paused, "read while paused");
    assert_eq!(ring.used_idx(), used, "a request completed while paused");
    shared.resume();
    ring.wait_used(N as u16);
    for i in 0..N {
        assert_eq!(status(&mem, huge_status(i)), S_OK, "request {i}");
    }
    assert_eq!(disk.done(), N * HUGE_SEGS * HUGE_SEG);
    d.set_status(0);
}

/// A request that failed gets no more pieces: a read of 64 MiB on a disk whose reads all
/// fail ends with IOERR after the first budget's worth, not after 64 failing pieces.
#[test]
fn a_failed_request_gets_no_more_pieces() {
    let disk = Arc::new(SlowDisk {
        failing: true,
        ..Arc::into_inner(SlowDisk::new()).unwrap()
    });
    let d = slow_driver(&disk, false);
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    publish_huge_reads(&mem, &mut ring, 1);
    d.notify(0);
    ring.wait_used(1);
    assert_eq!(status(&mem, huge_status(0)), S_IOERR);
    assert!(
        disk.done() <= keel_virtio_blk::BUDGET_BYTES,
        "{} MiB read for a request that failed at its first piece",
        disk.done() >> 20
    );
    d.set_status(0);
}

/// Pieces are handed out round robin: a 4 KiB read made available after a 64 MiB one
/// completes first, after a budget or two of the big one rather than all of it.
#[test]
fn a_small_request_does_not_wait_for_a_huge_one() {
    let disk = SlowDisk::new();
    let d = slow_driver(&disk, false);
    let mem = d.mem().clone();
    let mut ring = Ring::new(&mem, Q);
    d.start(FEATURES, &ring);
    publish_huge_reads(&mem, &mut ring, 1);
    let small = DATA_BASE + 0x40_000;
    header(&mem, small, T_IN, 0);
    let h = ring.add_descriptors(&[
        (small, 16, 0),
        (small + 0x1000, 4096, W),
        (huge_status(1), 1, W),
    ]);
    ring.publish(h);
    d.notify(0);
    ring.wait_used(2);
    assert_eq!(
        ring.used_elem(0).0,
        u32::from(h),
        "the small read completed first"
    );
    assert_eq!(status(&mem, huge_status(0)), S_OK);
    assert_eq!(status(&mem, huge_status(1)), S_OK);
    d.set_status(0);
}

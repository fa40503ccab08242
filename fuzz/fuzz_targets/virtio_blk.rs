//! Arbitrary guest memory into the virtio-blk request parser and executor, over every
//! kind of disk keel serves and both ways of serving it.
//!
//! The first byte chooses: the event-index feature, a read-only disk, the backend (a disk
//! in memory; a raw file, page-cached or O_DIRECT, served inline or by io_uring; a qcow2
//! file, served inline or by io_uring) and the server. The rest is guest memory: three
//! regions, the first two adjacent (a buffer may straddle them) and the third behind a
//! hole. Queue 0 has its rings at 0 (descriptors), 0x100 (available) and 0x200 (used);
//! queue 1 at 0x20000, 0x20100, 0x20200. Everything else (request headers, segments,
//! data, indirect tables) is wherever the input points.
//!
//! Served inline (deterministic): one `SyncServer` per queue, taking turns. Checks:
//! nothing panics; each used index advances by exactly the number of chains the driver
//! made available (every chain answered, none twice) unless the ring is broken, when the
//! device reports DEVICE_NEEDS_RESET; the disk never changes size.
//!
//! Served by the device (`Block`, one worker thread per queue, as in a VM): with an IOPS
//! or bandwidth limit from the input, the driver kicks every queue, then either waits
//! briefly for the answers or resets the device at once, with requests in flight or held
//! by the throttle. Checks: nothing panics; the reset returns promptly (it ends throttle
//! waits and waits only for I/O in flight); the disk never changes size.
#![no_main]

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keel_block::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use keel_block::{BlockBackend, CacheMode, MemBackend, RawFile, RawOptions};
use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{
    ActivateContext, ActiveQueue, InterruptError, InterruptKind, NeedsReset, VirtioDevice,
    VirtioInterrupt,
};
use keel_virtio_blk::{Block, BlockOptions, Disk, SyncServer};
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const DISK: u64 = 0x8000;
const QSIZE: u16 = 16;
/// Guest memory: two adjacent regions, a hole, a third region.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x20000, 0x8000)];
/// Ring addresses (descriptors, available, used) of each queue.
const RINGS: [(u64, u64, u64); 2] = [(0, 0x100, 0x200), (0x20000, 0x20100, 0x20200)];
/// How long a reset may take: it ends throttle waits at once and waits only for I/O in
/// flight, which on these small files takes microseconds (3 ms for the slowest input
/// found). A throttle wait that ignored the reset would take minutes at the limits the
/// inputs choose; 10 s leaves room for a heavily loaded machine (a run at nice 15 beside
/// two builds once measured 2.5 s; that input, replayed alone, took 4 ms).
const RESET_BOUND: Duration = Duration::from_secs(10);

struct Quiet;
impl VirtioInterrupt for Quiet {
    fn trigger(&self, _: InterruptKind) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// The disk's file, in a tmpfs, created once per process (emptied per input).
fn disk_file() -> &'static (PathBuf, File) {
    static FILE: OnceLock<(PathBuf, File)> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("keel-fuzz-blk-{}", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    })
}

/// The file, emptied, opened as a raw disk (`growable` for qcow2).
fn raw(cache: CacheMode, read_only: bool, growable: bool) -> RawFile {
    let (path, file) = disk_file();
    file.set_len(0).unwrap();
    if !growable {
        file.set_len(DISK).unwrap();
    }
    RawFile::open(
        path,
        RawOptions {
            cache,
            read_only,
            growable,
        },
    )
    .unwrap()
}

/// A qcow2 image of DISK bytes in the file (4 KiB clusters: the work per input stays small).
fn qcow2_image(read_only: bool) -> Qcow2<RawFile> {
    let file = raw(CacheMode::Writeback, false, true);
    qcow2::create(
        &file,
        &CreateOptions {
            size: DISK,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let file = if read_only { raw_reopen(true) } else { file };
    Qcow2::open(
        file,
        Qcow2Options {
            read_only,
            ..Default::default()
        },
    )
    .unwrap()
}

fn raw_reopen(read_only: bool) -> RawFile {
    RawFile::open(
        &disk_file().0,
        RawOptions {
            cache: CacheMode::Writeback,
            read_only,
            growable: true,
        },
    )
    .unwrap()
}

/// The disk the first byte chooses, and its backend (for its size).
fn disk(kind: u8, read_only: bool) -> (Disk, Arc<dyn BlockBackend>) {
    match kind % 6 {
        0 => {
            let m = Arc::new(if read_only {
                MemBackend::read_only(vec![0x5a; DISK as usize])
            } else {
                MemBackend::new(vec![0x5a; DISK as usize])
            });
            (Disk::synchronous(m.clone()), m)
        }
        1 => {
            let f = Arc::new(raw(CacheMode::Writeback, read_only, false));
            (Disk::synchronous(f.clone()), f)
        }
        2 => {
            let f = Arc::new(raw(CacheMode::None, read_only, false));
            (Disk::synchronous(f.clone()), f)
        }
        3 => {
            let f = Arc::new(raw(
                if kind & 8 != 0 {
                    CacheMode::None
                } else {
                    CacheMode::Writeback
                },
                read_only,
                false,
            ));
            (Disk::uring(f.clone(), 8), f)
        }
        4 => {
            let q = Arc::new(qcow2_image(read_only));
            (Disk::synchronous(q.clone()), q)
        }
        _ => {
            let q = Arc::new(qcow2_image(read_only));
            (Disk::uring(q.clone(), 8), q)
        }
    }
}

fn queue(rings: (u64, u64, u64), event_idx: bool) -> Queue {
    keel_virtio::testing::ready_queue(QSIZE, rings, event_idx)
}

fn used_idx(mem: &GuestMemoryMmap, q: usize) -> u16 {
    mem.read_obj(GuestAddress(RINGS[q].2 + 2)).unwrap()
}

fn avail_idx(mem: &GuestMemoryMmap, q: usize) -> u16 {
    mem.read_obj(GuestAddress(RINGS[q].1 + 2)).unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let Some((&opts, more)) = rest.split_first() else {
        return;
    };
    rest = more;
    let event_idx = flags & 1 != 0;
    let read_only = flags & 2 != 0;
    let threaded = flags & 0x40 != 0;
    let nq = 1 + usize::from(flags >> 7);

    let mem = GuestMemoryMmap::from_ranges(
        &REGIONS
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for &(a, l) in &REGIONS {
        let n = rest.len().min(l);
        mem.write_slice(&rest[..n], GuestAddress(a)).unwrap();
        rest = &rest[n..];
    }
    // The used rings start clean; the avail indices are what the input says, bounded so
    // the device does not see a broken ring every time.
    for (q, r) in RINGS.iter().enumerate().take(nq) {
        mem.write_slice(&[0u8; 4 + 8 * QSIZE as usize + 2], GuestAddress(r.2))
            .unwrap();
        let idx = avail_idx(&mem, q) % (QSIZE + 1);
        mem.write_obj(idx, GuestAddress(r.1 + 2)).unwrap();
    }

    let (disk, backend) = disk(flags >> 2 & 0xf, read_only);
    let size = backend.size();
    let disk = disk.with_id("fuzz");
    let interrupt: Arc<dyn VirtioInterrupt> = Arc::new(Quiet);
    let broken = Arc::new(AtomicBool::new(false));
    let needs_reset = NeedsReset::new(broken.clone(), interrupt.clone());

    if !threaded {
        let mut servers: Vec<SyncServer> = (0..nq)
            .map(|q| {
                SyncServer::new(
                    queue(RINGS[q], event_idx),
                    mem.clone(),
                    &disk,
                    interrupt.clone(),
                    needs_reset.clone(),
                )
                .unwrap()
            })
            .collect();
        for s in &mut servers {
            s.run_until_idle().unwrap();
        }
        // The device's own writes (status bytes, read data) may land in the rings, as
        // the guest's memory is the guest's business: compare with the available index
        // as it is now. A head index outside the table, or an index too far ahead,
        // breaks the ring: the device stops and says so.
        if !broken.load(Ordering::SeqCst) {
            for q in 0..nq {
                assert_eq!(
                    used_idx(&mem, q),
                    avail_idx(&mem, q),
                    "queue {q}: every available chain answered exactly once"
                );
            }
        }
    } else {
        // Throttled or not: up to 64 requests or 64 KiB a second.
        let (iops, bps) = match opts & 3 {
            0 => (0, 0),
            1 => (u64::from(opts >> 2) + 1, 0),
            2 => (0, (u64::from(opts >> 2) + 1) << 10),
            _ => (u64::from(opts >> 2) + 1, 4096),
        };
        let mut block = Block::new(
            disk,
            BlockOptions {
                queues: nq as u16,
                queue_size: QSIZE,
                writeback: opts & 0x40 != 0,
                iops,
                bps,
                poll_us: 0,
                affinity: None,
            },
        )
        .unwrap();
        let queues: Vec<ActiveQueue> = (0..nq)
            .map(|q| ActiveQueue {
                index: q as u16,
                queue: queue(RINGS[q], event_idx),
                notifier: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            })
            .collect();
        let kicks: Vec<Arc<EventFd>> = queues.iter().map(|q| q.notifier.clone()).collect();
        let mut features = block.features();
        if !event_idx {
            features &= !keel_virtio::VIRTIO_RING_F_EVENT_IDX;
        }
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                features,
                queues,
                interrupt,
                needs_reset,
            })
            .unwrap();
        for k in &kicks {
            k.write(1).unwrap();
        }
        if opts & 0x80 != 0 {
            // Wait (a little) for the answers before the reset.
            let until = Instant::now() + Duration::from_millis(5);
            while Instant::now() < until
                && !broken.load(Ordering::SeqCst)
                && (0..nq).any(|q| used_idx(&mem, q) != avail_idx(&mem, q))
            {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let t = Instant::now();
        block.reset();
        assert!(
            t.elapsed() < RESET_BOUND,
            "reset took {:?} (limits {iops}/s, {bps} B/s)",
            t.elapsed()
        );
    }
    assert_eq!(backend.size(), size, "the disk never changes size");
    assert_eq!(size, DISK);
});

//! Dropping a `UringQueue` lets go of what it registered before the drop returns: the
//! image file is closed (the last `IN_CLOSE` arrives, as inotify sees it) and registered
//! memory is no longer pinned (`VmPin` in `/proc/self/status` is back to 0). Closing a
//! ring alone leaves both to the kernel's own teardown of the ring, later, on a worker
//! of its own: a file system holding the image could not be unmounted right after the
//! VMM exited.
//!
//! One test in its own binary: it reads process-wide figures.
#![cfg(feature = "io_uring")]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use keel_block::aio::{AioQueue, AioRequest, UringQueue};
use keel_block::buf::GuestBuf;
use keel_block::iov::GuestRange;
use keel_block::{RawFile, RawOptions};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// `VmPin` of this process, in KiB.
fn pinned_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no VmPin in /proc/self/status:\n{status}"))
}

/// An inotify watch on one file for opens and closes, non-blocking.
struct Watch(libc::c_int);

impl Watch {
    fn new(path: &std::path::Path) -> Watch {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mask = libc::IN_OPEN | libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE;
        // SAFETY: `fd` is ours and `c` a NUL-terminated path that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        Watch(fd)
    }

    /// (opens, closes) queued since the last call.
    fn take(&self) -> (usize, usize) {
        let (mut opens, mut closes) = (0, 0);
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into `buf`, which is as long as the length given.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return (opens, closes);
            }
            let mut at = 0;
            while at < n as usize {
                // struct inotify_event: wd (i32), mask (u32), cookie (u32), len (u32),
                // then `len` bytes of name (none for a watch on a file).
                let field =
                    |o: usize| u32::from_ne_bytes(buf[at + o..at + o + 4].try_into().unwrap());
                let mask = field(4);
                if mask & libc::IN_OPEN != 0 {
                    opens += 1;
                }
                if mask & (libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE) != 0 {
                    closes += 1;
                }
                at += 16 + field(12) as usize;
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SAFETY: closes the descriptor this watch owns.
        unsafe { libc::close(self.0) };
    }
}

#[test]
fn a_dropped_queue_closes_its_file_and_unpins_memory_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    RawFile::create(&path, 1 << 20).unwrap();
    let watch = Watch::new(&path);
    assert_eq!(pinned_kib(), 0, "nothing pinned before the test");
    for register in [false, true] {
        let file = Arc::new(RawFile::open(&path, RawOptions::default()).unwrap());
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 10)]).unwrap());
        let mut q: UringQueue<RawFile, GuestBuf<Arc<GuestMemoryMmap>>> =
            UringQueue::new(file.clone(), 8).unwrap();
        if register {
            q.register_memory(mem.clone()).unwrap();
            assert_eq!(pinned_kib(), 256, "registered memory is pinned");
        }
        // One transfer through the ring, so it has used the file.
        let range = [GuestRange::new(GuestAddress(0x1000), 4096)]
            .into_iter()
            .collect();
        q.submit(AioRequest::write(8192, GuestBuf::new(mem, range), 1));
        let mut done = Vec::new();
        q.wait(1, &mut done).unwrap();
        done.pop().unwrap().result.unwrap();

        drop(q);
        drop(file);
        let (opens, closes) = watch.take();
        assert!(opens > 0, "the file was opened (register={register})");
        assert_eq!(
            closes, opens,
            "every open of the image closed when the queue and the file were dropped (register={register})"
        );
        assert_eq!(pinned_kib(), 0, "memory unpinned (register={register})");
    }
}

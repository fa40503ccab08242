//! The fuzz target's entry point.

use std::sync::Arc;

use super::check::{self, Fix};
use super::{CacheSizes, Qcow2, Qcow2Options};
use crate::backend::BlockBackend;

/// Opens an image held in memory and exercises it: header, L1, L2 (plain
/// and extended) and refcount parsing, snapshot tables, reads (compressed
/// clusters too, and of an in-memory backing image when the header names
/// one), and (if it opens read-write) writes (copy-on-write from the backing
/// image, over compressed and shared clusters), compressed writes, discard,
/// write-zeroes and a consistency check. Never panics on any input; used by
/// the fuzz target.
pub fn fuzz_image(data: &[u8]) {
    use crate::mem::MemBackend;
    let backing: Arc<dyn BlockBackend> = Arc::new(MemBackend::read_only(
        (0..256 << 10).map(|i| (i % 251) as u8).collect(),
    ));
    if let Ok(img) = Qcow2::open_with_backing(
        MemBackend::new(data.to_vec()).with_max_size(64 << 20),
        Qcow2Options {
            cache_sizes: CacheSizes {
                l2: Some(4096),
                refcount: Some(4096),
            },
            ..Default::default()
        },
        Some(backing.clone()),
    ) {
        let size = img.size();
        let mut buf = vec![0u8; 8192];
        for off in [0, size / 3, size.saturating_sub(8192)] {
            let n = (size - off).min(8192) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            let _ = img.write_at(&buf[..n.min(1000)], off);
        }
        let cs = img.cluster_size();
        if size >= 2 * cs && cs <= 1 << 16 {
            let text: Vec<u8> = (0..cs).map(|i| (i / 64) as u8).collect();
            let _ = img.write_compressed(cs, &text);
            let _ = img.read_at(&mut buf[..100], cs + 10);
            let _ = img.write_at(&buf[..100], cs + 50);
        }
        let _ = img.write_zeroes(0, size.min(1 << 20), true);
        let _ = img.discard(size / 2, size.min(1 << 20) / 2);
        let _ = img.flush();
        let _ = check::check(img.file(), Fix::None);
    }
    let ro = MemBackend::read_only(data.to_vec());
    let _ = check::check(&ro, Fix::None);
    if let Ok(img) = Qcow2::open_with_backing(ro, Qcow2Options::default(), Some(backing)) {
        let mut buf = vec![0u8; 4096];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.snapshots();
    }
}

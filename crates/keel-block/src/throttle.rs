//! I/O throttling: [`Throttled`] wraps any [`BlockBackend`] with a [`Throttle`] (token
//! buckets for operations and bytes per second, from keel-ratelimit, re-exported here).

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

pub use keel_ratelimit::{Throttle, TokenBucket};

use crate::backend::{BlockBackend, Limits, WriteFlags};
use crate::error::Result;

fn lock(t: &Mutex<Throttle>) -> MutexGuard<'_, Throttle> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A backend whose requests are throttled: each call waits for its turn.
pub struct Throttled<B> {
    inner: B,
    throttle: Mutex<Throttle>,
}

impl<B: BlockBackend> Throttled<B> {
    /// Wraps `inner` with `iops` and `bps` limits (0: unlimited).
    pub fn new(inner: B, iops: u64, bps: u64) -> Self {
        Throttled {
            inner,
            throttle: Mutex::new(Throttle::new(iops, bps, Instant::now())),
        }
    }

    /// New limits, effective for the next request.
    pub fn set_limits(&self, iops: u64, bps: u64) {
        lock(&self.throttle).reconfigure(iops, bps, Instant::now());
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: BlockBackend> BlockBackend for Throttled<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        Throttle::admit(&self.throttle, bufs.iter().map(|b| b.len() as u64).sum());
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[IoSlice<'_>],
        offset: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        Throttle::admit(&self.throttle, bufs.iter().map(|b| b.len() as u64).sum());
        self.inner.write_vectored_at(bufs, offset, flags)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Throttle::admit(&self.throttle, 0);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        Throttle::admit(&self.throttle, 0);
        self.inner.write_zeroes(offset, len, unmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemBackend;

    /// The one test that uses the real clock: a throttled backend's requests wait, so its
    /// observed rate stays within the limit (how long each wait is, keel-ratelimit's tests
    /// check with a clock of their own; a busy machine may only make this slower).
    #[test]
    fn a_throttled_backend_stays_within_its_limit() {
        let b = Throttled::new(MemBackend::new(vec![0; 1 << 20]), 200, 0);
        let mut buf = [0u8; 512];
        let start = Instant::now();
        // 20 burst + 180 at 200/s: 0.9 s.
        for i in 0..200u64 {
            b.read_at(&mut buf, (i * 512) % (1 << 20)).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = 180.0 / secs;
        assert!(rate <= 200.0 * 1.01, "{rate:.1} ops/s exceeds the limit");
    }
}

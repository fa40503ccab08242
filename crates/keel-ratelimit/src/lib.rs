//! Rate limiting: token buckets for operations (requests, packets) and bytes per second,
//! with bursts and reconfiguration at run time (QEMU's iotune, Firecracker's rate
//! limiter). Used by keel-block's throttled backends and by keel-virtio-net's queues.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` tokens per second. A
//! request may proceed while the bucket is not in debt; it then takes its cost, which
//! may put the bucket in debt (a request larger than the burst is never starved), and
//! later requests wait until the debt is repaid. [`Throttle`] pairs an operations bucket
//! with a bytes bucket. Time is passed in, so the arithmetic is testable without sleeping.

#![deny(missing_docs)]

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens available; negative while in debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` per second, holding up to `burst` (at least 1;
    /// 0 means one tenth of a second's worth).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = Self::burst_for(rate, burst);
        TokenBucket {
            rate,
            burst,
            tokens: burst as f64,
            last: now,
        }
    }

    fn burst_for(rate: u64, burst: u64) -> u64 {
        if burst == 0 {
            (rate / 10).max(1)
        } else {
            burst
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
    }

    /// How long until a request may proceed (zero: now).
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 || self.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }

    /// Takes `n` tokens (the bucket may go into debt).
    pub fn consume(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// New rate and burst; tokens already held are kept, up to the new burst.
    pub fn reconfigure(&mut self, rate: u64, burst: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.burst = Self::burst_for(rate, burst);
        self.tokens = self.tokens.min(self.burst as f64);
    }

    /// Tokens per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }
}

/// Limits on operations and bytes per second; either may be off.
#[derive(Clone, Debug)]
pub struct Throttle {
    ops: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl Throttle {
    /// `iops` operations and `bps` bytes per second (0: unlimited), with bursts of a
    /// tenth of a second.
    pub fn new(iops: u64, bps: u64, now: Instant) -> Self {
        Self::with_bursts(iops, 0, bps, 0, now)
    }

    /// As [`Throttle::new`] with explicit bursts (0: a tenth of a second's worth).
    pub fn with_bursts(
        iops: u64,
        ops_burst: u64,
        bps: u64,
        bytes_burst: u64,
        now: Instant,
    ) -> Self {
        Throttle {
            ops: (iops > 0).then(|| TokenBucket::new(iops, ops_burst, now)),
            bytes: (bps > 0).then(|| TokenBucket::new(bps, bytes_burst, now)),
        }
    }

    /// How long until the next request may start.
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        let a = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_time(now));
        let b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_time(now));
        a.max(b)
    }

    /// Charges one request of `bytes` bytes.
    pub fn consume(&mut self, bytes: u64, now: Instant) {
        if let Some(b) = self.ops.as_mut() {
            b.consume(1, now);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.consume(bytes, now);
        }
    }

    /// New limits (0: unlimited), keeping what each bucket holds.
    pub fn reconfigure(&mut self, iops: u64, bps: u64, now: Instant) {
        fn set(slot: &mut Option<TokenBucket>, rate: u64, now: Instant) {
            match (slot.as_mut(), rate) {
                (_, 0) => *slot = None,
                (Some(b), r) => b.reconfigure(r, 0, now),
                (None, r) => *slot = Some(TokenBucket::new(r, 0, now)),
            }
        }
        set(&mut self.ops, iops, now);
        set(&mut self.bytes, bps, now);
    }

    /// Charges a request of `bytes` bytes if it may start at `now`; otherwise charges
    /// nothing and says how long until it may (ask again then: another request may have
    /// been admitted meanwhile).
    ///
    /// This is the call for event loops: a request that has to wait is held, with a
    /// timer for the returned duration in the loop's poll set, so that whatever else the
    /// loop watches (a stop, a reset) still ends the wait at once.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use keel_ratelimit::Throttle;
    ///
    /// let t0 = Instant::now();
    /// // 1000 bytes per second, a burst of 100.
    /// let mut t = Throttle::with_bursts(0, 0, 1000, 100, t0);
    /// assert_eq!(t.try_admit(600, t0), Ok(()));
    /// // 500 bytes in debt: the next request waits half a second.
    /// let wait = t.try_admit(100, t0).unwrap_err();
    /// assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6);
    /// assert_eq!(t.try_admit(100, t0 + wait), Ok(()));
    /// ```
    pub fn try_admit(&mut self, bytes: u64, now: Instant) -> std::result::Result<(), Duration> {
        let wait = self.wait_time(now);
        if wait.is_zero() {
            self.consume(bytes, now);
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Blocks the calling thread until a request may start, then charges it: for
    /// synchronous callers that may block (keel-block's `Throttled`); an event loop holds the
    /// request and waits on a timer instead ([`Throttle::try_admit`]).
    pub fn admit(this: &Mutex<Throttle>, bytes: u64) {
        loop {
            let wait = match lock(this).try_admit(bytes, Instant::now()) {
                Ok(()) => return,
                Err(wait) => wait,
            };
            std::thread::sleep(wait);
        }
    }
}

fn lock(t: &Mutex<Throttle>) -> MutexGuard<'_, Throttle> {
    t.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests admitted over `secs` simulated seconds, each admitted as soon as allowed.
    fn admitted(t: &mut Throttle, bytes: u64, secs: f64, start: Instant) -> (u64, u64) {
        let mut now = start;
        let end = start + Duration::from_secs_f64(secs);
        let (mut ops, mut total) = (0, 0);
        loop {
            now += t.wait_time(now);
            if now >= end {
                return (ops, total);
            }
            t.consume(bytes, now);
            ops += 1;
            total += bytes;
        }
    }

    #[test]
    fn sustained_rates_match_the_limits() {
        let t0 = Instant::now();
        // 1000 ops/s for 10 s: the burst (100) plus 10 s of refill.
        let mut t = Throttle::new(1000, 0, t0);
        let (ops, _) = admitted(&mut t, 4096, 10.0, t0);
        assert!((10_000..=10_101).contains(&ops), "{ops}");
        // 1 MiB/s in 64 KiB requests.
        let mut t = Throttle::new(0, 1 << 20, t0);
        let (_, bytes) = admitted(&mut t, 65536, 10.0, t0);
        let rate = bytes as f64 / 10.0;
        assert!((rate / f64::from(1 << 20) - 1.0).abs() < 0.02, "{rate}");
        // Both: the tighter one wins.
        let mut t = Throttle::new(100, 1 << 20, t0);
        let (ops, _) = admitted(&mut t, 1 << 20, 10.0, t0);
        assert!((10..=12).contains(&ops), "{ops}");
    }

    #[test]
    fn bursts_and_debt() {
        let t0 = Instant::now();
        let mut t = Throttle::with_bursts(10, 5, 0, 0, t0);
        // A full bucket lets the burst through at once, then one every 100 ms.
        for _ in 0..5 {
            assert_eq!(t.wait_time(t0), Duration::ZERO);
            t.consume(0, t0);
        }
        let w = t.wait_time(t0);
        assert_eq!(w, Duration::ZERO, "the last token was taken, no debt yet");
        t.consume(0, t0);
        let w = t.wait_time(t0);
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-6, "{w:?}");
        // A request bigger than the burst is admitted, then repaid.
        let mut b = Throttle::with_bursts(0, 0, 1000, 100, t0);
        b.consume(1000, t0);
        let w = b.wait_time(t0);
        assert!((w.as_secs_f64() - 0.9).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn reconfiguration_applies_to_the_next_request() {
        let t0 = Instant::now();
        let mut t = Throttle::new(100, 0, t0);
        let (ops, _) = admitted(&mut t, 0, 1.0, t0);
        assert!((100..=111).contains(&ops), "{ops}");
        let t1 = t0 + Duration::from_secs(1);
        t.reconfigure(1000, 0, t1);
        let (ops, _) = admitted(&mut t, 0, 1.0, t1);
        assert!((990..=1101).contains(&ops), "{ops}");
        t.reconfigure(0, 0, t1);
        assert_eq!(t.wait_time(t1), Duration::ZERO);
    }
}

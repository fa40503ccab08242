//! keel-ratelimit's token buckets with simulated time: 1000 frames a second with a burst
//! of 100; how many a sender that always has one ready gets through in 2 s, and how long
//! the one after a burst waits.
//!
//! `cargo run -p keel-examples --example ratelimit`

use std::time::{Duration, Instant};

use keel_ratelimit::Throttle;

fn main() {
    let t0 = Instant::now();
    // 1000 operations per second (burst 100), no byte limit.
    let mut t = Throttle::with_bursts(1000, 100, 0, 0, t0);
    let mut now = t0;
    let end = t0 + Duration::from_secs(2);
    let mut admitted = 0u64;
    while now < end {
        match t.try_admit(64, now) {
            Ok(()) => admitted += 1,
            Err(wait) => now += wait,
        }
    }
    println!("admitted {admitted} in 2 s at 1000/s with a burst of 100");
    assert!((2100..=2101).contains(&admitted));

    let mut t = Throttle::with_bursts(0, 0, 1000, 100, t0);
    assert_eq!(t.try_admit(1500, t0), Ok(()));
    let wait = t.try_admit(1, t0).unwrap_err();
    println!("after a 1500-byte frame on a 1000 B/s, 100 B burst bucket: wait {wait:?}");
    assert!((wait.as_secs_f64() - 1.4).abs() < 1e-6);
}

//! A throttled disk does not hold keel hostage: while the test guest keeps its throttled
//! disk busy (`blk-bench`, every 4 KiB request 8 or 16 s of debt), SIGTERM stops keel
//! within 4 s (the next request would start no sooner than 6 s later). Throttled requests
//! wait on a timer in the queue worker's poll set, which a stop ends at once.

mod support;

use std::time::{Duration, Instant};

use keel_testutil::require_kvm;
use support::{Running, TempDir};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn sigterm_stops_keel_at_once_while_a_guest_floods_a_throttled_disk() {
    require_kvm!();
    let dir = TempDir::new("blk-throttle");
    let img = dir.path().join("disk.raw");
    // Sparse: nothing for keel's closing flush to write back.
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the image");
    for limits in ["bps=256", "iops=1,bps=512"] {
        let mut cmd = support::keel();
        cmd.args([
            "--memory",
            "128",
            "--cmdline",
            "keel.test=blk-bench keel.blk_n=1000000",
            "--disk",
        ])
        .arg(format!("path={},format=raw,{limits}", img.display()));
        let mut keel = Running::start(cmd);
        keel.wait_for("the first row", LIMIT, |s| {
            s.contains("keel-test: blk-bench: begin randread depth 1")
        });
        // A few requests in: the bucket is seconds in debt and the next request waits.
        std::thread::sleep(Duration::from_millis(1500));
        let start = Instant::now();
        keel.signal(15);
        let out = keel.finish(LIMIT);
        let took = start.elapsed();
        assert_eq!(
            out.code(),
            Some(128 + 15),
            "{limits}: stderr: {}",
            out.stderr
        );
        assert!(
            took < Duration::from_secs(4),
            "{limits}: keel took {took:?} to stop after SIGTERM"
        );
    }
}

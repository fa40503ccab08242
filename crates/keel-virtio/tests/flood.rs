//! A driver that makes chains available as fast as the device uses them cannot keep a
//! device's thread from its stop and pause requests: `drain_queue` stops at a budget
//! (the queue's size) and `QueueWorker` comes back to a queue with more on its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use keel_virtio::testing::*;
use keel_virtio::worker::{drain_queue, Drained, IndirectDesc, QueueWorker};
use vmm_sys_util::eventfd::EventFd;

#[test]
fn drain_queue_stops_at_the_queue_size_when_the_driver_never_runs_dry() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QUEUE_SIZE);
    let mut queue = ready_queue(QUEUE_SIZE, (ring.desc, ring.avail, ring.used), false);
    let head = ring.add_descriptors(&[(DATA_BASE, 16, VRING_DESC_F_WRITE)]);
    ring.publish(head);
    // Each time the device takes the chain the driver makes it available again, up to a
    // limit so that a drain without a budget ends too (and fails the count below).
    let mut calls = 0;
    let r = drain_queue(&mut queue, &mem, IndirectDesc::Negotiated, |_| {
        calls += 1;
        if calls < 1000 {
            ring.publish(head);
        }
        0
    })
    .unwrap();
    assert_eq!(calls, usize::from(QUEUE_SIZE), "chains handled in one call");
    assert!(r.more, "more is waiting: {r:?}");
    assert_eq!(ring.used_idx(), QUEUE_SIZE);
    // The next call goes on where this one stopped; once the driver stops refilling, the
    // queue runs dry and the call says so.
    let mut rest = 0;
    let r = drain_queue(&mut queue, &mem, IndirectDesc::Negotiated, |_| {
        rest += 1;
        0
    })
    .unwrap();
    assert_eq!(rest, 1, "the one chain still available");
    assert_eq!(
        r,
        Drained {
            interrupt: true,
            more: false
        }
    );
}

/// A call that uses exactly its budget and finds nothing more ends like any other: driver
/// notifications back on (EVENT_IDX: avail_event at the next index), so the driver's next
/// request is announced.
#[test]
fn a_drain_that_ends_exactly_at_its_budget_turns_notifications_back_on() {
    let mem = memory();
    let mut ring = Ring::new(&mem, QUEUE_SIZE);
    let mut queue = ready_queue(QUEUE_SIZE, (ring.desc, ring.avail, ring.used), true);
    for _ in 0..QUEUE_SIZE {
        let h = ring.add_descriptors(&[(DATA_BASE, 16, VRING_DESC_F_WRITE)]);
        ring.publish(h);
    }
    let r = drain_queue(&mut queue, &mem, IndirectDesc::Negotiated, |_| 0).unwrap();
    assert!(!r.more, "{r:?}");
    assert_eq!(ring.used_idx(), QUEUE_SIZE);
    assert_eq!(
        ring.avail_event(),
        QUEUE_SIZE,
        "the device asks to hear of the next request"
    );
}

#[test]
fn a_queue_worker_comes_back_to_a_queue_with_more_and_still_stops() {
    let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // A queue that always has more: only the worker's own notification brings it back.
    let mut w = QueueWorker::spawn("flood", vec![(0, kick)], move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        true
    })
    .unwrap();
    eventually("the worker to come back on its own", || {
        calls.load(Ordering::SeqCst) > 100
    });
    w.pause();
    let paused_at = calls.load(Ordering::SeqCst);
    settle();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        paused_at,
        "handled while paused"
    );
    w.resume();
    eventually("the worker to go on after resume", || {
        calls.load(Ordering::SeqCst) > paused_at
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        w.stop();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "stop did not return while the queue kept having more"
    );
}

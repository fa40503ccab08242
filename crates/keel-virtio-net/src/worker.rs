//! One worker thread per queue pair: the backend's descriptor and the queues' notifiers
//! in one poll set.
//!
//! TX: each available chain is checked (header, length, GSO type, `hdr_len`) and handed
//! to the backend as one gathered write, header first. RX: the worker takes as many
//! available chains as a frame of the largest size the guest accepts needs (one without
//! VIRTIO_NET_F_MRG_RXBUF), has the backend read one frame into all of them at once,
//! then uses as many as the frame filled, writes `num_buffers`, and gives the others
//! back to the ring. With no buffers posted the worker stops polling the backend for
//! reading: frames stay in the kernel, and the host keeps no queue. After the last
//! activity the worker keeps looking for `poll_us` before it sleeps (with notifications
//! off: a driver that sends again at once needs no kick).
//!
//! The control queue is served by pair 0's worker.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keel_memory::GuestMemoryMmap;
use keel_virtio::device::{ActiveQueue, InterruptKind, NeedsReset, VirtioInterrupt};
use keel_virtio::worker::{drain_queue, should_interrupt, IndirectDesc, PauseGate};
use virtio_bindings::virtio_net::*;
#[cfg(feature = "test-utils")]
use virtio_queue::Queue;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{read_at, write_at, Backend, GuestSlice, NET_HDR_LEN};
use crate::device::{lock, MacAddr, Shared, MAC_TABLE_ENTRIES, MAX_FRAME};

/// Everything a queue pair's worker needs.
pub(crate) struct PairContext {
    pub pair: u16,
    pub rx: ActiveQueue,
    pub tx: ActiveQueue,
    pub ctrl: Option<ActiveQueue>,
    pub backend: Box<dyn Backend>,
    pub mem: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub needs_reset: NeedsReset,
    pub features: u64,
    pub shared: Arc<Shared>,
    pub gate: Option<Arc<PauseGate>>,
    pub poll_us: u32,
    pub mtu: u16,
    pub max_pairs: u16,
}

/// Frames a direction handles before the other gets a turn.
const BUDGET: usize = 64;
/// Bytes of a control command the device reads (the largest valid one, two full MAC
/// tables, is 2 + 8 + 12 * 64 = 778).
const MAX_CTRL: usize = 4096;

/// How a direction stands after a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Frames moved (maybe more to do).
    Busy,
    /// TX: nothing available. RX: buffers available, nothing in the backend.
    Empty,
    /// RX: no buffers (or too few for the largest frame).
    Starved,
    /// The backend cannot take more (TX).
    Blocked,
    /// The rate limit holds the direction back this long.
    Throttled(Duration),
    /// Nothing to do until something changes (link down, pair not in use, ring broken).
    Idle,
}

/// The state of a queue pair, driven by the worker thread (or by `SyncServer`).
pub(crate) struct Engine {
    pub ctx: PairContext,
    indirect: IndirectDesc,
    mrg: bool,
    event_idx: bool,
    /// The largest frame (with header) the guest accepts.
    rx_max: usize,
    /// The largest frame (with header) without segmentation offload: with merged
    /// buffers, the worker waits for at least this much room before it reads.
    rx_min: usize,
    /// What the guest accepts: partial checksums, segments larger than the MTU.
    guest_csum: bool,
    guest_tso: bool,
    /// What the guest may send.
    host_csum: bool,
    host_tso4: bool,
    host_tso6: bool,
    host_ecn: bool,
    rx_used: bool,
    tx_used: bool,
    broken: bool,
    /// Whether the backend is attached (the pair is in use).
    enabled: bool,
    /// RX buffers were too few for the largest frame at this available index.
    rx_short: Option<u16>,
    /// Whether driver notifications are on (they are off while the worker is busy).
    rx_notify: bool,
    tx_notify: bool,
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// The guest slices of `chain`'s descriptors, if they are all of the `writable` kind
/// and all in guest memory.
fn chain_slices<'m>(
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    writable: bool,
    out: &mut Vec<GuestSlice<'m>>,
) -> Option<usize> {
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() != writable {
            return None;
        }
        let len = d.len() as usize;
        for s in vm_memory::GuestMemoryBackend::get_slices(mem, d.addr(), len) {
            out.push(s.ok()?);
        }
        total = total.checked_add(len)?;
    }
    Some(total)
}

impl Engine {
    pub fn new(ctx: PairContext) -> Engine {
        let has = |bit: u32| ctx.features & (1 << bit) != 0;
        let guest_tso = has(VIRTIO_NET_F_GUEST_CSUM)
            && (has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6));
        // Ethernet header and a VLAN tag around an MTU's worth.
        let frame = if guest_tso {
            MAX_FRAME
        } else {
            usize::from(ctx.mtu) + 18
        };
        Engine {
            indirect: IndirectDesc::from_features(ctx.features),
            mrg: has(VIRTIO_NET_F_MRG_RXBUF),
            event_idx: has(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX),
            rx_max: NET_HDR_LEN + frame,
            rx_min: NET_HDR_LEN + usize::from(ctx.mtu) + 18,
            guest_csum: has(VIRTIO_NET_F_GUEST_CSUM),
            guest_tso,
            host_csum: has(VIRTIO_NET_F_CSUM),
            host_tso4: has(VIRTIO_NET_F_HOST_TSO4),
            host_tso6: has(VIRTIO_NET_F_HOST_TSO6),
            host_ecn: has(VIRTIO_NET_F_HOST_ECN),
            rx_used: false,
            tx_used: false,
            broken: false,
            enabled: ctx.pair == 0,
            rx_short: None,
            rx_notify: true,
            tx_notify: true,
            ctx,
        }
    }

    fn broken(&mut self, what: &str, e: &dyn std::fmt::Display) {
        log::warn!("virtio-net pair {}: {what}: {e}", self.ctx.pair);
        self.broken = true;
        self.ctx.needs_reset.report();
    }

    fn has(&self, bit: u32) -> bool {
        self.ctx.features & (1 << bit) != 0
    }

    /// Attaches or detaches the backend when the driver changed the pairs in use.
    pub fn apply_active(&mut self) {
        let active = self.ctx.pair == 0
            || self.ctx.pair < self.ctx.shared.active_pairs.load(Ordering::SeqCst);
        if active != self.enabled {
            self.enabled = active;
            if let Err(e) = self.ctx.backend.set_enabled(active) {
                log::warn!(
                    "virtio-net pair {}: cannot {} the backend queue: {e}",
                    self.ctx.pair,
                    if active { "attach" } else { "detach" }
                );
            }
        }
    }

    /// Checks a TX header against the frame: the frame's length without the header, or
    /// None when the guest got it wrong.
    fn check_tx(&self, bufs: &[GuestSlice<'_>], total: usize) -> Option<usize> {
        let len = total.checked_sub(NET_HDR_LEN)?;
        if !(14..=MAX_FRAME).contains(&len) {
            return None;
        }
        let mut h = [0u8; NET_HDR_LEN];
        if !read_at(bufs, 0, &mut h) {
            return None;
        }
        let flags = u32::from(h[0]);
        let gso = u32::from(h[1]);
        let hdr_len = usize::from(u16::from_le_bytes([h[2], h[3]]));
        let gso_size = u16::from_le_bytes([h[4], h[5]]);
        let csum_start = usize::from(u16::from_le_bytes([h[6], h[7]]));
        let csum_offset = usize::from(u16::from_le_bytes([h[8], h[9]]));
        if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return None;
        }
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
            && (!self.host_csum || csum_start + csum_offset + 2 > len)
        {
            return None;
        }
        if hdr_len > len {
            return None;
        }
        let ecn = gso & VIRTIO_NET_HDR_GSO_ECN != 0;
        let ok = match gso & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => !ecn,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.host_tso4 && (!ecn || self.host_ecn),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.host_tso6 && (!ecn || self.host_ecn),
            _ => false,
        };
        if !ok {
            return None;
        }
        if gso != VIRTIO_NET_HDR_GSO_NONE
            && (gso_size == 0 || flags & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0)
        {
            return None;
        }
        Some(len)
    }

    /// Sends up to [`BUDGET`] frames; returns how many chains it took and how TX stands.
    pub fn tx(&mut self) -> (usize, Dir) {
        if self.broken {
            return (0, Dir::Idle);
        }
        let mem = self.ctx.mem.clone();
        if self.tx_notify {
            if let Err(e) = self.ctx.tx.queue.disable_notification(&*mem) {
                self.broken("tx ring", &e);
                return (0, Dir::Idle);
            }
            self.tx_notify = false;
        }
        let stats = &self.ctx.shared.stats.pairs[usize::from(self.ctx.pair)].tx;
        let mut n = 0;
        let mut bufs = Vec::new();
        while n < BUDGET {
            let wait = lock(&self.ctx.shared.tx_limit).wait_time(Instant::now());
            if !wait.is_zero() {
                return (n, Dir::Throttled(wait));
            }
            let q = &mut self.ctx.tx.queue;
            let chain = match q.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.broken("tx ring", &e);
                    return (n, Dir::Idle);
                }
            };
            let Some(chain) = chain else {
                return (n, Dir::Empty);
            };
            let head = chain.head_index();
            if self.indirect.refuses(q, &*mem, head) {
                self.broken("tx chain", &"an indirect table without INDIRECT_DESC");
                return (n, Dir::Idle);
            }
            n += 1;
            bufs.clear();
            let checked =
                chain_slices(&mem, chain, false, &mut bufs).and_then(|t| self.check_tx(&bufs, t));
            match checked {
                None => stats.error(),
                Some(_) if !self.ctx.shared.link_up.load(Ordering::Relaxed) => stats.drop(),
                Some(len) => match self.ctx.backend.send(&bufs) {
                    Ok(()) => {
                        stats.frame(len);
                        lock(&self.ctx.shared.tx_limit).consume(len as u64, Instant::now());
                    }
                    Err(e) if is_would_block(&e) => {
                        // Taken again when the backend has room.
                        let q = &mut self.ctx.tx.queue;
                        q.set_next_avail(q.next_avail().wrapping_sub(1));
                        return (n - 1, Dir::Blocked);
                    }
                    Err(e) => {
                        log::debug!("virtio-net pair {}: send: {e}", self.ctx.pair);
                        stats.drop();
                    }
                },
            }
            if let Err(e) = self.ctx.tx.queue.add_used(&*mem, head, 0) {
                self.broken("tx used ring", &e);
                return (n, Dir::Idle);
            }
            self.tx_used = true;
        }
        (n, Dir::Busy)
    }

    /// Receives up to [`BUDGET`] frames; returns how many and how RX stands.
    pub fn rx(&mut self) -> (usize, Dir) {
        let sh = self.ctx.shared.clone();
        if self.broken || !self.enabled || !sh.link_up.load(Ordering::Relaxed) {
            return (0, Dir::Idle);
        }
        let mem = self.ctx.mem.clone();
        if self.rx_notify {
            if let Err(e) = self.ctx.rx.queue.disable_notification(&*mem) {
                self.broken("rx ring", &e);
                return (0, Dir::Idle);
            }
            self.rx_notify = false;
        }
        let stats = &sh.stats.pairs[usize::from(self.ctx.pair)].rx;
        let mut frames = 0;
        let mut bufs: Vec<GuestSlice<'_>> = Vec::new();
        let mut chains: Vec<(u16, usize)> = Vec::new();
        while frames < BUDGET {
            let wait = lock(&sh.rx_limit).wait_time(Instant::now());
            if !wait.is_zero() {
                return (frames, Dir::Throttled(wait));
            }
            bufs.clear();
            chains.clear();
            let mut room = 0usize;
            let q = &mut self.ctx.rx.queue;
            let mut first = q.next_avail();
            loop {
                let chain = match q.iter(&*mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => {
                        self.broken("rx ring", &e);
                        return (frames, Dir::Idle);
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if self.indirect.refuses(q, &*mem, head) {
                    self.broken("rx chain", &"an indirect table without INDIRECT_DESC");
                    return (frames, Dir::Idle);
                }
                let before = bufs.len();
                match chain_slices(&mem, chain, true, &mut bufs) {
                    Some(len) if len > 0 => {
                        chains.push((head, len));
                        room = room.saturating_add(len);
                    }
                    _ => {
                        bufs.truncate(before);
                        if chains.is_empty() {
                            // An unusable buffer (readable, outside memory, empty): used
                            // empty, counted.
                            stats.error();
                            if let Err(e) = q.add_used(&*mem, head, 0) {
                                self.broken("rx used ring", &e);
                                return (frames, Dir::Idle);
                            }
                            self.rx_used = true;
                            first = q.next_avail();
                            continue;
                        }
                        // Handled on its own next time.
                        q.set_next_avail(q.next_avail().wrapping_sub(1));
                        break;
                    }
                }
                if !self.mrg || room >= self.rx_max {
                    break;
                }
            }
            let taken = q.next_avail().wrapping_sub(first);
            if chains.is_empty() {
                return (frames, Dir::Starved);
            }
            if self.mrg && room < self.rx_min && usize::from(taken) < usize::from(q.size()) {
                // Too few buffers for a frame of the MTU: wait for more. (With room for
                // that but not for the largest segment, the frame is read: a segment
                // that does not fit is dropped, and a driver that never posts more than
                // it has does not stall the queue.)
                q.set_next_avail(first);
                let avail = q
                    .avail_idx(&*mem, Ordering::Acquire)
                    .map(|w| w.0)
                    .unwrap_or(first);
                self.rx_short = Some(avail);
                return (frames, Dir::Starved);
            }
            self.rx_short = None;
            let len = match self.ctx.backend.recv(&bufs) {
                Ok(len) => len,
                Err(e) => {
                    q.set_next_avail(first);
                    if !is_would_block(&e) {
                        log::debug!("virtio-net pair {}: recv: {e}", self.ctx.pair);
                    }
                    return (frames, Dir::Empty);
                }
            };
            frames += 1;
            let mut dst = [0u8; 6];
            if len > room || len < NET_HDR_LEN + 14 || !read_at(&bufs, NET_HDR_LEN, &mut dst) {
                // Did not fit (or a runt): dropped, buffers given back.
                q.set_next_avail(first);
                stats.drop();
                continue;
            }
            let mut hdr = [0u8; 2];
            let offloaded = read_at(&bufs, 0, &mut hdr)
                && ((u32::from(hdr[0]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !self.guest_csum)
                    || (u32::from(hdr[1]) != VIRTIO_NET_HDR_GSO_NONE && !self.guest_tso));
            if offloaded {
                // Queued in the backend before this driver turned offloads off.
                q.set_next_avail(first);
                stats.drop();
                continue;
            }
            if !lock(&sh.filter).accepts(MacAddr(dst)) {
                q.set_next_avail(first);
                stats.drop();
                continue;
            }
            // Spread over as many chains as it filled.
            let mut left = len;
            let mut used = Vec::with_capacity(chains.len());
            for &(head, cap) in &chains {
                if left == 0 {
                    break;
                }
                let n = cap.min(left);
                used.push((head, n as u32));
                left -= n;
            }
            let num_buffers = used.len() as u16;
            if !write_at(&bufs, NET_HDR_LEN - 2, &num_buffers.to_le_bytes()) {
                q.set_next_avail(first);
                stats.error();
                continue;
            }
            q.set_next_avail(first.wrapping_add(num_buffers));
            // Counted before the driver can see it.
            let payload = len - NET_HDR_LEN;
            stats.frame(payload);
            lock(&sh.rx_limit).consume(payload as u64, Instant::now());
            for (head, n) in used {
                if let Err(e) = q.add_used(&*mem, head, n) {
                    self.broken("rx used ring", &e);
                    return (frames, Dir::Idle);
                }
            }
            self.rx_used = true;
        }
        (frames, Dir::Busy)
    }

    /// Serves the control queue, at most its size in commands; returns the commands it
    /// answered and whether more are waiting ([`keel_virtio::worker::Drained::more`]).
    pub fn ctrl(&mut self) -> (usize, bool) {
        if self.broken || self.ctx.ctrl.is_none() {
            return (0, false);
        }
        let mem = self.ctx.mem.clone();
        let mut answered = 0;
        let mut ctrl = self.ctx.ctrl.take();
        let Some(c) = ctrl.as_mut() else {
            return (0, false);
        };
        let result = drain_queue(&mut c.queue, &mem, self.indirect, |chain| {
            answered += 1;
            self.command(&mem, chain)
        });
        let more = match result {
            Ok(d) => {
                if d.interrupt {
                    if let Err(e) = self.ctx.interrupt.trigger(InterruptKind::Queue(c.index)) {
                        log::warn!("virtio-net: cannot interrupt the control queue: {e}");
                    }
                }
                d.more
            }
            Err(e) => {
                self.broken("control queue", &e);
                false
            }
        };
        self.ctx.ctrl = ctrl;
        (answered, more)
    }

    /// One control command: reads it, carries it out, writes the ack. Returns the bytes
    /// written.
    fn command(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let sh = &self.ctx.shared;
        let mut cmd = Vec::new();
        let mut ack_at = None;
        let mut too_long = false;
        for d in chain {
            if d.is_write_only() {
                ack_at.get_or_insert(d.addr());
                continue;
            }
            let len = d.len() as usize;
            if ack_at.is_some() || cmd.len() + len > MAX_CTRL {
                too_long = true;
                continue;
            }
            let at = cmd.len();
            cmd.resize(at + len, 0);
            if mem.read_slice(&mut cmd[at..], d.addr()).is_err() {
                too_long = true;
            }
        }
        let ok = !too_long && self.execute(&cmd);
        let Some(at) = ack_at else {
            sh.stats.ctrl_err.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let ack = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
        if mem.write_obj(ack, at).is_err() {
            sh.stats.ctrl_err.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let counter = if ok {
            &sh.stats.ctrl_ok
        } else {
            &sh.stats.ctrl_err
        };
        counter.fetch_add(1, Ordering::Relaxed);
        1
    }

    /// Carries out a command (class, command, data); false: VIRTIO_NET_ERR.
    fn execute(&self, cmd: &[u8]) -> bool {
        let sh = &self.ctx.shared;
        let [class, command, data @ ..] = cmd else {
            return false;
        };
        let (class, command) = (u32::from(*class), u32::from(*command));
        match (class, command, data) {
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[on])
                if self.has(VIRTIO_NET_F_CTRL_RX) =>
            {
                lock(&sh.filter).promisc = on != 0;
                true
            }
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[on])
                if self.has(VIRTIO_NET_F_CTRL_RX) =>
            {
                lock(&sh.filter).allmulti = on != 0;
                true
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &[a, b, c, d, e, f])
                if self.has(VIRTIO_NET_F_CTRL_MAC_ADDR) =>
            {
                let mac = MacAddr([a, b, c, d, e, f]);
                if mac.0[0] & 1 != 0 {
                    return false;
                }
                lock(&sh.filter).mac = mac;
                true
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, data)
                if self.has(VIRTIO_NET_F_CTRL_RX) =>
            {
                let Some((uni, rest)) = mac_table(data) else {
                    return false;
                };
                let Some((multi, rest)) = mac_table(rest) else {
                    return false;
                };
                if !rest.is_empty() {
                    return false;
                }
                let mut f = lock(&sh.filter);
                f.uni_overflow = uni.len() > MAC_TABLE_ENTRIES;
                f.multi_overflow = multi.len() > MAC_TABLE_ENTRIES;
                f.uni = if f.uni_overflow { Vec::new() } else { uni };
                f.multi = if f.multi_overflow { Vec::new() } else { multi };
                true
            }
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &[lo, hi])
                if self.has(VIRTIO_NET_F_MQ) =>
            {
                let n = u16::from_le_bytes([lo, hi]);
                if !(1..=self.ctx.max_pairs).contains(&n) {
                    return false;
                }
                sh.active_pairs.store(n, Ordering::SeqCst);
                sh.wake_all();
                true
            }
            _ => false,
        }
    }

    /// Interrupts the driver for the queues that used buffers, if it asked for it.
    pub fn signal(&mut self) {
        let mem = self.ctx.mem.clone();
        for rx in [true, false] {
            let (used, aq) = if rx {
                (&mut self.rx_used, &mut self.ctx.rx)
            } else {
                (&mut self.tx_used, &mut self.ctx.tx)
            };
            if !std::mem::take(used) {
                continue;
            }
            match should_interrupt(&mut aq.queue, &mem) {
                Ok(true) => {
                    if let Err(e) = self.ctx.interrupt.trigger(InterruptKind::Queue(aq.index)) {
                        log::warn!("virtio-net: cannot interrupt queue {}: {e}", aq.index);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    let index = aq.index;
                    self.broken(&format!("queue {index}"), &e);
                }
            }
        }
    }

    /// Before sleeping with TX empty: notifications back on; true if more arrived.
    pub fn tx_arm(&mut self) -> bool {
        let mem = self.ctx.mem.clone();
        self.tx_notify = true;
        match self.ctx.tx.queue.enable_notification(&*mem) {
            Ok(more) => more,
            Err(e) => {
                self.broken("tx ring", &e);
                false
            }
        }
    }

    /// Before sleeping with RX starved: notifications back on (for buffers beyond those
    /// already seen when there were too few); true if buffers arrived meanwhile.
    pub fn rx_arm(&mut self) -> bool {
        let mem = self.ctx.mem.clone();
        let q = &mut self.ctx.rx.queue;
        let more = match q.enable_notification(&*mem) {
            Ok(more) => more,
            Err(e) => {
                self.broken("rx ring", &e);
                return false;
            }
        };
        self.rx_notify = true;
        let Some(seen) = self.rx_short else {
            return more;
        };
        if self.event_idx {
            // A kick when the driver goes past what was seen (virtio-queue set
            // avail_event to the next chain, which the driver has already passed).
            let at = q.used_ring() + 4 + 8 * u64::from(q.size());
            if mem.write_obj(seen, GuestAddress(at)).is_err() {
                return false;
            }
            fence(Ordering::SeqCst);
        }
        q.avail_idx(&*mem, Ordering::Acquire)
            .map(|a| a.0 != seen)
            .unwrap_or(false)
    }
}

/// A MAC table of a VIRTIO_NET_CTRL_MAC_TABLE_SET command: its entries and what follows.
fn mac_table(data: &[u8]) -> Option<(Vec<MacAddr>, &[u8])> {
    let (n, rest) = data.split_first_chunk::<4>()?;
    let n = usize::try_from(u32::from_le_bytes(*n)).ok()?;
    let bytes = n.checked_mul(6)?;
    if bytes > rest.len() {
        return None;
    }
    let (table, rest) = rest.split_at(bytes);
    let macs = table
        .chunks_exact(6)
        .map(|c| MacAddr([c[0], c[1], c[2], c[3], c[4], c[5]]))
        .collect();
    Some((macs, rest))
}

/// A running queue-pair worker.
pub(crate) struct Worker {
    pair: u16,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<Box<dyn Backend>>>,
}

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const CTRL_KICK: u64 = 2;
const BACKEND: u64 = 3;
const WAKE: u64 = 4;
const TIMER: u64 = 5;

impl Worker {
    /// Starts the worker; on failure hands the backend back.
    pub fn spawn(ctx: PairContext) -> Result<Worker, (io::Error, Box<dyn Backend>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let (wake, w) = match EventFd::new(libc::EFD_NONBLOCK).and_then(|e| {
            let c = e.try_clone()?;
            Ok((e, c))
        }) {
            Ok(p) => p,
            Err(e) => return Err((e, ctx.backend)),
        };
        let pair = ctx.pair;
        let s = stop.clone();
        // The thread gets the context through a slot it takes from, so that a failed
        // spawn can hand the backend back.
        let slot = Arc::new(std::sync::Mutex::new(Some(ctx)));
        let t = slot.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("keel-net-q{pair}"))
            .spawn(move || {
                let ctx = lock(&t).take().expect("the context is given once");
                let gate = ctx.gate.clone();
                let _member = gate.as_deref().map(PauseGate::member);
                let mut engine = Engine::new(ctx);
                if let Err(e) = run(&mut engine, &s, &w) {
                    log::warn!("virtio-net pair {pair}: {e}");
                }
                engine.ctx.backend
            });
        match spawned {
            Ok(thread) => Ok(Worker {
                pair,
                stop,
                wake,
                thread: Some(thread),
            }),
            Err(e) => {
                let ctx = lock(&slot).take().expect("the thread never ran");
                Err((e, ctx.backend))
            }
        }
    }

    pub fn pair(&self) -> u16 {
        self.pair
    }

    /// Another handle on the worker's wake-up event.
    pub fn waker(&self) -> io::Result<EventFd> {
        self.wake.try_clone()
    }

    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Stops the worker and waits for it; returns its backend (None if it panicked).
    pub fn stop(&mut self) -> Option<Box<dyn Backend>> {
        let t = self.thread.take()?;
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        match t.join() {
            Ok(b) => Some(b),
            Err(_) => {
                log::error!("virtio-net: a queue pair worker panicked");
                None
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Why a worker stopped early.
#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("setting up epoll")]
    Epoll(#[source] io::Error),
    #[error("creating the rate-limit timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

fn run(e: &mut Engine, stop: &AtomicBool, wake: &EventFd) -> Result<(), WorkerError> {
    let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
    let mut timer = TimerFd::new().map_err(WorkerError::Timer)?;
    let add = |fd: i32, events: EventSet, token: u64| {
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(WorkerError::Epoll)
    };
    add(e.ctx.rx.notifier.as_raw_fd(), EventSet::IN, RX_KICK)?;
    add(e.ctx.tx.notifier.as_raw_fd(), EventSet::IN, TX_KICK)?;
    if let Some(c) = &e.ctx.ctrl {
        add(c.notifier.as_raw_fd(), EventSet::IN, CTRL_KICK)?;
    }
    add(wake.as_raw_fd(), EventSet::IN, WAKE)?;
    add(timer.as_raw_fd(), EventSet::IN, TIMER)?;
    let backend_fd = e.ctx.backend.fd().as_raw_fd();
    add(backend_fd, EventSet::empty(), BACKEND)?;
    let mut interest = EventSet::empty();
    let poll = Duration::from_micros(u64::from(e.ctx.poll_us));
    let mut last = Instant::now();
    let mut events = [EpollEvent::default(); 6];
    // The control queue is served when kicked (and once at start): it is not polled.
    let mut ctrl_kicked = true;
    let mut rounds = 0u32;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(gate) = e.ctx.gate.clone().filter(|g| g.is_closed()) {
            e.signal();
            gate.park();
            last = Instant::now();
            continue;
        }
        e.apply_active();
        let (ntx, tx) = e.tx();
        let (nrx, rx) = e.rx();
        let nctrl = if std::mem::take(&mut ctrl_kicked) {
            // More than a queue's worth waiting: the rest on the next round, after the
            // stop and pause checks above.
            let (n, more) = e.ctrl();
            ctrl_kicked = more;
            n
        } else {
            0
        };
        e.signal();
        rounds = rounds.wrapping_add(1);
        if rounds % 32 == 0 {
            // Busy or polling: a look at the notifiers now and then (the control queue,
            // wake-ups), without sleeping.
            ctrl_kicked |= wait_events(&epoll, 0, &mut events, e, wake, &mut timer)?;
        }
        if ntx + nrx + nctrl > 0 {
            last = Instant::now();
            continue;
        }
        let wait = [tx, rx]
            .iter()
            .filter_map(|d| match d {
                Dir::Throttled(w) => Some(*w),
                _ => None,
            })
            .min();
        if let Some(w) = wait {
            // A zero duration would disarm the timer.
            if let Err(err) = timer.reset(w.max(Duration::from_micros(1)), None) {
                log::warn!("virtio-net: arming the rate-limit timer: {err}");
            }
        } else if !poll.is_zero() && last.elapsed() < poll {
            std::hint::spin_loop();
            continue;
        }
        // Going to sleep: notifications back on, and one more look.
        if tx == Dir::Empty && e.tx_arm() {
            continue;
        }
        if rx == Dir::Starved && e.rx_arm() {
            continue;
        }
        let mut want = EventSet::empty();
        if rx == Dir::Empty {
            want |= EventSet::IN;
        }
        if tx == Dir::Blocked {
            want |= EventSet::OUT;
        }
        if want != interest {
            epoll
                .ctl(
                    ControlOperation::Modify,
                    backend_fd,
                    EpollEvent::new(want, BACKEND),
                )
                .map_err(WorkerError::Epoll)?;
            interest = want;
        }
        let kicked = wait_events(&epoll, -1, &mut events, e, wake, &mut timer)?;
        ctrl_kicked |= kicked;
        last = Instant::now();
    }
}

/// Waits up to `timeout` ms (-1: for ever) for the worker's descriptors and consumes what
/// fired; returns whether the control queue was kicked.
fn wait_events(
    epoll: &Epoll,
    timeout: i32,
    events: &mut [EpollEvent],
    e: &Engine,
    wake: &EventFd,
    timer: &mut TimerFd,
) -> Result<bool, WorkerError> {
    let n = match epoll.wait(timeout, events) {
        Ok(n) => n,
        Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(false),
        Err(err) => return Err(WorkerError::Epoll(err)),
    };
    let mut ctrl = false;
    for ev in &events[..n] {
        match ev.data() {
            RX_KICK => {
                let _ = e.ctx.rx.notifier.read();
            }
            TX_KICK => {
                let _ = e.ctx.tx.notifier.read();
            }
            CTRL_KICK => {
                if let Some(c) = &e.ctx.ctrl {
                    let _ = c.notifier.read();
                }
                ctrl = true;
            }
            WAKE => {
                let _ = wake.read();
            }
            TIMER => {
                let _ = timer.wait();
            }
            _ => {}
        }
    }
    Ok(ctrl)
}

/// The queues a [`SyncServer`] serves.
#[cfg(feature = "test-utils")]
pub struct SyncQueues {
    /// The receive queue.
    pub rx: Queue,
    /// The transmit queue.
    pub tx: Queue,
    /// The control queue, if VIRTIO_NET_F_CTRL_VQ is among the features.
    pub ctrl: Option<Queue>,
}

/// Serves one queue pair (and the control queue) on the calling thread: for tests and
/// fuzzers that want determinism.
#[cfg(feature = "test-utils")]
pub struct SyncServer {
    engine: Engine,
}

#[cfg(feature = "test-utils")]
impl SyncServer {
    /// A server for `queues` (already configured and validated), as a one-pair device
    /// with `features` negotiated and options `opts` would run them.
    pub fn new(
        mem: GuestMemoryMmap,
        features: u64,
        queues: SyncQueues,
        backend: Box<dyn Backend>,
        opts: crate::NetOptions,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: NeedsReset,
    ) -> std::io::Result<SyncServer> {
        let aq = |index, queue| -> std::io::Result<ActiveQueue> {
            Ok(ActiveQueue {
                index,
                queue,
                notifier: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
            })
        };
        let shared = crate::device::shared_for(1, &opts);
        Ok(SyncServer {
            engine: Engine::new(PairContext {
                pair: 0,
                rx: aq(0, queues.rx)?,
                tx: aq(1, queues.tx)?,
                ctrl: queues.ctrl.map(|q| aq(2, q)).transpose()?,
                backend,
                mem: Arc::new(mem),
                interrupt,
                needs_reset,
                features,
                shared,
                gate: None,
                poll_us: 0,
                mtu: opts.mtu,
                max_pairs: 1,
            }),
        })
    }

    /// Serves until nothing moves (at most `rounds` rounds).
    pub fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            let (a, _) = self.engine.tx();
            let (b, _) = self.engine.rx();
            let (c, _) = self.engine.ctrl();
            self.engine.signal();
            if a + b + c == 0 {
                return;
            }
        }
    }

    /// The receive queue (to inspect its indices).
    pub fn rx_queue(&self) -> &Queue {
        &self.engine.ctx.rx.queue
    }

    /// The transmit queue.
    pub fn tx_queue(&self) -> &Queue {
        &self.engine.ctx.tx.queue
    }

    /// The control queue, if there is one.
    pub fn ctrl_queue(&self) -> Option<&Queue> {
        self.engine.ctx.ctrl.as_ref().map(|c| &c.queue)
    }

    /// The counters.
    pub fn stats(&self) -> crate::NetStats {
        self.engine.ctx.shared.stats.snapshot()
    }
}

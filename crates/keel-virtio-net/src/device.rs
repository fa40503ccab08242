//! The virtio-net device: configuration space, features, the receive filter the control
//! queue sets, and one worker thread per queue pair.

use std::fmt;
use std::mem::{offset_of, size_of};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use keel_ratelimit::Throttle;
use keel_virtio::device::{
    ActivateContext, ActivateError, ActiveQueue, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use keel_virtio::worker::PauseGate;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{Backend, Offloads};
use crate::stats::{NetStats, Stats};
use crate::worker::{PairContext, Worker};

/// The virtio device type of network devices.
pub const NET_DEVICE_TYPE: u32 = VIRTIO_ID_NET;

/// The longest frame a driver may send (virtio 1.2 5.1.6.2: 65550 bytes without the
/// header: a 64 KiB GSO frame with its Ethernet header and a VLAN tag).
pub const MAX_FRAME: usize = 65550;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An Ethernet (MAC) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address (52:54:xx:xx:xx:xx, like QEMU's) that is
    /// the same for the same `seed` (a VM and device index, say).
    ///
    /// # Examples
    ///
    /// ```
    /// use keel_virtio_net::MacAddr;
    ///
    /// let a = MacAddr::local(7);
    /// assert_eq!(a, MacAddr::local(7));
    /// assert_ne!(a, MacAddr::local(8));
    /// assert_eq!(a.0[0] & 3, 2, "locally administered, unicast");
    /// assert_eq!("52:54:00:12:34:56".parse::<MacAddr>()?.to_string(), "52:54:00:12:34:56");
    /// # Ok::<(), keel_virtio_net::MacParseError>(())
    /// ```
    pub fn local(seed: u64) -> MacAddr {
        // splitmix64: well spread bits from any seed.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A MAC address that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex bytes separated by colons)")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<MacAddr, MacParseError> {
        let err = || MacParseError(s.to_string());
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(m))
    }
}

/// Limits of one direction (0: unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second (Ethernet frames without the virtio-net header).
    pub bytes_per_sec: u64,
    /// Frames per second.
    pub packets_per_sec: u64,
}

impl RateLimit {
    fn throttle(self) -> Throttle {
        Throttle::new(self.packets_per_sec, self.bytes_per_sec, Instant::now())
    }
}

/// Device options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The device's MAC address.
    pub mac: MacAddr,
    /// The MTU the device reports (VIRTIO_NET_F_MTU), 68 to 65535; also bounds the frames
    /// the device expects from a backend without segmentation offload.
    pub mtu: u16,
    /// Maximum size of each queue (a power of two up to 32768).
    pub queue_size: u16,
    /// After its last frame a queue pair's worker keeps looking at the rings and the
    /// backend for this many microseconds before it sleeps (0: never).
    pub poll_us: u32,
    /// Limits on frames to the guest.
    pub rx_limit: RateLimit,
    /// Limits on frames from the guest.
    pub tx_limit: RateLimit,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            mac: MacAddr::local(0),
            mtu: 1500,
            queue_size: 256,
            poll_us: 50,
            rx_limit: RateLimit::default(),
            tx_limit: RateLimit::default(),
        }
    }
}

/// Errors from building a network device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No backend, or more than 256 (one per queue pair).
    #[error("{0} backends: a virtio-net device here has 1 to 256 queue pairs, one backend each")]
    Pairs(usize),
    /// The queue size is not a power of two from 2 to 32768.
    #[error("queue size {0} is not a power of two from 2 to 32768")]
    QueueSize(u16),
    /// The MTU is below 68 (the IPv4 minimum).
    #[error("MTU {0} is below 68")]
    Mtu(u16),
    /// The MAC address is a multicast address.
    #[error("{0} is a multicast address")]
    Multicast(MacAddr),
    /// A queue pair's backend was lost (its worker thread ended abnormally).
    #[error("queue pair {0} has lost its backend")]
    BackendLost(usize),
    /// The backends disagree on offload support.
    #[error("the backends of one device must all support offloads or none")]
    MixedBackends,
}

/// What the control queue sets: which destinations the device delivers (virtio 1.2
/// 5.1.6.5.1). Promiscuous at reset, as QEMU (drivers turn it off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RxFilter {
    pub mac: MacAddr,
    pub promisc: bool,
    pub allmulti: bool,
    pub uni: Vec<MacAddr>,
    pub multi: Vec<MacAddr>,
    /// More unicast (multicast) entries than the table holds: accept them all.
    pub uni_overflow: bool,
    pub multi_overflow: bool,
}

/// Entries the MAC filter tables hold.
pub(crate) const MAC_TABLE_ENTRIES: usize = 64;

impl RxFilter {
    fn new(mac: MacAddr) -> RxFilter {
        RxFilter {
            mac,
            promisc: true,
            allmulti: false,
            uni: Vec::new(),
            multi: Vec::new(),
            uni_overflow: false,
            multi_overflow: false,
        }
    }

    /// Whether a frame to `dst` is delivered.
    pub fn accepts(&self, dst: MacAddr) -> bool {
        if self.promisc || dst.0 == [0xff; 6] {
            return true;
        }
        if dst.is_multicast() {
            self.allmulti || self.multi_overflow || self.multi.contains(&dst)
        } else {
            dst == self.mac || self.uni_overflow || self.uni.contains(&dst)
        }
    }
}

/// What the device's threads and its handle share.
pub(crate) struct Shared {
    pub link_up: AtomicBool,
    pub active_pairs: AtomicU16,
    pub filter: Mutex<RxFilter>,
    pub stats: Stats,
    pub rx_limit: Mutex<Throttle>,
    pub tx_limit: Mutex<Throttle>,
    pub limits: Mutex<(RateLimit, RateLimit)>,
    pub interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// Wakes each running worker (to look at the link, the active pairs, its gate).
    pub wakers: Mutex<Vec<EventFd>>,
}

impl Shared {
    pub fn wake_all(&self) {
        for w in lock(&self.wakers).iter() {
            let _ = w.write(1);
        }
    }
}

/// The shared state of a device of `pairs` queue pairs with `opts`, as at reset.
pub(crate) fn shared_for(pairs: usize, opts: &NetOptions) -> Arc<Shared> {
    Arc::new(Shared {
        link_up: AtomicBool::new(true),
        active_pairs: AtomicU16::new(1),
        filter: Mutex::new(RxFilter::new(opts.mac)),
        stats: Stats::new(pairs),
        rx_limit: Mutex::new(opts.rx_limit.throttle()),
        tx_limit: Mutex::new(opts.tx_limit.throttle()),
        limits: Mutex::new((opts.rx_limit, opts.tx_limit)),
        interrupt: Mutex::new(None),
        wakers: Mutex::new(Vec::new()),
    })
}

/// What the host can do with a device while the guest uses it: read its counters, take
/// the link down and up, change its limits. Cheap to clone.
#[derive(Clone)]
pub struct NetHandle {
    shared: Arc<Shared>,
}

impl NetHandle {
    /// The device's counters.
    pub fn stats(&self) -> NetStats {
        self.shared.stats.snapshot()
    }

    /// Whether the link is up (VIRTIO_NET_S_LINK_UP).
    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::SeqCst)
    }

    /// Takes the link down or up: the status field changes and the driver gets a
    /// configuration-change interrupt. While the link is down the device sends nothing
    /// (TX frames are dropped and counted) and receives nothing (frames stay in the
    /// backend).
    pub fn set_link(&self, up: bool) {
        if self.shared.link_up.swap(up, Ordering::SeqCst) == up {
            return;
        }
        let interrupt = lock(&self.shared.interrupt).clone();
        if let Some(i) = interrupt {
            if let Err(e) = i.trigger(InterruptKind::Config) {
                log::warn!("virtio-net: cannot signal a link change: {e}");
            }
        }
        self.shared.wake_all();
    }

    /// Changes the limits (0: unlimited) from the next frame on.
    pub fn set_limits(&self, rx: RateLimit, tx: RateLimit) {
        *lock(&self.shared.limits) = (rx, tx);
        let now = Instant::now();
        lock(&self.shared.rx_limit).reconfigure(rx.packets_per_sec, rx.bytes_per_sec, now);
        lock(&self.shared.tx_limit).reconfigure(tx.packets_per_sec, tx.bytes_per_sec, now);
        self.shared.wake_all();
    }

    /// The limits in force: (to the guest, from the guest).
    pub fn limits(&self) -> (RateLimit, RateLimit) {
        *lock(&self.shared.limits)
    }

    /// The device's MAC address now (the driver may change it with
    /// VIRTIO_NET_CTRL_MAC_ADDR_SET).
    pub fn mac(&self) -> MacAddr {
        lock(&self.shared.filter).mac
    }
}

/// Bytes of configuration space: `virtio_net_config` up to `mtu` (SPEED_DUPLEX and RSS
/// are not offered).
const CONFIG_LEN: usize = offset_of!(virtio_net_config, mtu) + size_of::<u16>();

/// The virtio-net device model.
pub struct Net {
    opts: NetOptions,
    backends: Vec<Option<Box<dyn Backend>>>,
    offloads: bool,
    sizes: Vec<u16>,
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    gate: Arc<PauseGate>,
}

impl Net {
    /// A device with one queue pair per backend (more than one: VIRTIO_NET_F_MQ). It
    /// starts one worker thread per pair when the driver activates it and stops them on
    /// reset; the backends are kept across resets.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::unix::net::UnixDatagram;
    /// use keel_virtio::device::VirtioDevice;
    /// use keel_virtio_net::backend::{Backend, SocketBackend};
    /// use keel_virtio_net::{MacAddr, Net, NetOptions, NET_DEVICE_TYPE};
    ///
    /// let (ours, _peer) = UnixDatagram::pair().unwrap();
    /// let backend: Box<dyn Backend> = Box::new(SocketBackend::new(ours).unwrap());
    /// let mac: MacAddr = "52:54:00:12:34:56".parse()?;
    /// let net = Net::new(vec![backend], NetOptions { mac, ..NetOptions::default() })?;
    /// assert_eq!(net.device_type(), NET_DEVICE_TYPE);
    /// let mut config = [0u8; 6];
    /// net.read_config(0, &mut config);
    /// assert_eq!(config, mac.0);
    /// // rx, tx and the control queue.
    /// assert_eq!(net.queue_max_sizes().len(), 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(backends: Vec<Box<dyn Backend>>, opts: NetOptions) -> Result<Net, Error> {
        if backends.is_empty() || backends.len() > 256 {
            return Err(Error::Pairs(backends.len()));
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size < 2 {
            return Err(Error::QueueSize(opts.queue_size));
        }
        if opts.mtu < 68 {
            return Err(Error::Mtu(opts.mtu));
        }
        if opts.mac.is_multicast() {
            return Err(Error::Multicast(opts.mac));
        }
        let offloads = backends[0].supports_offloads();
        if backends.iter().any(|b| b.supports_offloads() != offloads) {
            return Err(Error::MixedBackends);
        }
        let pairs = backends.len();
        Ok(Net {
            sizes: vec![opts.queue_size; 2 * pairs + 1],
            backends: backends.into_iter().map(Some).collect(),
            offloads,
            shared: shared_for(pairs, &opts),
            opts,
            workers: Vec::new(),
            gate: Arc::new(PauseGate::default()),
        })
    }

    /// A handle for the host: counters, link state, limits.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            shared: self.shared.clone(),
        }
    }

    fn pairs(&self) -> u16 {
        self.backends.len() as u16
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mac = lock(&self.shared.filter).mac;
        c[..6].copy_from_slice(&mac.0);
        let status = if self.shared.link_up.load(Ordering::SeqCst) {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        let at = offset_of!(virtio_net_config, status);
        c[at..at + 2].copy_from_slice(&status.to_le_bytes());
        let at = offset_of!(virtio_net_config, max_virtqueue_pairs);
        c[at..at + 2].copy_from_slice(&self.pairs().to_le_bytes());
        let at = offset_of!(virtio_net_config, mtu);
        c[at..at + 2].copy_from_slice(&self.opts.mtu.to_le_bytes());
        c
    }

    fn stop_workers(&mut self) {
        self.gate.open();
        for mut w in self.workers.drain(..) {
            let pair = usize::from(w.pair());
            if let Some(b) = w.stop() {
                self.backends[pair] = Some(b);
            }
        }
        lock(&self.shared.wakers).clear();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        NET_DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut f = 0u64;
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ] {
            f |= 1 << bit;
        }
        if self.pairs() > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        if self.offloads {
            for bit in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
            ] {
                f |= 1 << bit;
            }
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        // Nothing is writable for a VIRTIO_F_VERSION_1 driver (the MAC changes through
        // the control queue).
        false
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let has = |bit: u32| ctx.features & (1 << bit) != 0;
        let pairs = if has(VIRTIO_NET_F_MQ) {
            self.pairs()
        } else {
            1
        };
        let ctrl_index = 2 * pairs;
        let mut queues: Vec<Option<ActiveQueue>> = (0..=ctrl_index).map(|_| None).collect();
        for q in ctx.queues {
            if let Some(slot) = queues.get_mut(usize::from(q.index)) {
                *slot = Some(q);
            }
        }
        let ctrl = if has(VIRTIO_NET_F_CTRL_VQ) {
            queues[usize::from(ctrl_index)].take()
        } else {
            None
        };
        let offloads = Offloads::from_features(ctx.features);
        let multi = self.backends.len() > 1;
        for (i, b) in self.backends.iter_mut().enumerate() {
            let Some(b) = b else {
                return Err(ActivateError::Device {
                    step: "find the backend",
                    source: Box::new(Error::BackendLost(i)),
                });
            };
            b.set_offloads(offloads)
                .map_err(|e| ActivateError::Device {
                    step: "set the backend's offloads",
                    source: Box::new(e),
                })?;
            if multi {
                b.set_enabled(i == 0).map_err(|e| ActivateError::Device {
                    step: "attach or detach a backend queue",
                    source: Box::new(e),
                })?;
            }
        }
        // Reset state: one pair in use, the default filter, link as the host left it.
        self.shared.active_pairs.store(1, Ordering::SeqCst);
        {
            let mut f = lock(&self.shared.filter);
            *f = RxFilter::new(f.mac);
        }
        *lock(&self.shared.interrupt) = Some(ctx.interrupt.clone());
        let mem = Arc::new(ctx.mem);
        self.gate = Arc::new(PauseGate::default());
        let mut ctrl = ctrl;
        for p in 0..pairs {
            let (rx, tx) = (
                queues[usize::from(2 * p)].take(),
                queues[usize::from(2 * p + 1)].take(),
            );
            let (Some(rx), Some(tx)) = (rx, tx) else {
                if p == 0 {
                    self.stop_workers();
                    return Err(ActivateError::MissingQueue(0));
                }
                continue;
            };
            let Some(backend) = self.backends[usize::from(p)].take() else {
                continue;
            };
            let pc = PairContext {
                pair: p,
                rx,
                tx,
                ctrl: if p == 0 { ctrl.take() } else { None },
                backend,
                mem: mem.clone(),
                interrupt: ctx.interrupt.clone(),
                needs_reset: ctx.needs_reset.clone(),
                features: ctx.features,
                shared: self.shared.clone(),
                gate: Some(self.gate.clone()),
                poll_us: self.opts.poll_us,
                mtu: self.opts.mtu,
                max_pairs: self.pairs(),
            };
            match Worker::spawn(pc) {
                Ok(w) => {
                    if let Ok(e) = w.waker() {
                        lock(&self.shared.wakers).push(e);
                    }
                    self.workers.push(w);
                }
                Err((e, backend)) => {
                    self.backends[usize::from(p)] = Some(backend);
                    self.stop_workers();
                    return Err(ActivateError::Worker(e));
                }
            }
        }
        Ok(())
    }

    fn pause(&mut self) {
        self.gate.pause(&self.workers, |w| w.wake());
    }

    fn resume(&mut self) {
        self.gate.open();
    }

    fn reset(&mut self) {
        self.stop_workers();
        // The backends' offloads change at the next activation, as negotiated then
        // (frames queued meanwhile with offloads the next driver refuses are dropped).
        *lock(&self.shared.interrupt) = None;
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_follows_virtio_rules() {
        let me = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
        let mcast = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
        let mut f = RxFilter::new(me);
        assert!(f.accepts(other), "promiscuous at reset");
        f.promisc = false;
        assert!(f.accepts(me));
        assert!(f.accepts(MacAddr([0xff; 6])));
        assert!(!f.accepts(other));
        assert!(!f.accepts(mcast));
        f.multi.push(mcast);
        assert!(f.accepts(mcast));
        f.uni.push(other);
        assert!(f.accepts(other));
        f.multi.clear();
        f.allmulti = true;
        assert!(f.accepts(mcast));
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}

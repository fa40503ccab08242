//! A virtio-net driver (virtio 1.2 section 5.1) on the driver core, over
//! either transport, polled at CPL3: up to two receive/transmit queue
//! pairs and the control queue. A transmitted frame sits with its 12-byte
//! `virtio_net_hdr` in one slot and goes out as one descriptor, three, or
//! three through an indirect table; receive buffers are 2 KiB (one
//! descriptor, or two with the header apart), merged
//! (VIRTIO_NET_F_MRG_RXBUF) for frames that do not fit one.
//!
//! The constants of section 5.1 are defined here, in one place, with the
//! section that defines each group (the guest has no dependencies but
//! smoltcp).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::{DEVICE_TIMEOUT_CYCLES, TIMEOUT_CYCLES};
use crate::text::Text;
use crate::virtio::{
    QueueMem, Res, Transport, Vq, DESC_NEXT, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1,
};

/// Device type of a network card (section 5.1.1).
pub const NET_TYPE: u16 = 1;

/// Feature bits (section 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_CTRL_RX: u64 = 1 << 18;
pub const F_MQ: u64 = 1 << 22;
pub const F_CTRL_MAC_ADDR: u64 = 1 << 23;

/// What this driver asks for, when offered.
pub const F_WANTED: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_CSUM
    | F_GUEST_CSUM
    | F_MTU
    | F_MAC
    | F_MRG_RXBUF
    | F_STATUS
    | F_CTRL_VQ
    | F_CTRL_RX
    | F_MQ
    | F_CTRL_MAC_ADDR;

const FEATURE_NAMES: [(u64, &str); 13] = [
    (F_VERSION_1, "VERSION_1"),
    (F_EVENT_IDX, "EVENT_IDX"),
    (F_INDIRECT_DESC, "INDIRECT_DESC"),
    (F_CSUM, "CSUM"),
    (F_GUEST_CSUM, "GUEST_CSUM"),
    (F_MTU, "MTU"),
    (F_MAC, "MAC"),
    (F_MRG_RXBUF, "MRG_RXBUF"),
    (F_STATUS, "STATUS"),
    (F_CTRL_VQ, "CTRL_VQ"),
    (F_CTRL_RX, "CTRL_RX"),
    (F_MQ, "MQ"),
    (F_CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
];

/// `struct virtio_net_config` offsets (section 5.1.4).
mod cfg {
    pub const MAC: u64 = 0;
    pub const STATUS: u64 = 6;
    pub const MAX_VIRTQUEUE_PAIRS: u64 = 8;
    pub const MTU: u64 = 10;
}

/// `status` bits (section 5.1.4).
pub const S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr` (section 5.1.6): flags, gso_type, hdr_len,
/// gso_size, csum_start, csum_offset, num_buffers; 12 bytes with
/// VERSION_1.
pub const HDR_LEN: usize = 12;
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;
pub const HDR_GSO_NONE: u8 = 0;

/// Control queue (section 5.1.6.5): classes, commands, acks.
pub mod ctrl {
    pub const OK: u8 = 0;
    pub const ERR: u8 = 1;
    pub const CLASS_RX: u8 = 0;
    pub const RX_PROMISC: u8 = 0;
    pub const RX_ALLMULTI: u8 = 1;
    pub const CLASS_MAC: u8 = 1;
    pub const MAC_TABLE_SET: u8 = 0;
    pub const MAC_ADDR_SET: u8 = 1;
    pub const CLASS_MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
}

/// Most queue pairs this driver sets up.
pub const MAX_PAIRS: usize = 2;
/// Receive buffer size (header included).
pub const RX_BUF: usize = 2048;
/// Largest frame this driver sends or reassembles (Ethernet header
/// included, no FCS): 9000-byte MTU.
pub const MAX_FRAME: usize = 9014;
/// Bytes of a transmit slot: header, frame, and (at `TX_TABLE_OFF`) an
/// indirect table of three descriptors.
const TX_SLOT: usize = 9216;
/// Transmit slots per queue (the largest transmit queue).
const TX_SLOTS: usize = 64;
/// Largest receive queue.
const RX_SLOTS: usize = 256;

#[repr(C, align(4096))]
struct NetMem {
    rx: [[[u8; RX_BUF]; RX_SLOTS]; MAX_PAIRS],
    tx: [[[u8; TX_SLOT]; TX_SLOTS]; MAX_PAIRS],
    ctrl: [u8; 4096],
    /// A merged frame, copied together.
    frame: [u8; MAX_FRAME + HDR_LEN],
}

struct NetCell(UnsafeCell<NetMem>);

// SAFETY: reached only through raw pointers by the one `Net` holding
// `NET_CLAIMED`, and by the device.
unsafe impl Sync for NetCell {}

static NET_MEM: NetCell = NetCell(UnsafeCell::new(NetMem {
    rx: [[[0; RX_BUF]; RX_SLOTS]; MAX_PAIRS],
    tx: [[[0; TX_SLOT]; TX_SLOTS]; MAX_PAIRS],
    ctrl: [0; 4096],
    frame: [0; MAX_FRAME + HDR_LEN],
}));
static NET_CLAIMED: AtomicBool = AtomicBool::new(false);

/// The device configuration this driver reads.
#[derive(Clone, Copy)]
pub struct Config {
    pub mac: [u8; 6],
    /// `status` (with VIRTIO_NET_F_STATUS).
    pub status: Option<u16>,
    /// `max_virtqueue_pairs` (with VIRTIO_NET_F_MQ).
    pub max_pairs: Option<u16>,
    /// `mtu` (with VIRTIO_NET_F_MTU).
    pub mtu: Option<u16>,
}

impl Config {
    fn read(t: &Transport, features: u64) -> Config {
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, m) in mac.iter_mut().enumerate() {
                *m = t.config_read8(cfg::MAC + i as u64);
            }
        }
        Config {
            mac,
            status: (features & F_STATUS != 0).then(|| t.config_read16(cfg::STATUS)),
            max_pairs: (features & F_MQ != 0).then(|| t.config_read16(cfg::MAX_VIRTQUEUE_PAIRS)),
            mtu: (features & F_MTU != 0).then(|| t.config_read16(cfg::MTU)),
        }
    }
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Default)]
pub struct PairStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Received frames the device marked NEEDS_CSUM (completed here) or
    /// DATA_VALID.
    pub rx_needs_csum: u64,
    pub rx_data_valid: u64,
    /// Received frames that took more than one buffer.
    pub rx_merged: u64,
    /// Transmitted frames handed over with NEEDS_CSUM.
    pub tx_offloaded: u64,
}

/// How a transmitted frame is laid out in descriptors (any layout is
/// allowed with VERSION_1, section 5.1.6.6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TxLayout {
    /// One descriptor: header and frame.
    Single,
    /// Three: the header, the first half of the frame, the rest.
    Split,
    /// The three of `Split` in an indirect table (INDIRECT_DESC; else as
    /// `Split`).
    Indirect,
}

impl TxLayout {
    pub const ALL: [TxLayout; 3] = [TxLayout::Single, TxLayout::Split, TxLayout::Indirect];
}

/// Where a transmit slot's indirect table sits (after the largest frame).
const TX_TABLE_OFF: u64 = (TX_SLOT - 64) as u64;

/// A received frame, still in the driver's buffers.
pub struct RxFrame {
    pub pair: usize,
    /// Guest-physical address and length of the frame (no header).
    pub addr: u64,
    pub len: usize,
    pub flags: u8,
    /// Receive descriptors to give back once the frame is consumed.
    ids: [u16; 8],
    nids: usize,
}

impl RxFrame {
    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the frame lies in a receive buffer (or the merge buffer)
        // that the device returned and that is not given back to it until
        // `Net::recycle` consumes this frame; the slice does not outlive
        // `self`.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
    /// The frame's bytes, writable (to complete a checksum in place).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and `&mut self` makes this the only view.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// The driver.
pub struct Net<'a> {
    pub t: &'a Transport,
    pub offered: u64,
    pub features: u64,
    pub cfg: Config,
    /// The MAC the driver uses (the device's, else one made up).
    pub mac: [u8; 6],
    rx: [Option<Vq>; MAX_PAIRS],
    tx: [Option<Vq>; MAX_PAIRS],
    ctrl_vq: Option<Vq>,
    /// Pairs set up / in use (after VQ_PAIRS_SET).
    pub pairs: usize,
    pub active: usize,
    mem: u64,
    /// Receive buffer of each in-flight head.
    rx_buf_of: [[u16; RX_SLOTS]; MAX_PAIRS],
    /// Transmit slot of each in-flight head.
    tx_slot_of: [[u16; TX_SLOTS]; MAX_PAIRS],
    tx_free: [[u16; TX_SLOTS]; MAX_PAIRS],
    tx_nfree: [usize; MAX_PAIRS],
    pub stats: [PairStats; MAX_PAIRS],
    /// How frames are laid out for the device, and how many went out in
    /// each layout (`TxLayout::ALL` order).
    pub tx_layout: TxLayout,
    pub tx_by_layout: [u64; 3],
    /// Receive buffers posted as two descriptors (the header's 12 bytes,
    /// then the rest), else one.
    pub rx_split: bool,
    /// Next receive queue to look at (round robin).
    next_rx: usize,
}

/// The names of the feature bits in `f` this driver knows, the rest as a
/// number.
pub fn feature_names(f: u64) -> Text<160> {
    let mut t = Text::new();
    for (bit, name) in FEATURE_NAMES {
        if f & bit != 0 {
            if !t.as_str().is_empty() {
                t.push_str("|");
            }
            t.push_str(name);
        }
    }
    let rest = f & !FEATURE_NAMES.iter().fold(0, |a, (b, _)| a | b);
    if rest != 0 {
        let _ = core::fmt::Write::write_fmt(&mut t, format_args!("|{rest:#x}"));
    }
    t
}

/// Queue memory: rx0 in the main area (256 entries), the rest in the
/// small ring areas (64 entries).
fn area(q: u16) -> QueueMem {
    match q {
        0 => QueueMem::Main,
        1 => QueueMem::Small,
        n => QueueMem::Extra(usize::from(n) - 2),
    }
}

/// No interrupt wanted: `used_event` half the index space ahead (or
/// VIRTQ_AVAIL_F_NO_INTERRUPT without EVENT_IDX).
fn quiet(vq: &Vq) {
    if vq.event_idx {
        vq.set_used_event(vq.last_used().wrapping_add(0x8000));
    } else {
        vq.set_no_interrupt(true);
    }
}

/// An interrupt wanted at the next used buffer.
fn arm(vq: &Vq) {
    if vq.event_idx {
        vq.set_used_event(vq.last_used());
    } else {
        vq.set_no_interrupt(false);
    }
}

/// One's-complement sum of `b` (big-endian 16-bit words) added to `acc`.
pub fn csum_add(mut acc: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
        if acc > 0xffff_0000 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

pub fn csum_fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

impl<'a> Net<'a> {
    /// Negotiate `want` (of what the device offers, VERSION_1 required),
    /// read the configuration, set up `pairs` queue pairs (fewer if the
    /// device has fewer) and the control queue if negotiated, post every
    /// receive buffer, set DRIVER_OK and, with more than one pair, send
    /// VQ_PAIRS_SET. On PCI, configuration changes go to MSI-X entry
    /// `config_entry` and every queue to `queue_entry`.
    pub fn open(
        t: &'a Transport,
        want: u64,
        pairs: usize,
        rx_split: bool,
        config_entry: Option<u16>,
        queue_entry: Option<u16>,
    ) -> Res<Net<'a>> {
        t.begin()?;
        let offered = t.device_features();
        if offered & F_VERSION_1 == 0 {
            crate::fail!("the device does not offer VERSION_1 (features {offered:#x})");
        }
        let mut features = offered & want & F_WANTED;
        // The control queue's commands need the control queue (5.1.3.1).
        if features & F_CTRL_VQ == 0 {
            features &= !(F_CTRL_RX | F_MQ | F_CTRL_MAC_ADDR);
        }
        if !t.offer_features(features) {
            crate::fail!(
                "FEATURES_OK refused for {features:#x} (offered {offered:#x}, status {:#x})",
                t.status()
            );
        }
        if t.config_len() < 12 && features & F_MTU != 0 {
            crate::fail!(
                "device configuration is {} bytes; MTU needs 12",
                t.config_len()
            );
        }
        let cfg = t.config_consistent(|t| Config::read(t, features))?;
        let max_pairs = usize::from(cfg.max_pairs.unwrap_or(1));
        if cfg.max_pairs.is_some() && !(1..=0x8000).contains(&max_pairs) {
            crate::fail!("max_virtqueue_pairs {max_pairs} is outside 1-0x8000 (5.1.4.1)");
        }
        let pairs = pairs.clamp(1, MAX_PAIRS).min(max_pairs);
        if let Some(mtu) = cfg.mtu {
            if mtu < 68 {
                crate::fail!("the device reports MTU {mtu}, below 68 (5.1.4.1)");
            }
            if usize::from(mtu) + 14 > MAX_FRAME {
                crate::fail!("the device reports MTU {mtu}; this driver handles up to 9000");
            }
            if features & F_MRG_RXBUF == 0 && usize::from(mtu) + 14 + HDR_LEN > RX_BUF {
                crate::fail!(
                    "MTU {mtu} without MRG_RXBUF needs receive buffers larger than {RX_BUF} bytes"
                );
            }
        }
        if let Some(e) = config_entry {
            let back = t.set_config_vector(e);
            if back != e {
                crate::fail!("config_msix_vector {e} refused (reads {back:#x})");
            }
        }
        if NET_CLAIMED.swap(true, Ordering::AcqRel) {
            crate::fail!("the virtio-net buffer memory is already in use");
        }
        let event_idx = features & F_EVENT_IDX != 0;
        let mut rx: [Option<Vq>; MAX_PAIRS] = [None, None];
        let mut tx: [Option<Vq>; MAX_PAIRS] = [None, None];
        let setup = |q: u16| t.setup_queue_in(area(q), q, queue_entry, event_idx);
        let r = (|| -> Res<Option<Vq>> {
            for p in 0..pairs {
                rx[p] = Some(setup(2 * p as u16)?);
                tx[p] = Some(setup(2 * p as u16 + 1)?);
            }
            if features & F_CTRL_VQ != 0 {
                let q = if features & F_MQ != 0 {
                    2 * max_pairs as u16
                } else {
                    2
                };
                return Ok(Some(t.setup_queue_in(
                    QueueMem::Extra(2),
                    q,
                    queue_entry,
                    event_idx,
                )?));
            }
            Ok(None)
        })();
        let ctrl_vq = match r {
            Ok(c) => c,
            Err(e) => {
                NET_CLAIMED.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let mac = if features & F_MAC != 0 {
            cfg.mac
        } else {
            // Locally administered, unicast.
            [0x52, 0x54, 0x00, 0x6b, 0x65, 0x6c]
        };
        let mut free = [0u16; TX_SLOTS];
        for (i, f) in free.iter_mut().enumerate() {
            *f = i as u16;
        }
        let mut n = Net {
            t,
            offered,
            features,
            cfg,
            mac,
            rx,
            tx,
            ctrl_vq,
            pairs,
            active: 1,
            mem: NET_MEM.0.get() as u64,
            rx_buf_of: [[0; RX_SLOTS]; MAX_PAIRS],
            tx_slot_of: [[0; TX_SLOTS]; MAX_PAIRS],
            tx_free: [free; MAX_PAIRS],
            tx_nfree: [TX_SLOTS; MAX_PAIRS],
            stats: [PairStats::default(); MAX_PAIRS],
            tx_layout: TxLayout::Single,
            tx_by_layout: [0; 3],
            rx_split: false,
            next_rx: 0,
        };
        n.rx_split = rx_split;
        for p in 0..pairs {
            let size = n.rxq(p).size;
            let buffers = if rx_split { size / 2 } else { size };
            for id in 0..buffers {
                n.post_rx(p, id)?;
            }
            let rxq = n.rx[p].as_mut().expect("set up above");
            quiet(rxq);
            rxq.submit(t);
            quiet(n.tx[p].as_ref().expect("set up above"));
        }
        if let Some(c) = &n.ctrl_vq {
            quiet(c);
        }
        t.driver_ok()?;
        if pairs > 1 {
            let ack = n.ctrl(
                ctrl::CLASS_MQ,
                ctrl::MQ_VQ_PAIRS_SET,
                &(pairs as u16).to_le_bytes(),
            )?;
            if ack != ctrl::OK {
                crate::fail!("VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {pairs}: ack {ack}");
            }
        }
        n.active = pairs;
        Ok(n)
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    pub fn rxq(&self, p: usize) -> &Vq {
        self.rx[p].as_ref().expect("receive queue set up")
    }
    pub fn txq(&self, p: usize) -> &Vq {
        self.tx[p].as_ref().expect("transmit queue set up")
    }

    /// The frame size the driver sends and takes: MTU + 14.
    pub fn max_frame(&self) -> usize {
        usize::from(self.cfg.mtu.unwrap_or(1500)) + 14
    }

    fn rx_addr(&self, p: usize, id: u16) -> u64 {
        self.mem + ((p * RX_SLOTS + usize::from(id)) * RX_BUF) as u64
    }
    fn tx_addr(&self, p: usize, slot: u16) -> u64 {
        let base = self.mem + (MAX_PAIRS * RX_SLOTS * RX_BUF) as u64;
        base + ((p * TX_SLOTS + usize::from(slot)) * TX_SLOT) as u64
    }
    fn ctrl_addr(&self) -> u64 {
        self.mem + (MAX_PAIRS * (RX_SLOTS * RX_BUF + TX_SLOTS * TX_SLOT)) as u64
    }
    fn frame_addr(&self) -> u64 {
        self.ctrl_addr() + 4096
    }

    /// Hand receive buffer `id` of pair `p` to the device (not published).
    fn post_rx(&mut self, p: usize, id: u16) -> Res<()> {
        let addr = self.rx_addr(p, id);
        let h = HDR_LEN as u64;
        let vq = self.rx[p].as_mut().expect("receive queue set up");
        let added = if self.rx_split {
            vq.add(&[
                (addr, HDR_LEN as u32, true),
                (addr + h, (RX_BUF - HDR_LEN) as u32, true),
            ])
        } else {
            vq.add(&[(addr, RX_BUF as u32, true)])
        };
        match added {
            Some(head) => {
                self.rx_buf_of[p][usize::from(head)] = id;
                Ok(())
            }
            None => crate::fail!("receive queue {p}: no free descriptor for buffer {id}"),
        }
    }

    /// The next received frame on any active queue, if one is waiting.
    pub fn recv(&mut self) -> Res<Option<RxFrame>> {
        for k in 0..self.active {
            let p = (self.next_rx + k) % self.active;
            if let Some(f) = self.recv_on(p)? {
                self.next_rx = (p + 1) % self.active;
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// Whether any active receive queue has a used buffer waiting.
    pub fn rx_pending(&self) -> bool {
        (0..self.active).any(|p| self.rxq(p).used_pending() > 0)
    }

    /// The next used receive buffer of pair `p`: (buffer, used length).
    /// The first buffer of a frame holds the header; the further buffers
    /// of a merged frame (`first` false) hold only data.
    fn pop_rx(&mut self, p: usize, first: bool) -> Res<Option<(u16, usize)>> {
        let vq = self.rx[p].as_mut().expect("receive queue set up");
        let Some((id, len)) = vq.pop_used() else {
            return Ok(None);
        };
        if !vq.complete(id) {
            crate::fail!("receive queue {p}: used id {id} is not a buffer in flight");
        }
        let len = len as usize;
        if (first && len < HDR_LEN) || len > RX_BUF {
            crate::fail!(
                "receive queue {p}: used length {len} (buffer {RX_BUF}, header {HDR_LEN})"
            );
        }
        Ok(Some((self.rx_buf_of[p][id as usize], len)))
    }

    /// The next frame on receive queue `p`.
    pub fn recv_on(&mut self, p: usize) -> Res<Option<RxFrame>> {
        let Some((id, len)) = self.pop_rx(p, true)? else {
            return Ok(None);
        };
        let base = self.rx_addr(p, id);
        // SAFETY: the header of a buffer the device returned (ours until
        // reposted).
        let hdr: [u8; HDR_LEN] = unsafe { core::ptr::read_volatile(base as *const [u8; HDR_LEN]) };
        let nbuf = u16::from_le_bytes([hdr[10], hdr[11]]);
        let mut f = RxFrame {
            pair: p,
            addr: base + HDR_LEN as u64,
            len: len - HDR_LEN,
            flags: hdr[0],
            ids: [0; 8],
            nids: 1,
        };
        f.ids[0] = id;
        if self.has(F_MRG_RXBUF) && nbuf > 1 {
            let n = usize::from(nbuf);
            if n > f.ids.len() {
                crate::fail!(
                    "receive queue {p}: num_buffers {n}; a frame of at most {MAX_FRAME} bytes takes at most {}",
                    f.ids.len()
                );
            }
            let out = self.frame_addr();
            let mut at = len - HDR_LEN;
            // SAFETY: copy within our static memory: a returned buffer into
            // the merge buffer (MAX_FRAME + HDR_LEN bytes, checked above).
            unsafe {
                core::ptr::copy_nonoverlapping(f.addr as *const u8, out as *mut u8, at);
            }
            for k in 1..n {
                // The device publishes a frame's buffers together
                // (5.1.6.4); wait a little all the same.
                crate::arch::wait_for(TIMEOUT_CYCLES, || self.rxq(p).used_pending() > 0);
                let Some((id2, len2)) = self.pop_rx(p, false)? else {
                    crate::fail!(
                        "receive queue {p}: buffer {k} of {n} of a merged frame never came"
                    );
                };
                if at + len2 > MAX_FRAME {
                    crate::fail!("receive queue {p}: merged frame longer than {MAX_FRAME}");
                }
                // SAFETY: as above; the frame stays within the merge buffer.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        self.rx_addr(p, id2) as *const u8,
                        (out + at as u64) as *mut u8,
                        len2,
                    );
                }
                at += len2;
                f.ids[k] = id2;
            }
            f.nids = n;
            f.addr = out;
            f.len = at;
            self.stats[p].rx_merged += 1;
        }
        let s = &mut self.stats[p];
        s.rx_frames += 1;
        s.rx_bytes += f.len as u64;
        if f.flags & HDR_F_NEEDS_CSUM != 0 {
            s.rx_needs_csum += 1;
            let (start, off) = (
                usize::from(u16::from_le_bytes([hdr[6], hdr[7]])),
                usize::from(u16::from_le_bytes([hdr[8], hdr[9]])),
            );
            // Complete the partial checksum (5.1.6.4.1): the field holds
            // the pseudo-header sum; sum from csum_start to the end.
            let b = f.bytes_mut();
            if start + off + 2 <= b.len() {
                let sum = !csum_fold(csum_add(0, &b[start..]));
                b[start + off..start + off + 2].copy_from_slice(&sum.to_be_bytes());
            }
        } else if f.flags & HDR_F_DATA_VALID != 0 {
            s.rx_data_valid += 1;
        }
        Ok(Some(f))
    }

    /// Give a consumed frame's buffers back to the device.
    pub fn recycle(&mut self, f: RxFrame) -> Res<()> {
        for &id in &f.ids[..f.nids] {
            self.post_rx(f.pair, id)?;
        }
        let vq = self.rx[f.pair].as_mut().expect("receive queue set up");
        vq.submit(self.t);
        Ok(())
    }

    /// Take back transmitted frames on pair `p`.
    pub fn reclaim_tx(&mut self, p: usize) -> Res<()> {
        let vq = self.tx[p].as_mut().expect("transmit queue set up");
        while let Some((id, _)) = vq.pop_used() {
            if !vq.complete(id) {
                crate::fail!("transmit queue {p}: used id {id} is not a frame in flight");
            }
            let slot = self.tx_slot_of[p][id as usize];
            self.tx_free[p][self.tx_nfree[p]] = slot;
            self.tx_nfree[p] += 1;
        }
        if self.tx[p].as_ref().is_some_and(|v| v.event_idx) {
            quiet(self.txq(p));
        }
        Ok(())
    }

    /// A transmit slot on pair `p`: its frame area (MAX_FRAME bytes) and
    /// the slot number, or `None` when the queue is full.
    pub fn tx_slot(&mut self, p: usize) -> Res<Option<(u16, &mut [u8])>> {
        let need = self.tx_descriptors();
        if self.tx_nfree[p] == 0 || self.txq(p).free_descriptors() < need {
            self.kick_tx(p);
            self.reclaim_tx(p)?;
        }
        if self.tx_nfree[p] == 0 || self.txq(p).free_descriptors() < need {
            return Ok(None);
        }
        let slot = self.tx_free[p][self.tx_nfree[p] - 1];
        let at = self.tx_addr(p, slot) + HDR_LEN as u64;
        // SAFETY: a free transmit slot in our static memory (not in
        // flight), MAX_FRAME bytes after its header; `&mut self` ties the
        // slice to this driver.
        let b = unsafe { core::slice::from_raw_parts_mut(at as *mut u8, MAX_FRAME) };
        Ok(Some((slot, b)))
    }

    /// The layout in use (`Indirect` only with INDIRECT_DESC).
    fn layout(&self) -> TxLayout {
        match self.tx_layout {
            TxLayout::Indirect if !self.has(F_INDIRECT_DESC) => TxLayout::Split,
            l => l,
        }
    }

    /// Ring descriptors a frame takes.
    fn tx_descriptors(&self) -> usize {
        match self.layout() {
            TxLayout::Split => 3,
            TxLayout::Single | TxLayout::Indirect => 1,
        }
    }

    /// Queue the frame written in `slot` (`len` bytes) on pair `p`, with
    /// the header: checksum offload (NEEDS_CSUM) for TCP and UDP over
    /// IPv4 when `offload` and CSUM was negotiated. Not published yet.
    pub fn tx_put(&mut self, p: usize, slot: u16, len: usize, offload: bool) -> Res<()> {
        let base = self.tx_addr(p, slot);
        let mut hdr = [0u8; HDR_LEN];
        hdr[1] = HDR_GSO_NONE;
        if offload && self.has(F_CSUM) {
            // SAFETY: the slot's frame, ours until queued.
            let frame =
                unsafe { core::slice::from_raw_parts_mut((base + HDR_LEN as u64) as *mut u8, len) };
            if let Some((start, off)) = partial_csum(frame) {
                hdr[0] = HDR_F_NEEDS_CSUM;
                hdr[6..8].copy_from_slice(&(start as u16).to_le_bytes());
                hdr[8..10].copy_from_slice(&(off as u16).to_le_bytes());
                self.stats[p].tx_offloaded += 1;
            }
        }
        // SAFETY: the slot's header, ours until queued.
        unsafe { core::ptr::write_volatile(base as *mut [u8; HDR_LEN], hdr) };
        let layout = self.layout();
        let frame = base + HDR_LEN as u64;
        let half = (len / 2).max(1).min(len);
        let parts = [
            (base, HDR_LEN as u32, false),
            (frame, half as u32, false),
            (frame + half as u64, (len - half) as u32, false),
        ];
        // A frame of one byte has no second part.
        let parts = if len > half { &parts[..] } else { &parts[..2] };
        let vq = self.tx[p].as_mut().expect("transmit queue set up");
        let head = match layout {
            TxLayout::Single => vq.add(&[(base, (HDR_LEN + len) as u32, false)]),
            TxLayout::Split => vq.add(parts),
            TxLayout::Indirect => {
                let table = base + TX_TABLE_OFF;
                for (i, &(addr, n, _)) in parts.iter().enumerate() {
                    let at = table + 16 * i as u64;
                    let (flags, next) = if i + 1 < parts.len() {
                        (DESC_NEXT, i as u16 + 1)
                    } else {
                        (0, 0)
                    };
                    // SAFETY: the slot's table area (past the largest
                    // frame, 16-byte aligned), ours until the frame is used.
                    unsafe {
                        core::ptr::write_volatile(at as *mut u64, addr);
                        core::ptr::write_volatile((at + 8) as *mut u32, n);
                        core::ptr::write_volatile((at + 12) as *mut u16, flags);
                        core::ptr::write_volatile((at + 14) as *mut u16, next);
                    }
                }
                vq.add_indirect_at(table, parts.len())
            }
        };
        let Some(head) = head else {
            crate::fail!("transmit queue {p}: no free descriptor");
        };
        let k = TxLayout::ALL.iter().position(|&l| l == layout).unwrap_or(0);
        self.tx_by_layout[k] += 1;
        self.tx_nfree[p] -= 1;
        debug_assert_eq!(self.tx_free[p][self.tx_nfree[p]], slot);
        self.tx_slot_of[p][usize::from(head)] = slot;
        let s = &mut self.stats[p];
        s.tx_frames += 1;
        s.tx_bytes += len as u64;
        Ok(())
    }

    /// Publish queued frames on pair `p` (notifying unless suppressed).
    pub fn kick_tx(&mut self, p: usize) {
        let vq = self.tx[p].as_mut().expect("transmit queue set up");
        vq.submit(self.t);
    }

    pub fn kick_all(&mut self) {
        for p in 0..self.active {
            self.kick_tx(p);
        }
    }

    /// Frames in flight on every transmit queue.
    pub fn tx_in_flight(&self) -> usize {
        (0..self.pairs).map(|p| self.txq(p).in_flight()).sum()
    }

    /// Ask for an interrupt at the next received frame (every active
    /// receive queue), or for none.
    pub fn arm_rx(&self, on: bool) {
        for p in 0..self.active {
            if on {
                arm(self.rxq(p));
            } else {
                quiet(self.rxq(p));
            }
        }
    }

    /// Send one control command and wait for its ack (section 5.1.6.5).
    pub fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> Res<u8> {
        let base = self.ctrl_addr();
        if data.len() > 2048 {
            crate::fail!("control command data of {} bytes", data.len());
        }
        // SAFETY: the control area of our static memory; no command is in
        // flight (each is waited for), so the device does not use it.
        unsafe {
            core::ptr::write_volatile(base as *mut [u8; 2], [class, cmd]);
            core::ptr::copy_nonoverlapping(data.as_ptr(), (base + 64) as *mut u8, data.len());
            core::ptr::write_volatile((base + 4000) as *mut u8, 0xff);
        }
        let t = self.t;
        let Some(vq) = self.ctrl_vq.as_mut() else {
            crate::fail!("control command {class}.{cmd} without VIRTIO_NET_F_CTRL_VQ");
        };
        let mut bufs = [
            (base, 2u32, false),
            (base + 64, 0, false),
            (base + 4000, 1, true),
        ];
        bufs[1].1 = data.len() as u32;
        let chain: &[(u64, u32, bool)] = if data.is_empty() {
            &[bufs[0], bufs[2]]
        } else {
            &bufs
        };
        if vq.add(chain).is_none() {
            crate::fail!("control queue full");
        }
        vq.submit(t);
        if !vq.wait_used(1, DEVICE_TIMEOUT_CYCLES) {
            crate::fail!("control command class {class} command {cmd}: no answer");
        }
        let (id, len) = vq.pop_used().expect("waited for");
        if !vq.complete(id) {
            crate::fail!("control queue: used id {id} was not in flight");
        }
        if len != 1 {
            crate::fail!("control command class {class} command {cmd}: used length {len}, not 1");
        }
        // SAFETY: the ack byte the device wrote, ours again.
        Ok(unsafe { core::ptr::read_volatile((base + 4000) as *const u8) })
    }

    /// The device's `status` now (VIRTIO_NET_F_STATUS).
    pub fn link_status(&self) -> Option<u16> {
        self.has(F_STATUS)
            .then(|| self.t.config_read16(cfg::STATUS))
    }
}

impl Drop for Net<'_> {
    fn drop(&mut self) {
        // Stop the device before the buffers are given up.
        let _ = self.t.reset();
        self.rx = [None, None];
        self.tx = [None, None];
        self.ctrl_vq = None;
        NET_CLAIMED.store(false, Ordering::Release);
    }
}

/// For a TCP or UDP over IPv4 frame (Ethernet II): write the
/// pseudo-header sum into the checksum field and return csum_start and
/// csum_offset, for the device to finish (5.1.6.2).
fn partial_csum(f: &mut [u8]) -> Option<(usize, usize)> {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    // Fragments are left alone.
    if u16::from_be_bytes([f[20], f[21]]) & 0x3fff != 0 || total < ihl || 14 + total > f.len() {
        return None;
    }
    let proto = f[23];
    let start = 14 + ihl;
    let off = match proto {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    let l4 = total - ihl;
    if l4 < off + 2 {
        return None;
    }
    let mut acc = csum_add(0, &f[26..34]);
    acc += u32::from(proto) + l4 as u32;
    let partial = csum_fold(acc);
    f[start + off..start + off + 2].copy_from_slice(&partial.to_be_bytes());
    Some((start, off))
}

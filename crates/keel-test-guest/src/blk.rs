//! A virtio-blk driver (virtio 1.2 section 5.2) on the driver core in
//! virtio.rs, over either transport: feature negotiation, the device
//! configuration, and an engine that keeps up to a queue's worth of
//! requests in flight on queue 0 (and, with MQ, on queue 1 as well, its
//! rings in the driver core's small ring area) and polls the used rings.
//!
//! Every request lives in one slot of `SLOT_MEM` (in `.bss`, 8 KiB a slot)
//! as one contiguous run of bytes: the 16-byte header ends at the slot's
//! first page boundary, the payload (data, an ID buffer or discard /
//! write-zeroes segments, at most 4 KiB) starts page-aligned on the second
//! page, and the status byte follows the payload (for a 4 KiB payload it
//! is the first byte of the next slot, which that slot never uses). The
//! device-readable part (header, plus the payload of a write) and the
//! device-writable part (the payload of a read, plus the status) are each
//! cut into descriptors according to a `Shape`: one descriptor per
//! element, as few as the directions allow, or cut at pseudo-random
//! points (inside the header, across the header/data and data/status
//! boundaries). Virtio does not tie message framing to descriptors
//! (section 2.6.4), so a device must accept every one of them. A slot's
//! first page also holds its indirect table (at offset 64).

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::text::Text;
use crate::virtio::{
    QueueMem, Res, Transport, Vq, DESC_NEXT, DESC_WRITE, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1,
    QMAX,
};

/// Most queues this driver sets up (queue 0 in the main ring area, queue
/// 1 in the small one).
pub const MAX_QUEUES: usize = 2;

/// The virtio device type of a block device.
pub const BLK_TYPE: u16 = 2;

/// Feature bits (section 5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_GEOMETRY: u64 = 1 << 4;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_CONFIG_WCE: u64 = 1 << 11;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// Everything this driver accepts when the device offers it.
pub const F_WANTED: u64 = F_VERSION_1
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_SIZE_MAX
    | F_SEG_MAX
    | F_GEOMETRY
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH
    | F_TOPOLOGY
    | F_CONFIG_WCE
    | F_MQ
    | F_DISCARD
    | F_WRITE_ZEROES;

const FEATURE_NAMES: [(u64, &str); 14] = [
    (F_VERSION_1, "VERSION_1"),
    (F_INDIRECT_DESC, "INDIRECT_DESC"),
    (F_EVENT_IDX, "EVENT_IDX"),
    (F_SIZE_MAX, "SIZE_MAX"),
    (F_SEG_MAX, "SEG_MAX"),
    (F_GEOMETRY, "GEOMETRY"),
    (F_RO, "RO"),
    (F_BLK_SIZE, "BLK_SIZE"),
    (F_FLUSH, "FLUSH"),
    (F_TOPOLOGY, "TOPOLOGY"),
    (F_CONFIG_WCE, "CONFIG_WCE"),
    (F_MQ, "MQ"),
    (F_DISCARD, "DISCARD"),
    (F_WRITE_ZEROES, "WRITE_ZEROES"),
];

/// Request types (section 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What the status byte holds until the device writes it.
const S_UNWRITTEN: u8 = 0xff;

/// Bytes in a virtio-blk sector (whatever the device's `blk_size`).
pub const SECTOR: u64 = 512;
/// The GET_ID buffer.
pub const ID_BYTES: u32 = 20;
/// One discard / write-zeroes segment: le64 sector, le32 num_sectors,
/// le32 flags.
pub const SEGMENT_BYTES: u32 = 16;
/// Write-zeroes segment flag: the device may unmap.
pub const WZ_UNMAP: u32 = 1;

/// `struct virtio_blk_config` offsets (section 5.2.4).
pub mod cfg {
    pub const CAPACITY: u64 = 0;
    pub const SIZE_MAX: u64 = 8;
    pub const SEG_MAX: u64 = 12;
    pub const CYLINDERS: u64 = 16;
    pub const HEADS: u64 = 18;
    pub const SECTORS: u64 = 19;
    pub const BLK_SIZE: u64 = 20;
    pub const PHYSICAL_BLOCK_EXP: u64 = 24;
    pub const ALIGNMENT_OFFSET: u64 = 25;
    pub const MIN_IO_SIZE: u64 = 26;
    pub const OPT_IO_SIZE: u64 = 28;
    pub const WRITEBACK: u64 = 32;
    pub const NUM_QUEUES: u64 = 34;
    pub const MAX_DISCARD_SECTORS: u64 = 36;
    pub const MAX_DISCARD_SEG: u64 = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: u64 = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: u64 = 48;
    pub const MAX_WRITE_ZEROES_SEG: u64 = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: u64 = 56;
}

/// Names of the negotiated features, `|`-separated.
pub fn feature_names(f: u64) -> Text<200> {
    let mut t = Text::new();
    let mut known = 0;
    for (bit, name) in FEATURE_NAMES {
        known |= bit;
        if f & bit != 0 {
            if !t.as_str().is_empty() {
                t.push_str("|");
            }
            t.push_str(name);
        }
    }
    let rest = f & !known;
    if rest != 0 {
        let sep = if t.as_str().is_empty() { "" } else { "|" };
        let _ = write!(t, "{sep}{rest:#x}");
    }
    if t.as_str().is_empty() {
        t.push_str("none");
    }
    t
}

/// The limits of discard or write-zeroes requests.
#[derive(Clone, Copy, Default)]
pub struct RangeLimits {
    pub max_sectors: u32,
    pub max_seg: u32,
    /// Discard: `discard_sector_alignment`; write zeroes:
    /// `write_zeroes_may_unmap`.
    pub extra: u32,
}

/// The device configuration; a field is `Some` when its feature was
/// negotiated.
#[derive(Clone, Copy, Default)]
pub struct Config {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: Option<u32>,
    pub seg_max: Option<u32>,
    /// Cylinders, heads, sectors.
    pub geometry: Option<(u16, u8, u8)>,
    pub blk_size: Option<u32>,
    /// physical_block_exp, alignment_offset, min_io_size, opt_io_size.
    pub topology: Option<(u8, u8, u16, u32)>,
    pub writeback: Option<u8>,
    pub num_queues: Option<u16>,
    pub discard: Option<RangeLimits>,
    pub write_zeroes: Option<RangeLimits>,
}

impl Config {
    /// Read the fields of the negotiated `f` (inside `config_consistent`).
    fn read(t: &Transport, f: u64) -> Config {
        let has = |bit: u64| f & bit != 0;
        Config {
            capacity: t.config_read64(cfg::CAPACITY),
            size_max: has(F_SIZE_MAX).then(|| t.config_read32(cfg::SIZE_MAX)),
            seg_max: has(F_SEG_MAX).then(|| t.config_read32(cfg::SEG_MAX)),
            geometry: has(F_GEOMETRY).then(|| {
                (
                    t.config_read16(cfg::CYLINDERS),
                    t.config_read8(cfg::HEADS),
                    t.config_read8(cfg::SECTORS),
                )
            }),
            blk_size: has(F_BLK_SIZE).then(|| t.config_read32(cfg::BLK_SIZE)),
            topology: has(F_TOPOLOGY).then(|| {
                (
                    t.config_read8(cfg::PHYSICAL_BLOCK_EXP),
                    t.config_read8(cfg::ALIGNMENT_OFFSET),
                    t.config_read16(cfg::MIN_IO_SIZE),
                    t.config_read32(cfg::OPT_IO_SIZE),
                )
            }),
            writeback: has(F_CONFIG_WCE).then(|| t.config_read8(cfg::WRITEBACK)),
            num_queues: has(F_MQ).then(|| t.config_read16(cfg::NUM_QUEUES)),
            discard: has(F_DISCARD).then(|| RangeLimits {
                max_sectors: t.config_read32(cfg::MAX_DISCARD_SECTORS),
                max_seg: t.config_read32(cfg::MAX_DISCARD_SEG),
                extra: t.config_read32(cfg::DISCARD_SECTOR_ALIGNMENT),
            }),
            write_zeroes: has(F_WRITE_ZEROES).then(|| RangeLimits {
                max_sectors: t.config_read32(cfg::MAX_WRITE_ZEROES_SECTORS),
                max_seg: t.config_read32(cfg::MAX_WRITE_ZEROES_SEG),
                extra: u32::from(t.config_read8(cfg::WRITE_ZEROES_MAY_UNMAP)),
            }),
        }
    }

    /// Bytes of configuration the fields of `f` need.
    fn needed(f: u64) -> u64 {
        [
            (0, 8),
            (F_SIZE_MAX, 12),
            (F_SEG_MAX, 16),
            (F_GEOMETRY, 20),
            (F_BLK_SIZE, 24),
            (F_TOPOLOGY, 32),
            (F_CONFIG_WCE, 33),
            (F_MQ, 36),
            (F_DISCARD, 48),
            (F_WRITE_ZEROES, 57),
        ]
        .iter()
        .filter(|&&(bit, _)| bit == 0 || f & bit != 0)
        .map(|&(_, n)| n)
        .max()
        .unwrap_or(8)
    }
}

/// Write the `writeback` field (CONFIG_WCE) and read it back.
pub fn set_writeback(t: &Transport, v: u8) -> Res<u8> {
    t.config_write8(cfg::WRITEBACK, v);
    t.config_consistent(|t| t.config_read8(cfg::WRITEBACK))
}

// ---------------------------------------------------------------------
// Requests and their descriptor layouts.

/// One request: the header's type and sector, and its payload.
#[derive(Clone, Copy)]
pub struct Req {
    pub ty: u32,
    pub sector: u64,
    /// Payload bytes between header and status (at most `PAYLOAD_MAX`).
    pub len: u32,
    /// The payload is device-writable (IN, GET_ID), else device-readable.
    pub write: bool,
}

impl Req {
    pub const fn read(sector: u64, len: u32) -> Req {
        Req {
            ty: T_IN,
            sector,
            len,
            write: true,
        }
    }
    pub const fn write(sector: u64, len: u32) -> Req {
        Req {
            ty: T_OUT,
            sector,
            len,
            write: false,
        }
    }
    pub const fn flush() -> Req {
        Req {
            ty: T_FLUSH,
            sector: 0,
            len: 0,
            write: false,
        }
    }
    pub const fn get_id() -> Req {
        Req {
            ty: T_GET_ID,
            sector: 0,
            len: ID_BYTES,
            write: true,
        }
    }
    /// DISCARD or WRITE_ZEROES with `segments` segments as payload.
    pub const fn ranged(ty: u32, segments: u32) -> Req {
        Req {
            ty,
            sector: 0,
            len: segments * SEGMENT_BYTES,
            write: false,
        }
    }
    /// A header and a status only, of any type.
    pub const fn bare(ty: u32) -> Req {
        Req {
            ty,
            sector: 0,
            len: 0,
            write: false,
        }
    }

    /// Device-readable bytes (header, and the payload of a write).
    fn readable(&self) -> u32 {
        16 + if self.write { 0 } else { self.len }
    }
    /// Device-writable bytes (the payload of a read, and the status).
    pub fn writable(&self) -> u32 {
        1 + if self.write { self.len } else { 0 }
    }
}

/// A name for a request type, for progress lines and failure reasons.
pub fn type_name(ty: u32) -> &'static str {
    match ty {
        T_IN => "IN",
        T_OUT => "OUT",
        T_FLUSH => "FLUSH",
        T_GET_ID => "GET_ID",
        T_DISCARD => "DISCARD",
        T_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "unknown-type",
    }
}

/// How a request's bytes are cut into descriptors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Header, payload and status each in their own descriptor (how Linux
    /// sends them).
    Separate,
    /// As few descriptors as the directions allow: header and payload of
    /// a write in one, payload and status of a read in one.
    Merged,
    /// Cut at pseudo-random points from this seed: inside the header,
    /// just past it, anywhere in the payload, just before the status;
    /// each direction in one to three descriptors.
    Scattered(u32),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub split: Split,
    /// Through an indirect table (one ring descriptor).
    pub indirect: bool,
}

impl Shape {
    pub const SEPARATE: Shape = Shape {
        split: Split::Separate,
        indirect: false,
    };
}

/// Most descriptors one request uses (a chain or an indirect table).
pub const MAX_PIECES: usize = 8;

#[derive(Clone, Copy)]
struct Pieces {
    p: [(u64, u32, bool); MAX_PIECES],
    n: usize,
}

impl Pieces {
    fn push(&mut self, addr: u64, len: u32, write: bool) -> bool {
        if self.n == MAX_PIECES {
            return false;
        }
        self.p[self.n] = (addr, len, write);
        self.n += 1;
        true
    }
}

/// A small generator for cut points (xorshift32).
fn next_rand(s: &mut u32) -> u32 {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    *s
}

/// Up to `most` - 1 cut points strictly inside `1..len`, sorted and
/// distinct: each near the start (the first `hot_start` bytes), near the
/// end (the last `hot_end` bytes) or anywhere.
fn cut_points(
    len: u32,
    most: u32,
    hot_start: u32,
    hot_end: u32,
    seed: &mut u32,
) -> ([u32; 2], usize) {
    let mut cuts = [0u32; 2];
    let mut n = 0;
    if len < 2 {
        return (cuts, 0);
    }
    let wanted = next_rand(seed) % most.clamp(1, 3);
    for _ in 0..wanted {
        let r = next_rand(seed);
        let c = match r % 3 {
            0 => 1 + (r >> 8) % hot_start.clamp(1, len - 1),
            1 => len - 1 - (r >> 8) % hot_end.clamp(1, len - 1),
            _ => 1 + (r >> 8) % (len - 1),
        };
        if !cuts[..n].contains(&c) {
            cuts[n] = c;
            n += 1;
        }
    }
    cuts[..n].sort_unstable();
    (cuts, n)
}

// ---------------------------------------------------------------------
// Slot memory.

/// Bytes of one slot.
const SLOT: usize = 8192;
/// The header's offset in its slot: it ends where the payload begins.
const HDR_OFF: usize = 4096 - 16;
/// The payload's offset in its slot (page-aligned).
const PAYLOAD_OFF: usize = 4096;
/// Largest payload of one request.
pub const PAYLOAD_MAX: usize = 4096;
/// The indirect table's offset in its slot.
const TABLE_OFF: usize = 64;

#[repr(C, align(4096))]
struct SlotMem([u8; QMAX * SLOT + 4096]);

struct SlotCell(UnsafeCell<SlotMem>);

// SAFETY: reached only through raw pointers by the one `Blk` holding the
// claim (`SLOTS_CLAIMED`), and by the device.
unsafe impl Sync for SlotCell {}

static SLOT_MEM: SlotCell = SlotCell(UnsafeCell::new(SlotMem([0; QMAX * SLOT + 4096])));
static SLOTS_CLAIMED: AtomicBool = AtomicBool::new(false);

/// A completed request.
#[derive(Clone, Copy)]
pub struct Done {
    /// The queue it went through.
    pub queue: usize,
    pub slot: usize,
    /// The caller's number for the request.
    pub tag: u32,
    pub req: Req,
    pub status: u8,
    pub used_len: u32,
    /// It went through an indirect table.
    pub indirect: bool,
}

/// Counters of one phase.
#[derive(Clone, Copy, Default)]
pub struct Stats {
    pub requests: u32,
    pub indirect: u32,
    /// Requests whose layout was not `Separate`.
    pub unusual: u32,
    pub max_in_flight: usize,
}

/// Describes request `i` of a pipeline and fills its payload.
pub type MakeReq<'f> = dyn FnMut(u32, &mut [u8]) -> Res<(Req, Shape)> + 'f;
/// Describes request `i` of queue `q` of a multi-queue pipeline
/// (`q`, `i`, payload).
pub type MakeReqOn<'f> = dyn FnMut(usize, u32, &mut [u8]) -> Res<(Req, Shape)> + 'f;
/// Judges one completion of a pipeline (with the slot's payload).
pub type CheckDone<'f> = dyn FnMut(&Done, &[u8]) -> Res<()> + 'f;

/// A request that could not be started yet (not enough descriptors).
#[derive(Clone, Copy)]
struct Waiting {
    slot: usize,
    tag: u32,
    req: Req,
    shape: Shape,
}

/// A virtio-blk device with queue 0 (and perhaps queue 1) set up.
pub struct Blk<'a> {
    pub t: &'a Transport,
    /// Queue 0.
    pub vq: Vq,
    /// Queue 1, when `open_queues` was asked for two.
    pub vq1: Option<Vq>,
    pub offered: u64,
    pub features: u64,
    pub cfg: Config,
    /// Longest chain or indirect table a request may use.
    pub max_pieces: usize,
    pub stats: Stats,
    /// The same counters for each queue (`max_in_flight`: on that queue).
    pub queue_stats: [Stats; MAX_QUEUES],
    mem: u64,
    /// Per queue: the slot of each head in flight.
    head_slot: [[u16; QMAX]; MAX_QUEUES],
    slot_req: [Req; QMAX],
    slot_tag: [u32; QMAX],
    slot_indirect: [bool; QMAX],
    /// Slots handed to the device.
    started: [bool; QMAX],
    /// Slots allocated (started or being filled).
    busy: [bool; QMAX],
    free: [u16; QMAX],
    nfree: usize,
    /// Requests in flight, per queue.
    in_flight: [usize; MAX_QUEUES],
}

impl Drop for Blk<'_> {
    fn drop(&mut self) {
        SLOTS_CLAIMED.store(false, Ordering::Release);
    }
}

/// How long one request may take (an I/O to a host file, under load):
/// 2^34 TSC cycles, 5-17 s at 1-3.5 GHz.
pub const IO_TIMEOUT_CYCLES: u64 = 1 << 34;

/// No head (in `head_slot`).
const NONE: u16 = u16::MAX;

impl<'a> Blk<'a> {
    /// Negotiate (VERSION_1 plus whatever of `F_WANTED` the device
    /// offers), read the configuration, set up one queue per element of
    /// `queue_entries` (1 or 2) and set DRIVER_OK. On PCI, configuration
    /// changes go to MSI-X entry `config_entry` and queue q to
    /// `queue_entries[q]`. More than one queue needs VIRTIO_BLK_F_MQ and
    /// `num_queues` at least as large.
    pub fn open_queues(
        t: &'a Transport,
        config_entry: Option<u16>,
        queue_entries: &[Option<u16>],
    ) -> Res<Blk<'a>> {
        let nq = queue_entries.len();
        if !(1..=MAX_QUEUES).contains(&nq) {
            crate::fail!("{nq} queues asked for; this driver sets up 1 to {MAX_QUEUES}");
        }
        t.begin()?;
        let offered = t.device_features();
        if offered & F_VERSION_1 == 0 {
            crate::fail!(
                "the device does not offer VERSION_1 (features {offered:#x}): a legacy-only device"
            );
        }
        let features = offered & F_WANTED;
        if !t.offer_features(features) {
            crate::fail!(
                "FEATURES_OK refused for features {features:#x} (device offers {offered:#x}, status {:#x})",
                t.status()
            );
        }
        let need = Config::needed(features);
        if t.config_len() < need {
            crate::fail!(
                "device configuration is {} bytes; the negotiated features need {need}",
                t.config_len()
            );
        }
        let cfg = t.config_consistent(|t| Config::read(t, features))?;
        if let Some(s) = cfg.blk_size {
            if !s.is_power_of_two() || !(512..=4096).contains(&s) {
                crate::fail!("blk_size {s}: this driver needs a power of two from 512 to 4096");
            }
        }
        if nq > 1 {
            match cfg.num_queues {
                None => crate::fail!(
                    "the device does not offer VIRTIO_BLK_F_MQ (features {offered:#x}); {nq} queues needed (keel: --disk ...,queues=2; QEMU: num-queues=2)"
                ),
                Some(n) if usize::from(n) < nq => crate::fail!(
                    "num_queues is {n} with VIRTIO_BLK_F_MQ; {nq} queues needed (num_queues >= {nq}) (keel: --disk ...,queues=2; QEMU: num-queues=2)"
                ),
                Some(_) => {}
            }
        }
        if cfg.seg_max == Some(0) {
            crate::fail!("SEG_MAX offered with seg_max 0");
        }
        if cfg.size_max.is_some_and(|s| s < 512) {
            crate::fail!(
                "size_max {}: a 512-byte sector does not fit one segment",
                cfg.size_max.unwrap_or(0)
            );
        }
        for (what, l) in [("discard", cfg.discard), ("write-zeroes", cfg.write_zeroes)] {
            if let Some(l) = l {
                if l.max_sectors == 0 || l.max_seg == 0 {
                    crate::fail!(
                        "{what} offered with max sectors {} and max segments {}",
                        l.max_sectors,
                        l.max_seg
                    );
                }
            }
        }
        if let Some(e) = config_entry {
            let back = t.set_config_vector(e);
            if back != e {
                crate::fail!("config_msix_vector {e} refused (reads {back:#x})");
            }
        }
        let event_idx = features & F_EVENT_IDX != 0;
        let vq = t.setup_queue(0, queue_entries[0], event_idx)?;
        let vq1 = match queue_entries.get(1) {
            Some(&e) => Some(t.setup_queue_in(QueueMem::Small, 1, e, event_idx)?),
            None => None,
        };
        if SLOTS_CLAIMED.swap(true, Ordering::AcqRel) {
            crate::fail!("the virtio-blk slot memory is already in use");
        }
        let smallest = vq1.as_ref().map_or(vq.size, |v| v.size.min(vq.size));
        let mut max_pieces = MAX_PIECES.min(usize::from(smallest));
        if let Some(s) = cfg.seg_max {
            // seg_max counts data segments; header and status come on top.
            max_pieces = max_pieces.min(s as usize + 2);
        }
        let mut free = [0u16; QMAX];
        for (i, f) in free.iter_mut().enumerate() {
            *f = (QMAX - 1 - i) as u16;
        }
        let blk = Blk {
            t,
            vq,
            vq1,
            offered,
            features,
            cfg,
            max_pieces,
            stats: Stats::default(),
            queue_stats: [Stats::default(); MAX_QUEUES],
            mem: SLOT_MEM.0.get() as u64,
            head_slot: [[NONE; QMAX]; MAX_QUEUES],
            slot_req: [Req::bare(0); QMAX],
            slot_tag: [0; QMAX],
            slot_indirect: [false; QMAX],
            started: [false; QMAX],
            busy: [false; QMAX],
            free,
            nfree: QMAX,
            in_flight: [0; MAX_QUEUES],
        };
        blk.quiet();
        t.driver_ok()?;
        Ok(blk)
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// The most requests that can be in flight: the queue size (slots are
    /// as many as the largest queue).
    pub fn depth_max(&self) -> usize {
        usize::from(self.vq.size)
    }

    /// Queues set up (1 or 2).
    pub fn queues(&self) -> usize {
        1 + usize::from(self.vq1.is_some())
    }

    /// Queue `q` (0 or 1, when set up).
    pub fn queue(&self, q: usize) -> &Vq {
        match (q, &self.vq1) {
            (0, _) => &self.vq,
            (1, Some(v)) => v,
            _ => panic!("queue {q} is not set up"),
        }
    }

    fn queue_mut(&mut self, q: usize) -> &mut Vq {
        match (q, &mut self.vq1) {
            (0, _) => &mut self.vq,
            (1, Some(v)) => v,
            _ => panic!("queue {q} is not set up"),
        }
    }

    fn in_flight_total(&self) -> usize {
        self.in_flight.iter().sum()
    }

    fn slot_base(&self, slot: usize) -> u64 {
        self.mem + (slot * SLOT) as u64
    }
    fn hdr_addr(&self, slot: usize) -> u64 {
        self.slot_base(slot) + HDR_OFF as u64
    }
    fn status_addr(&self, slot: usize, r: &Req) -> u64 {
        self.slot_base(slot) + PAYLOAD_OFF as u64 + u64::from(r.len)
    }

    /// A free slot, if any.
    pub fn alloc(&mut self) -> Option<usize> {
        if self.nfree == 0 {
            return None;
        }
        self.nfree -= 1;
        let s = usize::from(self.free[self.nfree]);
        self.busy[s] = true;
        Some(s)
    }

    fn release(&mut self, slot: usize) {
        if !self.busy[slot] {
            return;
        }
        self.busy[slot] = false;
        self.free[self.nfree] = slot as u16;
        self.nfree += 1;
    }

    /// The payload area of `slot`, which the caller allocated and has not
    /// started (or which just completed).
    pub fn payload_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!(
            slot < QMAX && !self.started[slot],
            "slot {slot} is in flight"
        );
        // SAFETY: inside the claimed slot memory; the slot is not in flight,
        // so the device does not touch it, and `&mut self` keeps any other
        // reference from this driver away while the slice lives.
        unsafe {
            core::slice::from_raw_parts_mut(
                (self.slot_base(slot) + PAYLOAD_OFF as u64) as *mut u8,
                PAYLOAD_MAX,
            )
        }
    }

    /// The payload area of a slot that is not in flight.
    pub fn payload(&self, slot: usize) -> &[u8] {
        assert!(
            slot < QMAX && !self.started[slot],
            "slot {slot} is in flight"
        );
        // SAFETY: as payload_mut, read-only.
        unsafe {
            core::slice::from_raw_parts(
                (self.slot_base(slot) + PAYLOAD_OFF as u64) as *const u8,
                PAYLOAD_MAX,
            )
        }
    }

    /// The descriptors for `r` in `slot` laid out as `shape` says.
    fn pieces(&self, slot: usize, r: &Req, shape: Shape) -> Pieces {
        let mut p = Pieces {
            p: [(0, 0, false); MAX_PIECES],
            n: 0,
        };
        let hdr = self.hdr_addr(slot);
        let (rd, wr) = (r.readable(), r.writable());
        let wr_at = hdr + u64::from(rd);
        // Each region as cut points: pieces are the runs between them.
        let mut seed = match shape.split {
            Split::Scattered(s) => s | 1,
            _ => 1,
        };
        let (rcuts, nr) = match shape.split {
            Split::Separate if rd > 16 => ([16, 0], 1),
            Split::Separate | Split::Merged => ([0, 0], 0),
            Split::Scattered(_) => cut_points(rd, 3, 24, 8, &mut seed),
        };
        let (wcuts, nw) = match shape.split {
            Split::Separate if wr > 1 => ([wr - 1, 0], 1),
            Split::Separate | Split::Merged => ([0, 0], 0),
            Split::Scattered(_) => cut_points(wr, 3, 8, 8, &mut seed),
        };
        let size_max = self.cfg.size_max.unwrap_or(u32::MAX);
        let mut ok = true;
        for (base, len, cuts, write) in [
            (hdr, rd, &rcuts[..nr], false),
            (wr_at, wr, &wcuts[..nw], true),
        ] {
            let mut from = 0u32;
            for &to in cuts.iter().chain(core::iter::once(&len)) {
                // Honour size_max by cutting further.
                let mut at = from;
                while at < to {
                    let n = (to - at).min(size_max);
                    ok &= p.push(base + u64::from(at), n, write);
                    at += n;
                }
                from = to;
            }
        }
        if !ok {
            p.n = MAX_PIECES + 1;
        }
        p
    }

    /// Start request `r` on queue `q` in `slot` (allocated, payload filled): write the
    /// header, preset the status, lay the descriptors out as `shape` says
    /// (falling back to `Split::Separate` if the device's limits do not
    /// allow it) and put the head on the avail ring, unpublished.
    /// `Ok(false)`: not enough free descriptors now.
    pub fn start_on(
        &mut self,
        q: usize,
        slot: usize,
        tag: u32,
        r: &Req,
        shape: Shape,
    ) -> Res<bool> {
        if r.len as usize > PAYLOAD_MAX {
            crate::fail!("a {}-byte payload does not fit a slot", r.len);
        }
        let mut shape = shape;
        shape.indirect &= self.has(F_INDIRECT_DESC);
        let mut p = self.pieces(slot, r, shape);
        if p.n > self.max_pieces {
            shape.split = Split::Separate;
            p = self.pieces(slot, r, shape);
        }
        if p.n > self.max_pieces {
            crate::fail!(
                "{} of {} bytes needs {}{} descriptors; the device allows {} (seg_max {:?}, size_max {:?})",
                type_name(r.ty),
                r.len,
                if p.n > MAX_PIECES { "more than " } else { "" },
                p.n.min(MAX_PIECES),
                self.max_pieces,
                self.cfg.seg_max,
                self.cfg.size_max
            );
        }
        let ring = if shape.indirect { 1 } else { p.n };
        if self.queue(q).free_descriptors() < ring {
            return Ok(false);
        }
        let hdr = self.hdr_addr(slot);
        // SAFETY: the header (16 bytes, 16-byte aligned) and status byte of
        // a slot this driver owns and has not handed to the device.
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, r.ty.to_le());
            core::ptr::write_volatile((hdr + 4) as *mut u32, 0);
            core::ptr::write_volatile((hdr + 8) as *mut u64, r.sector.to_le());
            core::ptr::write_volatile(self.status_addr(slot, r) as *mut u8, S_UNWRITTEN);
        }
        let head = if shape.indirect {
            let table = self.slot_base(slot) + TABLE_OFF as u64;
            for (k, &(addr, len, write)) in p.p[..p.n].iter().enumerate() {
                let mut flags = if write { DESC_WRITE } else { 0 };
                let mut next = 0u16;
                if k + 1 < p.n {
                    flags |= DESC_NEXT;
                    next = (k + 1) as u16;
                }
                let at = table + 16 * k as u64;
                // SAFETY: entry k (< MAX_PIECES, 16 bytes each) of this
                // slot's indirect table, in its first page before the
                // header; the slot is not in flight.
                unsafe {
                    core::ptr::write_volatile(at as *mut u64, addr);
                    core::ptr::write_volatile((at + 8) as *mut u32, len);
                    core::ptr::write_volatile((at + 12) as *mut u16, flags);
                    core::ptr::write_volatile((at + 14) as *mut u16, next);
                }
            }
            self.queue_mut(q).add_indirect_at(table, p.n)
        } else {
            self.queue_mut(q).add(&p.p[..p.n])
        };
        let Some(head) = head else {
            crate::fail!(
                "the queue refused a chain of {ring} descriptor(s) although they were free"
            );
        };
        let heads = &mut self.head_slot[q];
        if heads[usize::from(head)] != NONE {
            crate::fail!("queue {q}: descriptor {head} handed out twice");
        }
        heads[usize::from(head)] = slot as u16;
        self.slot_req[slot] = *r;
        self.slot_tag[slot] = tag;
        self.slot_indirect[slot] = shape.indirect;
        self.started[slot] = true;
        self.in_flight[q] += 1;
        let total = self.in_flight_total();
        let in_q = self.in_flight[q];
        for (st, now) in [(&mut self.stats, total), (&mut self.queue_stats[q], in_q)] {
            st.requests += 1;
            st.indirect += u32::from(shape.indirect);
            st.unusual += u32::from(shape.split != Split::Separate);
            st.max_in_flight = st.max_in_flight.max(now);
        }
        Ok(true)
    }

    /// Publish what was started on queue `q` and notify the device unless
    /// its `avail_event` says it need not be.
    pub fn publish_on(&mut self, q: usize) -> bool {
        let t = self.t;
        self.queue_mut(q).submit(t)
    }

    /// Polling: keep the device from interrupting on any queue (EVENT_IDX:
    /// `used_event` half the index space ahead; else
    /// VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn quiet(&self) {
        for q in 0..self.queues() {
            let vq = self.queue(q);
            if vq.event_idx {
                vq.set_used_event(vq.last_used().wrapping_add(0x8000));
            } else {
                vq.set_no_interrupt(true);
            }
        }
    }

    /// Ask for an interrupt at the next used buffer. The device decides
    /// after it has published the used buffer, so keep the request in
    /// place (no `quiet`) until the interrupt has arrived.
    pub fn want_interrupt(&self) {
        self.want_interrupt_on(0);
    }

    /// `want_interrupt` on queue `q`.
    pub fn want_interrupt_on(&self, q: usize) {
        let vq = self.queue(q);
        if vq.event_idx {
            vq.set_used_event(vq.last_used());
        } else {
            vq.set_no_interrupt(false);
        }
    }

    /// Take one used buffer of queue `q`, if any: check its id, status byte and length,
    /// and free its descriptors and slot (the payload stays readable until
    /// the slot is allocated again).
    pub fn poll_on(&mut self, q: usize) -> Res<Option<Done>> {
        let Some((id, used_len)) = self.queue_mut(q).pop_used() else {
            return Ok(None);
        };
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| self.head_slot[q].get(i).copied())
            .unwrap_or(NONE);
        if slot == NONE || !self.queue_mut(q).complete(id) {
            crate::fail!(
                "queue {q}: used id {id} (len {used_len}) is not the head of a request in flight"
            );
        }
        let slot = usize::from(slot);
        self.head_slot[q][id as usize] = NONE;
        self.in_flight[q] -= 1;
        let r = self.slot_req[slot];
        let tag = self.slot_tag[slot];
        let indirect = self.slot_indirect[slot];
        self.started[slot] = false;
        // SAFETY: the status byte of this slot, which the device returned.
        let status = unsafe { core::ptr::read_volatile(self.status_addr(slot, &r) as *const u8) };
        self.release(slot);
        let what = |t: &mut Text<160>| {
            let _ = write!(
                t,
                "{}request {tag} ({} sector {} len {}{})",
                if q == 0 { "" } else { "queue 1: " },
                type_name(r.ty),
                r.sector,
                r.len,
                if indirect { ", indirect" } else { "" }
            );
        };
        if status > S_UNSUPP {
            let mut t = Text::new();
            what(&mut t);
            let _ = write!(
                t,
                ": status byte reads {status:#x} (preset {S_UNWRITTEN:#x}), not OK, IOERR or UNSUPP"
            );
            return Err(t);
        }
        let wr = r.writable();
        if used_len > wr || (status == S_OK && used_len != wr) {
            let mut t = Text::new();
            what(&mut t);
            let _ = write!(
                t,
                ": used.len {used_len} with status {status}, the chain has {wr} device-writable bytes"
            );
            return Err(t);
        }
        Ok(Some(Done {
            queue: q,
            slot,
            tag,
            req: r,
            status,
            used_len,
            indirect,
        }))
    }

    /// Why nothing came back: for failure reasons.
    fn stuck(&self, t: &mut Text<160>) {
        for q in 0..self.queues() {
            let vq = self.queue(q);
            let _ = write!(
                t,
                "{}{} in flight, avail idx {}, used idx {}, avail_event {}",
                if q == 0 { "" } else { "; queue 1: " },
                self.in_flight[q],
                vq.avail_idx(),
                vq.used_idx(),
                vq.avail_event()
            );
        }
    }

    /// Wait (bounded) for a used buffer on queue `q` and take it.
    pub fn wait_on(&mut self, q: usize) -> Res<Done> {
        if !self.queue(q).wait_used(1, IO_TIMEOUT_CYCLES) {
            let mut t = Text::new();
            let _ = write!(t, "queue {q}: no request completed within the timeout: ");
            self.stuck(&mut t);
            return Err(t);
        }
        match self.poll_on(q)? {
            Some(d) => Ok(d),
            None => crate::fail!("the used ring lost an entry"),
        }
    }

    /// One request on its own: `fill` prepares the payload; the result
    /// and the payload are handed to `check` before the slot is reused.
    /// Interrupt suppression is left as it is (see `want_interrupt`).
    pub fn one<T>(
        &mut self,
        r: &Req,
        shape: Shape,
        fill: impl FnOnce(&mut [u8]),
        check: impl FnOnce(&Done, &[u8]) -> Res<T>,
    ) -> Res<T> {
        self.one_on(0, r, shape, fill, check)
    }

    /// `one` on queue `q`.
    pub fn one_on<T>(
        &mut self,
        q: usize,
        r: &Req,
        shape: Shape,
        fill: impl FnOnce(&mut [u8]),
        check: impl FnOnce(&Done, &[u8]) -> Res<T>,
    ) -> Res<T> {
        if self.in_flight_total() != 0 {
            crate::fail!("{} requests still in flight", self.in_flight_total());
        }
        let Some(slot) = self.alloc() else {
            crate::fail!("no free slot on an idle queue");
        };
        fill(self.payload_mut(slot));
        if !self.start_on(q, slot, 0, r, shape)? {
            crate::fail!("{} does not fit an idle queue", type_name(r.ty));
        }
        self.publish_on(q);
        let d = self.wait_on(q)?;
        // used_event stays where it was: moving it now could withdraw an
        // interrupt the caller asked for before the device decided on it.
        check(&d, self.payload(d.slot))
    }

    /// `count` requests, at most `depth` in flight: `make(i, payload)`
    /// describes request `i` and fills its payload; `check(done,
    /// payload)` judges each completion (in completion order). Refills
    /// and publishes after every round of completions.
    pub fn pipeline(
        &mut self,
        count: u32,
        depth: usize,
        make: &mut MakeReq,
        check: &mut CheckDone,
    ) -> Res<()> {
        self.pipeline_queues(&[count], depth, &mut |_, i, p| make(i, p), check)
    }

    /// `pipeline` on every queue at once: `counts[q]` requests on queue
    /// `q`, at most `depth` in flight on each. `make(q, i, payload)`
    /// describes request `i` of queue `q` (its `Done::tag` is `i`). Each
    /// round fills and publishes every queue before waiting, so requests
    /// are in flight on all of them together; the wait ends when any
    /// queue has a completion, and then every queue is drained.
    pub fn pipeline_queues(
        &mut self,
        counts: &[u32],
        depth: usize,
        make: &mut MakeReqOn,
        check: &mut CheckDone,
    ) -> Res<()> {
        let nq = counts.len();
        if nq == 0 || nq > self.queues() {
            crate::fail!("a pipeline over {nq} queues; {} are set up", self.queues());
        }
        let mut next = [0u32; MAX_QUEUES];
        let mut waiting: [Option<Waiting>; MAX_QUEUES] = [None; MAX_QUEUES];
        let total: u32 = counts.iter().sum();
        let mut finished = 0u32;
        while finished < total {
            for q in 0..nq {
                let depth = depth.clamp(1, usize::from(self.queue(q).size));
                let mut started = 0;
                while self.in_flight[q] < depth {
                    let w = match waiting[q].take() {
                        Some(w) => w,
                        None if next[q] < counts[q] => {
                            let Some(slot) = self.alloc() else { break };
                            let i = next[q];
                            let (req, shape) = make(q, i, self.payload_mut(slot))?;
                            next[q] += 1;
                            Waiting {
                                slot,
                                tag: i,
                                req,
                                shape,
                            }
                        }
                        None => break,
                    };
                    if !self.start_on(q, w.slot, w.tag, &w.req, w.shape)? {
                        waiting[q] = Some(w);
                        break;
                    }
                    started += 1;
                }
                if started > 0 {
                    self.publish_on(q);
                }
                if self.in_flight[q] == 0 && waiting[q].is_some() {
                    crate::fail!(
                        "queue {q}: request {} ({}) does not fit an idle queue of {}",
                        next[q].saturating_sub(1),
                        waiting[q].map_or("?", |w| type_name(w.req.ty)),
                        self.queue(q).size
                    );
                }
            }
            if self.in_flight_total() == 0 {
                crate::fail!("{finished} of {total} requests completed and none is in flight");
            }
            let any = || (0..nq).any(|q| self.queue(q).used_pending() > 0);
            if !crate::arch::wait_for(IO_TIMEOUT_CYCLES, any) {
                let mut t = Text::new();
                let _ = write!(
                    t,
                    "{finished} of {total} requests completed, then none within the timeout: "
                );
                self.stuck(&mut t);
                return Err(t);
            }
            for q in 0..nq {
                while let Some(d) = self.poll_on(q)? {
                    check(&d, self.payload(d.slot))?;
                    finished += 1;
                }
            }
            self.quiet();
        }
        Ok(())
    }
}

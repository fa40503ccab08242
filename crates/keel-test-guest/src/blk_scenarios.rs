//! Scenarios on the virtio-blk driver (blk.rs), on the first virtio-blk
//! device (PCI bus 0, else virtio-mmio from the command line):
//!
//! * `blk`: configuration, GET_ID, a pattern written over the first 8 MiB
//!   and read back (depth 1, then the full queue), FLUSH, DISCARD,
//!   WRITE_ZEROES with and without UNMAP, an unsupported type and reads
//!   past the end. The disk's final content is documented (README) so the
//!   host can check the image.
//! * `blk-ro`: a read-only disk holding what `blk` leaves: reads work,
//!   writes fail with IOERR and change nothing.
//! * `blk-qcow2-header`: a qcow2 header written over sector 0; the status the
//!   device answers (QEMU and keel refuse it on an image whose format they
//!   probed) and block 0 read back to match it.
//! * `blk-bench`: 4 KiB random reads and writes at depth 1 and 32; the
//!   host times each row by its begin/end lines.
//! * `blk-mq`: queues 0 and 1 of a multi-queue device (VIRTIO_BLK_F_MQ)
//!   at once: disjoint halves of the first 2 MiB written through each,
//!   then every block read back through the other queue; an interrupt on
//!   each queue's own MSI-X vector (virtio-pci) or on the one line with
//!   InterruptStatus (virtio-mmio).

use core::fmt::Write;

use crate::acpi::Acpi;
use crate::arch::{self, rdtsc, DEVICE_TIMEOUT_CYCLES};
use crate::blk::{
    self, Blk, Done, Req, Shape, Split, F_DISCARD, F_FLUSH, F_RO, F_WRITE_ZEROES, SECTOR, S_IOERR,
    S_OK, S_UNSUPP, T_DISCARD, T_WRITE_ZEROES, WZ_UNMAP,
};
use crate::idt::VEC_COUNTED;
use crate::irq;
use crate::pvh::BootInfo;
use crate::text::Text;
use crate::virtio::{self, Transport, F_INDIRECT_DESC};
use crate::virtio_scenarios::{self as vs, Ctx, Irqs};
use crate::Outcome;

macro_rules! say {
    ($name:expr, $($arg:tt)*) => {
        println!("keel-test: {}: {}", $name, format_args!($($arg)*))
    };
}

/// The pattern's unit: 4 KiB blocks.
const BLOCK: u32 = 4096;
const SECTORS_PER_BLOCK: u64 = BLOCK as u64 / SECTOR;
/// `blk` writes the first 8 MiB: blocks 0-2047.
const PATTERN_BLOCKS: u32 = 2048;
/// The first blocks are written one request at a time.
const DEPTH1_BLOCKS: u32 = 64;
/// Discarded and then zeroed with WRITE_ZEROES and UNMAP.
const ZERO_UNMAP: (u32, u32) = (16, 32);
/// Zeroed with WRITE_ZEROES without UNMAP.
const ZERO_KEEP: (u32, u32) = (48, 64);

/// Every byte of block `b` as `blk` writes it.
pub fn pattern(b: u32) -> u8 {
    (b % 251 + 1) as u8
}

/// Every byte of block `b` (< 2048) once `blk` has passed.
fn final_byte(b: u32) -> u8 {
    let inside = |(lo, hi): (u32, u32)| (lo..hi).contains(&b);
    if inside(ZERO_UNMAP) || inside(ZERO_KEEP) {
        0
    } else {
        pattern(b)
    }
}

fn sector_of(b: u32) -> u64 {
    u64::from(b) * SECTORS_PER_BLOCK
}

/// Run `body` on the first virtio-blk device.
fn with_device(
    name: &'static str,
    boot: &BootInfo,
    acpi: &Acpi,
    body: impl FnOnce(&Ctx) -> Outcome,
) -> Outcome {
    let want = vs::Wanted {
        device_type: blk::BLK_TYPE,
        what: "virtio-blk",
        pci_ids: "1af4:1042, 1af4:1001",
        keel_option: "--disk",
    };
    vs::with_device(name, boot, acpi, &want, body)
}

/// `Some(v)` as a number, `None` as "not offered".
struct Opt<T>(Option<T>);

impl<T: core::fmt::Display> core::fmt::Display for Opt<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("not offered"),
        }
    }
}

/// Negotiate, set up the queue and print what the device is.
fn open<'a>(c: &Ctx<'a>) -> Result<Blk<'a>, Text<160>> {
    open_queues(c, &[vs::queue_vector(c)])
}

/// `open` with one queue per element of `queue_entries` (their MSI-X
/// entries on PCI).
fn open_queues<'a>(c: &Ctx<'a>, queue_entries: &[Option<u16>]) -> Result<Blk<'a>, Text<160>> {
    let name = c.name;
    let config_entry = (c.irqs == Irqs::Pci).then_some(0);
    let b = Blk::open_queues(c.t, config_entry, queue_entries)?;
    if let Transport::Pci(p) = c.t {
        if p.device == 0x1001 {
            say!(
                name,
                "transitional device 1af4:1001, driven as a modern one (VERSION_1 offered)"
            );
        }
    }
    say!(
        name,
        "negotiated features {:#x} ({}); device offers {:#x}",
        b.features,
        blk::feature_names(b.features),
        b.offered
    );
    let g = &b.cfg;
    say!(
        name,
        "capacity {} sectors ({} MiB), blk_size {}, seg_max {}, size_max {}, num_queues {}",
        g.capacity,
        (g.capacity * SECTOR) >> 20,
        Opt(g.blk_size),
        Opt(g.seg_max),
        Opt(g.size_max),
        Opt(g.num_queues)
    );
    if let Some((cyl, heads, sectors)) = g.geometry {
        say!(
            name,
            "geometry: {cyl} cylinders, {heads} heads, {sectors} sectors"
        );
    }
    if let Some((exp, align, min_io, opt_io)) = g.topology {
        say!(
            name,
            "topology: physical_block_exp {exp}, alignment_offset {align}, min_io_size {min_io}, opt_io_size {opt_io}"
        );
    }
    match g.discard {
        Some(l) => say!(
            name,
            "discard: max_discard_sectors {}, max_discard_seg {}, discard_sector_alignment {}",
            l.max_sectors,
            l.max_seg,
            l.extra
        ),
        None => say!(name, "discard: not offered"),
    }
    match g.write_zeroes {
        Some(l) => say!(
            name,
            "write zeroes: max_write_zeroes_sectors {}, max_write_zeroes_seg {}, write_zeroes_may_unmap {}",
            l.max_sectors,
            l.max_seg,
            l.extra
        ),
        None => say!(name, "write zeroes: not offered"),
    }
    match g.writeback {
        Some(w) => say!(name, "writeback {w} (CONFIG_WCE)"),
        None => say!(name, "writeback: CONFIG_WCE not offered"),
    }
    for q in 0..b.queues() {
        let vq = b.queue(q);
        say!(
            name,
            "queue {q}: {} entries (device maximum {}), at most {} descriptors a request{}",
            vq.size,
            vq.max,
            b.max_pieces,
            if q + 1 == b.queues() {
                "; DRIVER_OK"
            } else {
                ""
            }
        );
    }
    Ok(b)
}

/// GET_ID: the 20-byte ID as printable text (up to the first NUL).
fn get_id(b: &mut Blk) -> Result<Text<24>, Text<160>> {
    b.one(
        &Req::get_id(),
        Shape::SEPARATE,
        |p| p[..blk::ID_BYTES as usize].fill(0xff),
        |d, p| {
            if d.status != S_OK {
                crate::fail!("GET_ID: status {}, expected 0 (OK)", d.status);
            }
            let mut t = Text::<24>::new();
            for &ch in p[..blk::ID_BYTES as usize]
                .iter()
                .take_while(|&&ch| ch != 0)
            {
                let ch = if ch.is_ascii_graphic() || ch == b' ' {
                    ch
                } else {
                    b'?'
                };
                let _ = t.write_char(char::from(ch));
            }
            Ok(t)
        },
    )
}

/// Layouts cycled through: each split directly and through an indirect
/// table (when INDIRECT_DESC was negotiated).
fn mixed_shape(i: u32) -> Shape {
    Shape {
        split: split_of(i),
        indirect: (i / 3) % 2 == 1,
    }
}

/// Each split in turn, all through indirect tables, so that one ring
/// descriptor per request lets the whole queue be in flight.
fn indirect_shape(i: u32) -> Shape {
    Shape {
        split: split_of(i),
        indirect: true,
    }
}

fn split_of(i: u32) -> Split {
    match i % 3 {
        0 => Split::Separate,
        1 => Split::Merged,
        _ => Split::Scattered(i.wrapping_mul(0x9e37_79b9) ^ 0x6b65_656c),
    }
}

/// Describe what a phase sent: "N requests, at most M in flight, ...".
fn phase_text(st: &blk::Stats) -> Text<160> {
    let mut t = Text::new();
    let _ = write!(
        t,
        "{} requests, at most {} in flight, {} through indirect tables, {} split other than header/data/status",
        st.requests, st.max_in_flight, st.indirect, st.unusual
    );
    t
}

fn expect(d: &Done, want: u8) -> Outcome {
    if d.status != want {
        crate::fail!(
            "{} at sector {} ({} bytes{}): status {} (used.len {}), expected {want}",
            blk::type_name(d.req.ty),
            d.req.sector,
            d.req.len,
            if d.indirect { ", indirect" } else { "" },
            d.status,
            d.used_len
        );
    }
    Ok(())
}

/// Check that 4 KiB block `b` read back as all `want`.
fn check_block(b: u32, p: &[u8], want: u8, what: &str) -> Outcome {
    if let Some(k) = p[..BLOCK as usize].iter().position(|&x| x != want) {
        crate::fail!(
            "block {b} (sector {}) read back byte {k} as {:#04x}, expected {want:#04x} ({what})",
            sector_of(b),
            p[k]
        );
    }
    Ok(())
}

/// Write blocks `first..end`, every byte of block b = `byte(b)`, at most
/// `depth` in flight, laid out as `shape(i)`.
fn write_blocks(
    b: &mut Blk,
    first: u32,
    end: u32,
    depth: usize,
    byte: fn(u32) -> u8,
    shape: fn(u32) -> Shape,
) -> Outcome {
    b.pipeline(
        end - first,
        depth,
        &mut |i, p| {
            let blk = first + i;
            p[..BLOCK as usize].fill(byte(blk));
            Ok((Req::write(sector_of(blk), BLOCK), shape(i)))
        },
        &mut |d, _| expect(d, S_OK),
    )
}

/// Read blocks `first..end` and check each is all `byte(b)`. The buffer
/// is filled with the complement first, so a block the device did not
/// write shows.
fn read_blocks(
    b: &mut Blk,
    first: u32,
    end: u32,
    depth: usize,
    byte: fn(u32) -> u8,
    shape: fn(u32) -> Shape,
    what: &str,
) -> Outcome {
    b.pipeline(
        end - first,
        depth,
        &mut |i, p| {
            p[..BLOCK as usize].fill(!byte(first + i));
            Ok((Req::read(sector_of(first + i), BLOCK), shape(i)))
        },
        &mut |d, p| {
            expect(d, S_OK)?;
            let blk = first + d.tag;
            check_block(blk, p, byte(blk), what)
        },
    )
}

/// DISCARD or WRITE_ZEROES over blocks `first..end` with segment `flags`,
/// within the device's limits: segments of at most max sectors (kept on
/// the discard alignment), split in two when the limits allow it so that
/// multi-segment payloads are exercised, packed max_seg to a request.
/// Returns (requests, segments).
fn ranged(
    b: &mut Blk,
    ty: u32,
    first: u32,
    end: u32,
    flags: u32,
    lim: blk::RangeLimits,
) -> Result<(u32, u32), Text<160>> {
    let start = sector_of(first);
    let total = sector_of(end) - start;
    let align = if ty == T_DISCARD {
        u64::from(lim.extra.max(1))
    } else {
        1
    };
    let mut most = u64::from(lim.max_sectors);
    if most >= align {
        most -= most % align;
    }
    let half = total / 2;
    if lim.max_seg >= 2 && total <= most && half % align == 0 {
        most = half;
    }
    let per_req = lim.max_seg.min(256) as usize;
    let mut segs = [(0u64, 0u32); 64];
    let mut n = 0;
    let mut at = start;
    while at < start + total {
        if n == segs.len() {
            crate::fail!(
                "{} over {total} sectors needs more than 64 segments (max {} sectors each)",
                blk::type_name(ty),
                lim.max_sectors
            );
        }
        let len = most.min(start + total - at);
        segs[n] = (at, len as u32);
        n += 1;
        at += len;
    }
    let mut requests = 0;
    for (k, chunk) in segs[..n].chunks(per_req).enumerate() {
        let shape = Shape {
            split: if k == 0 {
                Split::Merged
            } else {
                Split::Separate
            },
            indirect: false,
        };
        b.one(
            &Req::ranged(ty, chunk.len() as u32),
            shape,
            |p| {
                for (j, &(sector, sectors)) in chunk.iter().enumerate() {
                    let s = &mut p[16 * j..16 * j + 16];
                    s[..8].copy_from_slice(&sector.to_le_bytes());
                    s[8..12].copy_from_slice(&sectors.to_le_bytes());
                    s[12..].copy_from_slice(&flags.to_le_bytes());
                }
            },
            |d, _| expect(d, S_OK),
        )?;
        requests += 1;
    }
    Ok((requests, n as u32))
}

fn flush(b: &mut Blk, name: &str, again: &str) -> Outcome {
    if !b.has(F_FLUSH) {
        say!(
            name,
            "FLUSH not offered: skipped{again} (the device writes through)"
        );
        return Ok(());
    }
    b.one(
        &Req::flush(),
        Shape::SEPARATE,
        |_| {},
        |d, _| expect(d, S_OK),
    )?;
    say!(name, "FLUSH: OK{again}");
    Ok(())
}

/// Interrupts on the queue so far.
fn queue_irqs(c: &Ctx) -> u64 {
    c.irqs.queue()
}

/// One read with used_event at the used index: the queue interrupt must
/// come (virtio-mmio: InterruptStatus bit 0, acknowledged).
fn interrupt_check(c: &Ctx, b: &mut Blk) -> Outcome {
    vs::settle(c);
    let before = queue_irqs(c);
    b.want_interrupt();
    b.one(
        &Req::read(0, BLOCK),
        Shape::SEPARATE,
        |_| {},
        |d, _| expect(d, S_OK),
    )?;
    if !arch::wait_for(DEVICE_TIMEOUT_CYCLES, || queue_irqs(c) > before) {
        crate::fail!(
            "no queue interrupt (vector {:#x}) after a read with used_event at the used index",
            c.irqs.queue_vector()
        );
    }
    vs::check_used_status(c)?;
    b.quiet();
    say!(
        c.name,
        "queue interrupt arrived when asked for (vector {:#x})",
        c.irqs.queue_vector()
    );
    Ok(())
}

// ---------------------------------------------------------------------
// blk

/// Scenario `blk`.
pub fn scenario_blk(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    with_device("blk", boot, acpi, blk_steps)
}

fn blk_steps(c: &Ctx) -> Outcome {
    let name = c.name;
    let mut b = open(c)?;
    let id = get_id(&mut b)?;
    say!(name, "ID \"{id}\"");
    if b.has(F_RO) {
        crate::fail!("the disk is read-only (VIRTIO_BLK_F_RO); blk writes to it");
    }
    let cap = b.cfg.capacity;
    if cap < sector_of(PATTERN_BLOCKS) {
        crate::fail!(
            "capacity {cap} sectors is below the {} (8 MiB) blk writes",
            sector_of(PATTERN_BLOCKS)
        );
    }
    if let Some(w) = b.cfg.writeback {
        let other = u8::from(w == 0);
        let back = blk::set_writeback(c.t, other)?;
        if back != other {
            crate::fail!("writeback {w}: wrote {other}, reads back {back}");
        }
        let back = blk::set_writeback(c.t, w)?;
        if back != w {
            crate::fail!("writeback: wrote {w} back, reads {back}");
        }
        say!(name, "writeback toggled to {other} and back to {w}");
    }
    if !b.has(F_INDIRECT_DESC) {
        say!(
            name,
            "INDIRECT_DESC not offered: every request is a direct chain"
        );
    }
    let irqs0 = queue_irqs(c);
    let full = b.depth_max();

    // (a) The pattern: depth 1, then the whole queue.
    b.stats = blk::Stats::default();
    write_blocks(&mut b, 0, DEPTH1_BLOCKS, 1, pattern, mixed_shape)?;
    say!(
        name,
        "wrote blocks 0-{} at depth 1: {}",
        DEPTH1_BLOCKS - 1,
        phase_text(&b.stats)
    );
    b.stats = blk::Stats::default();
    write_blocks(
        &mut b,
        DEPTH1_BLOCKS,
        PATTERN_BLOCKS,
        full,
        pattern,
        indirect_shape,
    )?;
    say!(
        name,
        "wrote blocks {}-{} at depth {full}: {}",
        DEPTH1_BLOCKS,
        PATTERN_BLOCKS - 1,
        phase_text(&b.stats)
    );

    // (b) Read everything back.
    b.stats = blk::Stats::default();
    read_blocks(
        &mut b,
        0,
        PATTERN_BLOCKS,
        full,
        pattern,
        mixed_shape,
        "the pattern",
    )?;
    say!(
        name,
        "read back and verified blocks 0-{} at depth {full}: {}",
        PATTERN_BLOCKS - 1,
        phase_text(&b.stats)
    );

    // (c)
    flush(&mut b, name, "")?;

    // (d)
    let (zlo, zhi) = ZERO_UNMAP;
    match b.cfg.discard {
        Some(l) => {
            let (r, s) = ranged(&mut b, T_DISCARD, zlo, zhi, 0, l)?;
            say!(
                name,
                "DISCARD blocks {zlo}-{}: OK ({r} request(s), {s} segment(s))",
                zhi - 1
            );
        }
        None => say!(name, "DISCARD not offered: skipped"),
    }

    // (e)
    let (klo, khi) = ZERO_KEEP;
    match b.cfg.write_zeroes {
        Some(l) => {
            let (r1, s1) = ranged(&mut b, T_WRITE_ZEROES, zlo, zhi, WZ_UNMAP, l)?;
            let (r2, s2) = ranged(&mut b, T_WRITE_ZEROES, klo, khi, 0, l)?;
            say!(
                name,
                "WRITE_ZEROES blocks {zlo}-{} with UNMAP and {klo}-{} without: OK ({} request(s), {} segment(s))",
                zhi - 1,
                khi - 1,
                r1 + r2,
                s1 + s2
            );
        }
        None => {
            write_blocks(&mut b, zlo, zhi, full, |_| 0, mixed_shape)?;
            write_blocks(&mut b, klo, khi, full, |_| 0, mixed_shape)?;
            say!(
                name,
                "WRITE_ZEROES not offered: wrote zeroes over blocks {zlo}-{} and {klo}-{} with OUT",
                zhi - 1,
                khi - 1
            );
        }
    }
    read_blocks(&mut b, zlo, zhi, full, |_| 0, mixed_shape, "zeroed")?;
    read_blocks(&mut b, klo, khi, full, |_| 0, mixed_shape, "zeroed")?;
    say!(
        name,
        "blocks {zlo}-{} and {klo}-{} read back as zeroes",
        zhi - 1,
        khi - 1
    );

    // (f)
    flush(&mut b, name, " (again)")?;

    // (g) Errors.
    b.one(
        &Req::bare(0xff),
        Shape::SEPARATE,
        |_| {},
        |d, _| expect(d, S_UNSUPP),
    )?;
    say!(name, "request type 0xff: UNSUPP");
    for (sector, what) in [(cap, "past the end"), (cap - 1, "across the end")] {
        b.one(
            &Req::read(sector, BLOCK),
            Shape::SEPARATE,
            |_| {},
            |d, _| expect(d, S_IOERR),
        )?;
        say!(name, "IN of 4 KiB at sector {sector} ({what}): IOERR");
    }
    read_blocks(&mut b, 0, 1, 1, final_byte, mixed_shape, "the pattern")?;
    say!(name, "block 0 still reads back after the errors");

    // Notifications and interrupts.
    say!(
        name,
        "{} notifications, {} suppressed by avail_event; {} queue interrupts while polling",
        b.vq.kicks,
        b.vq.kicks_suppressed,
        queue_irqs(c) - irqs0
    );
    interrupt_check(c, &mut b)?;

    c.t.reset()?;
    say!(name, "reset: status reads 0");
    Ok(())
}

// ---------------------------------------------------------------------
// blk-ro

/// Blocks `blk-ro` reads and checks: the zeroed ranges and the pattern
/// around them.
const RO_BLOCKS: u32 = 64;

/// Scenario `blk-ro`.
pub fn scenario_blk_ro(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    with_device("blk-ro", boot, acpi, blk_ro_steps)
}

fn blk_ro_steps(c: &Ctx) -> Outcome {
    let name = c.name;
    let mut b = open(c)?;
    let id = get_id(&mut b)?;
    say!(name, "ID \"{id}\"");
    if !b.has(F_RO) {
        crate::fail!("the device does not offer VIRTIO_BLK_F_RO (keel: --disk ...,readonly=on)");
    }
    if b.cfg.capacity < sector_of(PATTERN_BLOCKS) {
        crate::fail!(
            "capacity {} sectors is below the 8 MiB blk-ro reads",
            b.cfg.capacity
        );
    }
    let full = b.depth_max();
    read_blocks(
        &mut b,
        0,
        RO_BLOCKS,
        full,
        final_byte,
        mixed_shape,
        "what blk leaves",
    )?;
    read_blocks(
        &mut b,
        PATTERN_BLOCKS - 1,
        PATTERN_BLOCKS,
        1,
        final_byte,
        mixed_shape,
        "what blk leaves",
    )?;
    say!(
        name,
        "read blocks 0-{} and {}: the content blk leaves",
        RO_BLOCKS - 1,
        PATTERN_BLOCKS - 1
    );
    b.one(
        &Req::write(0, BLOCK),
        Shape::SEPARATE,
        |p| p[..BLOCK as usize].fill(0xee),
        |d, _| expect(d, S_IOERR),
    )?;
    say!(name, "OUT to block 0: IOERR");
    // One segment over block RO_BLOCKS (checked unchanged below).
    let range = |b: &mut Blk, ty: u32, flags: u32| {
        b.one(
            &Req::ranged(ty, 1),
            Shape::SEPARATE,
            |p| {
                p[..8].copy_from_slice(&sector_of(RO_BLOCKS).to_le_bytes());
                p[8..12].copy_from_slice(&(SECTORS_PER_BLOCK as u32).to_le_bytes());
                p[12..16].copy_from_slice(&flags.to_le_bytes());
            },
            |d, _| Ok(*d),
        )
    };
    if b.has(F_WRITE_ZEROES) {
        let d = range(&mut b, T_WRITE_ZEROES, WZ_UNMAP)?;
        expect(&d, S_IOERR)?;
        say!(name, "WRITE_ZEROES of block {RO_BLOCKS}: IOERR");
    }
    if b.has(F_DISCARD) {
        // A discard leaves the content undefined, so a device may also
        // complete it without effect (QEMU does); the block must not
        // change either way.
        let d = range(&mut b, T_DISCARD, 0)?;
        match d.status {
            S_IOERR => say!(name, "DISCARD of block {RO_BLOCKS}: IOERR"),
            S_OK => say!(
                name,
                "DISCARD of block {RO_BLOCKS}: OK (must have had no effect: checked below)"
            ),
            _ => expect(&d, S_IOERR)?,
        }
    }
    flush(&mut b, name, "")?;
    read_blocks(
        &mut b,
        0,
        RO_BLOCKS + 1,
        full,
        final_byte,
        mixed_shape,
        "unchanged after the refused writes",
    )?;
    say!(
        name,
        "blocks 0-{RO_BLOCKS} unchanged after the refused writes"
    );
    c.t.reset()?;
    say!(name, "reset: status reads 0");
    Ok(())
}

// ---------------------------------------------------------------------
// blk-qcow2-header

/// What `blk-qcow2-header` writes over block 0 first: an ordinary block.
const HEADER_BEFORE: u8 = 0x11;

/// Byte `i` of the 4 KiB block `blk-qcow2-header` tries to write over block 0: a qcow2
/// version 3 header of a 1 TiB image with 64 KiB clusters (the rest of the block is
/// 0x22). It is enough for a probe to call the image qcow2, which is the point.
fn qcow2_header_byte(i: usize) -> u8 {
    const HEAD: [u8; 32] = [
        b'Q', b'F', b'I', 0xfb, // magic
        0, 0, 0, 3, // version
        0, 0, 0, 0, 0, 0, 0, 0, // backing_file_offset
        0, 0, 0, 0, // backing_file_size
        0, 0, 0, 16, // cluster_bits
        0, 0, 1, 0, 0, 0, 0, 0, // size: 1 TiB
    ];
    match i {
        0..32 => HEAD[i],
        // The rest of a version 2 header and the version 3 fields: zero.
        32..104 => 0,
        _ => 0x22,
    }
}

/// Scenario `blk-qcow2-header`.
pub fn scenario_blk_qcow2_header(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    with_device("blk-qcow2-header", boot, acpi, qcow2_header_steps)
}

/// Writes an ordinary block 0, then a qcow2 header over sector 0 (alone, then as the
/// start of block 0), and reports the status each got; block 0 must then read back as
/// what the device said it did. A device may refuse the header (QEMU and keel do on an
/// image whose format they probed) or take it; the host decides which was right.
fn qcow2_header_steps(c: &Ctx) -> Outcome {
    let name = c.name;
    let mut b = open(c)?;
    if b.cfg.capacity < SECTORS_PER_BLOCK {
        crate::fail!(
            "capacity {} sectors is below one 4 KiB block",
            b.cfg.capacity
        );
    }
    b.one(
        &Req::write(0, BLOCK),
        Shape::SEPARATE,
        |p| p[..BLOCK as usize].fill(HEADER_BEFORE),
        |d, _| expect(d, S_OK),
    )?;
    say!(name, "OUT of an ordinary block 0: OK");
    let status_text = |s: u8| match s {
        S_OK => "OK",
        S_IOERR => "IOERR",
        _ => "other",
    };
    let mut statuses = [0u8; 2];
    for (k, (len, what)) in [
        (SECTOR as u32, "sector 0 (512 bytes)"),
        (BLOCK, "block 0 (4 KiB)"),
    ]
    .into_iter()
    .enumerate()
    {
        let d = b.one(
            &Req::write(0, len),
            Shape::SEPARATE,
            |p| {
                for (i, x) in p[..len as usize].iter_mut().enumerate() {
                    *x = qcow2_header_byte(i);
                }
            },
            |d, _| Ok(*d),
        )?;
        if d.status != S_OK && d.status != S_IOERR {
            expect(&d, S_IOERR)?;
        }
        say!(
            name,
            "OUT of a qcow2 header over {what}: {}",
            status_text(d.status)
        );
        statuses[k] = d.status;
    }
    if statuses[0] != statuses[1] {
        crate::fail!(
            "the header alone got {} but as the start of block 0 got {}",
            status_text(statuses[0]),
            status_text(statuses[1])
        );
    }
    let taken = statuses[0] == S_OK;
    b.one(
        &Req::read(0, BLOCK),
        Shape::SEPARATE,
        |p| p[..BLOCK as usize].fill(0xee),
        |d, p| {
            expect(d, S_OK)?;
            for (i, &x) in p[..BLOCK as usize].iter().enumerate() {
                let want = if taken {
                    qcow2_header_byte(i)
                } else {
                    HEADER_BEFORE
                };
                if x != want {
                    crate::fail!("block 0 read back byte {i} as {x:#04x}, expected {want:#04x}");
                }
            }
            Ok(())
        },
    )?;
    if taken {
        say!(name, "block 0 reads back as the header");
    } else {
        say!(name, "block 0 reads back unchanged");
    }
    flush(&mut b, name, "")?;
    c.t.reset()?;
    say!(name, "reset: status reads 0");
    Ok(())
}

// ---------------------------------------------------------------------
// blk-bench

/// Requests per row unless `keel.blk_n=` says otherwise.
const BENCH_N: u32 = 20_000;
/// The LCG's seed, the same for every row.
const BENCH_SEED: u64 = 0x6b65_656c_626c_6b21;
/// Bytes of every block the write rows write.
const BENCH_BYTE: u8 = 0x5a;

/// Knuth's MMIX LCG; the block is the high 32 bits modulo the blocks.
fn lcg(x: u64) -> u64 {
    x.wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407)
}

/// Scenario `blk-bench`.
pub fn scenario_blk_bench(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let n = match boot
        .cmdline()
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("keel.blk_n="))
    {
        None => BENCH_N,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => crate::fail!("keel.blk_n={v}: expected a number of requests from 1 to 2^32-1"),
        },
    };
    with_device("blk-bench", boot, acpi, |c| bench_steps(c, n))
}

fn bench_steps(c: &Ctx, n: u32) -> Outcome {
    let name = c.name;
    let mut b = open(c)?;
    let blocks = b.cfg.capacity / SECTORS_PER_BLOCK;
    if blocks == 0 {
        crate::fail!("capacity {} sectors holds no 4 KiB block", b.cfg.capacity);
    }
    let hz = crate::pit::tsc_hz_tries();
    match hz {
        Some(hz) => say!(
            name,
            "TSC {} MHz (calibrated against PIT channel 0)",
            hz / 1_000_000
        ),
        None => say!(
            name,
            "TSC not calibrated (PIT channel 0 did not count consistently): no guest-measured IOPS"
        ),
    }
    say!(
        name,
        "{n} requests per row, 4 KiB each, blocks from an LCG (seed {BENCH_SEED:#x}) over {blocks} blocks"
    );
    for (write, depth) in [(false, 1), (true, 1), (false, 32), (true, 32)] {
        let kind = if write { "randwrite" } else { "randread" };
        if depth > b.depth_max() {
            crate::fail!(
                "depth {depth} is more than the queue's {} entries",
                b.vq.size
            );
        }
        let mut x = BENCH_SEED;
        say!(name, "begin {kind} depth {depth}");
        let t0 = rdtsc();
        b.pipeline(
            n,
            depth,
            &mut |_, p| {
                x = lcg(x);
                let sector = ((x >> 32) % blocks) * SECTORS_PER_BLOCK;
                Ok(if write {
                    p[..BLOCK as usize].fill(BENCH_BYTE);
                    (Req::write(sector, BLOCK), Shape::SEPARATE)
                } else {
                    (Req::read(sector, BLOCK), Shape::SEPARATE)
                })
            },
            &mut |d, _| expect(d, S_OK),
        )?;
        let cycles = rdtsc().wrapping_sub(t0);
        say!(name, "end {kind} depth {depth} requests {n}");
        if let Some(hz) = hz {
            let iops = u128::from(n) * u128::from(hz) / u128::from(cycles.max(1));
            let us = u128::from(cycles) * 1_000_000 / u128::from(hz);
            say!(
                name,
                "{kind} depth {depth}: {n} requests in {us} us (guest TSC), {iops} IOPS"
            );
        }
    }
    say!(
        name,
        "{} notifications, {} suppressed by avail_event",
        b.vq.kicks,
        b.vq.kicks_suppressed
    );
    c.t.reset()?;
    Ok(())
}

// ---------------------------------------------------------------------
// blk-mq

/// `blk-mq` writes the first 2 MiB: blocks 0-511.
const MQ_BLOCKS: u32 = 512;
/// Requests in flight on each queue (at most the queue's size).
const MQ_DEPTH: usize = 16;
/// PCI: queue 1 interrupts through MSI-X entry 2, counted on
/// VEC_COUNTED + 3 (entries 0 and 1, and the virtio-mmio line, take
/// counters 0-2).
const MSIX_QUEUE1: u16 = 2;
const QUEUE1_COUNTER: usize = 3;

/// Every byte of 512-byte sector `s` (of the first 2 MiB) as `blk-mq`
/// writes it.
pub fn mq_byte(s: u64) -> u8 {
    (s % 251 + 1) as u8
}

/// Queue `q`'s share: block `2i + q` is written through queue `q` and read
/// back through queue `1 - q`.
fn mq_block(q: usize, i: u32) -> u32 {
    2 * i + q as u32
}

/// Fill a 4 KiB block's payload with what `blk-mq` writes to block `b`
/// (`invert`: the complement, so a block the device did not write shows).
fn mq_fill(b: u32, p: &mut [u8], invert: bool) {
    for (k, sector) in p[..BLOCK as usize].chunks_mut(SECTOR as usize).enumerate() {
        let v = mq_byte(sector_of(b) + k as u64);
        sector.fill(if invert { !v } else { v });
    }
}

/// Scenario `blk-mq`.
pub fn scenario_blk_mq(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    with_device("blk-mq", boot, acpi, mq_steps)
}

/// Where queue `q`'s interrupts are counted.
fn mq_counter(c: &Ctx, q: usize) -> usize {
    match (c.irqs, q) {
        (Irqs::Pci, 1) => QUEUE1_COUNTER,
        _ => c.irqs.queue_counter(),
    }
}

fn mq_steps(c: &Ctx) -> Outcome {
    let name = c.name;
    // MQ first, so that a single-queue device fails for what it lacks
    // (open_queues checks num_queues once the features are negotiated).
    c.t.begin()?;
    let offered = c.t.device_features();
    if offered & blk::F_MQ == 0 {
        crate::fail!(
            "the device does not offer VIRTIO_BLK_F_MQ (features {offered:#x}); blk-mq needs num_queues >= 2 (keel: --disk ...,queues=2; QEMU: num-queues=2)"
        );
    }
    let mut entry1 = None;
    if let Transport::Pci(p) = c.t {
        if p.msix.vectors < 3 {
            crate::fail!(
                "MSI-X has {} vectors; two queues and configuration changes need 3",
                p.msix.vectors
            );
        }
        let vector = VEC_COUNTED + QUEUE1_COUNTER as u8;
        p.route(MSIX_QUEUE1, vector);
        say!(
            name,
            "MSI-X entry {MSIX_QUEUE1} -> vector {vector:#x} (queue 1)"
        );
        entry1 = Some(MSIX_QUEUE1);
    }
    let mut b = open_queues(c, &[vs::queue_vector(c), entry1])?;
    if b.has(F_RO) {
        crate::fail!("the disk is read-only (VIRTIO_BLK_F_RO); blk-mq writes to it");
    }
    if b.cfg.capacity < sector_of(MQ_BLOCKS) {
        crate::fail!(
            "capacity {} sectors is below the {} (2 MiB) blk-mq writes",
            b.cfg.capacity,
            sector_of(MQ_BLOCKS)
        );
    }
    let indirect = b.has(F_INDIRECT_DESC);
    let half = MQ_BLOCKS / 2;
    let counts = [half, half];
    let last = MQ_BLOCKS - 1;

    // Writes: even blocks through queue 0, odd blocks through queue 1,
    // both queues filled before every wait. Through indirect tables when
    // offered (one ring descriptor a request), else three-descriptor
    // chains (16 of them fit a 64-entry queue).
    b.stats = blk::Stats::default();
    b.queue_stats = [blk::Stats::default(); 2];
    b.pipeline_queues(
        &counts,
        MQ_DEPTH,
        &mut |q, i, p| {
            let blk = mq_block(q, i);
            mq_fill(blk, p, false);
            let shape = if indirect {
                indirect_shape(i)
            } else {
                Shape::SEPARATE
            };
            Ok((Req::write(sector_of(blk), BLOCK), shape))
        },
        &mut |d, _| expect(d, S_OK),
    )?;
    let w = b.queue_stats;
    say!(
        name,
        "wrote blocks 0-{last}: the even ones through queue 0 ({} requests, at most {} in flight), the odd ones through queue 1 ({} requests, at most {} in flight); at most {} in flight on both together",
        w[0].requests,
        w[0].max_in_flight,
        w[1].requests,
        w[1].max_in_flight,
        b.stats.max_in_flight
    );
    let writes_together = b.stats.max_in_flight;

    // Reads: every block through the other queue, direct chains.
    b.stats = blk::Stats::default();
    b.queue_stats = [blk::Stats::default(); 2];
    b.pipeline_queues(
        &counts,
        MQ_DEPTH,
        &mut |q, i, p| {
            let blk = mq_block(1 - q, i);
            mq_fill(blk, p, true);
            Ok((Req::read(sector_of(blk), BLOCK), Shape::SEPARATE))
        },
        &mut |d, p| {
            expect(d, S_OK)?;
            let blk = mq_block(1 - d.queue, d.tag);
            if let Some(k) = (0..BLOCK as usize).find(|&k| {
                p[k] != mq_byte(sector_of(blk) + (k as u64) / SECTOR)
            }) {
                crate::fail!(
                    "block {blk} read back through queue {} (written through queue {}): byte {k} is {:#04x}, expected {:#04x}",
                    d.queue,
                    1 - d.queue,
                    p[k],
                    mq_byte(sector_of(blk) + (k as u64) / SECTOR)
                );
            }
            Ok(())
        },
    )?;
    let r = b.queue_stats;
    let reads_together = b.stats.max_in_flight;
    let (a, bb) = (
        w[0].max_in_flight.max(r[0].max_in_flight),
        w[1].max_in_flight.max(r[1].max_in_flight),
    );
    if writes_together.max(reads_together) <= a.max(bb) {
        crate::fail!(
            "requests were never in flight on both queues at once (at most {a} and {bb}, {} together)",
            writes_together.max(reads_together)
        );
    }
    say!(
        name,
        "2 queues; queue 0: {} requests, queue 1: {} requests, at most {a} and {bb} in flight at once",
        w[0].requests + r[0].requests,
        w[1].requests + r[1].requests
    );
    say!(name, "every block read back through the other queue");

    // An interrupt on each queue when asked for: on its own MSI-X vector,
    // or on the one virtio-mmio line with InterruptStatus bit 0.
    for q in 0..2 {
        vs::settle(c);
        let counter = mq_counter(c, q);
        let other = mq_counter(c, 1 - q);
        let (before, other_before) = (irq::vec_count(counter), irq::vec_count(other));
        b.want_interrupt_on(q);
        b.one_on(
            q,
            &Req::read(0, BLOCK),
            Shape::SEPARATE,
            |_| {},
            |d, _| expect(d, S_OK),
        )?;
        let vector = VEC_COUNTED + counter as u8;
        if !arch::wait_for(DEVICE_TIMEOUT_CYCLES, || irq::vec_count(counter) > before) {
            crate::fail!(
                "no interrupt for queue {q} (vector {vector:#x}) after a read with used_event at the used index"
            );
        }
        vs::check_used_status(c)?;
        if other != counter && irq::vec_count(other) != other_before {
            crate::fail!(
                "a completion on queue {q} also raised vector {:#x}, queue {}'s",
                VEC_COUNTED + other as u8,
                1 - q
            );
        }
        b.quiet();
        say!(
            name,
            "queue {q} interrupt arrived when asked for (vector {vector:#x})"
        );
    }
    flush(&mut b, name, "")?;
    c.t.reset()?;
    say!(name, "reset: status reads 0");
    Ok(())
}

/// The disk a long-running scenario (`idle`) writes its tick to, so the host
/// can see whether the guest's writes stand still (while the VM is stopped).
pub struct TickDisk<'a> {
    b: Blk<'a>,
    /// Configuration interrupts seen (virtio-pci: MSI-X entry 0, vector 0x50);
    /// `None` on virtio-mmio, where they are not watched.
    config_irqs: Option<u64>,
}

impl TickDisk<'_> {
    /// After a configuration-change interrupt, the capacity (sectors) read
    /// again, if it changed.
    pub fn capacity_changed(&mut self) -> Result<Option<u64>, Text<160>> {
        let Some(seen) = self.config_irqs else {
            return Ok(None);
        };
        let now = irq::vec_count(0);
        if now == seen {
            return Ok(None);
        }
        self.config_irqs = Some(now);
        let cap = self
            .b
            .t
            .config_consistent(|t| t.config_read64(blk::cfg::CAPACITY))?;
        if cap == self.b.cfg.capacity {
            return Ok(None);
        }
        self.b.cfg.capacity = cap;
        Ok(Some(cap))
    }

    /// Writes block 0: `keel-test tick N\n` in ASCII, zero-padded to 4 KiB. A write
    /// the device fails with IOERR (the host's disk is full, say) is printed as
    /// `keel-test: tick N: disk write failed (IOERR)` and the guest goes on, as a
    /// guest whose VMM reports errors rather than stopping (`werror=report`) would.
    pub fn write_tick(&mut self, n: u64) -> Outcome {
        let mut line = Text::<64>::new();
        let _ = writeln!(line, "keel-test tick {n}");
        let status = self.b.one(
            &Req::write(0, BLOCK),
            Shape::SEPARATE,
            |p| {
                let text = line.as_str().as_bytes();
                p[..BLOCK as usize].fill(0);
                p[..text.len()].copy_from_slice(text);
            },
            |d, _| Ok(d.status),
        )?;
        match status {
            S_OK => Ok(()),
            S_IOERR => {
                println!("keel-test: tick {n}: disk write failed (IOERR)");
                Ok(())
            }
            other => crate::fail!("tick {n}: disk write: status {other}, expected 0 or 1"),
        }
    }
}

/// Runs `body` with the first virtio-blk device (as `with_device` finds it)
/// opened as a [`TickDisk`], or with `None` when there is no such device.
pub fn with_tick_disk(
    name: &'static str,
    boot: &BootInfo,
    acpi: &Acpi,
    body: impl FnOnce(Option<&mut TickDisk>) -> Outcome,
) -> Outcome {
    let on_mmio = || {
        virtio::find_mmio(name, boot.cmdline(), u32::from(blk::BLK_TYPE))
            .is_ok_and(|s| s.found.is_some())
    };
    if virtio::find_pci(acpi, blk::BLK_TYPE).is_none() && !on_mmio() {
        return body(None);
    }
    with_device(name, boot, acpi, |c| {
        let b = open(c)?;
        let config_irqs = (c.irqs == Irqs::Pci).then(|| irq::vec_count(0));
        let mut disk = TickDisk { b, config_irqs };
        body(Some(&mut disk))
    })
}

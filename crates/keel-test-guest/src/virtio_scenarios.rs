//! Scenarios on the virtio driver core (virtio.rs):
//!
//! * `virtio-pci` and `virtio-mmio`: keel's echo test device (device type
//!   0x3f) over each transport: discovery, negotiation edge cases, data in
//!   both directions (split payloads, indirect tables, a full ring),
//!   interrupts, EVENT_IDX suppression, a configuration change, reset.
//! * `virtio-rng`: an entropy device (type 4) on either transport, the
//!   driver core checked against a device this project did not write
//!   (QEMU's virtio-rng).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::acpi::Acpi;
use crate::arch::{self, DEVICE_TIMEOUT_CYCLES};
use crate::idt::VEC_COUNTED;
use crate::irq;
use crate::pci::QUIET_CYCLES;
use crate::pvh::BootInfo;
use crate::text::Text;
use crate::virtio::{
    self, MmioTransport, PciTransport, Pool, Transport, Vq, DESC_NEXT, DESC_WRITE, F_EVENT_IDX,
    F_INDIRECT_DESC, F_VERSION_1, INDIRECT, INT_CONFIG, INT_USED, NO_VECTOR, POOL, QMAX,
};
use crate::Outcome;

const ECHO_TYPE: u16 = 0x3f;
const ECHO_MAGIC: u32 = 0x4f48_4345;
const CFG_MAGIC: u64 = 0;
const CFG_XOR: u64 = 4;
const RNG_TYPE: u16 = 4;

/// MSI-X entry 0 (configuration changes) -> VEC_COUNTED + 0.
const MSIX_CONFIG: u16 = 0;
/// MSI-X entry 1 (queue 0) -> VEC_COUNTED + 1.
const MSIX_QUEUE: u16 = 1;
/// virtio-mmio's IOAPIC pin -> VEC_COUNTED + 2.
const MMIO_COUNTER: usize = 2;

macro_rules! say {
    ($name:expr, $($arg:tt)*) => {
        println!("keel-test: {}: {}", $name, format_args!($($arg)*))
    };
}

/// Where a transport's interrupts are counted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Irqs {
    /// MSI-X: configuration on counter 0, queue 0 on counter 1.
    Pci,
    /// One IOAPIC pin on counter 2; InterruptStatus says why.
    Mmio,
}

impl Irqs {
    pub(crate) fn queue_counter(self) -> usize {
        match self {
            Irqs::Pci => usize::from(MSIX_QUEUE),
            Irqs::Mmio => MMIO_COUNTER,
        }
    }
    fn config_counter(self) -> usize {
        match self {
            Irqs::Pci => usize::from(MSIX_CONFIG),
            Irqs::Mmio => MMIO_COUNTER,
        }
    }
    pub(crate) fn queue(self) -> u64 {
        irq::vec_count(self.queue_counter())
    }
    fn config(self) -> u64 {
        irq::vec_count(self.config_counter())
    }
    pub(crate) fn queue_vector(self) -> u8 {
        VEC_COUNTED + self.queue_counter() as u8
    }
    fn config_vector(self) -> u8 {
        VEC_COUNTED + self.config_counter() as u8
    }
}

/// One scenario's view: its name (the progress-line prefix), the
/// transport and where its interrupts land.
pub(crate) struct Ctx<'a> {
    pub(crate) name: &'static str,
    pub(crate) t: &'a Transport,
    pub(crate) irqs: Irqs,
}

// ---------------------------------------------------------------------
// Discovery and interrupt routing per transport.

pub(crate) fn open_pci(name: &'static str, f: crate::pci::Func) -> Result<PciTransport, Text<160>> {
    let p = PciTransport::open(f)?;
    say!(
        name,
        "found {:04x}:{:04x} at 00:{:02x}.{} (device type {:#x})",
        p.vendor,
        p.device,
        f.dev,
        f.func,
        p.device_type
    );
    let c = |i: usize| p.caps[i];
    say!(
        name,
        "common BAR{}+{:#x}, notify BAR{}+{:#x} (multiplier {}), ISR BAR{}+{:#x}, device BAR{}+{:#x}; BAR{} at {:#x}",
        c(1).bar,
        c(1).offset,
        c(2).bar,
        c(2).offset,
        p.notify_multiplier,
        c(3).bar,
        c(3).offset,
        c(4).bar,
        c(4).offset,
        c(1).bar,
        p.bar_base[usize::from(c(1).bar)]
    );
    if p.msix.vectors < 2 {
        crate::fail!(
            "MSI-X has {} vectors; a device with one queue needs 2",
            p.msix.vectors
        );
    }
    p.route(MSIX_CONFIG, Irqs::Pci.config_vector());
    p.route(MSIX_QUEUE, Irqs::Pci.queue_vector());
    p.enable_msix();
    say!(
        name,
        "MSI-X: {} vectors; entry {MSIX_CONFIG} -> vector {:#x} (configuration), entry {MSIX_QUEUE} -> vector {:#x} (queue 0)",
        p.msix.vectors,
        Irqs::Pci.config_vector(),
        Irqs::Pci.queue_vector()
    );
    Ok(p)
}

pub(crate) fn describe_mmio(name: &'static str, m: &MmioTransport) {
    say!(
        name,
        "found virtio-mmio version 2 at {:#x} (size {:#x}, IRQ {}, vendor {:#x}, device type {:#x})",
        m.base,
        m.size,
        m.irq,
        m.vendor_id,
        m.device_id
    );
}

pub(crate) fn route_mmio(
    name: &'static str,
    acpi: &Acpi,
    m: &MmioTransport,
) -> Result<(u64, u32), Text<160>> {
    let vector = Irqs::Mmio.queue_vector();
    let (ioapic, pin) = irq::route_gsi(acpi, m.irq, vector, false, false)?;
    say!(
        name,
        "IRQ {} -> IOAPIC {ioapic:#x} pin {pin} -> vector {vector:#x} (edge)",
        m.irq
    );
    Ok((ioapic, pin))
}

/// A kind of virtio device a scenario runs on, and how its FAIL line names it when absent.
pub(crate) struct Wanted {
    /// The virtio device type.
    pub device_type: u16,
    /// "virtio-net".
    pub what: &'static str,
    /// The PCI IDs looked for (modern, transitional): "1af4:1041, 1af4:1000".
    pub pci_ids: &'static str,
    /// keel's option that adds one: "--net".
    pub keel_option: &'static str,
}

/// Runs `body` on the first device `want` names: on PCI bus 0, else among the command
/// line's `virtio_mmio.device=` entries (its IOAPIC pin routed for the run, masked after).
pub(crate) fn with_device(
    name: &'static str,
    boot: &BootInfo,
    acpi: &Acpi,
    want: &Wanted,
    body: impl FnOnce(&Ctx) -> Outcome,
) -> Outcome {
    irq::lapic_enable();
    if let Some(f) = virtio::find_pci(acpi, want.device_type) {
        let t = Transport::Pci(open_pci(name, f)?);
        return body(&Ctx {
            name,
            t: &t,
            irqs: Irqs::Pci,
        });
    }
    let s = virtio::find_mmio(name, boot.cmdline(), u32::from(want.device_type))?;
    let Some(m) = s.found else {
        crate::fail!(
            "no {} device: none on PCI bus 0 ({}) nor among the {} virtio_mmio.device= entries (keel: {})",
            want.what,
            want.pci_ids,
            s.words,
            want.keel_option
        );
    };
    over_mmio(name, acpi, m, body)
}

/// PCI: the configuration interrupt on MSI-X entry 0 (read back).
pub(crate) fn config_vector(c: &Ctx) -> Outcome {
    if c.irqs == Irqs::Pci {
        let back = c.t.set_config_vector(MSIX_CONFIG);
        if back != MSIX_CONFIG {
            crate::fail!(
                "config_msix_vector {MSIX_CONFIG} refused (reads {back:#x}{})",
                if back == NO_VECTOR { ", NO_VECTOR" } else { "" }
            );
        }
    }
    Ok(())
}

pub(crate) fn queue_vector(c: &Ctx) -> Option<u16> {
    (c.irqs == Irqs::Pci).then_some(MSIX_QUEUE)
}

/// After a queue interrupt was counted: on virtio-mmio, InterruptStatus
/// must say "used buffer", and InterruptACK must clear it.
pub(crate) fn check_used_status(c: &Ctx) -> Result<u32, Text<160>> {
    if c.irqs != Irqs::Mmio {
        return Ok(0);
    }
    let s = c.t.interrupt_status();
    if s & INT_USED == 0 {
        crate::fail!("a queue interrupt arrived, but InterruptStatus reads {s:#x} (bit 0 clear)");
    }
    c.t.ack(INT_USED);
    let after = c.t.interrupt_status();
    if after & INT_USED != 0 {
        crate::fail!("InterruptStatus reads {after:#x} after InterruptACK of bit 0");
    }
    Ok(s)
}

/// Let interrupts still in flight land, then acknowledge what the
/// virtio-mmio status shows, so the next count starts clean.
pub(crate) fn settle(c: &Ctx) {
    arch::wait_for(QUIET_CYCLES, || false);
    let s = c.t.interrupt_status();
    if s != 0 {
        c.t.ack(s);
    }
    // virtio-pci: reading the ISR clears it.
    let _ = c.t.read_isr();
}

// ---------------------------------------------------------------------
// Echo requests: specification, placement, batches, verification.

/// A small deterministic generator (xorshift64*).
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() >> 32) as u32 % n
    }
}

/// Split `len` into `n` (<= 3, <= len) positive parts.
fn split(len: u32, n: u32, rng: &mut Prng) -> [u32; 3] {
    let mut parts = [0u32; 3];
    let mut left = len;
    for j in 0..n - 1 {
        // Leave at least one byte for each part still to come.
        let most = left - (n - 1 - j);
        let p = 1 + rng.below(most);
        parts[j as usize] = p;
        left -= p;
    }
    parts[(n - 1) as usize] = left;
    parts
}

/// What one request looks like.
#[derive(Clone, Copy)]
struct Spec {
    /// Payload bytes, split over `nrd` device-readable descriptors.
    len: u32,
    rd: [u32; 3],
    nrd: u32,
    /// Device-writable capacity, split over `nwr` descriptors.
    cap: u32,
    wr: [u32; 3],
    nwr: u32,
    indirect: bool,
}

impl Spec {
    fn new(len: u32, nrd: u32, cap: u32, nwr: u32, indirect: bool, rng: &mut Prng) -> Spec {
        let nrd = nrd.clamp(1, 3).min(len);
        let nwr = nwr.clamp(1, 2).min(cap);
        Spec {
            len,
            rd: split(len, nrd, rng),
            nrd,
            cap,
            wr: split(cap, nwr, rng),
            nwr,
            indirect,
        }
    }
}

/// The mixed workload: 1 byte to 4 KiB, 1-3 readable and 1-2 writable
/// descriptors, some with room to spare, some truncated, every eighth
/// through an indirect table.
fn mixed_spec(i: u32, rng: &mut Prng) -> Spec {
    let len = match i {
        0 => 1,
        1 => 4096,
        2 => 2,
        3 => 3000,
        _ if i % 4 == 3 => 1 + rng.below(4096),
        _ => 1 + rng.below(256),
    };
    let cap = if i % 7 == 5 {
        len + 1 + rng.below(32)
    } else if i % 11 == 9 && len >= 2 {
        len / 2
    } else {
        len
    };
    Spec::new(len, 1 + i % 3, cap, 1 + (i / 3) % 2, i % 8 == 4, rng)
}

/// Bytes of the writable buffers the device must not touch.
const SENTINEL: u8 = 0xa5;
const NONE: u16 = u16::MAX;
/// Room left between buffers, so an overrun shows.
const GAP: usize = 16;

/// A request in flight: where its pieces are in the pools.
#[derive(Clone, Copy)]
struct Req {
    seq: u32,
    rd: [(u32, u32); 3],
    nrd: u8,
    wr: [(u32, u32); 3],
    nwr: u8,
    len: u32,
    cap: u32,
    indirect: bool,
}

const REQ0: Req = Req {
    seq: 0,
    rd: [(0, 0); 3],
    nrd: 0,
    wr: [(0, 0); 3],
    nwr: 0,
    len: 0,
    cap: 0,
    indirect: false,
};

/// One batch being built: requests, head -> request, pool use.
struct Batch {
    reqs: [Req; QMAX],
    n: usize,
    by_head: [u16; QMAX],
    out_used: usize,
    in_used: usize,
    ind_used: usize,
    descs: usize,
}

impl Batch {
    fn clear(&mut self) {
        self.n = 0;
        self.by_head = [NONE; QMAX];
        self.out_used = 0;
        self.in_used = 0;
        self.ind_used = 0;
        self.descs = 0;
    }
}

struct BatchCell(UnsafeCell<Batch>);

// SAFETY: handed out once (`BATCH_TAKEN`) as the only reference.
unsafe impl Sync for BatchCell {}

static BATCH: BatchCell = BatchCell(UnsafeCell::new(Batch {
    reqs: [REQ0; QMAX],
    n: 0,
    by_head: [0; QMAX],
    out_used: 0,
    in_used: 0,
    ind_used: 0,
    descs: 0,
}));
static BATCH_TAKEN: AtomicBool = AtomicBool::new(false);

/// The batch bookkeeping (16 KiB, kept off the CPL3 stack). Once per boot.
fn take_batch() -> Result<&'static mut Batch, Text<160>> {
    if BATCH_TAKEN.swap(true, Ordering::AcqRel) {
        crate::fail!("the echo batch memory is already in use");
    }
    // SAFETY: the flag above makes this the only reference, ever.
    let b = unsafe { &mut *BATCH.0.get() };
    b.clear();
    Ok(b)
}

#[derive(Default)]
struct Stats {
    requests: u32,
    bytes: u64,
    batches: u32,
    indirect: u32,
    max_reqs: usize,
    max_descs: usize,
    full_ring: bool,
}

fn pool_need(parts: &[u32]) -> usize {
    parts
        .iter()
        .map(|&p| (p as usize).next_multiple_of(GAP) + GAP)
        .sum()
}

/// Put request `spec` into the batch: fill its payload, set up its
/// descriptors, put its head on the avail ring. `false`: it does not fit
/// (ring, pools or indirect space); nothing was changed.
fn place(vq: &mut Vq, b: &mut Batch, spec: &Spec, seq: u32, rng: &mut Prng) -> bool {
    let (nrd, nwr) = (spec.nrd as usize, spec.nwr as usize);
    let out_need = pool_need(&spec.rd[..nrd]);
    let in_need = pool_need(&spec.wr[..nwr]);
    let entries = nrd + nwr;
    let ring = if spec.indirect { 1 } else { entries };
    if b.n == QMAX
        || b.out_used + out_need > POOL
        || b.in_used + in_need > POOL
        || vq.free_descriptors() < ring
        || (spec.indirect && b.ind_used + entries > INDIRECT / 16)
    {
        return false;
    }
    let mut req = Req {
        seq,
        nrd: nrd as u8,
        nwr: nwr as u8,
        len: spec.len,
        cap: spec.cap,
        indirect: spec.indirect,
        ..REQ0
    };
    let mut bufs = [(0u64, 0u32, false); 8];
    for (j, &part) in spec.rd[..nrd].iter().enumerate() {
        let off = b.out_used.next_multiple_of(GAP);
        b.out_used = off + part as usize + GAP;
        for k in 0..part as usize {
            vq.pool_set(Pool::Out, off + k, rng.next() as u8);
        }
        req.rd[j] = (off as u32, part);
        bufs[j] = (vq.pool_addr(Pool::Out, off), part, false);
    }
    for (j, &part) in spec.wr[..nwr].iter().enumerate() {
        let off = b.in_used.next_multiple_of(GAP);
        b.in_used = off + part as usize + GAP;
        for k in 0..part as usize {
            vq.pool_set(Pool::In, off + k, SENTINEL);
        }
        req.wr[j] = (off as u32, part);
        bufs[nrd + j] = (vq.pool_addr(Pool::In, off), part, true);
    }
    let head = if spec.indirect {
        let first = b.ind_used;
        b.ind_used += entries;
        for (k, &(addr, len, write)) in bufs[..entries].iter().enumerate() {
            let mut flags = if write { virtio::DESC_WRITE } else { 0 };
            let mut next = 0;
            if k + 1 < entries {
                flags |= virtio::DESC_NEXT;
                next = (k + 1) as u16;
            }
            vq.write_indirect(first + k, addr, len, flags, next);
        }
        vq.add_indirect(first, entries)
    } else {
        vq.add(&bufs[..entries])
    };
    // Free descriptors were checked above.
    let Some(head) = head else { return false };
    b.reqs[b.n] = req;
    b.by_head[usize::from(head)] = b.n as u16;
    b.n += 1;
    b.descs += ring;
    true
}

/// Pool offset of byte `k` of a request's readable or writable part.
fn locate(segs: &[(u32, u32)], mut k: u32) -> usize {
    for &(off, len) in segs {
        if k < len {
            return (off + k) as usize;
        }
        k -= len;
    }
    unreachable!("byte beyond the request's buffers")
}

/// Check one completed request: used.len, every echoed byte, and that
/// nothing past the echoed bytes was written.
fn verify(vq: &Vq, r: &Req, used_len: u32, xor: u8) -> Outcome {
    let want = r.len.min(r.cap);
    let what = if r.indirect {
        " via an indirect table"
    } else {
        ""
    };
    if used_len != want {
        crate::fail!(
            "request {}: {} bytes in {}+{} descriptors{what}, room {}: used.len {used_len}, expected {want}",
            r.seq,
            r.len,
            r.nrd,
            r.nwr,
            r.cap
        );
    }
    let rd = &r.rd[..usize::from(r.nrd)];
    let wr = &r.wr[..usize::from(r.nwr)];
    for k in 0..r.cap {
        let got = vq.pool_get(Pool::In, locate(wr, k));
        if k < want {
            let p = vq.pool_get(Pool::Out, locate(rd, k));
            if got != p ^ xor {
                crate::fail!(
                    "request {} ({} bytes{what}): echoed byte {k} reads {got:#04x}, expected {:#04x} ({p:#04x} ^ xor {xor:#04x})",
                    r.seq,
                    r.len,
                    p ^ xor
                );
            }
        } else if got != SENTINEL {
            crate::fail!(
                "request {} ({} bytes{what}): byte {k} of the writable buffer, past the {want} echoed, changed to {got:#04x}",
                r.seq,
                r.len
            );
        }
    }
    Ok(())
}

/// Submit the batch with used_event = `event` (EVENT_IDX), poll the used
/// ring until every request is back, and verify each one.
fn flush(c: &Ctx, vq: &mut Vq, b: &mut Batch, xor: u8, event: u16, st: &mut Stats) -> Outcome {
    if b.n == 0 {
        return Ok(());
    }
    if vq.event_idx {
        vq.set_used_event(event);
    }
    let n = b.n as u16;
    let kicked = vq.submit(c.t);
    if !vq.wait_used(n, DEVICE_TIMEOUT_CYCLES) {
        crate::fail!(
            "batch {}: {} of {n} requests used within the timeout (avail idx {}, used idx {}, avail_event {}, {})",
            st.batches + 1,
            vq.used_pending(),
            vq.avail_idx(),
            vq.used_idx(),
            vq.avail_event(),
            if kicked { "notified" } else { "notification suppressed" }
        );
    }
    for _ in 0..n {
        let Some((id, len)) = vq.pop_used() else {
            crate::fail!("the used ring lost entries (used idx {})", vq.used_idx());
        };
        let ri = usize::try_from(id)
            .ok()
            .and_then(|i| b.by_head.get(i).copied())
            .unwrap_or(NONE);
        if ri == NONE || !vq.complete(id) {
            crate::fail!(
                "batch {}: used id {id} (len {len}) is not the head of a request in flight",
                st.batches + 1
            );
        }
        b.by_head[id as usize] = NONE;
        let r = b.reqs[usize::from(ri)];
        verify(vq, &r, len, xor)?;
        st.requests += 1;
        st.bytes += u64::from(r.len);
        st.indirect += u32::from(r.indirect);
    }
    if vq.used_pending() != 0 {
        crate::fail!(
            "batch {}: the device used {} more buffers than were submitted",
            st.batches + 1,
            vq.used_pending()
        );
    }
    if vq.in_flight() != 0 {
        crate::fail!(
            "{} descriptors still in flight after every request came back",
            vq.in_flight()
        );
    }
    st.batches += 1;
    st.max_reqs = st.max_reqs.max(b.n);
    st.max_descs = st.max_descs.max(b.descs);
    st.full_ring |= b.n == usize::from(vq.size) && b.descs == usize::from(vq.size);
    b.clear();
    Ok(())
}

/// virtio-mmio: clear the used-buffer bit the bulk echo left (a device
/// that raises its line while a status bit is set gives no new edge).
fn ack_used(c: &Ctx) {
    let s = c.t.interrupt_status() & INT_USED;
    if s != 0 {
        c.t.ack(s);
    }
}

/// The echo workload's state: the queue, the batch being built, the
/// totals and the payload generator.
struct Run {
    vq: Vq,
    b: &'static mut Batch,
    st: Stats,
    rng: Prng,
}

/// Echo `count` requests made by `make`, batched as they fit.
fn echo_many(
    c: &Ctx,
    r: &mut Run,
    xor: u8,
    count: u32,
    mut make: impl FnMut(u32, &mut Prng) -> Spec,
) -> Outcome {
    let Run { vq, b, st, rng } = r;
    for i in 0..count {
        let spec = make(i, rng);
        if !place(vq, b, &spec, st.requests + b.n as u32, rng) {
            let event = vq.last_used();
            flush(c, vq, b, xor, event, st)?;
            ack_used(c);
            if !place(vq, b, &spec, st.requests, rng) {
                crate::fail!(
                    "request of {} bytes in {}+{} descriptors does not fit an empty queue of {}",
                    spec.len,
                    spec.nrd,
                    spec.nwr,
                    vq.size
                );
            }
        }
    }
    let event = vq.last_used();
    flush(c, vq, b, xor, event, st)?;
    ack_used(c);
    Ok(())
}

/// One request on its own, with used_event = `event`.
fn echo_one(c: &Ctx, r: &mut Run, xor: u8, len: u32, event: u16) -> Outcome {
    let Run { vq, b, st, rng } = r;
    let spec = Spec::new(len, 2, len, 1, false, rng);
    if !place(vq, b, &spec, st.requests, rng) {
        crate::fail!("a {len}-byte request does not fit an idle queue");
    }
    flush(c, vq, b, xor, event, st)
}

// ---------------------------------------------------------------------
// The echo scenarios.

/// Scenario `virtio-pci`.
pub fn scenario_pci(acpi: &Acpi) -> Outcome {
    let name = "virtio-pci";
    irq::lapic_enable();
    let Some(f) = virtio::find_pci(acpi, ECHO_TYPE) else {
        crate::fail!(
            "no virtio-pci device of type 0x3f (1af4:107f) on bus 0 (keel: --device virtio-echo --transport pci)"
        );
    };
    let p = open_pci(name, f)?;
    let t = Transport::Pci(p);
    echo(&Ctx {
        name,
        t: &t,
        irqs: Irqs::Pci,
    })
}

/// Scenario `virtio-mmio`.
pub fn scenario_mmio(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let name = "virtio-mmio";
    irq::lapic_enable();
    let s = virtio::find_mmio(name, boot.cmdline(), u32::from(ECHO_TYPE))?;
    let Some(m) = s.found else {
        crate::fail!(
            "no virtio-mmio device of type 0x3f among the {} virtio_mmio.device= entries on the command line (keel: --device virtio-echo --transport mmio)",
            s.words
        );
    };
    over_mmio(name, acpi, m, echo)
}

/// Runs `body` on the virtio-mmio device `m`: described, its interrupt routed through the
/// IOAPIC for the run and masked again afterwards.
fn over_mmio(
    name: &'static str,
    acpi: &Acpi,
    m: MmioTransport,
    body: impl FnOnce(&Ctx) -> Outcome,
) -> Outcome {
    describe_mmio(name, &m);
    let (ioapic, pin) = route_mmio(name, acpi, &m)?;
    let t = Transport::Mmio(m);
    let r = body(&Ctx {
        name,
        t: &t,
        irqs: Irqs::Mmio,
    });
    irq::mask_pin(ioapic, pin);
    r
}

fn echo(c: &Ctx) -> Outcome {
    let (name, t) = (c.name, c.t);

    // 1. The device: its configuration magic.
    if t.config_len() < 5 {
        crate::fail!(
            "device configuration is {} bytes; the echo device's is 5 (magic, xor)",
            t.config_len()
        );
    }
    let magic = t.config_consistent(|t| t.config_read32(CFG_MAGIC))?;
    if magic != ECHO_MAGIC {
        crate::fail!("config magic reads {magic:#x}, expected {ECHO_MAGIC:#x}");
    }
    say!(name, "config magic {magic:#x}");

    // 2. Negotiation, the edge cases first.
    t.begin()?;
    let offered = t.device_features();
    say!(name, "device offers features {offered:#x}");
    if offered & F_VERSION_1 == 0 {
        crate::fail!("the device does not offer VERSION_1 (features {offered:#x})");
    }
    for bit in [0u32, 40] {
        let extra = 1u64 << bit;
        if offered & extra != 0 {
            crate::fail!(
                "the device offers feature bit {bit}, which the echo device does not have"
            );
        }
        t.begin()?;
        if t.offer_features(F_VERSION_1 | extra) {
            crate::fail!(
                "FEATURES_OK accepted with unoffered feature bit {bit} (features {:#x}, status {:#x})",
                F_VERSION_1 | extra,
                t.status()
            );
        }
    }
    say!(
        name,
        "FEATURES_OK refused for unoffered features (bits 0 and 40)"
    );
    let want = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX;
    if offered & want != want {
        crate::fail!(
            "the device offers {offered:#x}, without {}",
            virtio::feature_names(want & !offered)
        );
    }
    t.begin()?;
    if t.offer_features(want & !F_VERSION_1) {
        crate::fail!(
            "FEATURES_OK accepted without VERSION_1 (features {:#x}, status {:#x})",
            want & !F_VERSION_1,
            t.status()
        );
    }
    say!(name, "FEATURES_OK refused without VERSION_1");
    // `begin` resets first and waits for the status to read 0.
    t.begin()?;
    if !t.offer_features(want) {
        crate::fail!(
            "FEATURES_OK refused for {} (features {want:#x}, status {:#x})",
            virtio::feature_names(want),
            t.status()
        );
    }
    say!(
        name,
        "negotiated features {want:#x} (VERSION_1|INDIRECT_DESC|EVENT_IDX)"
    );

    config_vector(c)?;
    let vq = t.setup_queue(0, queue_vector(c), true)?;
    say!(
        name,
        "queue 0: {} entries (device maximum {})",
        vq.size,
        vq.max
    );
    let s = t.driver_ok()?;
    say!(name, "DRIVER_OK (status {s:#x})");

    // 3. Data both ways.
    let mut r = Run {
        vq,
        b: take_batch()?,
        st: Stats::default(),
        rng: Prng(0x6b65_656c_7669_7274),
    };
    let q0 = c.irqs.queue();
    echo_many(c, &mut r, 0, 300, mixed_spec)?;
    // A full ring: `size` requests at once, each through a two-entry
    // indirect table, so every descriptor and avail slot is in use.
    let full = u32::from(r.vq.size);
    echo_many(c, &mut r, 0, full, |_, rng| {
        let len = 1 + rng.below(16);
        Spec::new(len, 1, len, 1, true, rng)
    })?;
    if !r.st.full_ring {
        crate::fail!(
            "no batch filled the ring (at most {} requests in {} descriptors)",
            r.st.max_reqs,
            r.st.max_descs
        );
    }
    say!(
        name,
        "echoed {} requests ({} bytes), all verified",
        r.st.requests,
        r.st.bytes
    );
    say!(
        name,
        "{} batches, {} requests through indirect tables, the ring full once ({} requests); {} notifications, {} suppressed by avail_event, {} interrupts",
        r.st.batches,
        r.st.indirect,
        r.vq.size,
        r.vq.kicks,
        r.vq.kicks_suppressed,
        c.irqs.queue() - q0
    );

    // 4. The queue interrupt.
    settle(c);
    let before = c.irqs.queue();
    let event = r.vq.last_used();
    echo_one(c, &mut r, 0, 100, event)?;
    if !arch::wait_for(DEVICE_TIMEOUT_CYCLES, || c.irqs.queue() > before) {
        crate::fail!(
            "no queue interrupt (vector {:#x}) within the timeout after a used buffer (used_event {event})",
            c.irqs.queue_vector()
        );
    }
    let s = check_used_status(c)?;
    if c.irqs == Irqs::Mmio {
        say!(
            name,
            "queue interrupt arrived (vector {:#x}, InterruptStatus {s:#x}, acknowledged)",
            c.irqs.queue_vector()
        );
    } else {
        say!(
            name,
            "queue interrupt arrived (vector {:#x})",
            c.irqs.queue_vector()
        );
    }

    // 5. EVENT_IDX: used_event far ahead suppresses the interrupt; at the
    // used index it asks for one.
    settle(c);
    let before = c.irqs.queue();
    let ahead = r.vq.last_used().wrapping_add(0x8000);
    echo_one(c, &mut r, 0, 64, ahead)?;
    arch::wait_for(QUIET_CYCLES, || c.irqs.queue() != before);
    if c.irqs.queue() != before {
        crate::fail!(
            "a queue interrupt arrived although used_event ({ahead}) was far ahead of the used index ({})",
            r.vq.used_idx()
        );
    }
    if c.t.interrupt_status() & INT_USED != 0 {
        crate::fail!("InterruptStatus bit 0 is set although used_event suppressed the interrupt");
    }
    say!(
        name,
        "used_event suppressed the interrupt (used_event {ahead}, used idx {})",
        r.vq.used_idx()
    );
    let before = c.irqs.queue();
    let event = r.vq.last_used();
    echo_one(c, &mut r, 0, 64, event)?;
    if !arch::wait_for(DEVICE_TIMEOUT_CYCLES, || c.irqs.queue() > before) {
        crate::fail!("no queue interrupt after used_event was set to the used index ({event})");
    }
    check_used_status(c)?;
    say!(name, "used_event requested an interrupt, and it came");

    // 6. A configuration change.
    settle(c);
    let g0 = t.config_generation();
    let before = c.irqs.config();
    t.config_write8(CFG_XOR, 0x5a);
    if !arch::wait_for(DEVICE_TIMEOUT_CYCLES, || c.irqs.config() > before) {
        crate::fail!(
            "no configuration-change interrupt (vector {:#x}) after writing xor",
            c.irqs.config_vector()
        );
    }
    // Why: virtio-mmio InterruptStatus (acknowledged), virtio-pci ISR
    // (the device sets bit 1 before the notification, section 4.1.4.5.1).
    let why = match t.read_isr() {
        Some(isr) => {
            if u32::from(isr) & INT_CONFIG == 0 {
                crate::fail!(
                    "a configuration interrupt arrived, but the ISR reads {isr:#x} (bit 1 clear)"
                );
            }
            ("ISR", u32::from(isr))
        }
        None => {
            let s = t.interrupt_status();
            if s & INT_CONFIG == 0 {
                crate::fail!("a configuration interrupt arrived, but InterruptStatus reads {s:#x} (bit 1 clear)");
            }
            t.ack(INT_CONFIG);
            ("InterruptStatus", s)
        }
    };
    let g1 = t.config_generation();
    if g1 == g0 {
        crate::fail!("config_generation is still {g0} after xor was written");
    }
    let x = t.config_consistent(|t| t.config_read8(CFG_XOR))?;
    if x != 0x5a {
        crate::fail!("xor reads {x:#x} after writing 0x5a");
    }
    say!(
        name,
        "configuration change: interrupt on vector {:#x} ({} {:#x}), config_generation {g0} -> {g1}, xor reads 0x5a",
        c.irqs.config_vector(),
        why.0,
        why.1
    );
    let event = r.vq.last_used();
    echo_one(c, &mut r, 0x5a, 200, event)?;
    say!(name, "the next echo came back XORed with 0x5a");

    // 7. Reset.
    t.reset()?;
    let x = t.config_read8(CFG_XOR);
    if x != 0 {
        crate::fail!("xor reads {x:#x} after a reset, expected 0");
    }
    say!(name, "reset: status reads 0, xor back to 0");
    Ok(())
}

// ---------------------------------------------------------------------
// virtio-rng.

/// Scenario `virtio-rng`: an entropy device on PCI bus 0, else on the
/// command line (virtio-mmio).
pub fn scenario_rng(boot: &BootInfo, acpi: &Acpi) -> Outcome {
    let name = "virtio-rng";
    irq::lapic_enable();
    if let Some(f) = virtio::find_pci(acpi, RNG_TYPE) {
        let p = open_pci(name, f)?;
        let t = Transport::Pci(p);
        return rng(&Ctx {
            name,
            t: &t,
            irqs: Irqs::Pci,
        });
    }
    let s = virtio::find_mmio(name, boot.cmdline(), u32::from(RNG_TYPE))?;
    let Some(m) = s.found else {
        crate::fail!(
            "no virtio entropy device: none on PCI bus 0 (1af4:1044, 1af4:1005) nor among the {} virtio_mmio.device= entries",
            s.words
        );
    };
    over_mmio(name, acpi, m, rng)
}

const RNG_BYTES: usize = 64;

/// Fill pool bytes `at..at + RNG_BYTES` from the device, one request at a
/// time (the device may return fewer bytes than asked for); each request
/// through a two-entry indirect table when `indirect`. Returns the number
/// of requests.
fn rng_fill(c: &Ctx, vq: &mut Vq, at: usize, indirect: bool) -> Result<u32, Text<160>> {
    let mut got = 0usize;
    let mut requests = 0u32;
    while got < RNG_BYTES {
        if requests == 16 {
            crate::fail!("only {got} of {RNG_BYTES} bytes after 16 requests");
        }
        requests += 1;
        let room = (RNG_BYTES - got) as u32;
        let addr = vq.pool_addr(Pool::In, at + got);
        let head = if indirect && room >= 2 {
            let half = room / 2;
            vq.write_indirect(0, addr, half, DESC_WRITE | DESC_NEXT, 1);
            vq.write_indirect(1, addr + u64::from(half), room - half, DESC_WRITE, 0);
            vq.add_indirect(0, 2)
        } else {
            vq.add(&[(addr, room, true)])
        };
        let Some(head) = head else {
            crate::fail!("no free descriptor for request {requests}");
        };
        if vq.event_idx {
            vq.set_used_event(vq.last_used());
        }
        let kicked = vq.submit(c.t);
        if !vq.wait_used(1, DEVICE_TIMEOUT_CYCLES) {
            crate::fail!(
                "request {requests}: no used buffer within the timeout (avail idx {}, used idx {}, {})",
                vq.avail_idx(),
                vq.used_idx(),
                if kicked { "notified" } else { "notification suppressed" }
            );
        }
        let Some((id, len)) = vq.pop_used() else {
            crate::fail!("the used ring lost an entry");
        };
        if id != u32::from(head) || !vq.complete(id) {
            crate::fail!("request {requests}: used id {id}, expected {head}");
        }
        if len > room {
            crate::fail!("request {requests}: used.len {len} is more than the {room}-byte buffer");
        }
        got += len as usize;
    }
    Ok(requests)
}

/// The bytes at `at`, checked not to be all equal; their first 16 in hex.
fn rng_bytes(vq: &Vq, at: usize) -> Result<([u8; RNG_BYTES], Text<48>), Text<160>> {
    let mut bytes = [0u8; RNG_BYTES];
    for (k, b) in bytes.iter_mut().enumerate() {
        *b = vq.pool_get(Pool::In, at + k);
    }
    if bytes.iter().all(|&b| b == bytes[0]) {
        crate::fail!("all {RNG_BYTES} bytes read {:#04x}", bytes[0]);
    }
    let mut hex = Text::<48>::new();
    for b in &bytes[..16] {
        let _ = core::fmt::Write::write_fmt(&mut hex, format_args!("{b:02x}"));
    }
    Ok((bytes, hex))
}

/// Wait for the queue interrupt that `before` predates; on virtio-mmio
/// check and acknowledge InterruptStatus.
fn rng_interrupt(c: &Ctx, before: u64) -> Outcome {
    if !arch::wait_for(DEVICE_TIMEOUT_CYCLES, || c.irqs.queue() > before) {
        crate::fail!(
            "no queue interrupt (vector {:#x}) within the timeout",
            c.irqs.queue_vector()
        );
    }
    check_used_status(c)?;
    Ok(())
}

fn rng(c: &Ctx) -> Outcome {
    let (name, t) = (c.name, c.t);
    t.begin()?;
    let offered = t.device_features();
    if offered & F_VERSION_1 == 0 {
        crate::fail!("the device does not offer VERSION_1 (features {offered:#x})");
    }
    // VERSION_1, plus the ring features the core drives when offered.
    let want = F_VERSION_1 | (offered & (F_EVENT_IDX | F_INDIRECT_DESC));
    if !t.offer_features(want) {
        crate::fail!(
            "FEATURES_OK refused for {} (device offers {offered:#x}, status {:#x})",
            virtio::feature_names(want),
            t.status()
        );
    }
    say!(
        name,
        "negotiated features {want:#x} ({}; device offers {offered:#x})",
        virtio::feature_names(want)
    );
    config_vector(c)?;
    let mut vq = t.setup_queue(0, queue_vector(c), want & F_EVENT_IDX != 0)?;
    say!(
        name,
        "queue 0: {} entries (device maximum {})",
        vq.size,
        vq.max
    );
    let s = t.driver_ok()?;
    say!(name, "DRIVER_OK (status {s:#x})");
    for k in 0..2 * RNG_BYTES {
        vq.pool_set(Pool::In, k, 0);
    }

    let before = c.irqs.queue();
    let n = rng_fill(c, &mut vq, 0, false)?;
    let (first, hex) = rng_bytes(&vq, 0)?;
    say!(
        name,
        "read {RNG_BYTES} bytes in {n} request(s), not all equal: {hex}..."
    );
    rng_interrupt(c, before)?;
    say!(
        name,
        "queue interrupt arrived (vector {:#x})",
        c.irqs.queue_vector()
    );

    if want & F_INDIRECT_DESC != 0 {
        let before = c.irqs.queue();
        let n = rng_fill(c, &mut vq, RNG_BYTES, true)?;
        let (second, hex) = rng_bytes(&vq, RNG_BYTES)?;
        if second == first {
            crate::fail!("the second {RNG_BYTES} bytes repeat the first");
        }
        say!(
            name,
            "read {RNG_BYTES} more bytes through indirect tables in {n} request(s), not all equal, not a repeat: {hex}..."
        );
        rng_interrupt(c, before)?;
        say!(name, "queue interrupt arrived again");
    }
    t.reset()?;
    say!(name, "reset: status reads 0");
    Ok(())
}

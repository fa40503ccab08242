//! Host clusters with data transfers in flight are never handed to another
//! guest offset: discard and write-zeroes racing asynchronous reads and
//! writes, checked against a model of what every guest block may contain.
//!
//! Every request covers whole 4 KiB blocks (two per 8 KiB cluster) and fills
//! each block with one 64-bit tag repeated: the id of the write and the guest
//! block it was written to. The model keeps, per block, the set of tags the
//! block may hold given which requests overlap in time (a request still in
//! flight may land before or after a later overlapping one), so the check is
//! exact wherever requests did not race, and a tag that was never written to
//! a block, the symptom of a host cluster reused under an in-flight
//! transfer, always fails it.
//!
//! Two queues share one image, as the queues of a multi-queue device do. An
//! io_uring queue hands its requests to the kernel only when it is waited on,
//! so a request mapped by queue A stays pending while discards and queue B's
//! writes go ahead: the reuse race is deterministic there, and each round
//! also runs it in a fixed script before the random part. The thread engine
//! races for real.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use common::*;
#[cfg(feature = "io_uring")]
use keel_block::aio::UringQueue;
use keel_block::aio::{AioQueue, AioRequest, Completion, ThreadQueue};
use keel_block::buf::AlignedBuf;
use keel_block::qcow2::{self, CreateOptions};
use keel_block::{BlockBackend, CacheMode, Qcow2, Qcow2Options, RawFile, RawOptions};

const CS: u64 = 8192;
const BS: u64 = 4096;
const CLUSTERS: u64 = 40;
const BLOCKS: u64 = CLUSTERS * CS / BS;
const WORDS: usize = (BS / 8) as usize;
/// A block of zeroes.
const ZERO: u64 = 0;

type Img = Qcow2<RawFile>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    #[cfg(feature = "io_uring")]
    Uring,
    Threads,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "io_uring")]
            Engine::Uring => "io_uring",
            Engine::Threads => "threads",
        }
    }
    fn queue(self, img: &std::sync::Arc<Img>) -> Box<dyn AioQueue<AlignedBuf>> {
        match self {
            #[cfg(feature = "io_uring")]
            Engine::Uring => Box::new(UringQueue::new(img.clone(), 16).unwrap()),
            Engine::Threads => Box::new(ThreadQueue::new(img.clone(), 3).unwrap()),
        }
    }
}

fn tag(write_id: u64, block: u64) -> u64 {
    (write_id << 20) | block
}

fn describe(t: u64) -> String {
    if t == ZERO {
        "zeroes".into()
    } else {
        format!("write #{} to block {}", t >> 20, t & 0xf_ffff)
    }
}

fn describe_set(s: &HashSet<u64>) -> String {
    let mut v: Vec<u64> = s.iter().copied().collect();
    v.sort();
    v.iter()
        .map(|&t| describe(t))
        .collect::<Vec<_>>()
        .join(", ")
}

enum Kind {
    Write,
    /// The tags each block may be read as.
    Read(Vec<HashSet<u64>>),
}

struct Pending {
    kind: Kind,
    block: u64,
    blocks: u64,
}

/// What every guest block may contain.
struct Model {
    /// Once every request issued so far has completed.
    after: Vec<HashSet<u64>>,
    /// At any moment from now until the next request that does not race.
    now: Vec<HashSet<u64>>,
    /// Writes in flight per block.
    writes: Vec<u32>,
}

impl Model {
    fn new() -> Model {
        let zero: HashSet<u64> = [ZERO].into_iter().collect();
        Model {
            after: vec![zero.clone(); BLOCKS as usize],
            now: vec![zero; BLOCKS as usize],
            writes: vec![0; BLOCKS as usize],
        }
    }
}

struct Run {
    engine: Engine,
    round: u64,
    img: std::sync::Arc<Img>,
    queues: [Box<dyn AioQueue<AlignedBuf>>; 2],
    pending: HashMap<u64, Pending>,
    model: Model,
    next_id: u64,
    out: Vec<Completion<AlignedBuf>>,
}

impl Run {
    fn ctx(&self) -> String {
        format!("{} round {}", self.engine.name(), self.round)
    }

    /// Block `b` takes value `v`; `done` for synchronous operations (they
    /// have completed when this is called), else a write goes in flight.
    fn apply(&mut self, b: u64, v: u64, done: bool) {
        let m = &mut self.model;
        let i = b as usize;
        if m.writes[i] == 0 {
            m.after[i] = [v].into_iter().collect();
            if done {
                m.now[i] = m.after[i].clone();
            } else {
                m.now[i].insert(v);
            }
        } else {
            m.after[i].insert(v);
            m.now[i].insert(v);
        }
        if !done {
            m.writes[i] += 1;
        }
        for p in self.pending.values_mut() {
            if let Kind::Read(ok) = &mut p.kind {
                if (p.block..p.block + p.blocks).contains(&b) {
                    ok[(b - p.block) as usize].insert(v);
                }
            }
        }
    }

    fn submit_write(&mut self, q: usize, block: u64, blocks: u64) {
        self.next_id += 1;
        let id = self.next_id;
        let mut buf = AlignedBuf::new((blocks * BS) as usize, 4096);
        for (k, chunk) in buf.as_mut_slice().chunks_mut(BS as usize).enumerate() {
            let t = tag(id, block + k as u64);
            for w in chunk.chunks_mut(8) {
                w.copy_from_slice(&t.to_ne_bytes());
            }
        }
        for k in 0..blocks {
            self.apply(block + k, tag(id, block + k), false);
        }
        self.pending.insert(
            id,
            Pending {
                kind: Kind::Write,
                block,
                blocks,
            },
        );
        // The buffer travels with the request until its completion is reaped.
        self.queues[q].submit(AioRequest::write(block * BS, buf, id));
    }

    fn submit_read(&mut self, q: usize, block: u64, blocks: u64) {
        self.next_id += 1;
        let id = self.next_id;
        let buf = AlignedBuf::new((blocks * BS) as usize, 4096);
        let ok = (block..block + blocks)
            .map(|b| self.model.now[b as usize].clone())
            .collect();
        self.pending.insert(
            id,
            Pending {
                kind: Kind::Read(ok),
                block,
                blocks,
            },
        );
        self.queues[q].submit(AioRequest::read(block * BS, buf, id));
    }

    /// Checks that every block of `data` (starting at guest block `block`)
    /// holds one of the tags in `ok`.
    fn verify(&self, what: &str, block: u64, data: &[u8], ok: &[HashSet<u64>]) {
        for (k, chunk) in data.chunks(BS as usize).enumerate() {
            let b = block + k as u64;
            for (w, word) in chunk.chunks(8).enumerate() {
                let t = u64::from_ne_bytes(word.try_into().unwrap());
                assert!(
                    ok[k].contains(&t),
                    "{}: {what}: guest block {b} (offset {:#x}) holds {} at word {w} of {WORDS}; \
                     it may only hold one of: {}",
                    self.ctx(),
                    b * BS,
                    describe(t),
                    describe_set(&ok[k]),
                );
            }
        }
    }

    fn reap(&mut self, q: usize, min: usize) {
        let mut out = std::mem::take(&mut self.out);
        self.queues[q].wait(min, &mut out).unwrap();
        for c in out.drain(..) {
            if let Err(e) = &c.result {
                panic!("{}: request {} failed: {e}", self.ctx(), c.user_data);
            }
            let p = self.pending.remove(&c.user_data).expect("known request");
            match &p.kind {
                Kind::Write => {
                    for b in p.block..p.block + p.blocks {
                        let i = b as usize;
                        self.model.writes[i] -= 1;
                        if self.model.writes[i] == 0 {
                            self.model.now[i] = self.model.after[i].clone();
                        }
                    }
                }
                Kind::Read(ok) => {
                    let buf = c.buf.as_ref().expect("a read returns its buffer");
                    self.verify(
                        &format!("read #{}", c.user_data),
                        p.block,
                        buf.as_slice(),
                        ok,
                    );
                }
            }
        }
        self.out = out;
    }

    fn drain(&mut self, q: usize) {
        while self.queues[q].in_flight() > 0 {
            self.reap(q, 1);
        }
    }

    fn discard(&mut self, cluster: u64, clusters: u64) {
        self.img.discard(cluster * CS, clusters * CS).unwrap();
        for b in cluster * CS / BS..(cluster + clusters) * CS / BS {
            self.apply(b, ZERO, true);
        }
    }

    fn write_zeroes(&mut self, block: u64, blocks: u64, unmap: bool) {
        self.img
            .write_zeroes(block * BS, blocks * BS, unmap)
            .unwrap();
        for b in block..block + blocks {
            self.apply(b, ZERO, true);
        }
    }

    /// A synchronous write through the backend API.
    fn write_sync(&mut self, block: u64, blocks: u64) {
        self.next_id += 1;
        let id = self.next_id;
        let mut data = vec![0u8; (blocks * BS) as usize];
        for (k, chunk) in data.chunks_mut(BS as usize).enumerate() {
            let t = tag(id, block + k as u64);
            for w in chunk.chunks_mut(8) {
                w.copy_from_slice(&t.to_ne_bytes());
            }
        }
        self.img.write_at(&data, block * BS).unwrap();
        for k in 0..blocks {
            self.apply(block + k, tag(id, block + k), true);
        }
    }

    /// Reads every block back (nothing in flight) and checks it exactly
    /// where no requests raced.
    fn check_all(&self) -> Vec<u8> {
        let mut data = vec![0u8; (BLOCKS * BS) as usize];
        self.img.read_at(&mut data, 0).unwrap();
        self.verify("final contents", 0, &data, &self.model.after);
        data
    }
}

/// The reuse races in a fixed order: a write (then a read) mapped by queue 0
/// and still pending while its cluster is discarded and queue 1 writes to
/// other, unallocated clusters.
fn scripted(r: &mut Run) {
    // Write, discard, write elsewhere.
    r.submit_write(0, 0, 2);
    r.discard(0, 1);
    r.submit_write(1, 2 * BS_PER_C, 2);
    r.drain(1);
    r.write_sync(4 * BS_PER_C, 2);
    r.drain(0);
    r.check_all();

    // Read, discard, write elsewhere.
    r.submit_write(1, 6 * BS_PER_C, 2);
    r.drain(1);
    r.submit_read(0, 6 * BS_PER_C, 2);
    r.discard(6, 1);
    r.submit_write(1, 8 * BS_PER_C, 2);
    r.drain(1);
    r.drain(0);

    // Write, write-zeroes with unmap, partial write elsewhere (the new
    // cluster's other half is zero-filled synchronously).
    r.submit_write(0, 10 * BS_PER_C, 2);
    r.write_zeroes(10 * BS_PER_C, 2, true);
    r.submit_write(1, 12 * BS_PER_C + 1, 1);
    r.drain(1);
    r.drain(0);
    r.check_all();
}

const BS_PER_C: u64 = CS / BS;

fn random_ops(r: &mut Run, rng: &mut Rng, ops: usize) {
    for _ in 0..ops {
        let q = rng.below(2) as usize;
        let blocks = 1 + rng.below(3);
        let block = rng.below(BLOCKS - blocks + 1);
        match rng.below(100) {
            0..=29 => r.submit_write(q, block, blocks),
            30..=44 => r.submit_read(q, block, blocks),
            45..=59 => {
                let n = 1 + rng.below(2);
                r.discard(rng.below(CLUSTERS - n + 1), n)
            }
            60..=66 => r.write_zeroes(block, blocks, true),
            67..=70 => r.write_zeroes(block, blocks, false),
            71..=76 => r.write_sync(block, blocks),
            77..=91 => r.reap(q, 1),
            _ => r.drain(q),
        }
        for q in 0..2 {
            if r.queues[q].in_flight() >= 12 {
                r.reap(q, 1);
            }
        }
    }
    r.drain(0);
    r.drain(1);
}

fn open(path: &Path) -> Img {
    let f = RawFile::open(
        path,
        RawOptions {
            cache: CacheMode::None,
            growable: true,
            ..Default::default()
        },
    )
    .unwrap();
    Qcow2::open(f, Qcow2Options::default()).unwrap()
}

fn run_engine(engine: Engine, rounds: u64, ops: usize) {
    require_qemu();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_0000 + engine as u64);
    for round in 0..rounds {
        let path = dir.path().join(format!("{}-{round}.qcow2", engine.name()));
        qcow2::create_path(
            &path,
            &CreateOptions {
                size: CLUSTERS * CS,
                cluster_size: CS,
                // Half the rounds without write barriers between metadata
                // updates, which makes them cheap.
                lazy_refcounts: round % 2 == 1,
                ..Default::default()
            },
        )
        .unwrap();
        let img = std::sync::Arc::new(open(&path));
        let mut r = Run {
            engine,
            round,
            queues: [engine.queue(&img), engine.queue(&img)],
            img,
            pending: HashMap::new(),
            model: Model::new(),
            next_id: 0,
            out: Vec::new(),
        };
        scripted(&mut r);
        random_ops(&mut r, &mut rng, ops);
        let contents = r.check_all();
        let Run { img, queues, .. } = r;
        drop(queues);
        let img = std::sync::Arc::into_inner(img).expect("queues dropped");
        img.close().unwrap();
        drop(img);

        let (code, corruptions, leaks, errors) = qemu_check(&path);
        assert_eq!(
            (code, corruptions, leaks, errors),
            (0, 0, 0, 0),
            "{} round {round}: qemu-img check",
            engine.name()
        );
        // QEMU reads the same guest contents.
        let raw = dir.path().join(format!("{}-{round}.raw", engine.name()));
        ok(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", p(&path), p(&raw)],
        );
        let theirs = std::fs::read(&raw).unwrap();
        assert!(
            theirs == contents,
            "{} round {round}: qemu-img convert disagrees with our reads",
            engine.name()
        );
    }
}

#[cfg(feature = "io_uring")]
#[test]
fn uring_never_reuses_clusters_with_io_in_flight() {
    run_engine(Engine::Uring, 10, 2000);
}

#[test]
fn threads_never_reuse_clusters_with_io_in_flight() {
    run_engine(Engine::Threads, 10, 2000);
}

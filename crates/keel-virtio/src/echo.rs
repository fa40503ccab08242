//! The echo device: the smallest complete virtio device, used to test transports end to
//! end, and a model for writing others. A test device, behind the `test-utils` feature.
//!
//! - Device type [`ECHO_DEVICE_TYPE`] (0x3f, a project-local ID), one queue of up to 256.
//! - Features: VERSION_1, EVENT_IDX, INDIRECT_DESC.
//! - Configuration: `le32 magic` = [`ECHO_MAGIC`] at 0 (read-only), `u8 xor` at 4.
//! - A request is a chain of device-readable descriptors (the payload, any split) followed
//!   by device-writable ones; the device writes the payload back with every byte XORed
//!   with `xor`, up to the writable capacity, and reports the bytes written as used
//!   length. Writing `xor` raises a configuration-change interrupt.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

use keel_memory::GuestMemoryMmap;
use virtio_queue::Queue;

use crate::device::{
    ActivateContext, ActivateError, InterruptKind, NeedsReset, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::worker::{drain_queue, IndirectDesc, QueueWorker};
use keel_bus::ErrorChain;

/// The echo device's virtio device type: a project-local ID, not in
/// `virtio_bindings::virtio_ids` (virtio 1.2 section 5 assigns none to 0x3f).
pub const ECHO_DEVICE_TYPE: u32 = 0x3f;
/// The value of the configuration's `magic` field ("ECHO").
pub const ECHO_MAGIC: u32 = 0x4f48_4345;
const QUEUE_SIZES: [u16; 1] = [256];

/// The echo device.
#[derive(Default)]
pub struct Echo {
    xor: Arc<Mutex<u8>>,
    worker: Option<QueueWorker>,
}

impl Echo {
    /// A new echo device.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Bytes echoed per chain at most: a chain may describe up to 4 GiB per descriptor.
const MAX_ECHO: u32 = 1 << 20;

/// Handles one request chain (its first [`MAX_ECHO`] bytes); returns the bytes written.
fn echo_chain(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    xor: u8,
) -> u32 {
    // Malformed chains (loops, out-of-memory addresses) make the reader or writer fail:
    // the request completes with nothing written.
    let Ok(mut reader) = chain.clone().reader(mem) else {
        return 0;
    };
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let mut buf = [0u8; 512];
    let mut written = 0u32;
    loop {
        // At most what a used element can report: a chain whose descriptors point at the
        // same memory again and again can claim far more.
        let room = writer
            .available_bytes()
            .min(buf.len())
            .min((MAX_ECHO - written) as usize);
        if room == 0 {
            break;
        }
        let n = match reader.read(&mut buf[..room]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for b in &mut buf[..n] {
            *b ^= xor;
        }
        match writer.write(&buf[..n]) {
            // `w` is at most `room`, so this stays within MAX_ECHO.
            Ok(w) => written += w as u32,
            Err(_) => break,
        }
    }
    written
}

fn serve(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    indirect: IndirectDesc,
    xor: &Mutex<u8>,
    interrupt: &dyn VirtioInterrupt,
    needs_reset: &NeedsReset,
) -> bool {
    let x = *xor.lock().unwrap_or_else(PoisonError::into_inner);
    match drain_queue(queue, mem, indirect, |chain| echo_chain(chain, mem, x)) {
        Ok(d) => {
            if d.interrupt {
                if let Err(e) = interrupt.trigger(InterruptKind::Queue(0)) {
                    log::warn!("echo: {}", ErrorChain(&e));
                }
            }
            d.more
        }
        Err(e) => {
            log::warn!("echo: {}", ErrorChain(&e));
            needs_reset.report();
            false
        }
    }
}

impl VirtioDevice for Echo {
    fn device_type(&self) -> u32 {
        ECHO_DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(&ECHO_MAGIC.to_le_bytes());
        cfg[4] = *self.xor.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        // Only `xor` is writable.
        match (offset, data.first()) {
            (4, Some(&v)) => {
                *self.xor.lock().unwrap_or_else(PoisonError::into_inner) = v;
                true
            }
            _ => false,
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues;
        let Some(pos) = queues.iter().position(|q| q.index == 0) else {
            return Err(ActivateError::MissingQueue(0));
        };
        let q = queues.swap_remove(pos);
        let notifier = q.notifier.clone();
        let mut queue = q.queue;
        let (mem, xor, interrupt, needs_reset) =
            (ctx.mem, self.xor.clone(), ctx.interrupt, ctx.needs_reset);
        let indirect = IndirectDesc::from_features(ctx.features);
        let worker = QueueWorker::spawn("keel-virtio-echo", vec![(0, notifier)], move |_| {
            serve(
                &mut queue,
                &mem,
                indirect,
                &xor,
                interrupt.as_ref(),
                &needs_reset,
            )
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        *self.xor.lock().unwrap_or_else(PoisonError::into_inner) = 0;
    }
}

//! MSI: a 64-bit capability with per-vector masking, 1 to 32 vectors.

use std::sync::Arc;

use keel_bus::interrupt::{MsiGroup, MsiMessage};

use crate::config::{cap_id, ConfigError, ConfigSpace};
use keel_bus::ErrorChain;

const CTRL_ENABLE: u16 = 1;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;
const CAP_LEN: usize = 24;

/// An MSI capability and its state.
pub struct Msi {
    cap: usize,
    vectors: u32,
    pending: u32,
    masked: Vec<bool>,
    group: Arc<dyn MsiGroup>,
}

impl Msi {
    /// Adds the capability for `vectors` vectors (a power of two, 1 to 32).
    pub fn new(
        cfg: &mut ConfigSpace,
        vectors: u32,
        group: Arc<dyn MsiGroup>,
    ) -> Result<Self, ConfigError> {
        if !vectors.is_power_of_two() || vectors > 32 || vectors as usize > group.len() {
            return Err(ConfigError::InvalidVectors {
                count: vectors,
                group: group.len(),
            });
        }
        let mmc = vectors.trailing_zeros() as u16;
        let ctrl = (mmc << 1) | CTRL_64BIT | CTRL_PER_VECTOR_MASK;
        let mut body = vec![0u8; CAP_LEN - 2];
        body[..2].copy_from_slice(&ctrl.to_le_bytes());
        let mut w = vec![0u8; CAP_LEN - 2];
        w[..2].copy_from_slice(&(CTRL_ENABLE | (0b111 << 4)).to_le_bytes()); // enable, MME
        w[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes()); // address low
        w[6..10].copy_from_slice(&[0xff; 4]); // address high
        w[10..12].copy_from_slice(&[0xff; 2]); // data
        let mask_bits = if vectors == 32 {
            u32::MAX
        } else {
            (1 << vectors) - 1
        };
        w[14..18].copy_from_slice(&mask_bits.to_le_bytes()); // per-vector mask
        let cap = cfg.add_capability(cap_id::MSI, &body, &w)?;
        Ok(Msi {
            cap,
            vectors,
            pending: 0,
            masked: vec![true; vectors as usize],
            group,
        })
    }

    /// Offset of the capability in configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap
    }

    /// Whether `[offset, offset+len)` overlaps the capability.
    pub fn covers(&self, offset: usize, len: usize) -> bool {
        offset < self.cap + CAP_LEN && offset + len > self.cap
    }

    /// Whether the guest enabled MSI.
    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.read_u16(self.cap + 2) & CTRL_ENABLE != 0
    }

    /// Vectors the guest enabled (multiple message enable, capped at what is offered).
    fn enabled_vectors(&self, cfg: &ConfigSpace) -> u32 {
        let mme = (cfg.read_u16(self.cap + 2) >> 4) & 0b111;
        (1u32 << mme.min(5)).min(self.vectors)
    }

    fn message(&self, cfg: &ConfigSpace, v: u32) -> MsiMessage {
        let n = self.enabled_vectors(cfg);
        let data = u32::from(cfg.read_u16(self.cap + 12));
        MsiMessage {
            address: u64::from(cfg.read_u32(self.cap + 4))
                | (u64::from(cfg.read_u32(self.cap + 8)) << 32),
            // With several vectors, the low bits of the data select the vector.
            data: (data & !(n - 1)) | v,
        }
    }

    fn masked(&self, cfg: &ConfigSpace, v: u32) -> bool {
        !self.enabled(cfg)
            || v >= self.enabled_vectors(cfg)
            || cfg.read_u32(self.cap + 16) >> v & 1 != 0
    }

    /// Call after every configuration write that touched the capability.
    pub fn written(&mut self, cfg: &ConfigSpace) {
        for v in 0..self.vectors {
            let masked = self.masked(cfg, v);
            if let Err(e) = self
                .group
                .configure(v as usize, self.message(cfg, v), masked)
            {
                log::warn!("MSI vector {v}: {}", ErrorChain(&e));
            }
            let was = std::mem::replace(&mut self.masked[v as usize], masked);
            if was && !masked && self.pending & (1 << v) != 0 {
                self.pending &= !(1 << v);
                if let Err(e) = self.group.trigger(v as usize) {
                    log::warn!("MSI vector {v}: {}", ErrorChain(&e));
                }
            }
        }
    }

    /// The pending-bits register as the guest reads it.
    pub fn pending_bits(&self) -> u32 {
        (0..self.vectors).fold(self.pending, |acc, v| {
            let held =
                self.masked[v as usize] && self.group.is_pending(v as usize).unwrap_or(false);
            acc | (u32::from(held) << v)
        })
    }

    /// Offset of the pending-bits register (read-only, computed on read).
    pub fn pending_offset(&self) -> usize {
        self.cap + 20
    }

    /// Raises vector `v`: delivered now, or held pending while masked.
    pub fn trigger(&mut self, cfg: &ConfigSpace, v: u32) {
        if v >= self.vectors {
            return;
        }
        if self.masked(cfg, v) {
            self.pending |= 1 << v;
        } else if let Err(e) = self.group.trigger(v as usize) {
            log::warn!("MSI vector {v}: {}", ErrorChain(&e));
        }
    }
}

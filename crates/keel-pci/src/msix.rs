//! MSI-X: the capability, the vector table and the pending-bit array.
//!
//! The table and PBA live in a BAR. The model keeps the keel-bus [`MsiGroup`] in step with
//! the guest's table: each vector is configured with its message and an effective mask
//! (vector mask, or function mask, or MSI-X disabled). A vector raised while masked is
//! pending, in this model's PBA or in the group (an irqfd-backed group holds signals a
//! device raised through its notifier); unmasking delivers it once.

use std::sync::Arc;

use keel_bus::interrupt::{MsiGroup, MsiMessage};

use crate::config::{cap_id, ConfigError, ConfigSpace};
use keel_bus::ErrorChain;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Most vectors an MSI-X capability can describe.
pub const MAX_VECTORS: u16 = 2048;

const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// Where the table and PBA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors (1 to 2048).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixLayout {
    /// Table size in bytes.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }
    /// PBA size in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// An MSI-X capability and its state.
pub struct Msix {
    layout: MsixLayout,
    cap: usize,
    /// The table as the guest sees it, 16 bytes per vector.
    table: Vec<u8>,
    /// Pending bits of vectors raised through [`Msix::trigger`] while masked.
    pending: Vec<bool>,
    /// The effective mask last given to the group, per vector.
    masked: Vec<bool>,
    group: Arc<dyn MsiGroup>,
}

impl Msix {
    /// Adds the capability to `cfg`. Vectors start masked, MSI-X disabled.
    ///
    /// The vector count must be 1 to [`MAX_VECTORS`] and at most the group's size, else
    /// [`ConfigError::InvalidVectors`].
    pub fn new(
        cfg: &mut ConfigSpace,
        layout: MsixLayout,
        group: Arc<dyn MsiGroup>,
    ) -> Result<Self, ConfigError> {
        if !(1..=MAX_VECTORS).contains(&layout.vectors) || usize::from(layout.vectors) > group.len()
        {
            return Err(ConfigError::InvalidVectors {
                count: u32::from(layout.vectors),
                group: group.len(),
            });
        }
        let ctrl = layout.vectors - 1;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&ctrl.to_le_bytes());
        body.extend_from_slice(&(layout.table_offset | u32::from(layout.table_bar)).to_le_bytes());
        body.extend_from_slice(&(layout.pba_offset | u32::from(layout.pba_bar)).to_le_bytes());
        let mut writable = vec![0u8; 10];
        writable[..2].copy_from_slice(&(CTRL_ENABLE | CTRL_FUNCTION_MASK).to_le_bytes());
        let cap = cfg.add_capability(cap_id::MSIX, &body, &writable)?;
        let n = usize::from(layout.vectors);
        let mut table = vec![0u8; n * ENTRY_SIZE as usize];
        for e in table.chunks_mut(ENTRY_SIZE as usize) {
            e[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        }
        Ok(Msix {
            layout,
            cap,
            table,
            pending: vec![false; n],
            masked: vec![true; n],
            group,
        })
    }

    /// The table and PBA placement.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Offset of the capability in configuration space.
    pub fn cap_offset(&self) -> usize {
        self.cap
    }

    fn control(&self, cfg: &ConfigSpace) -> u16 {
        cfg.read_u16(self.cap + 2)
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        self.control(cfg) & CTRL_ENABLE != 0
    }

    fn entry_u32(&self, v: usize, field: usize) -> u32 {
        let at = v * ENTRY_SIZE as usize + field;
        u32::from_le_bytes(self.table[at..at + 4].try_into().expect("4 bytes"))
    }

    fn message(&self, v: usize) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.entry_u32(v, 0)) | (u64::from(self.entry_u32(v, 4)) << 32),
            data: self.entry_u32(v, 8),
        }
    }

    fn effective_mask(&self, cfg: &ConfigSpace, v: usize) -> bool {
        let ctrl = self.control(cfg);
        ctrl & CTRL_ENABLE == 0
            || ctrl & CTRL_FUNCTION_MASK != 0
            || self.entry_u32(v, 12) & VECTOR_MASKED != 0
    }

    /// Pushes vector `v`'s state to the group, and delivers a pending signal if the
    /// vector just became unmasked.
    fn sync(&mut self, cfg: &ConfigSpace, v: usize) {
        let masked = self.effective_mask(cfg, v);
        if let Err(e) = self.group.configure(v, self.message(v), masked) {
            log::warn!("MSI-X vector {v}: {}", ErrorChain(&e));
        }
        if self.masked[v] && !masked && std::mem::take(&mut self.pending[v]) {
            if let Err(e) = self.group.trigger(v) {
                log::warn!("MSI-X vector {v}: {}", ErrorChain(&e));
            }
        }
        self.masked[v] = masked;
    }

    /// Call after every configuration write that touched the capability.
    pub fn control_written(&mut self, cfg: &ConfigSpace) {
        for v in 0..self.pending.len() {
            self.sync(cfg, v);
        }
    }

    /// Whether `[offset, offset+len)` of `bar` falls in the table or PBA.
    pub fn claims(&self, bar: u8, offset: u64, len: usize) -> bool {
        let end = offset.saturating_add(len as u64);
        let within =
            |base: u32, size: u64| offset >= u64::from(base) && end <= u64::from(base) + size;
        (bar == self.layout.table_bar && within(self.layout.table_offset, self.layout.table_len()))
            || (bar == self.layout.pba_bar && within(self.layout.pba_offset, self.layout.pba_len()))
    }

    /// A guest read in the table or PBA (`claims` must hold).
    pub fn read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        let l = self.layout;
        if bar == l.table_bar
            && offset >= u64::from(l.table_offset)
            && offset < u64::from(l.table_offset) + l.table_len()
        {
            let at = (offset - u64::from(l.table_offset)) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.table.get(at + i).copied().unwrap_or(0);
            }
            return;
        }
        // PBA: one bit per vector.
        let at = (offset - u64::from(l.pba_offset)) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            let mut byte = 0u8;
            for bit in 0..8 {
                let v = (at + i) * 8 + bit;
                if v < self.pending.len() && self.is_pending(v) {
                    byte |= 1 << bit;
                }
            }
            *b = byte;
        }
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending[v] || (self.masked[v] && self.group.is_pending(v).unwrap_or(false))
    }

    /// A guest write in the table (PBA writes are ignored: it is read-only).
    pub fn write(&mut self, cfg: &ConfigSpace, bar: u8, offset: u64, data: &[u8]) {
        let l = self.layout;
        if bar != l.table_bar
            || offset < u64::from(l.table_offset)
            || offset >= u64::from(l.table_offset) + l.table_len()
        {
            return;
        }
        let at = (offset - u64::from(l.table_offset)) as usize;
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let pos = at + i;
            let Some(slot) = self.table.get_mut(pos) else {
                continue;
            };
            // In vector control only the mask bit is writable.
            let field = pos % ENTRY_SIZE as usize;
            *slot = match field {
                12 => b & VECTOR_MASKED as u8,
                13..=15 => 0,
                _ => b,
            };
            let v = pos / ENTRY_SIZE as usize;
            if touched.last() != Some(&v) {
                touched.push(v);
            }
        }
        for v in touched {
            self.sync(cfg, v);
        }
    }

    /// Raises vector `v`: delivered now, or held pending while masked.
    pub fn trigger(&mut self, cfg: &ConfigSpace, v: usize) {
        if v >= self.pending.len() {
            return;
        }
        if self.effective_mask(cfg, v) {
            self.pending[v] = true;
        } else if let Err(e) = self.group.trigger(v) {
            log::warn!("MSI-X vector {v}: {}", ErrorChain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_bus::interrupt::Result;
    use vmm_sys_util::eventfd::EventFd;

    struct Group(usize);
    impl MsiGroup for Group {
        fn len(&self) -> usize {
            self.0
        }
        fn configure(&self, _: usize, _: MsiMessage, _: bool) -> Result<()> {
            Ok(())
        }
        fn trigger(&self, _: usize) -> Result<()> {
            Ok(())
        }
        fn is_pending(&self, _: usize) -> Result<bool> {
            Ok(false)
        }
        fn notifier(&self, _: usize) -> Option<&EventFd> {
            None
        }
    }

    fn layout(vectors: u16) -> MsixLayout {
        MsixLayout {
            vectors,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x8000,
        }
    }

    #[test]
    fn bad_vector_counts_are_errors() {
        let mut cfg = ConfigSpace::new(1, 2, 3, 4, 5);
        for (vectors, group) in [(0, 4), (5, 4), (MAX_VECTORS + 1, 4096)] {
            assert_eq!(
                Msix::new(&mut cfg, layout(vectors), Arc::new(Group(group))).err(),
                Some(ConfigError::InvalidVectors {
                    count: u32::from(vectors),
                    group
                }),
                "{vectors} vectors, group of {group}"
            );
        }
        assert!(cfg.capabilities().is_empty(), "nothing added on error");
        let m = Msix::new(&mut cfg, layout(MAX_VECTORS), Arc::new(Group(4096))).unwrap();
        assert_eq!(cfg.capabilities(), vec![(m.cap_offset(), cap_id::MSIX)]);
        assert_eq!(cfg.read_u16(m.cap_offset() + 2), MAX_VECTORS - 1);
    }
}

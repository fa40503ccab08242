//! Base address registers: kinds, the sizing protocol and address decoding.
//!
//! A BAR of size S keeps only the address bits above log2(S) writable, so a guest that
//! writes all ones reads back the size mask with the type bits: the sizing protocol falls
//! out of the configuration space's write masks.

use crate::config::{command, reg, ConfigSpace};

/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory space.
    Memory32 {
        /// Prefetchable (no read side effects).
        prefetchable: bool,
    },
    /// 64-bit memory space; uses two consecutive BAR registers.
    Memory64 {
        /// Prefetchable (no read side effects).
        prefetchable: bool,
    },
    /// I/O port space.
    Io,
}

impl BarKind {
    /// Whether this BAR lives in I/O port space.
    pub fn is_io(self) -> bool {
        self == BarKind::Io
    }
}

/// Errors in a BAR description.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BarError {
    /// Sizes are powers of two: memory at least 16 bytes, I/O 4 to 256 bytes, 32-bit
    /// memory at most 2 GiB.
    #[error("invalid size {size:#x} for a {kind:?} BAR")]
    BadSize {
        /// Requested size.
        size: u64,
        /// Its kind.
        kind: BarKind,
    },
    /// The BAR index is past the six registers (or a 64-bit BAR starts at the last one).
    #[error("BAR {0} does not exist (or has no room for a 64-bit pair)")]
    BadIndex(usize),
    /// The register (or the pair's upper half) is already taken.
    #[error("BAR {0} is already defined")]
    Taken(usize),
}

/// A BAR's kind and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// What it decodes.
    pub kind: BarKind,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl BarSpec {
    /// A 32-bit memory BAR.
    pub fn mem32(size: u64, prefetchable: bool) -> Result<Self, BarError> {
        Self::checked(BarKind::Memory32 { prefetchable }, size)
    }
    /// A 64-bit memory BAR.
    pub fn mem64(size: u64, prefetchable: bool) -> Result<Self, BarError> {
        Self::checked(BarKind::Memory64 { prefetchable }, size)
    }
    /// An I/O BAR.
    pub fn io(size: u64) -> Result<Self, BarError> {
        Self::checked(BarKind::Io, size)
    }

    fn checked(kind: BarKind, size: u64) -> Result<Self, BarError> {
        let ok = size.is_power_of_two()
            && match kind {
                BarKind::Io => (4..=256).contains(&size),
                BarKind::Memory32 { .. } => (16..=1 << 31).contains(&size),
                BarKind::Memory64 { .. } => (16..=1 << 62).contains(&size),
            };
        if ok {
            Ok(BarSpec { kind, size })
        } else {
            Err(BarError::BadSize { size, kind })
        }
    }

    /// The read-only type bits in the low dword.
    fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0b01,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0b100 | (u32::from(prefetchable) << 3),
        }
    }

    /// Writes the type bits and write masks for BAR `index` into `cfg`.
    pub(crate) fn install(&self, cfg: &mut ConfigSpace, index: usize) {
        let off = reg::BAR0 + 4 * index;
        let addr_mask = !(self.size - 1);
        let low_flags = if self.kind.is_io() { 0x3 } else { 0xf };
        cfg.set_u32(off, self.type_bits());
        cfg.set_writable_u32(off, (addr_mask as u32) & !low_flags);
        if let BarKind::Memory64 { .. } = self.kind {
            cfg.set_u32(off + 4, 0);
            cfg.set_writable_u32(off + 4, (addr_mask >> 32) as u32);
        }
    }

    /// The address currently programmed into BAR `index` (ignoring the command register).
    pub fn address(&self, cfg: &ConfigSpace, index: usize) -> u64 {
        let off = reg::BAR0 + 4 * index;
        let low = cfg.read_u32(off);
        match self.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Memory32 { .. } => u64::from(low & !0xf),
            BarKind::Memory64 { .. } => {
                u64::from(low & !0xf) | (u64::from(cfg.read_u32(off + 4)) << 32)
            }
        }
    }

    /// Programs `addr` into BAR `index` from the device side (initial placement).
    pub(crate) fn set_address(&self, cfg: &mut ConfigSpace, index: usize, addr: u64) {
        let off = reg::BAR0 + 4 * index;
        cfg.set_u32(off, (addr as u32 & !0xf) | self.type_bits());
        if let BarKind::Memory64 { .. } = self.kind {
            cfg.set_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// Where the BAR decodes now: `None` when decoding of its space is off in the command
    /// register, when it holds 0 (unassigned), or when the range would not fit its space
    /// (for example while a guest sizes it with decoding left on).
    pub fn decoded(&self, cfg: &ConfigSpace, index: usize) -> Option<u64> {
        let enable = if self.kind.is_io() {
            command::IO
        } else {
            command::MEMORY
        };
        if cfg.command() & enable == 0 {
            return None;
        }
        let addr = self.address(cfg, index);
        let limit: u64 = match self.kind {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 { .. } => 1 << 32,
            // Beyond any guest's physical address width.
            BarKind::Memory64 { .. } => 1 << 52,
        };
        // Like QEMU, a range touching the very top of its space is not decoded: that is
        // where a BAR sits while a guest sizes it with decoding left on.
        let end = addr.checked_add(self.size)?;
        (addr != 0 && end < limit).then_some(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ConfigSpace {
        ConfigSpace::new(1, 2, 3, 4, 5)
    }

    fn size_bar(c: &mut ConfigSpace, i: usize) -> u32 {
        let off = reg::BAR0 + 4 * i;
        c.write(off, &[0xff; 4]);
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn sizing_reads_back_mask_and_type() {
        let mut c = cfg();
        BarSpec::mem32(0x1000, false).unwrap().install(&mut c, 0);
        BarSpec::io(0x40).unwrap().install(&mut c, 1);
        BarSpec::mem32(0x10_0000, true).unwrap().install(&mut c, 2);
        assert_eq!(size_bar(&mut c, 0), 0xffff_f000);
        assert_eq!(size_bar(&mut c, 1), 0xffff_ffc1);
        assert_eq!(size_bar(&mut c, 2), 0xfff0_0008);
        // Unused BARs are hard-wired to zero.
        assert_eq!(size_bar(&mut c, 5), 0);
    }

    #[test]
    fn bar64_pairs() {
        let mut c = cfg();
        let spec = BarSpec::mem64(0x2_0000_0000, true).unwrap();
        spec.install(&mut c, 2);
        assert_eq!(size_bar(&mut c, 2), 0x0000_000c);
        assert_eq!(size_bar(&mut c, 3), 0xffff_fffe);
        // Program 0x40_0000_0000 as a guest would: low dword, then high dword.
        c.write(reg::BAR0 + 8, &0u32.to_le_bytes());
        c.write(reg::BAR0 + 12, &0x40u32.to_le_bytes());
        assert_eq!(spec.address(&c, 2), 0x40_0000_0000);
        assert_eq!(spec.decoded(&c, 2), None, "memory decoding is off");
        c.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(spec.decoded(&c, 2), Some(0x40_0000_0000));
        // A small 64-bit BAR keeps the whole high dword writable.
        let mut c = cfg();
        let small = BarSpec::mem64(0x4000, false).unwrap();
        small.install(&mut c, 0);
        assert_eq!(size_bar(&mut c, 0), 0xffff_c004);
        assert_eq!(size_bar(&mut c, 1), 0xffff_ffff);
    }

    #[test]
    fn decoding_rules() {
        let mut c = cfg();
        let spec = BarSpec::mem32(0x1000, false).unwrap();
        spec.install(&mut c, 0);
        c.write(reg::COMMAND, &command::MEMORY.to_le_bytes());
        assert_eq!(spec.decoded(&c, 0), None, "address 0 is unassigned");
        c.write(reg::BAR0, &0xc000_0000u32.to_le_bytes());
        assert_eq!(spec.decoded(&c, 0), Some(0xc000_0000));
        // Sizing with decoding on: the all-ones pattern is not a usable address.
        size_bar(&mut c, 0);
        assert_eq!(spec.decoded(&c, 0), None);
        let io = BarSpec::io(0x100).unwrap();
        io.install(&mut c, 1);
        c.write(reg::BAR0 + 4, &0xc100u32.to_le_bytes());
        assert_eq!(io.decoded(&c, 1), None, "I/O decoding is off");
        c.write(reg::COMMAND, &(command::MEMORY | command::IO).to_le_bytes());
        assert_eq!(io.decoded(&c, 1), Some(0xc100));
    }

    #[test]
    fn bad_sizes() {
        assert!(BarSpec::mem32(0x1800, false).is_err());
        assert!(BarSpec::mem32(8, false).is_err());
        assert!(BarSpec::mem32(1 << 32, false).is_err());
        assert!(BarSpec::io(512).is_err());
        assert!(BarSpec::io(2).is_err());
        assert!(BarSpec::mem64(1 << 32, false).is_ok());
    }
}

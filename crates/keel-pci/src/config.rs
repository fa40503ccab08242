//! Type-0 configuration space with per-bit access masks and a capability-list builder.

/// Size of conventional configuration space. ECAM exposes 4 KiB per function; the bytes
/// above this read as zero (no extended capabilities) and ignore writes.
pub const CONFIG_SIZE: usize = 256;

/// Register offsets of the type-0 header.
pub mod reg {
    /// Vendor ID (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (u16).
    pub const COMMAND: usize = 0x04;
    /// Status (u16).
    pub const STATUS: usize = 0x06;
    /// Revision ID (u8).
    pub const REVISION: usize = 0x08;
    /// Programming interface, subclass, class (3 bytes).
    pub const CLASS_CODE: usize = 0x09;
    /// Cache line size (u8).
    pub const CACHE_LINE: usize = 0x0c;
    /// Header type (u8); bit 7 = multi-function.
    pub const HEADER_TYPE: usize = 0x0e;
    /// First BAR (six u32 registers).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Capabilities pointer (u8).
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line (u8).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (u8): 0 none, 1-4 INTA#-INTD#.
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register bits.
pub mod command {
    /// Decode I/O BARs.
    pub const IO: u16 = 1 << 0;
    /// Decode memory BARs.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master (DMA, and MSI writes).
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
    /// The bits a guest may set.
    pub const WRITABLE: u16 = IO | MEMORY | BUS_MASTER | PARITY | SERR | INTX_DISABLE;
}

/// Status register bits.
pub mod status {
    /// INTx asserted (read-only).
    pub const INTERRUPT: u16 = 1 << 3;
    /// A capability list is present (read-only).
    pub const CAPABILITIES: u16 = 1 << 4;
    /// Error bits (master data parity, target/master abort, SERR, parity): write 1 to clear.
    pub const W1C: u16 = (1 << 8) | (0b11111 << 11);
}

/// Capability IDs used here.
pub mod cap_id {
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor-specific (virtio-pci uses these).
    pub const VENDOR: u8 = 0x09;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Where capabilities start: right after the type-0 header.
const FIRST_CAP: usize = 0x40;

/// Errors from building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The capability does not fit in conventional configuration space.
    #[error("capability {id:#x} of {len} bytes does not fit (next free offset {at:#x})")]
    NoRoom {
        /// Capability ID.
        id: u8,
        /// Its length including the 2-byte header.
        len: usize,
        /// Where it would have gone.
        at: usize,
    },
    /// An MSI or MSI-X vector count the capability cannot describe, or more vectors than
    /// the interrupt group has.
    #[error("cannot offer {count} vectors (interrupt group has {group})")]
    InvalidVectors {
        /// Requested vectors.
        count: u32,
        /// Vectors in the group.
        group: usize,
    },
    /// The write mask is not the same length as the body.
    #[error("capability body and its write mask differ in length")]
    MaskLength,
}

/// 256 bytes of configuration space and, for every bit, whether the guest may write it,
/// and whether a write of 1 clears it.
///
/// All multi-byte registers are little-endian, as on the PCI bus.
#[derive(Clone)]
pub struct ConfigSpace {
    data: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    w1c: [u8; CONFIG_SIZE],
    last_cap: Option<usize>,
    next_free: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read_u16(reg::VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read_u16(reg::DEVICE_ID)),
            )
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// A type-0 header: IDs, class code (class, subclass, programming interface), and the
    /// standard writable fields (command bits, cache line size, interrupt line, W1C status).
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut c = ConfigSpace {
            data: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            w1c: [0; CONFIG_SIZE],
            last_cap: None,
            next_free: FIRST_CAP,
        };
        c.set_u16(reg::VENDOR_ID, vendor);
        c.set_u16(reg::DEVICE_ID, device);
        c.data[reg::CLASS_CODE] = prog_if;
        c.data[reg::CLASS_CODE + 1] = subclass;
        c.data[reg::CLASS_CODE + 2] = class;
        c.set_writable_u16(reg::COMMAND, command::WRITABLE);
        c.set_w1c_u16(reg::STATUS, status::W1C);
        c.writable[reg::CACHE_LINE] = 0xff;
        c.writable[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the conventional space read as 0.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.data.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write: only writable bits change, and W1C bits written as 1 clear.
    /// Bytes past the conventional space are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SIZE) else {
                continue;
            };
            let keep = self.data[o] & !self.writable[o];
            let mut new = keep | (v & self.writable[o]);
            new &= !(v & self.w1c[o]);
            self.data[o] = new;
        }
    }

    /// Reads a little-endian u16 (device-side view, no masks).
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.data[offset], self.data[offset + 1]])
    }

    /// Reads a little-endian u32 (device-side view, no masks).
    pub fn read_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.data[offset..offset + 4].try_into().expect("4 bytes"))
    }

    /// Sets a byte from the device side, ignoring masks.
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.data[offset] = v;
    }

    /// Sets a u16 from the device side, ignoring masks.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.data[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a u32 from the device side, ignoring masks.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.data[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Which bits of the u16 at `offset` the guest may write.
    pub fn set_writable_u16(&mut self, offset: usize, mask: u16) {
        self.writable[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    /// Which bits of the u32 at `offset` the guest may write.
    pub fn set_writable_u32(&mut self, offset: usize, mask: u32) {
        self.writable[offset..offset + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Which bits of the u16 at `offset` clear when the guest writes 1 to them.
    pub fn set_w1c_u16(&mut self, offset: usize, mask: u16) {
        self.w1c[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(reg::COMMAND)
    }

    /// Appends a capability: `id`, then `body` (the bytes after the ID and next pointer),
    /// with `writable` giving the guest-writable bits of the body. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        if body.len() != writable.len() {
            return Err(ConfigError::MaskLength);
        }
        let at = self.next_free;
        let len = 2 + body.len();
        if at + len > CONFIG_SIZE {
            return Err(ConfigError::NoRoom { id, len, at });
        }
        self.data[at] = id;
        self.data[at + 1] = 0;
        self.data[at + 2..at + len].copy_from_slice(body);
        self.writable[at + 2..at + len].copy_from_slice(writable);
        match self.last_cap {
            Some(prev) => self.data[prev + 1] = at as u8,
            None => self.data[reg::CAPABILITIES] = at as u8,
        }
        self.last_cap = Some(at);
        self.next_free = (at + len).next_multiple_of(4);
        let st = self.read_u16(reg::STATUS) | status::CAPABILITIES;
        self.set_u16(reg::STATUS, st);
        Ok(at)
    }

    /// The capabilities as the guest walks them: (offset, id) pairs. Stops at a loop or a
    /// pointer outside the capability area.
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut at = usize::from(self.data[reg::CAPABILITIES]) & !3;
        while (FIRST_CAP..CONFIG_SIZE - 1).contains(&at) && out.len() < 48 {
            out.push((at, self.data[at]));
            at = usize::from(self.data[at + 1]) & !3;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w16(c: &mut ConfigSpace, off: usize, v: u16) {
        c.write(off, &v.to_le_bytes());
    }
    fn r16(c: &ConfigSpace, off: usize) -> u16 {
        let mut b = [0; 2];
        c.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn read_only_bits_stay() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01, 0x00, 0x00);
        c.write(reg::VENDOR_ID, &[0xff; 4]);
        assert_eq!(r16(&c, reg::VENDOR_ID), 0x1af4);
        assert_eq!(r16(&c, reg::DEVICE_ID), 0x1042);
        // Only the defined command bits take.
        w16(&mut c, reg::COMMAND, 0xffff);
        assert_eq!(c.command(), command::WRITABLE);
        c.write(reg::CLASS_CODE, &[0xff, 0xff, 0xff]);
        assert_eq!(c.read_u32(reg::REVISION) >> 8, 0x01_00_00);
        // Writable byte registers.
        c.write(reg::INTERRUPT_LINE, &[11]);
        c.write(reg::INTERRUPT_PIN, &[4]);
        let mut b = [0; 2];
        c.read(reg::INTERRUPT_LINE, &mut b);
        assert_eq!(b, [11, 0]);
    }

    #[test]
    fn w1c_clears_only_written_ones() {
        let mut c = ConfigSpace::new(1, 2, 3, 4, 5);
        // The device raises two error bits and the (read-only) interrupt bit.
        c.set_u16(reg::STATUS, (1 << 13) | (1 << 14) | status::INTERRUPT);
        w16(&mut c, reg::STATUS, 1 << 13);
        assert_eq!(r16(&c, reg::STATUS), (1 << 14) | status::INTERRUPT);
        // Writing 0 changes nothing; writing 1 to the read-only bit changes nothing.
        w16(&mut c, reg::STATUS, status::INTERRUPT);
        assert_eq!(r16(&c, reg::STATUS), (1 << 14) | status::INTERRUPT);
        w16(&mut c, reg::STATUS, 0xffff);
        assert_eq!(r16(&c, reg::STATUS), status::INTERRUPT);
    }

    #[test]
    fn capability_chain_walk() {
        let mut c = ConfigSpace::new(1, 2, 3, 4, 5);
        assert_eq!(c.capabilities(), vec![]);
        assert_eq!(r16(&c, reg::STATUS) & status::CAPABILITIES, 0);
        let a = c
            .add_capability(cap_id::VENDOR, &[0xaa; 14], &[0; 14])
            .unwrap();
        let b = c.add_capability(cap_id::MSIX, &[0; 10], &[0; 10]).unwrap();
        let d = c
            .add_capability(cap_id::VENDOR, &[1, 2, 3], &[0xff, 0, 0])
            .unwrap();
        assert_eq!((a, b, d), (0x40, 0x50, 0x5c));
        assert_eq!(
            c.capabilities(),
            vec![
                (0x40, cap_id::VENDOR),
                (0x50, cap_id::MSIX),
                (0x5c, cap_id::VENDOR)
            ]
        );
        assert_ne!(r16(&c, reg::STATUS) & status::CAPABILITIES, 0);
        // The guest cannot rewrite the chain, only the writable body bytes.
        c.write(0x41, &[0x80]);
        c.write(0x5e, &[9, 9]);
        let mut b = [0; 2];
        c.read(0x5e, &mut b);
        assert_eq!(b, [9, 2]);
        assert_eq!(c.capabilities().len(), 3);
        // Running out of room is an error, not a panic.
        assert!(matches!(
            c.add_capability(cap_id::VENDOR, &[0; 200], &[0; 200]),
            Err(ConfigError::NoRoom { .. })
        ));
    }

    #[test]
    fn out_of_range_accesses() {
        let mut c = ConfigSpace::new(1, 2, 3, 4, 5);
        let mut b = [0xee; 4];
        c.read(0xffe, &mut b);
        assert_eq!(b, [0; 4]);
        c.write(0xfe, &[1, 2, 3, 4]); // straddles the end
        c.write(usize::MAX, &[1, 2]);
        c.read(0xfe, &mut b);
        assert_eq!(b, [0; 4]);
    }
}

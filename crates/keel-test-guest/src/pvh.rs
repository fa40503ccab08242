//! The PVH `hvm_start_info` the VMM hands over in EBX.

use crate::text::Text;

const MAGIC: u32 = 0x336e_c578;
pub const MAX_MEMMAP: usize = 128;

#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Copied out of guest memory at boot, so the `memory` scenario may
/// overwrite the original.
pub struct BootInfo {
    pub version: u32,
    pub rsdp: u64,
    cmdline: [u8; 4096],
    cmdline_len: usize,
    memmap: [MemEntry; MAX_MEMMAP],
    memmap_len: usize,
    pub memmap_truncated: bool,
}

fn read_u32(base: u64, off: u64) -> u32 {
    // SAFETY: `base + off` is below 4 GiB (identity-mapped): callers read
    // within the 40-byte version-0 struct, the 56-byte version-1 struct
    // (only when version >= 1), or memory map entries the VMM described.
    unsafe { core::ptr::read_unaligned((base + off) as *const u32) }
}

fn read_u64(base: u64, off: u64) -> u64 {
    // SAFETY: as read_u32.
    unsafe { core::ptr::read_unaligned((base + off) as *const u64) }
}

impl BootInfo {
    pub fn parse(addr: u64) -> Result<Self, Text<160>> {
        let mut err = Text::new();
        if addr == 0 || addr >= (1 << 32) - 64 {
            use core::fmt::Write;
            let _ = write!(err, "no hvm_start_info (EBX = {addr:#x}); boot through PVH");
            return Err(err);
        }
        let magic = read_u32(addr, 0);
        if magic != MAGIC {
            use core::fmt::Write;
            let _ = write!(err, "bad hvm_start_info magic {magic:#x} at {addr:#x}");
            return Err(err);
        }
        let mut info = BootInfo {
            version: read_u32(addr, 4),
            rsdp: read_u64(addr, 32),
            cmdline: [0; 4096],
            cmdline_len: 0,
            memmap: [MemEntry::default(); MAX_MEMMAP],
            memmap_len: 0,
            memmap_truncated: false,
        };
        let cmdline = read_u64(addr, 24);
        if cmdline != 0 && cmdline < (1 << 32) - 4096 {
            while info.cmdline_len < info.cmdline.len() {
                // SAFETY: identity-mapped address below 4 GiB; the VMM put a
                // NUL-terminated string there and we stop at the NUL.
                let b = unsafe {
                    core::ptr::read_volatile((cmdline + info.cmdline_len as u64) as *const u8)
                };
                if b == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = b;
                info.cmdline_len += 1;
            }
        }
        if info.version >= 1 {
            let map = read_u64(addr, 40);
            let n = read_u32(addr, 48) as usize;
            if map != 0 && map < (1 << 32) {
                info.memmap_truncated = n > MAX_MEMMAP;
                for i in 0..n.min(MAX_MEMMAP) {
                    let e = map + 24 * i as u64;
                    info.memmap[i] = MemEntry {
                        addr: read_u64(e, 0),
                        size: read_u64(e, 8),
                        kind: read_u32(e, 16),
                    };
                }
                info.memmap_len = n.min(MAX_MEMMAP);
            }
        }
        Ok(info)
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// `NAME` from `keel.test=NAME` on the command line.
    pub fn scenario(&self) -> Option<&str> {
        self.cmdline()
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix("keel.test="))
    }

    pub fn memmap(&self) -> &[MemEntry] {
        &self.memmap[..self.memmap_len]
    }
}

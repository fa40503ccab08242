//! The persistent dirty bitmaps' directory (read only: names, granularity, flags).

use super::header::Header;
use crate::backend::BlockBackend;
use crate::error::Result;

/// Header extension: persistent dirty bitmaps.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Largest bitmap directory read (QEMU's limit).
const MAX_DIR_BYTES: u64 = 64 << 20;

/// One persistent dirty bitmap, as the bitmap directory describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// The in-use flag: the bitmap was not stored cleanly.
    pub in_use: bool,
    /// The auto flag: the bitmap tracks writes when the image is opened.
    pub auto: bool,
}

/// The bitmaps the image's bitmap directory lists (none without the extension).
/// Entries that do not fit the directory end the list.
pub fn bitmaps(f: &dyn BlockBackend, h: &Header) -> Result<Vec<Bitmap>> {
    let Some(ext) = h.extensions.iter().find(|e| e.kind == EXT_BITMAPS) else {
        return Ok(Vec::new());
    };
    if ext.data.len() < 24 {
        return Ok(Vec::new());
    }
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let nb = be32(&ext.data, 0);
    let dir_size = be64(&ext.data, 8).min(MAX_DIR_BYTES);
    let dir_off = be64(&ext.data, 16);
    let mut dir = vec![0u8; dir_size as usize];
    f.read_at(&mut dir, dir_off)?;
    let mut out = Vec::new();
    let mut p = 0usize;
    for _ in 0..nb {
        let Some(e) = dir.get(p..).filter(|e| e.len() >= 24) else {
            break;
        };
        let flags = be32(e, 12);
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = be32(e, 20) as usize;
        let Some(name) = e.get(24 + extra..24 + extra + name_size) else {
            break;
        };
        out.push(Bitmap {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity: 1u64 << e[17].min(63),
            in_use: flags & 1 != 0,
            auto: flags & 2 != 0,
        });
        p += (24 + extra + name_size).div_ceil(8) * 8;
    }
    Ok(out)
}

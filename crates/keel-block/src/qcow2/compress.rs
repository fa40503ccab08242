//! Compressed clusters: raw deflate (RFC 1951, 4 KiB window, as QEMU writes
//! it) and zstd, selected by the header's compression type.
//!
//! A compressed cluster's data is read from the host range named by its L2
//! entry; the range is sector-granular, so it may end with bytes that belong
//! to the next compressed cluster. Decompression therefore stops as soon as
//! the cluster is full, exactly like QEMU, and fails if the data does not
//! fill it.

use std::io::Read;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::error::{DecompressError, Error, Result};

/// How compressed clusters are compressed: the header's compression type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (type 0, QEMU's `zlib`); the only type of version 2 images.
    #[default]
    Deflate,
    /// zstd (type 1, version 3 images only).
    Zstd,
}

impl CompressionType {
    /// The type with header field value `t`, if it is one.
    pub fn from_raw(t: u8) -> Option<CompressionType> {
        match t {
            0 => Some(CompressionType::Deflate),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// The header field value.
    pub fn raw(self) -> u8 {
        match self {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// The name `qemu-img` uses (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for CompressionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Window size QEMU uses for deflate (2^12 bytes); its decompressor accepts
/// nothing larger, so compress with the same window.
const DEFLATE_WINDOW_BITS: u8 = 12;

fn bad(host: u64, source: DecompressError) -> Error {
    Error::CompressedData { host, source }
}

/// Decompresses `src` (read from host offset `host`, for messages) into
/// `out`, which must be filled exactly.
pub fn decompress(ctype: CompressionType, src: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    match ctype {
        CompressionType::Deflate => {
            let mut d = Decompress::new_with_window_bits(false, 15);
            let r = d.decompress(src, out, FlushDecompress::Finish);
            match r {
                // The sector-granular input may be cut short or padded: what
                // counts is that the cluster is full.
                Ok(Status::StreamEnd | Status::Ok | Status::BufError)
                    if d.total_out() == out.len() as u64 =>
                {
                    Ok(())
                }
                Ok(_) => Err(bad(host, DecompressError::ShortDeflate)),
                Err(e) => Err(bad(host, DecompressError::Deflate(e))),
            }
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(src)
                .map_err(|e| bad(host, DecompressError::ZstdDecoder(e)))?
                .single_frame();
            dec.read_exact(out)
                .map_err(|e| bad(host, DecompressError::Zstd(e)))?;
            // A frame holding more than a cluster is damaged (as QEMU says).
            let mut extra = [0u8; 1];
            match dec.read(&mut extra) {
                Ok(0) => Ok(()),
                Ok(_) => Err(bad(host, DecompressError::ZstdTooLarge)),
                Err(e) => Err(bad(host, DecompressError::ZstdTail(e))),
            }
        }
    }
}

/// Compresses one cluster. Returns `None` when the result would not be
/// smaller than the cluster (such clusters are stored uncompressed).
pub fn compress(ctype: CompressionType, src: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = src.len().saturating_sub(1);
    match ctype {
        CompressionType::Deflate => {
            let mut c =
                Compress::new_with_window_bits(Compression::default(), false, DEFLATE_WINDOW_BITS);
            let mut out = Vec::with_capacity(limit);
            match c.compress_vec(src, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => Ok(Some(out)),
                // Out of room: not worth compressing.
                Ok(_) => Ok(None),
                Err(e) => Err(Error::io(
                    "compressing a cluster (deflate)",
                    std::io::Error::other(e),
                )),
            }
        }
        CompressionType::Zstd => {
            let out = zstd::bulk::compress(src, 0)
                .map_err(|e| Error::io("compressing a cluster (zstd)", e))?;
            Ok((out.len() <= limit).then_some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let mut src = vec![0u8; 65536];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i / 100 % 7) as u8;
        }
        for t in [CompressionType::Deflate, CompressionType::Zstd] {
            let mut c = compress(t, &src).unwrap().expect("compressible");
            assert!(c.len() < src.len());
            // Trailing bytes of the last sector belong to someone else.
            c.extend_from_slice(&[0xa5; 300]);
            let mut out = vec![0u8; src.len()];
            decompress(t, &c, &mut out, 0).unwrap();
            assert_eq!(out, src);
            // Too short for the cluster.
            let mut big = vec![0u8; src.len() * 2];
            assert!(decompress(t, &c, &mut big, 0).is_err());
            // Truncated data.
            assert!(decompress(t, &c[..c.len() / 4], &mut out, 0).is_err());
            // Garbage never panics.
            let _ = decompress(t, &[0xff; 64], &mut out, 0);
        }
        // Random data does not shrink.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        assert!(compress(CompressionType::Deflate, &noise)
            .unwrap()
            .is_none());
        assert!(compress(CompressionType::Zstd, &noise).unwrap().is_none());
    }
}

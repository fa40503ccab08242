//! qcow2 header parsing, validation and creation.

use crate::error::{
    Error, HeaderField, InvalidArgument, InvalidImage, Metadata, Result, Unsupported,
};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster_bits (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table we load (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we load (QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest snapshot count we accept (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bit: refcounts may be stale.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit: image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit: non-deflate compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit: extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// One header extension, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Extension payload (unpadded).
    pub data: Vec<u8>,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// 0 deflate, 1 zstd.
    pub compression_type: u8,
    /// Header extensions, in file order, excluding the end marker.
    pub extensions: Vec<Extension>,
    /// Backing file name, if any.
    pub backing_file: Option<Vec<u8>>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

fn invalid(kind: InvalidImage) -> Error {
    Error::InvalidImage(kind)
}

fn field(field: HeaderField, value: impl Into<u64>, min: u64, max: u64) -> Error {
    invalid(InvalidImage::HeaderField {
        field,
        value: value.into(),
        min,
        max,
    })
}

const KNOWN_INCOMPAT: [(u32, &str); 5] = [
    (0, "dirty bit"),
    (1, "corrupt bit"),
    (2, "external data file"),
    (3, "compression type"),
    (4, "extended L2 entries"),
];

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses the fixed fields from the start of an image. `buf` must hold at
    /// least the first cluster or the whole file, whichever is shorter, and
    /// `file_size` is the size of the image file.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < 72 {
            return Err(invalid(InvalidImage::TooShort {
                len: buf.len() as u64,
                needed: 72,
            }));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(invalid(InvalidImage::BadMagic { magic }));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Unsupported::Version(version).into());
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(field(
                HeaderField::ClusterBits,
                cluster_bits,
                MIN_CLUSTER_BITS.into(),
                MAX_CLUSTER_BITS.into(),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(invalid(InvalidImage::TooShort {
                    len: buf.len() as u64,
                    needed: 104,
                }));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let max = cs.min(buf.len() as u64);
            if h.header_length < 104 || h.header_length as u64 > max {
                return Err(field(HeaderField::HeaderLength, h.header_length, 104, max));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return Err(field(HeaderField::RefcountOrder, h.refcount_order, 0, 6));
        }
        // Extensions live between the header and the end of cluster 0.
        let limit = (cs as usize).min(buf.len());
        let mut off = h.header_length as usize;
        loop {
            if off + 8 > limit {
                return Err(invalid(InvalidImage::ExtensionPastCluster {
                    kind: None,
                    len: 0,
                }));
            }
            let kind = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > limit - off {
                return Err(invalid(InvalidImage::ExtensionPastCluster {
                    kind: Some(kind),
                    len: len as u64,
                }));
            }
            h.extensions.push(Extension {
                kind,
                data: buf[off..off + len].to_vec(),
            });
            off += len.div_ceil(8) * 8;
        }
        if h.backing_file_offset != 0 {
            let bo = h.backing_file_offset;
            let bl = h.backing_file_size as u64;
            if bl > 1023 || bo > limit as u64 || bl > limit as u64 - bo {
                return Err(invalid(InvalidImage::BackingNamePastCluster {
                    offset: bo,
                    len: h.backing_file_size,
                }));
            }
            h.backing_file = Some(buf[bo as usize..(bo + bl) as usize].to_vec());
        }
        h.validate(file_size)?;
        Ok(h)
    }

    /// The backing file format the backing-format extension states, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| {
                let end = e.data.iter().position(|&c| c == 0).unwrap_or(e.data.len());
                String::from_utf8_lossy(&e.data[..end]).into_owned()
            })
    }

    /// Name of an incompatible feature bit, from the image's feature table or
    /// the specification.
    pub fn feature_name(&self, bit: u32) -> String {
        for ext in self
            .extensions
            .iter()
            .filter(|e| e.kind == EXT_FEATURE_TABLE)
        {
            for e in ext.data.chunks_exact(48) {
                if e[0] == 0 && e[1] as u32 == bit {
                    let name = &e[2..];
                    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    return String::from_utf8_lossy(&name[..end]).into_owned();
                }
            }
        }
        KNOWN_INCOMPAT
            .iter()
            .find(|(b, _)| *b == bit)
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    fn validate(&self, file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.crypt_method != 0 {
            return Err(Unsupported::Encryption {
                method: self.crypt_method,
            }
            .into());
        }
        let supported = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
        let bad = self.incompatible_features & !supported;
        if bad != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| bad & (1u64 << b) != 0)
                .map(|b| self.feature_name(b))
                .collect();
            return Err(Unsupported::IncompatibleFeatures { bits: bad, names }.into());
        }
        if self.extensions.iter().any(|e| e.kind == EXT_DATA_FILE) {
            return Err(Unsupported::ExternalDataFile.into());
        }
        let compression_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, compression_bit) {
            (0, false) | (1, true) => {}
            (t, bit) => {
                return Err(invalid(InvalidImage::CompressionTypeMismatch {
                    compression_type: t,
                    feature_bit: bit,
                }))
            }
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 && self.cluster_bits < 14 {
            return Err(invalid(InvalidImage::ExtendedL2ClusterSize {
                cluster_bits: self.cluster_bits,
            }));
        }
        let aligned = |o: u64| o % cs == 0;
        for (table, offset) in [
            (Metadata::L1Table, self.l1_table_offset),
            (Metadata::RefcountTable, self.refcount_table_offset),
        ] {
            if !aligned(offset) {
                return Err(invalid(InvalidImage::Misaligned { table, offset }));
            }
        }
        if self.refcount_table_offset == 0 {
            return Err(invalid(InvalidImage::AtOffsetZero {
                table: Metadata::RefcountTable,
            }));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(field(
                HeaderField::RefcountTableClusters,
                self.refcount_table_clusters,
                1,
                MAX_REFTABLE_BYTES / cs,
            ));
        }
        if self.refcount_table_offset.saturating_add(rt_bytes) > file_size {
            return Err(invalid(InvalidImage::PastEnd {
                table: Metadata::RefcountTable,
                offset: self.refcount_table_offset,
                len: rt_bytes,
                file_size,
            }));
        }
        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(field(
                HeaderField::L1Size,
                self.l1_size,
                0,
                MAX_L1_BYTES / 8,
            ));
        }
        let l2_bits =
            self.cluster_bits - 3 - (self.incompatible_features & INCOMPAT_EXTL2 != 0) as u32;
        let per_l1 = 1u128 << (self.cluster_bits + l2_bits);
        if (self.l1_size as u128) * per_l1 < self.size as u128 {
            return Err(invalid(InvalidImage::L1TooSmall {
                l1_size: self.l1_size,
                size: self.size,
            }));
        }
        if self.size > (1u64 << 62) {
            return Err(field(HeaderField::Size, self.size, 0, 1 << 62));
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(invalid(InvalidImage::AtOffsetZero {
                table: Metadata::L1Table,
            }));
        }
        if self.l1_size > 0 && self.l1_table_offset.saturating_add(l1_bytes) > file_size {
            return Err(invalid(InvalidImage::PastEnd {
                table: Metadata::L1Table,
                offset: self.l1_table_offset,
                len: l1_bytes,
                file_size,
            }));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(field(
                HeaderField::NbSnapshots,
                self.nb_snapshots,
                0,
                MAX_SNAPSHOTS.into(),
            ));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset == 0 {
            return Err(invalid(InvalidImage::AtOffsetZero {
                table: Metadata::SnapshotTable,
            }));
        }
        if self.nb_snapshots > 0 && !aligned(self.snapshots_offset) {
            return Err(invalid(InvalidImage::Misaligned {
                table: Metadata::SnapshotTable,
                offset: self.snapshots_offset,
            }));
        }
        Ok(())
    }

    /// Serialises a fresh header for a new image (cluster 0 contents).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put64(&mut b, 8, self.backing_file_offset);
        put32(&mut b, 16, self.backing_file_size);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
            }
        }
        for e in &self.extensions {
            b.extend_from_slice(&e.kind.to_be_bytes());
            b.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            b.extend_from_slice(&e.data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        b.extend_from_slice(&[0u8; 8]);
        if b.len() > cs {
            return Err(InvalidArgument::HeaderSize {
                bytes: b.len() as u64,
                cluster_size: cs as u64,
            }
            .into());
        }
        Ok(b)
    }
}

/// The feature-name table QEMU writes into new version 3 images.
pub fn feature_table() -> Extension {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(48 * entries.len());
    for (t, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = t;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            extensions: vec![
                feature_table(),
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
            backing_file: None,
        }
    }

    #[test]
    fn round_trip_keeps_extensions() {
        let h = sample();
        let b = h.to_bytes().unwrap();
        let p = Header::parse(&b, 4 << 16).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut h = sample();
        h.incompatible_features = INCOMPAT_DATA_FILE | (1 << 40);
        let b = h.to_bytes().unwrap();
        let e = Header::parse(&b, 4 << 16).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::Unsupported(Unsupported::IncompatibleFeatures { bits, .. })
                    if *bits == INCOMPAT_DATA_FILE | (1 << 40)
            ),
            "{e}"
        );
        let e = e.to_string();
        assert!(e.contains("external data file"), "{e}");
        assert!(e.contains("unknown incompatible feature bit 40"), "{e}");
        h.incompatible_features = INCOMPAT_DATA_FILE;
        let e = Header::parse(&h.to_bytes().unwrap(), 4 << 16).unwrap_err();
        assert!(e.to_string().contains("external data file"));
        h.incompatible_features = 0;
        h.crypt_method = 2;
        let e = Header::parse(&h.to_bytes().unwrap(), 4 << 16).unwrap_err();
        assert!(e.to_string().contains("LUKS"));
        assert!(matches!(
            e,
            Error::Unsupported(Unsupported::Encryption { method: 2 })
        ));
    }

    #[test]
    fn bounds_are_enforced() {
        let mut h = sample();
        h.l1_size = 1 << 30;
        assert!(Header::parse(&h.to_bytes().unwrap(), 4 << 16).is_err());
        let mut h = sample();
        h.refcount_table_clusters = 1000;
        assert!(Header::parse(&h.to_bytes().unwrap(), 4 << 16).is_err());
        let mut h = sample();
        h.cluster_bits = 22;
        assert!(Header::parse(&h.to_bytes().unwrap(), 4 << 16).is_err());
        let mut b = sample().to_bytes().unwrap();
        b[100..104].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        assert!(Header::parse(&b, 4 << 16).is_err());
    }
}

//! Formatting a file as a new qcow2 image.

use super::compress::CompressionType;
use super::header::{self, Header};
use super::{refcount, CreateOptions};
use std::path::Path;

use crate::backend::BlockBackend;
use crate::error::{InvalidArgument, Result};
use crate::raw::{RawFile, RawOptions};

/// Creates (or truncates) `path` and formats it as a new, empty qcow2 image, as `qemu-img
/// create -f qcow2` does; returns the file, open read-write and growable.
///
/// # Examples
///
/// ```
/// use keel_block::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
/// use keel_block::BlockBackend;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.qcow2");
/// let f = qcow2::create_path(&path, &CreateOptions { size: 1 << 20, ..Default::default() })?;
/// let img = Qcow2::open(f, Qcow2Options::default())?;
/// img.write_at(&[1; 512], 0)?;
/// # Ok::<(), keel_block::Error>(())
/// ```
pub fn create_path(path: impl AsRef<Path>, o: &CreateOptions) -> Result<RawFile> {
    let path = path.as_ref();
    RawFile::create(path, 0)?;
    let f = RawFile::open(
        path,
        RawOptions {
            growable: true,
            ..Default::default()
        },
    )?;
    create(&f, o)?;
    Ok(f)
}

/// Checks `o` as [`create`] does before it writes anything: the cluster size, refcount
/// width, version and the features it allows, and the virtual size against the L1
/// table's limit. [`crate::measure`] checks its options the same way.
pub fn check_options(o: &CreateOptions) -> Result<()> {
    let cs = o.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(InvalidArgument::ClusterSize(cs).into());
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(InvalidArgument::RefcountBits(o.refcount_bits).into());
    }
    if o.version != 2 && o.version != 3 {
        return Err(InvalidArgument::Version(o.version).into());
    }
    if o.version == 2 && (o.refcount_bits != 16 || o.lazy_refcounts) {
        return Err(InvalidArgument::Version2Features {
            refcount_bits: o.refcount_bits,
            lazy_refcounts: o.lazy_refcounts,
        }
        .into());
    }
    let cb = cs.trailing_zeros();
    if o.extended_l2 && (o.version < 3 || cb < 14) {
        return Err(InvalidArgument::ExtendedL2 {
            version: o.version,
            cluster_size: cs,
        }
        .into());
    }
    if o.compression_type != CompressionType::Deflate && o.version < 3 {
        return Err(InvalidArgument::CompressionType {
            compression_type: o.compression_type,
            version: o.version,
        }
        .into());
    }
    let ext = o.extended_l2 as u32;
    let per_l1 = 1u128 << (2 * cb - 3 - ext);
    let l1_size = (o.size as u128).div_ceil(per_l1);
    if l1_size * 8 > header::MAX_L1_BYTES as u128 || o.size > (1 << 62) {
        return Err(InvalidArgument::ImageSize {
            size: o.size,
            cluster_size: cs,
        }
        .into());
    }
    Ok(())
}

/// Formats `file` as a new, empty qcow2 image.
pub fn create(file: &dyn BlockBackend, o: &CreateOptions) -> Result<()> {
    check_options(o)?;
    let cs = o.cluster_size;
    let cb = cs.trailing_zeros();
    let order = o.refcount_bits.trailing_zeros();
    let mut extensions = Vec::new();
    if let Some(fmt) = o.backing_format {
        extensions.push(header::Extension {
            kind: header::EXT_BACKING_FORMAT,
            data: fmt.as_str().as_bytes().to_vec(),
        });
    }
    if o.version == 3 {
        extensions.push(header::feature_table());
    }
    let ext = o.extended_l2 as u32;
    let per_l1 = 1u128 << (2 * cb - 3 - ext);
    let l1_size = (o.size as u128).div_ceil(per_l1) as u64;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let rb_entries = cs * 8 / o.refcount_bits as u64;
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let n = 1 + t + b + l1_clusters;
        let nb = n.div_ceil(rb_entries);
        let nt = (nb * 8).div_ceil(cs);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    let total = 1 + t + b + l1_clusters;
    let l1_off = (1 + t + b) * cs;
    // L1 table (zeroes).
    if l1_clusters > 0 {
        file.write_zeroes(l1_off, l1_clusters * cs, false)?;
    }
    // Refcount blocks.
    let mut table = vec![0u8; (t * cs) as usize];
    for k in 0..b {
        let mut block = vec![0u8; cs as usize];
        for c in k * rb_entries..((k + 1) * rb_entries).min(total) {
            refcount::set(&mut block, (c - k * rb_entries) as usize, order, 1);
        }
        let off = (1 + t + k) * cs;
        file.write_at(&block, off)?;
        table[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    file.write_at(&table, cs)?;
    let hdr = Header {
        version: o.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size: o.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: cs,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if o.extended_l2 {
            header::INCOMPAT_EXTL2
        } else {
            0
        } | if o.compression_type == CompressionType::Zstd {
            header::INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible_features: if o.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: order,
        header_length: if o.version == 3 { 112 } else { 72 },
        compression_type: o.compression_type.raw(),
        extensions,
        backing_file: None,
    };
    let mut hdr = hdr;
    let mut hb = hdr.to_bytes()?;
    if let Some(name) = &o.backing_file {
        if name.is_empty() || name.len() > 1023 {
            return Err(InvalidArgument::BackingNameLength(name.len()).into());
        }
        hdr.backing_file_offset = hb.len() as u64;
        hdr.backing_file_size = name.len() as u32;
        hb = hdr.to_bytes()?;
        hb.extend_from_slice(name.as_bytes());
        if hb.len() as u64 > cs {
            return Err(InvalidArgument::HeaderSize {
                bytes: hb.len() as u64,
                cluster_size: cs,
            }
            .into());
        }
    }
    hb.resize(cs as usize, 0);
    file.write_at(&hb, 0)?;
    file.flush()
}

//! `keel-img info`: what qemu-img info prints, for one image or (`--backing-chain`)
//! each image of its chain.

use std::path::Path;

use keel_block::qcow2::bitmaps::Bitmap;
use keel_block::qcow2::snapshot::Snapshot;
use keel_block::qcow2::{self, backing, ImageInfo};
use keel_block::{BlockBackend, Format};
use serde_json::{json, Value};

use crate::text::{size_str, snapshot_listing};
use crate::{disk_usage, image_format, qcow2_options, CliError, OutputFormat, Result};

/// Runs `info`.
pub(crate) fn cmd_info(
    file: &Path,
    fmt: Option<&str>,
    output: OutputFormat,
    backing_chain: bool,
    allow_probed_backing: bool,
) -> Result<i32> {
    let format: Format = image_format(file, fmt)?.parse()?;
    let images: Vec<(std::path::PathBuf, Format)> = if backing_chain {
        let chain = crate::open_chain(file, format, qcow2_options(allow_probed_backing))?;
        chain
            .layers()
            .iter()
            .map(|l| (l.path().to_path_buf(), l.format()))
            .collect()
    } else {
        vec![(file.to_path_buf(), format)]
    };
    let described = images
        .iter()
        .map(|(p, f)| describe(p, *f))
        .collect::<Result<Vec<_>>>()?;
    match output {
        OutputFormat::Json => {
            let v = if backing_chain {
                Value::Array(described.into_iter().map(|d| d.0).collect())
            } else {
                described
                    .into_iter()
                    .map(|d| d.0)
                    .next()
                    .unwrap_or_default()
            };
            print_json(&v)?;
        }
        OutputFormat::Human => {
            let texts: Vec<String> = described.into_iter().map(|d| d.1).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(0)
}

/// Prints JSON indented by four spaces, as qemu-img does.
pub(crate) fn print_json(v: &Value) -> Result<()> {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).map_err(CliError::Json)?;
    println!("{}", String::from_utf8_lossy(&out));
    Ok(())
}

/// One image's info: the JSON object and the human text.
fn describe(file: &Path, format: Format) -> Result<(Value, String)> {
    let raw = crate::open_raw(file, true)?;
    let actual = disk_usage(file);
    let name = file.display().to_string();
    let file_len = raw.size();
    // QEMU counts files in whole 512-byte sectors.
    let file_len = file_len.div_ceil(512) * 512;
    let (vsize, q, hdr, extra) = match format {
        Format::Qcow2 => {
            let h = qcow2::read_header(&raw)?;
            let extra = Qcow2Extra {
                bitmaps: qcow2::bitmaps::bitmaps(&raw, &h)?,
                snapshots: qcow2::snapshot::read_snapshots(&raw, &h)?,
            };
            (h.size, Some(qcow2::info_from_header(&h)), Some(h), extra)
        }
        _ => (file_len, None, None, Qcow2Extra::default()),
    };
    let full_backing = hdr
        .as_ref()
        .and_then(|h| h.backing_file.as_ref())
        .map(|b| backing::resolve(file, b).display().to_string());
    let mut v = json!({
        "children": [{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": file_len,
                "filename": name,
                "format": "file",
                "actual-size": actual,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false,
            }
        }],
        "virtual-size": vsize,
        "filename": name,
        "format": format.as_str(),
        "actual-size": actual,
        "dirty-flag": q.as_ref().is_some_and(|i| i.dirty),
    });
    let mut s = String::new();
    s += &format!("image: {name}\n");
    s += &format!("file format: {format}\n");
    s += &format!("virtual size: {} ({vsize} bytes)\n", size_str(vsize));
    s += &format!("disk size: {}\n", size_str(actual));
    if let Some(i) = &q {
        qcow2_fields(&mut v, &mut s, i, full_backing.as_deref(), &extra);
    }
    s += "Child node '/file':\n";
    s += &format!("    filename: {name}\n");
    s += "    protocol type: file\n";
    s += &format!(
        "    file length: {} ({file_len} bytes)\n",
        size_str(file_len)
    );
    s += &format!("    disk size: {}\n", size_str(actual));
    Ok((v, s))
}

/// The qcow2-specific fields, JSON and human.
/// What a qcow2 image's info shows beyond its header.
#[derive(Default)]
struct Qcow2Extra {
    bitmaps: Vec<Bitmap>,
    snapshots: Vec<Snapshot>,
}

fn qcow2_fields(
    v: &mut Value,
    s: &mut String,
    i: &ImageInfo,
    full_backing: Option<&str>,
    extra: &Qcow2Extra,
) {
    let bitmaps = &extra.bitmaps;
    let compat = if i.version == 3 { "1.1" } else { "0.10" };
    v["cluster-size"] = i.cluster_size.into();
    let mut data = json!({
        "compat": compat,
        "compression-type": i.compression_type.name(),
        "refcount-bits": i.refcount_bits,
    });
    if !bitmaps.is_empty() {
        data["bitmaps"] = bitmaps
            .iter()
            .map(|b| json!({"flags": flags(b), "name": b.name, "granularity": b.granularity}))
            .collect();
    }
    if i.version == 3 {
        data["lazy-refcounts"] = i.lazy_refcounts.into();
        data["corrupt"] = i.corrupt.into();
        data["extended-l2"] = i.extended_l2.into();
    }
    v["format-specific"] = json!({"type": "qcow2", "data": data});
    *s += &format!("cluster_size: {}\n", i.cluster_size);
    if let Some(b) = &i.backing_file {
        v["backing-filename"] = b.clone().into();
        *s += &format!("backing file: {b}");
        if let Some(full) = full_backing {
            v["full-backing-filename"] = full.into();
            if full != b {
                *s += &format!(" (actual path: {full})");
            }
        }
        *s += "\n";
    }
    if let Some(b) = &i.backing_format {
        v["backing-filename-format"] = b.clone().into();
        *s += &format!("backing file format: {b}\n");
    }
    if !extra.snapshots.is_empty() {
        v["snapshots"] = extra.snapshots.iter().map(snapshot_json).collect();
        *s += &snapshot_listing(&extra.snapshots);
    }
    *s += "Format specific information:\n";
    *s += &format!("    compat: {compat}\n");
    *s += &format!("    compression type: {}\n", i.compression_type);
    if i.version == 3 {
        *s += &format!("    lazy refcounts: {}\n", i.lazy_refcounts);
    }
    if !bitmaps.is_empty() {
        *s += "    bitmaps:\n";
        for (k, b) in bitmaps.iter().enumerate() {
            *s += &format!("        [{k}]:\n            flags:\n");
            for (j, f) in flags(b).iter().enumerate() {
                *s += &format!("                [{j}]: {f}\n");
            }
            *s += &format!("            name: {}\n", b.name);
            *s += &format!("            granularity: {}\n", b.granularity);
        }
    }
    *s += &format!("    refcount bits: {}\n", i.refcount_bits);
    if i.version == 3 {
        *s += &format!("    corrupt: {}\n", i.corrupt);
        *s += &format!("    extended l2: {}\n", i.extended_l2);
    }
    if i.dirty {
        *s += "    dirty: true\n";
    }
}

/// A snapshot as qemu-img info --output=json shows it.
fn snapshot_json(sn: &Snapshot) -> Value {
    let mut v = json!({
        "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
        "name": sn.name,
        "date-sec": sn.date_sec,
        "date-nsec": sn.date_nsec,
        "vm-clock-sec": sn.vm_clock_nsec / 1_000_000_000,
        "id": sn.id,
        "vm-state-size": sn.vm_state_size,
    });
    if let Some(i) = sn.icount {
        v["icount"] = i.into();
    }
    v
}

/// A bitmap's flags as qemu-img names them.
fn flags(b: &Bitmap) -> Vec<&'static str> {
    let mut f = Vec::new();
    if b.in_use {
        f.push("in-use");
    }
    if b.auto {
        f.push("auto");
    }
    f
}

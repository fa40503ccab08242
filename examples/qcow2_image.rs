//! keel-block: create a qcow2 image in a temporary directory, write to it, read it back,
//! check it, look at how it maps guest offsets, and stack an overlay on it.
//!
//! `cargo run -p keel-examples --example qcow2_image`

use std::path::{Path, PathBuf};

use keel_block::image::{Format, Image, ImageOptions};
use keel_block::mapping::{ExtentKind, MapExtents};
use keel_block::qcow2::{self, CreateOptions, Fix};
use keel_block::{Error, RawFile, RawOptions};

/// A directory removed (with its files) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, Error> {
        let path = std::env::temp_dir().join(format!("keel-block-example-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Formats a new qcow2 image file at `path`.
fn create(path: &Path, opts: &CreateOptions) -> Result<(), Error> {
    RawFile::create(path, 0)?;
    // qcow2 grows its file as it allocates clusters.
    let file = RawFile::open(
        path,
        RawOptions {
            growable: true,
            ..Default::default()
        },
    )?;
    qcow2::create(&file, opts)
}

fn main() -> Result<(), Error> {
    let dir = TempDir::new()?;
    let base = dir.0.join("base.qcow2");
    create(
        &base,
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 64 << 10,
            ..Default::default()
        },
    )?;
    println!("created {} (16 MiB, 64 KiB clusters)", base.display());

    // Write a pattern at 1 MiB, then close cleanly.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    {
        let img = Image::open(&base, Format::Qcow2, ImageOptions::default())?;
        img.backend().write_at(&data, 1 << 20)?;
        img.close()?;
    }

    // Reopen read-only and read it back.
    let read_only = ImageOptions {
        file: RawOptions {
            read_only: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let img = Image::open(&base, Format::Qcow2, read_only)?;
    let mut back = vec![0u8; data.len()];
    img.backend().read_at(&mut back, 1 << 20)?;
    assert_eq!(back, data);
    println!("read back {} bytes at 1 MiB", back.len());

    // Where guest offsets live: data clusters for the written range, nothing
    // allocated before it.
    let Image::Qcow2(q) = &img else {
        unreachable!("opened as qcow2")
    };
    let map = q.map_read(0, 2 << 20)?;
    for e in map.extents() {
        match e.kind {
            ExtentKind::Data(host) => println!("  {:>8} bytes at host offset {host:#x}", e.len),
            other => println!("  {:>8} bytes {other:?}", e.len),
        }
    }
    drop(map);

    // The image is consistent, as `qemu-img check` would say.
    let report = qcow2::check(q.file(), Fix::None)?;
    assert!(report.is_clean(), "{:?}", report.messages);
    println!("check: no errors");
    drop(img);

    // An overlay: unallocated clusters read from the base image, writes stay
    // in the overlay.
    let overlay = dir.0.join("overlay.qcow2");
    create(
        &overlay,
        &CreateOptions {
            size: 16 << 20,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some(Format::Qcow2),
            ..Default::default()
        },
    )?;
    let top = Image::open(&overlay, Format::Qcow2, ImageOptions::default())?;
    top.backend().read_at(&mut back, 1 << 20)?;
    assert_eq!(back, data, "the overlay shows the base image's data");
    top.backend().write_at(&[0xee; 4096], 1 << 20)?;
    top.close()?;

    let base_img = Image::open(&base, Format::Qcow2, read_only)?;
    let mut first = [0u8; 4096];
    base_img.backend().read_at(&mut first, 1 << 20)?;
    assert_eq!(first[..], data[..4096], "the base image is unchanged");
    println!("overlay written; base image unchanged");
    Ok(())
}

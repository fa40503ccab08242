//! `--disk path=P[,format=raw|qcow2][,backing=follow|refuse][,readonly=on][,cache=MODE][,queues=N][,iops=N][,bps=N][,poll=US][,memory=per-request|registered][,affinity=CPUS]`:
//! parsing the option and opening the disk behind a virtio-blk device.

use std::path::PathBuf;
use std::sync::Arc;

use keel_block::image::{Format, Image, ImageOptions};
use keel_block::ProbedRaw;
use keel_virtio::affinity::{AffinityError, CpuSet, MAX_CPUS};
use keel_virtio_blk::{Block, BlockOptions, Disk, GuestMemoryAccess};

/// One `--disk`: the image and how to open it, and the device in front of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image file.
    pub path: PathBuf,
    /// Format; `None` probes (qcow2 magic, else raw), and the guest may then not write a
    /// first sector that would probe as another format.
    pub format: Option<Format>,
    /// How the image is opened: host cache mode (`cache=`), read-only
    /// (`readonly=`; the guest then sees VIRTIO_BLK_F_RO).
    pub image: ImageOptions,
    /// The virtio-blk device: queues (`queues=`), throttling (`iops=`,
    /// `bps=`), polling (`poll=`); its write cache follows the cache mode.
    pub device: BlockOptions,
    /// How the I/O engines reach guest memory (`memory=`): `per-request` (the default)
    /// or `registered` (all of guest memory pinned and registered with io_uring once;
    /// refused together with `--balloon`).
    pub memory: GuestMemoryAccess,
    /// Whether a qcow2 image's backing file is followed (`backing=`).
    pub backing: Backing,
}

/// What to do with the backing file a qcow2 image names (`backing=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Follow the names the image states (with `format=qcow2`), wherever they point, as
    /// QEMU does.
    #[default]
    Follow,
    /// Refuse an image that names a backing file: for images from elsewhere, whose
    /// backing name could be any host file.
    Refuse,
}

/// What is wrong with a `--disk` value; the message names the option and what it takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// A part is not `KEY=VALUE`.
    #[error("'{0}': expected KEY=VALUE")]
    NotKeyValue(String),
    /// An unknown key.
    #[error("'{0}': unknown disk option")]
    Unknown(String),
    /// A key given twice (which one would count is not obvious).
    #[error("{0}: given twice")]
    Repeated(String),
    /// A key given without a value.
    #[error("{0}=: a value is needed")]
    Empty(String),
    /// A number was expected.
    #[error("{key}={value}: expected a number")]
    Number {
        /// The option.
        key: String,
        /// What was given.
        value: String,
    },
    /// `format=` is neither raw nor qcow2.
    #[error("format={0}: expected raw or qcow2")]
    Format(String),
    /// `readonly=` is neither on nor off.
    #[error("readonly={0}: expected on or off")]
    ReadOnly(String),
    /// `cache=` names no cache mode.
    #[error("cache={0}: expected none, writeback, writethrough, directsync or unsafe")]
    Cache(String),
    /// `queues=` is outside 1 to 64.
    #[error("queues={0}: expected 1 to 64")]
    Queues(String),
    /// `poll=` is outside 0 to 1000000.
    #[error("poll={0}: expected 0 to 1000000 microseconds")]
    Poll(String),
    /// `memory=` is neither per-request nor registered.
    #[error("memory={0}: expected per-request or registered")]
    Memory(String),
    /// `affinity=` is not a host CPU list.
    #[error("affinity={0}: expected host CPUs below {max} as 1, 0-3 or [0,2-3]", max = MAX_CPUS)]
    Affinity(String),
    /// `backing=` is neither follow nor refuse.
    #[error("backing={0}: expected follow or refuse")]
    Backing(String),
    /// A `[` without its `]`.
    #[error("'{0}': a '[' without its ']'")]
    Bracket(String),
    /// No `path=`.
    #[error("path=FILE is required")]
    NoPath,
}

/// Parses the option's value.
pub fn parse_disk(s: &str) -> Result<DiskSpec, OptionError> {
    let mut spec = DiskSpec {
        path: PathBuf::new(),
        format: None,
        image: ImageOptions::default(),
        device: BlockOptions {
            queue_size: QUEUE_SIZE,
            ..Default::default()
        },
        memory: GuestMemoryAccess::default(),
        backing: Backing::default(),
    };
    let number = |k: &str, v: &str| {
        v.parse::<u64>().map_err(|_| OptionError::Number {
            key: k.into(),
            value: v.into(),
        })
    };
    let mut seen = Vec::new();
    for part in split_options(s)? {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| OptionError::NotKeyValue(part.into()))?;
        match k {
            "path" if v.is_empty() => return Err(OptionError::Empty(k.into())),
            "path" => spec.path = PathBuf::from(v),
            "format" => {
                spec.format = Some(match v {
                    "raw" => Format::Raw,
                    "qcow2" => Format::Qcow2,
                    _ => return Err(OptionError::Format(v.into())),
                })
            }
            "readonly" => {
                spec.image.file.read_only = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(OptionError::ReadOnly(v.into())),
                }
            }
            "cache" => {
                spec.image.file.cache = v.parse().map_err(|_| OptionError::Cache(v.into()))?
            }
            "queues" => match number(k, v)? {
                n @ 1..=64 => spec.device.queues = n as u16,
                _ => return Err(OptionError::Queues(v.into())),
            },
            "iops" => spec.device.iops = number(k, v)?,
            "bps" => spec.device.bps = number(k, v)?,
            "poll" => {
                spec.device.poll_us = u32::try_from(number(k, v)?)
                    .ok()
                    .filter(|&us| us <= 1_000_000)
                    .ok_or_else(|| OptionError::Poll(v.into()))?
            }
            "memory" => {
                spec.memory = match v {
                    "per-request" => GuestMemoryAccess::PerRequest,
                    "registered" => GuestMemoryAccess::Registered,
                    _ => return Err(OptionError::Memory(v.into())),
                }
            }
            "backing" => {
                spec.backing = match v {
                    "follow" => Backing::Follow,
                    "refuse" => Backing::Refuse,
                    _ => return Err(OptionError::Backing(v.into())),
                }
            }
            "affinity" => {
                // A list with commas comes in brackets: affinity=[0,2-3].
                let list = v
                    .strip_prefix('[')
                    .and_then(|l| l.strip_suffix(']'))
                    .unwrap_or(v);
                spec.device.affinity = Some(
                    list.parse::<CpuSet>()
                        .map_err(|_| OptionError::Affinity(v.into()))?,
                );
            }
            _ => return Err(OptionError::Unknown(part.into())),
        }
        // A known key (the match took it) given again.
        if seen.contains(&k) {
            return Err(OptionError::Repeated(k.into()));
        }
        seen.push(k);
    }
    if spec.path.as_os_str().is_empty() {
        return Err(OptionError::NoPath);
    }
    // Write-through modes show the guest a disk without a volatile cache.
    spec.device.writeback = !spec.image.file.cache.dsync();
    Ok(spec)
}

/// The option's `KEY=VALUE` parts: split at commas outside brackets. A bracket opens a
/// group only as the first character of a value (`affinity=[0,2]`), so paths may hold
/// brackets.
fn split_options(s: &str) -> Result<Vec<&str>, OptionError> {
    let mut parts = Vec::new();
    let (mut start, mut depth) = (0, 0u32);
    let mut prev = None;
    for (i, c) in s.char_indices() {
        let after_eq = prev == Some('=');
        prev = Some(c);
        match c {
            '[' if after_eq || depth > 0 => depth += 1,
            ']' if depth > 0 => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(OptionError::Bracket(s[start..].into()));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image cannot be opened.
    #[error("disk {path}")]
    Open {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: keel_block::Error,
    },
    /// The format was probed as qcow2 and the image names a backing file.
    #[error(
        "disk {path}: probed as qcow2 with a backing file; give format=qcow2 to follow it \
         (a raw image a guest wrote could name any host file as its backing file)"
    )]
    ProbedBacking {
        /// The image.
        path: String,
    },
    /// `backing=refuse`, and the image names a backing file.
    #[error("disk {path}: names the backing file {name}, and backing=refuse")]
    BackingRefused {
        /// The image.
        path: String,
        /// The backing file name the image states.
        name: String,
    },
    /// `memory=registered` in a VM with a balloon, which discards guest pages the
    /// registration would keep transferring to.
    #[error("disk {path}: memory=registered cannot be used with --balloon (the balloon discards guest pages that registered memory keeps pinned)")]
    RegisteredWithBalloon {
        /// The image.
        path: String,
    },
    /// `affinity=` names CPUs this process may not run on.
    #[error("disk {path}: affinity")]
    Affinity {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: AffinityError,
    },
    /// The device refused the options.
    #[error("disk {path}")]
    Device {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: keel_virtio_blk::Error,
    },
}

/// The backing file name the qcow2 image at `path` states, if any.
fn backing_name(path: &std::path::Path) -> keel_block::Result<Option<String>> {
    let f = keel_block::RawFile::open(
        path,
        keel_block::RawOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let h = keel_block::qcow2::read_header(&f)?;
    Ok(match (h.backing_file_offset, h.backing_file) {
        (0, _) => None,
        (_, Some(name)) => Some(String::from_utf8_lossy(&name).into_owned()),
        (_, None) => Some(String::new()),
    })
}

/// Queue size of every disk's queues.
const QUEUE_SIZE: u16 = 256;

/// Opens the image and builds its virtio-blk device. The image stays open as long as the
/// device (the returned `Image` can close it cleanly at shutdown).
pub fn open(spec: &DiskSpec, index: usize) -> Result<(Box<Block>, Image), Error> {
    let path = spec.path.display().to_string();
    if let Some(Err(source)) = spec.device.affinity.map(|a| a.check()) {
        return Err(Error::Affinity { path, source });
    }
    let open = |source| Error::Open {
        path: path.clone(),
        source,
    };
    let format = match spec.format {
        Some(f) => f,
        None => {
            let f = Format::probe(&spec.path).map_err(open)?;
            if f == Format::Qcow2 && backing_name(&spec.path).map_err(open)?.is_some() {
                // A raw image the guest wrote can hold a qcow2 header naming any host
                // file as its backing file: only an explicit format follows it.
                return Err(Error::ProbedBacking { path });
            }
            f
        }
    };
    if format == Format::Qcow2 && spec.backing == Backing::Refuse {
        if let Some(name) = backing_name(&spec.path).map_err(open)? {
            return Err(Error::BackingRefused { path, name });
        }
    }
    let image = Image::open(&spec.path, format, spec.image).map_err(open)?;
    // io_uring depth per queue: the queue size, so a full ring never waits for room.
    let depth = u32::from(spec.device.queue_size);
    let disk = match &image {
        // A raw image the guest could turn into another format for the next probe: its
        // writes that would are refused (IOERR), as QEMU refuses them.
        Image::Raw(r) if spec.format.is_none() => {
            Disk::uring(Arc::new(ProbedRaw::new(r.clone())), depth)
        }
        Image::Raw(r) => Disk::uring(r.clone(), depth),
        Image::Qcow2(q) => Disk::uring(q.clone(), depth),
    }
    .with_id(&format!("keel-disk{index}"))
    .with_memory_access(spec.memory);
    let block = Block::new(disk, spec.device).map_err(|source| Error::Device {
        path: path.clone(),
        source,
    })?;
    Ok((Box::new(block), image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_block::{CacheMode, RawOptions};

    #[test]
    fn disk_options_parse() {
        let d = parse_disk(
            "path=/tmp/a.qcow2,format=qcow2,backing=refuse,readonly=on,cache=none,queues=4,iops=100,bps=1048576,poll=0,memory=registered,affinity=[0,2-3]",
        )
        .unwrap();
        assert_eq!(
            d,
            DiskSpec {
                path: "/tmp/a.qcow2".into(),
                format: Some(Format::Qcow2),
                image: ImageOptions {
                    file: RawOptions {
                        read_only: true,
                        cache: CacheMode::None,
                        ..Default::default()
                    },
                    ..Default::default()
                },
                device: BlockOptions {
                    queues: 4,
                    queue_size: QUEUE_SIZE,
                    writeback: true,
                    iops: 100,
                    bps: 1 << 20,
                    poll_us: 0,
                    affinity: Some("0,2-3".parse().unwrap()),
                },
                memory: GuestMemoryAccess::Registered,
                backing: Backing::Refuse,
            }
        );
        let d = parse_disk("path=x").unwrap();
        assert_eq!(
            (
                d.format,
                d.image.file.read_only,
                d.image.file.cache,
                d.device.queues
            ),
            (None, false, CacheMode::Writeback, 1)
        );
        assert!(d.device.writeback);
        assert_eq!(d.device.poll_us, BlockOptions::default().poll_us);
        assert_eq!(d.memory, GuestMemoryAccess::PerRequest);
        assert_eq!(d.device.affinity, None);
        assert_eq!(d.backing, Backing::Follow);
        assert_eq!(
            parse_disk("path=x,backing=follow").unwrap().backing,
            Backing::Follow
        );
        for (list, cpus) in [
            ("1", "1"),
            ("0-1", "0-1"),
            ("[1]", "1"),
            ("[0,1,3]", "0-1,3"),
        ] {
            let d = parse_disk(&format!("path=x,affinity={list},queues=2")).unwrap();
            assert_eq!(d.device.affinity.unwrap().to_string(), cpus, "{list}");
            assert_eq!(d.device.queues, 2, "the option after the list: {list}");
        }
        // Brackets in a path are the path's.
        let d = parse_disk("path=/img/a[1].raw,queues=2,path2=").unwrap_err();
        assert_eq!(d, OptionError::Unknown("path2=".into()));
        let d = parse_disk("path=/img/a[1.raw,queues=2").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a[1.raw"));
        assert_eq!(d.device.queues, 2);
        let d = parse_disk("path=x,cache=writethrough").unwrap();
        assert!(!d.device.writeback, "write-through shows no volatile cache");
        let s = String::from;
        for (bad, want, why) in [
            ("format=raw", OptionError::NoPath, "path=FILE is required"),
            (
                "path=x,format=vmdk",
                OptionError::Format(s("vmdk")),
                "format=vmdk",
            ),
            (
                "path=x,readonly=yes",
                OptionError::ReadOnly(s("yes")),
                "readonly=yes",
            ),
            (
                "path=x,cache=fast",
                OptionError::Cache(s("fast")),
                "cache=fast",
            ),
            ("path=x,queues=0", OptionError::Queues(s("0")), "queues=0"),
            (
                "path=x,queues=65",
                OptionError::Queues(s("65")),
                "queues=65",
            ),
            (
                "path=x,iops=lots",
                OptionError::Number {
                    key: s("iops"),
                    value: s("lots"),
                },
                "iops=lots: expected a number",
            ),
            (
                "path=x,colour=blue",
                OptionError::Unknown(s("colour=blue")),
                "unknown disk option",
            ),
            (
                "path=a,path=b",
                OptionError::Repeated(s("path")),
                "path: given twice",
            ),
            (
                "path=",
                OptionError::Empty(s("path")),
                "path=: a value is needed",
            ),
            (
                "path=x,poll=2000000",
                OptionError::Poll(s("2000000")),
                "poll=2000000",
            ),
            (
                "path=x,memory=pinned",
                OptionError::Memory(s("pinned")),
                "memory=pinned: expected per-request or registered",
            ),
            (
                "path=x,backing=ignore",
                OptionError::Backing(s("ignore")),
                "backing=ignore: expected follow or refuse",
            ),
            (
                "path=x,oops",
                OptionError::NotKeyValue(s("oops")),
                "expected KEY=VALUE",
            ),
            (
                "path=x,affinity=2-1",
                OptionError::Affinity(s("2-1")),
                "affinity=2-1: expected host CPUs",
            ),
            (
                "path=x,affinity=[0,1",
                OptionError::Bracket(s("affinity=[0,1")),
                "a '[' without its ']'",
            ),
            (
                "path=x,affinity=0,1",
                OptionError::NotKeyValue(s("1")),
                "expected KEY=VALUE",
            ),
            (
                "path=x,affinity=4096",
                OptionError::Affinity(s("4096")),
                "below 1024",
            ),
            (
                "path=x[1,affinity=[1",
                OptionError::Bracket(s("affinity=[1")),
                "a '[' without its ']'",
            ),
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert_eq!(e, want, "{bad}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }
}

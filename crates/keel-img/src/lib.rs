#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

mod compare;
mod info;
mod lifecycle;
mod map;
mod measure;
mod progress;
mod size;
mod text;
use keel_block::aio::{AioQueue, AioRequest, Completion, ThreadQueue, UringQueue};
use keel_block::buf::AlignedBuf;
use keel_block::chain::{file_id, Chain};
use keel_block::convert::{convert, Destination};
use keel_block::image::{Format, Image, ImageOptions};
use keel_block::qcow2::{self, CompressionType, CreateOptions, Fix, Qcow2Options};
use keel_block::{CacheMode, RawFile, RawOptions};
use progress::Progress;

/// keel-img's errors: the library's, and the command line's own.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The library failed.
    #[error(transparent)]
    Block(#[from] keel_block::Error),
    /// The library failed on an image of a one-image command (`info`, `check`,
    /// `snapshot -l`): the message names it.
    #[error("{}", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: keel_block::Error,
    },
    /// Opening an image (or its backing chain) failed.
    #[error("opening {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: keel_block::Error,
    },
    /// A life-cycle verb (resize, snapshot, commit, rebase, amend) failed.
    #[error(transparent)]
    Verb(#[from] lifecycle::VerbError),
    /// A bad command line.
    #[error("invalid argument: {0}")]
    Usage(Usage),
    /// A command-line request keel-img does not implement.
    #[error("unsupported: {0}")]
    Unsupported(Unsupported),
    /// A `refcount_bits` value that does not parse as a number.
    #[error("invalid argument: bad refcount_bits '{value}'")]
    RefcountBits {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// Writing to standard output failed.
    #[error("writing the output")]
    Stdout(#[source] std::io::Error),
    /// Serializing JSON output failed.
    #[error("formatting the JSON output")]
    Json(#[source] serde_json::Error),
    /// `map` in human form cannot show a range without a host offset.
    #[error("File contains external, encrypted or compressed clusters.")]
    CompressedInHumanMap,
    /// A pattern that does not parse as a byte.
    #[error("'{value}' is not a byte value (0-255 or 0x00-0xff)")]
    Byte {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// What is wrong with the command line.
#[derive(Debug)]
enum Usage {
    SizeSuffix(String),
    SizeTooLarge(String),
    Size(String),
    Compat(String),
    CompressionType(String),
    CreateOption(String),
    CacheSizesNeedQcow2(String),
    CacheSizesNeedQcow2Image,
    RawBacking,
    RawOptions,
    RepairMode(String),
    CompressNeedsQcow2,
    NotPositive,
    BackingNeedsFormat,
    FormatNeedsBacking,
    SizeRequired,
    Preallocation(String),
    MeasureSizeAndFile,
    MeasureNeedsInput,
    ConvertBackingNeedsQcow2,
    CompressWithBacking,
    /// `convert`'s output is a file the input reads (the input, or in its chain).
    OutputInInputChain(PathBuf),
    /// The image would be in its own backing chain.
    OwnBacking(PathBuf),
    /// `bench`'s request size exceeds the image.
    BenchSize {
        size: u64,
        image: u64,
    },
    /// A `read`, `write` or `discard` range that does not lie within the image.
    Range {
        offset: u64,
        len: u64,
        image: u64,
    },
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Usage::SizeSuffix(s) => write!(f, "bad size suffix in '{s}'"),
            Usage::SizeTooLarge(s) => write!(f, "size '{s}' too large"),
            Usage::Size(s) => write!(f, "invalid size '{s}'"),
            Usage::Compat(v) => write!(f, "unknown compat '{v}'"),
            Usage::CompressionType(v) => {
                write!(f, "unknown compression_type '{v}' (zlib or zstd)")
            }
            Usage::CreateOption(k) => write!(f, "unsupported option '{k}'"),
            Usage::CacheSizesNeedQcow2(fmt) => write!(
                f,
                "--l2-cache-size and --refcount-cache-size apply to qcow2 images, not {fmt}"
            ),
            Usage::CacheSizesNeedQcow2Image => {
                f.write_str("--l2-cache-size and --refcount-cache-size apply to qcow2 images")
            }
            Usage::RawBacking => f.write_str("raw images have no backing file"),
            Usage::RawOptions => f.write_str("raw images take no -o options"),
            Usage::RepairMode(m) => write!(f, "unknown repair mode '{m}'"),
            Usage::CompressNeedsQcow2 => f.write_str("-c (compression) needs -O qcow2"),
            Usage::NotPositive => f.write_str("request size and depth must be positive"),
            Usage::BackingNeedsFormat => f.write_str(
                "-b needs -F FMT: keel-img does not create images whose backing format must be probed",
            ),
            Usage::FormatNeedsBacking => f.write_str("-F needs -b FILE"),
            Usage::Preallocation(v) => write!(f, "unknown preallocation '{v}'"),
            Usage::MeasureSizeAndFile => {
                f.write_str("--size N cannot be used together with a filename.")
            }
            Usage::MeasureNeedsInput => {
                f.write_str("Either --size N or one filename must be specified.")
            }
            Usage::ConvertBackingNeedsQcow2 => f.write_str("-B needs -O qcow2"),
            Usage::CompressWithBacking => {
                f.write_str("-c and -B together are not supported")
            }
            Usage::OutputInInputChain(p) => write!(
                f,
                "the output {} is the input image or in its backing chain: writing it would destroy what is read",
                p.display()
            ),
            Usage::OwnBacking(p) => write!(
                f,
                "{} would be in its own backing chain",
                p.display()
            ),
            Usage::BenchSize { size, image } => write!(
                f,
                "request size {size} is larger than the image ({image} bytes)"
            ),
            Usage::Range { offset, len, image } => write!(
                f,
                "{len} bytes at offset {offset} do not lie within the image ({image} bytes)"
            ),
            Usage::SizeRequired => {
                f.write_str("an image size is required (or -b to take the backing file's)")
            }
        }
    }
}

/// A request keel-img does not implement.
#[derive(Debug)]
enum Unsupported {
    AioEngine(String),
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsupported::AioEngine(e) => write!(f, "aio engine '{e}' (use io_uring or threads)"),
        }
    }
}

impl From<Usage> for CliError {
    fn from(u: Usage) -> Self {
        CliError::Usage(u)
    }
}

type Result<T> = std::result::Result<T, CliError>;

#[derive(Parser)]
#[command(
    name = "keel-img",
    version,
    about = "Raw and qcow2 image tool (qemu-img compatible subset)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// qcow2 metadata cache sizes (QEMU's runtime options of the same names) and
/// backing policy: the command line of [`Qcow2Options`].
#[derive(clap::Args, Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CacheSizes {
    /// qcow2 L2 table cache size (suffixes k, M, G). Default: enough to map
    /// the whole image, at most 32 MiB. Rounded down to whole clusters, at
    /// least 2.
    #[arg(long = "l2-cache-size", value_name = "SIZE", value_parser = size_arg)]
    l2: Option<u64>,
    /// qcow2 refcount block cache size (suffixes k, M, G). Default: 4
    /// clusters, at least 256 KiB. Rounded down to whole clusters, at least 2.
    #[arg(long = "refcount-cache-size", value_name = "SIZE", value_parser = size_arg)]
    refcount: Option<u64>,
    /// Follow qcow2 backing files whose format the image does not state,
    /// probing it. Off by default: a guest could write a qcow2 header naming
    /// any host file into its raw disk.
    #[arg(long = "allow-probed-backing")]
    allow_probed_backing: bool,
}

impl CacheSizes {
    fn is_set(&self) -> bool {
        self.l2.is_some() || self.refcount.is_some()
    }

    /// The qcow2 options these flags ask for.
    fn qcow2_options(&self) -> Qcow2Options {
        Qcow2Options {
            cache_sizes: qcow2::CacheSizes {
                l2: self.l2,
                refcount: self.refcount,
            },
            allow_probed_backing: self.allow_probed_backing,
            ..Default::default()
        }
    }

    /// Options for opening an image with these flags.
    fn open_options(&self, read_only: bool, cache: CacheMode) -> ImageOptions {
        ImageOptions {
            file: RawOptions {
                cache,
                read_only,
                ..Default::default()
            },
            qcow2: self.qcow2_options(),
        }
    }
}

/// `--output`: qemu-img's two output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// JSON.
    Json,
}

/// qcow2 options for opening a chain read-only with this backing policy.
fn qcow2_options(allow_probed_backing: bool) -> Qcow2Options {
    Qcow2Options {
        allow_probed_backing,
        read_only: true,
        ..Default::default()
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image: `create [-f fmt] [-o opts] FILE SIZE`.
    Create {
        /// Format: raw or qcow2.
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// qcow2 options: cluster_size, compat (0.10/1.1), refcount_bits,
        /// lazy_refcounts, compression_type (zlib/zstd), extended_l2.
        #[arg(short = 'o')]
        options: Option<String>,
        /// Backing file (qcow2 only), stored as given: a relative name is
        /// resolved against the new image's directory.
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format (raw or qcow2); required with -b.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        file: PathBuf,
        /// Size (suffixes k, M, G, T); default with -b: the backing file's.
        size: Option<String>,
    },
    /// List, create, apply or delete internal snapshots:
    /// `snapshot [-l | -c NAME | -a NAME | -d NAME] FILE`.
    Snapshot(lifecycle::snapshot::Args),
    /// Change the virtual size: `resize [--shrink] [--preallocation=MODE] FILE [+-]SIZE`.
    Resize(lifecycle::resize::Args),
    /// Write an overlay's data into its backing chain: `commit [-b BASE] [-d] [-p] FILE`.
    Commit(lifecycle::commit::Args),
    /// Change the backing file: `rebase [-u] -b BACKING [-F FMT] [-p] FILE`.
    Rebase(lifecycle::rebase::Args),
    /// Change qcow2 options in place: `amend -o compat=..,lazy_refcounts=..,refcount_bits=.. FILE`.
    Amend(lifecycle::amend::Args),
    /// Show information about an image.
    Info {
        /// Accepted for qemu-img compatibility (`-U`, `--force-share`): keel-img
        /// takes no image locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Format (probed if omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: human or json.
        #[arg(long = "output", value_enum, default_value = "human")]
        output: OutputFormat,
        /// Show every image of the backing chain (JSON: a list).
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Follow backing files whose format is not stated, probing it.
        #[arg(long = "allow-probed-backing")]
        allow_probed_backing: bool,
        /// Image file.
        file: PathBuf,
    },
    /// Show where each range of the image is stored, through its backing chain.
    Map {
        /// Accepted for qemu-img compatibility (`-U`, `--force-share`): keel-img
        /// takes no image locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Output format: human or json.
        #[arg(long = "output", value_enum, default_value = "human")]
        output: OutputFormat,
        /// First byte to map (suffixes k, M, G).
        #[arg(long = "start-offset", value_parser = size_arg, default_value = "0")]
        start_offset: u64,
        /// Most bytes to map (suffixes k, M, G).
        #[arg(long = "max-length", value_parser = size_arg)]
        max_length: Option<u64>,
        /// Format (probed if omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Follow backing files whose format is not stated, probing it.
        #[arg(long = "allow-probed-backing")]
        allow_probed_backing: bool,
        /// Image file.
        file: PathBuf,
    },
    /// Compare two images: exit 0 identical, 1 different, 2 error.
    Compare {
        /// Accepted for qemu-img compatibility (`-U`, `--force-share`): keel-img
        /// takes no image locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Format of the first image (probed if omitted).
        #[arg(short = 'f')]
        format1: Option<String>,
        /// Format of the second image (probed if omitted).
        #[arg(short = 'F')]
        format2: Option<String>,
        /// Strict: sizes and block status must match too.
        #[arg(short = 's')]
        strict: bool,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Follow backing files whose format is not stated, probing it.
        #[arg(long = "allow-probed-backing")]
        allow_probed_backing: bool,
        /// First image.
        file1: PathBuf,
        /// Second image.
        file2: PathBuf,
    },
    /// The file size a new image needs, for a size or for a copy of an image.
    Measure {
        /// Accepted for qemu-img compatibility (`-U`, `--force-share`): keel-img
        /// takes no image locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Output format: human or json.
        #[arg(long = "output", value_enum, default_value = "human")]
        output: OutputFormat,
        /// Format of the new image.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Options of the new image, as for create (and preallocation).
        #[arg(short = 'o')]
        options: Option<String>,
        /// Virtual size of an empty new image (suffixes k, M, G).
        #[arg(long = "size", value_parser = size_arg)]
        size: Option<u64>,
        /// Format of FILE (probed if omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Follow backing files whose format is not stated, probing it.
        #[arg(long = "allow-probed-backing")]
        allow_probed_backing: bool,
        /// The image to copy.
        file: Option<PathBuf>,
    },
    /// Check a qcow2 image. Exit code: 0 clean, 1 check error, 2 corruption, 3 leaks only.
    Check {
        /// Repair: leaks or all.
        #[arg(short = 'r')]
        repair: Option<String>,
        /// Format (probed if omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: human or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        /// Image file.
        file: PathBuf,
    },
    /// Convert between raw and qcow2.
    Convert {
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Input format (probed if omitted).
        #[arg(short = 'f')]
        input_format: Option<String>,
        /// Output format.
        #[arg(short = 'O', default_value = "raw")]
        output_format: String,
        /// Output qcow2 options, as for create.
        #[arg(short = 'o')]
        options: Option<String>,
        /// Compress the output (qcow2): clusters that do not shrink are
        /// stored uncompressed.
        #[arg(short = 'c')]
        compress: bool,
        /// Output cache mode.
        #[arg(short = 't', default_value = "writeback")]
        cache: String,
        /// Make the output an overlay of this backing file (stored as given: a
        /// relative name is resolved against the output's directory) holding only
        /// what differs from it; needs -F.
        #[arg(short = 'B')]
        backing: Option<String>,
        /// Format of the -B backing file (raw or qcow2).
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Cache sizes of the qcow2 images (input and output).
        #[command(flatten)]
        sizes: CacheSizes,
        /// Input file.
        input: PathBuf,
        /// Output file.
        output: PathBuf,
    },
    /// Benchmark sequential strided I/O, like `qemu-img bench`.
    Bench {
        /// Number of requests.
        #[arg(short = 'c', default_value_t = 75000)]
        count: u64,
        /// Requests in flight.
        #[arg(short = 'd', default_value_t = 64)]
        depth: u32,
        /// Format (probed if omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Cache mode.
        #[arg(short = 't', default_value = "writeback")]
        cache: String,
        /// Same as -t none.
        #[arg(short = 'n')]
        nocache: bool,
        /// AIO engine: io_uring, or threads (a pool of `depth` worker threads).
        #[arg(short = 'i', default_value = "io_uring")]
        aio: String,
        /// Offset of the first request.
        #[arg(short = 'o', default_value = "0")]
        offset: String,
        /// Request size.
        #[arg(short = 's', default_value = "4096")]
        size: String,
        /// Offset increment between requests (default: the request size).
        #[arg(short = 'S')]
        step: Option<String>,
        /// Write instead of read.
        #[arg(short = 'w')]
        write: bool,
        /// Byte written by write requests.
        #[arg(long = "pattern", default_value = "0", value_parser = parse_byte)]
        pattern: u8,
        /// Flush after this many write requests.
        #[arg(long = "flush-interval")]
        flush_interval: Option<u64>,
        /// Do not wait for in-flight requests before each flush.
        #[arg(long = "no-drain")]
        no_drain: bool,
        /// Quiet.
        #[arg(short = 'q')]
        quiet: bool,
        #[command(flatten)]
        sizes: CacheSizes,
        /// Image file.
        file: PathBuf,
    },
    /// Write a byte pattern (or zeroes), like `qemu-io -c 'write -P'`.
    Write {
        /// Pattern byte (decimal or 0x hex).
        #[arg(short = 'P', default_value = "0xcd", value_parser = parse_byte)]
        pattern: u8,
        /// Write zeroes instead of a pattern.
        #[arg(short = 'z')]
        zero: bool,
        /// With -z, allow unmapping.
        #[arg(short = 'u')]
        unmap: bool,
        /// Cache mode.
        #[arg(short = 't', default_value = "writeback")]
        cache: String,
        #[command(flatten)]
        range: RwRange,
    },
    /// Read a range and verify a byte pattern; exits 1 on a mismatch.
    Read {
        /// Expected byte (decimal or 0x hex).
        #[arg(short = 'P', value_parser = parse_byte)]
        pattern: Option<u8>,
        #[command(flatten)]
        range: RwRange,
    },
    /// Discard a range.
    Discard {
        #[command(flatten)]
        range: RwRange,
    },
}

/// The image and the byte range that `write`, `read` and `discard` act on.
#[derive(clap::Args, Debug)]
struct RwRange {
    /// Format (probed if omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    #[command(flatten)]
    sizes: CacheSizes,
    /// Image file.
    file: PathBuf,
    /// Offset.
    offset: String,
    /// Length.
    len: String,
}

/// `-b BACKING -F FMT`: both or neither.
fn backing_arg<'a>(
    backing: Option<&'a str>,
    format: Option<&str>,
) -> Result<Option<(&'a str, Format)>> {
    match (backing, format) {
        (Some(b), Some(f)) => Ok(Some((b, f.parse::<Format>()?))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(Usage::BackingNeedsFormat.into()),
        (None, Some(_)) => Err(Usage::FormatNeedsBacking.into()),
    }
}

fn parse_byte(s: &str) -> Result<u8> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16),
        None => s.parse::<u8>(),
    };
    r.map_err(|source| CliError::Byte {
        value: s.to_string(),
        source,
    })
}

fn size_arg(s: &str) -> Result<u64> {
    parse_size(s)
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    size::parse(s, false).map_err(|e| {
        match e {
            size::SizeError::Suffix => Usage::SizeSuffix(s.to_string()),
            size::SizeError::TooLarge => Usage::SizeTooLarge(s.to_string()),
            size::SizeError::Number => Usage::Size(s.to_string()),
        }
        .into()
    })
}

fn parse_create_opts(opts: Option<&str>, size: u64) -> Result<CreateOptions> {
    let mut o = CreateOptions {
        size,
        ..Default::default()
    };
    let Some(opts) = opts else { return Ok(o) };
    for kv in opts.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
        match k {
            "cluster_size" => o.cluster_size = parse_size(v)?,
            "compat" => {
                o.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(Usage::Compat(v.to_string()).into()),
                }
            }
            "refcount_bits" => {
                o.refcount_bits = v.parse().map_err(|source| CliError::RefcountBits {
                    value: v.to_string(),
                    source,
                })?
            }
            "lazy_refcounts" => o.lazy_refcounts = matches!(v, "on" | "true" | "yes"),
            "extended_l2" => o.extended_l2 = matches!(v, "on" | "true" | "yes"),
            "compression_type" => {
                o.compression_type = match v {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(Usage::CompressionType(v.to_string()).into()),
                }
            }
            "backing_file" => o.backing_file = Some(v.to_string()),
            "backing_fmt" => o.backing_format = Some(v.parse()?),
            "size" => o.size = parse_size(v)?,
            _ => return Err(Usage::CreateOption(k.to_string()).into()),
        }
    }
    Ok(o)
}

fn image_format(path: &Path, fmt: Option<&str>) -> Result<String> {
    match fmt {
        Some(f) => Ok(f.to_string()),
        None => Ok(Format::probe(path)?.to_string()),
    }
}

/// Opens an image. Cache sizes apply to qcow2 images only; setting them for
/// any other format is an error.
fn open_image(
    path: &Path,
    fmt: Option<&str>,
    cache: CacheMode,
    read_only: bool,
    sizes: CacheSizes,
) -> Result<Image> {
    let fmt = image_format(path, fmt)?;
    let format: Format = fmt.parse()?;
    if format != Format::Qcow2 && sizes.is_set() {
        return Err(Usage::CacheSizesNeedQcow2(fmt).into());
    }
    Image::open(path, format, sizes.open_options(read_only, cache)).map_err(|e| opening(path, e))
}

/// [`Chain::open`], naming `path` in the error.
pub(crate) fn open_chain(path: &Path, format: Format, opts: Qcow2Options) -> Result<Chain> {
    Chain::open(path, format, opts).map_err(|e| opening(path, e))
}

fn create_image(
    path: &Path,
    fmt: &str,
    opts: Option<&str>,
    size: u64,
    backing: Option<(&str, Format)>,
) -> Result<()> {
    match fmt {
        "raw" => {
            if backing.is_some() {
                return Err(Usage::RawBacking.into());
            }
            if opts.is_some() {
                return Err(Usage::RawOptions.into());
            }
            Ok(RawFile::create(path, size)?)
        }
        "qcow2" => {
            // Like QEMU: qcow2 sizes are whole 512-byte sectors.
            let mut o = parse_create_opts(opts, size.div_ceil(512) * 512)?;
            if let Some((name, bfmt)) = backing {
                refuse_own_backing(path, name, bfmt)?;
                o.backing_file = Some(name.to_string());
                o.backing_format = Some(bfmt);
            }
            qcow2::create_path(path, &o)?;
            Ok(())
        }
        other => Err(
            keel_block::Error::Unsupported(keel_block::error::Unsupported::Format(
                other.to_string(),
            ))
            .into(),
        ),
    }
}

/// Refuses a backing file `name` (of format `format`) for the image to be made at `path`
/// when `path` would be in its own chain: the backing file is `path` itself (however
/// named, existing or not), or `path` exists and the backing file's chain reads it.
/// Checked before anything is written, so the old image is still there.
fn refuse_own_backing(path: &Path, name: &str, format: Format) -> Result<()> {
    let backing = qcow2::backing::resolve(path, name.as_bytes());
    let own = same_path(&backing, path)
        || (path.exists()
            && Chain::open(&backing, format, qcow2_options(true))
                .is_ok_and(|c| c.contains_file(path)));
    if own {
        return Err(Usage::OwnBacking(path.to_path_buf()).into());
    }
    Ok(())
}

/// Whether `a` and `b` name the same file: the same device and inode when both exist,
/// else the same name in the same (canonical) directory.
fn same_path(a: &Path, b: &Path) -> bool {
    if let (Some(x), Some(y)) = (file_id(a), file_id(b)) {
        return x == y;
    }
    let norm = |p: &Path| {
        let name = p.file_name()?;
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(dir.canonicalize().ok()?.join(name))
    };
    matches!((norm(a), norm(b)), (Some(x), Some(y)) if x == y)
}

/// Opens the file under an image: read-only, or read-write and growable.
pub(crate) fn open_raw(
    path: &Path,
    read_only: bool,
) -> std::result::Result<RawFile, keel_block::Error> {
    RawFile::open(
        path,
        RawOptions {
            read_only,
            growable: !read_only,
            ..Default::default()
        },
    )
}

/// Bytes the file takes on disk.
pub(crate) fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Names `path` in a library error of `r` (a one-image command's).
fn about(path: &Path, r: Result<i32>) -> Result<i32> {
    r.map_err(|e| match e {
        CliError::Block(source) if !names(&source, path) => CliError::Image {
            path: path.to_path_buf(),
            source,
        },
        e => e,
    })
}

/// Whether `e`'s message already names `path` (an I/O error on it does).
fn names(e: &keel_block::Error, path: &Path) -> bool {
    e.to_string().contains(&path.display().to_string())
}

/// `e`, from opening the image at `path`, with `path` named once.
fn opening(path: &Path, e: keel_block::Error) -> CliError {
    if names(&e, path) {
        CliError::Block(e)
    } else {
        CliError::Open {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// `snapshot -l` on a qcow2 image (the verb has checked the format): qemu-img's listing.
fn list_snapshots(file: &Path) -> Result<i32> {
    about(file, list_snapshots_of(file))
}

fn list_snapshots_of(file: &Path) -> Result<i32> {
    let raw = open_raw(file, true)?;
    let h = qcow2::read_header(&raw)?;
    let snaps = qcow2::snapshot::read_snapshots(&raw, &h)?;
    if !snaps.is_empty() {
        print!("{}", text::snapshot_listing(&snaps));
    }
    Ok(0)
}

fn cmd_check(
    file: &Path,
    fmt: Option<&str>,
    repair: Option<&str>,
    output: &str,
    quiet: bool,
) -> Result<i32> {
    let fmt = match fmt {
        Some(f) => f.to_string(),
        None => Format::probe(file)?.to_string(),
    };
    if fmt != "qcow2" {
        eprintln!("keel-img: This image format does not support checks");
        return Ok(63);
    }
    let fix = match repair {
        None => Fix::None,
        Some("leaks") => Fix::Leaks,
        Some("all") => Fix::All,
        Some(o) => return Err(Usage::RepairMode(o.to_string()).into()),
    };
    let f = RawFile::open(
        file,
        RawOptions {
            read_only: fix == Fix::None,
            growable: true,
            ..Default::default()
        },
    )?;
    let r = qcow2::check(&f, fix)?;
    let code = check_exit_code(&r);
    if output == "json" {
        let mut v = serde_json::json!({
            "image-end-offset": r.image_end_offset,
            "total-clusters": r.total_clusters,
            "check-errors": r.check_errors,
            "allocated-clusters": r.allocated_clusters,
            "filename": file.display().to_string(),
            "format": "qcow2",
        });
        for (k, n) in [
            ("leaks", r.leaks),
            ("corruptions", r.corruptions),
            ("leaks-fixed", r.leaks_fixed),
            ("corruptions-fixed", r.corruptions_fixed),
        ] {
            if n > 0 {
                v[k] = n.into();
            }
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if !quiet {
        for m in &r.messages {
            eprintln!("{m}");
        }
        if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
            println!("The following inconsistencies were found and repaired:\n");
            println!("    {} leaked clusters", r.leaks_fixed);
            println!("    {} corruptions\n", r.corruptions_fixed);
            println!("Double checking the fixed image now...");
        }
        if r.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
        if r.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if code == 0 {
            println!("No errors were found on the image.");
        }
        if r.total_clusters > 0 {
            println!(
                "{}/{} = {:.2}% allocated, 0.00% fragmented, 0.00% compressed clusters",
                r.allocated_clusters,
                r.total_clusters,
                r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64
            );
        }
        println!("Image end offset: {}", r.image_end_offset);
    }
    Ok(code)
}

/// qemu-img check's exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
fn check_exit_code(r: &qcow2::CheckReport) -> i32 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// Options of `convert`.
struct ConvertArgs<'a> {
    input: &'a Path,
    input_format: Option<&'a str>,
    output: &'a Path,
    output_format: &'a str,
    options: Option<&'a str>,
    compress: bool,
    cache: CacheMode,
    sizes: CacheSizes,
    progress: bool,
    /// `-B NAME` and `-F FMT`: the output's backing file, stored as given.
    backing: Option<(&'a str, Format)>,
}

fn cmd_convert(a: &ConvertArgs<'_>) -> Result<i32> {
    let ifmt = image_format(a.input, a.input_format)?;
    let ofmt = a.output_format;
    let sizes = a.sizes;
    if sizes.is_set() && ifmt != "qcow2" && ofmt != "qcow2" {
        return Err(Usage::CacheSizesNeedQcow2Image.into());
    }
    if a.backing.is_some() && ofmt != "qcow2" {
        return Err(Usage::ConvertBackingNeedsQcow2.into());
    }
    let for_fmt = |f: &str| {
        if f == "qcow2" {
            sizes
        } else {
            CacheSizes::default()
        }
    };
    let src = open_image(
        a.input,
        Some(&ifmt),
        CacheMode::Writeback,
        true,
        for_fmt(&ifmt),
    )?;
    let size = src.backend().size();
    // Creating the output truncates it: it must not be a file the input reads.
    if a.output.exists() {
        let chain = open_chain(a.input, ifmt.parse()?, for_fmt(&ifmt).qcow2_options())?;
        if chain.contains_file(a.output) {
            return Err(Usage::OutputInInputChain(a.output.to_path_buf()).into());
        }
    }
    create_image(a.output, ofmt, a.options, size, a.backing)?;
    let dst = open_image(a.output, Some(ofmt), a.cache, false, for_fmt(ofmt))?;
    let dest = match (&dst, a.compress, a.backing.is_some()) {
        (_, true, true) => return Err(Usage::CompressWithBacking.into()),
        (Image::Qcow2(q), true, false) => Destination::Compressed(q),
        (_, true, false) => return Err(Usage::CompressNeedsQcow2.into()),
        (Image::Qcow2(q), false, true) => match q.backing() {
            Some(b) => Destination::Overlay {
                image: &**q,
                backing: &**b,
                granularity: q.cluster_size(),
            },
            None => Destination::Plain(dst.backend()),
        },
        (_, false, _) => Destination::Plain(dst.backend()),
    };
    let mut progress = Progress::new(a.progress);
    convert(src.backend(), dest, &mut |f| progress.update(f))?;
    if a.progress {
        progress.finish();
    }
    dst.close()?;
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn cmd_bench(
    file: &Path,
    fmt: Option<&str>,
    cache: CacheMode,
    aio: &str,
    count: u64,
    depth: u32,
    offset: u64,
    size: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: Option<u64>,
    no_drain: bool,
    quiet: bool,
    sizes: CacheSizes,
) -> Result<i32> {
    let img = open_image(file, fmt, cache, !write, sizes)?;
    let image_size = img.backend().size();
    if size == 0 || depth == 0 {
        return Err(Usage::NotPositive.into());
    }
    // Checked before depth buffers of it are allocated.
    if size > image_size {
        return Err(Usage::BenchSize {
            size,
            image: image_size,
        }
        .into());
    }
    if !quiet {
        println!(
            "Sending {count} {} requests, {size} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})",
            if write { "write" } else { "read" }
        );
    }
    let mut queue: Box<dyn AioQueue<AlignedBuf>> = match (aio, &img) {
        ("io_uring", Image::Raw(r)) => Box::new(UringQueue::new(r.clone(), depth)?),
        ("io_uring", Image::Qcow2(q)) => Box::new(UringQueue::new(q.clone(), depth)?),
        ("threads", Image::Raw(r)) => Box::new(ThreadQueue::new(r.clone(), depth as usize)?),
        ("threads", Image::Qcow2(q)) => Box::new(ThreadQueue::new(q.clone(), depth as usize)?),
        (other, _) => {
            return Err(CliError::Unsupported(Unsupported::AioEngine(
                other.to_string(),
            )))
        }
    };
    // Each buffer travels with its request and comes back with the completion.
    let mut free: Vec<AlignedBuf> = (0..depth)
        .map(|_| {
            let mut b = AlignedBuf::new(size as usize, 4096);
            b.as_mut_slice().fill(pattern);
            b
        })
        .collect();
    let mut next_off = offset;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut since_flush = 0u64;
    let mut out: Vec<Completion<AlignedBuf>> = Vec::new();
    let start = Instant::now();
    while completed < count {
        while submitted < count && !free.is_empty() {
            if let (Some(iv), true) = (flush_interval, write) {
                if since_flush >= iv {
                    if !no_drain && queue.in_flight() > 0 {
                        break;
                    }
                    img.backend().flush()?;
                    since_flush = 0;
                }
            }
            let Some(buf) = free.pop() else { break };
            // Past the end (or past 2^64), the next request starts over at offset 0.
            if next_off
                .checked_add(size)
                .is_none_or(|end| end > image_size)
            {
                next_off = 0;
            }
            let req = if write {
                AioRequest::write(next_off, buf, submitted)
            } else {
                AioRequest::read(next_off, buf, submitted)
            };
            queue.submit(req);
            submitted += 1;
            since_flush += 1;
            next_off = next_off.saturating_add(step);
        }
        out.clear();
        queue.wait(1, &mut out)?;
        for c in out.drain(..) {
            c.result?;
            free.extend(c.buf);
            completed += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if !quiet {
        println!("Run completed in {secs:.3} seconds.");
    }
    drop(queue);
    img.close()?;
    Ok(0)
}

fn cmd_rw(range: &RwRange, cache: CacheMode, op: RwOp) -> Result<i32> {
    let (offset, len) = (parse_size(&range.offset)?, parse_size(&range.len)?);
    let read_only = matches!(op, RwOp::Read(_));
    let img = open_image(
        &range.file,
        range.format.as_deref(),
        cache,
        read_only,
        range.sizes,
    )?;
    let b = img.backend();
    // The whole range first: a write that fails half way has already changed the image.
    if offset.checked_add(len).is_none_or(|end| end > b.size()) {
        return Err(Usage::Range {
            offset,
            len,
            image: b.size(),
        }
        .into());
    }
    let result = rw(b, offset, len, op);
    if result.is_err() && !read_only && marked_corrupt(&range.file) {
        // The library marked the image when it found the corruption; say so, as qemu-img
        // does ("Marking image as corrupt"), or the next command's refusal is a surprise.
        eprintln!(
            "keel-img: {} is now marked corrupt: it opens read-only until `keel-img check -r all` repairs it",
            range.file.display()
        );
    }
    let result = result?;
    img.close()?;
    Ok(result)
}

/// Whether the qcow2 image at `path` has its corrupt bit set (false for raw images or a
/// file that cannot be read).
fn marked_corrupt(path: &Path) -> bool {
    open_raw(path, true)
        .ok()
        .and_then(|f| qcow2::read_header(&f).ok())
        .is_some_and(|h| h.incompatible_features & qcow2::header::INCOMPAT_CORRUPT != 0)
}

/// `read`, `write` or `discard` of `len` bytes at `offset` of `b`: the exit code.
fn rw(b: &dyn keel_block::BlockBackend, offset: u64, len: u64, op: RwOp) -> Result<i32> {
    Ok(match op {
        RwOp::Write(p) => {
            let chunk = 1u64 << 20;
            let buf = vec![p; chunk.min(len) as usize];
            let mut pos = 0;
            while pos < len {
                let n = (len - pos).min(chunk);
                b.write_at(&buf[..n as usize], offset + pos)?;
                pos += n;
            }
            println!("wrote {len}/{len} bytes at offset {offset}");
            0
        }
        RwOp::Zero(unmap) => {
            b.write_zeroes(offset, len, unmap)?;
            println!("wrote {len}/{len} bytes at offset {offset}");
            0
        }
        RwOp::Discard => {
            b.discard(offset, len)?;
            println!("discard {len}/{len} bytes at offset {offset}");
            0
        }
        RwOp::Read(p) => {
            let chunk = 1u64 << 20;
            let mut buf = vec![0u8; chunk.min(len) as usize];
            let mut pos = 0;
            let mut bad = None;
            while pos < len {
                let n = (len - pos).min(chunk) as usize;
                b.read_at(&mut buf[..n], offset + pos)?;
                if let Some(p) = p {
                    if bad.is_none() {
                        if let Some(i) = buf[..n].iter().position(|&x| x != p) {
                            bad = Some(offset + pos + i as u64);
                        }
                    }
                }
                pos += n as u64;
            }
            match bad {
                Some(at) => {
                    println!("Pattern verification failed at offset {at}, {len} bytes");
                    1
                }
                None => {
                    println!("read {len}/{len} bytes at offset {offset}");
                    0
                }
            }
        }
    })
}

enum RwOp {
    Write(u8),
    Zero(bool),
    Read(Option<u8>),
    Discard,
}

fn run(cli: Cli) -> Result<i32> {
    match cli.cmd {
        Cmd::Create {
            format,
            options,
            backing,
            backing_format,
            quiet,
            file,
            size,
        } => {
            let backing = backing_arg(backing.as_deref(), backing_format.as_deref())?;
            let size = match (&size, backing) {
                (Some(s), _) => parse_size(s)?,
                (None, Some((name, fmt))) => {
                    let path = keel_block::qcow2::backing::resolve(&file, name.as_bytes());
                    let img = Image::open(
                        &path,
                        fmt,
                        ImageOptions {
                            file: RawOptions {
                                read_only: true,
                                ..Default::default()
                            },
                            ..Default::default()
                        },
                    )
                    .map_err(|e| opening(&path, e))?;
                    img.backend().size()
                }
                (None, None) => return Err(Usage::SizeRequired.into()),
            };
            create_image(&file, &format, options.as_deref(), size, backing)?;
            if !quiet {
                println!("Formatting '{}', fmt={format} size={size}", file.display());
            }
            Ok(0)
        }
        Cmd::Info {
            force_share: _,
            format,
            output,
            backing_chain,
            allow_probed_backing,
            file,
        } => about(
            &file,
            info::cmd_info(
                &file,
                format.as_deref(),
                output,
                backing_chain,
                allow_probed_backing,
            ),
        ),
        Cmd::Compare {
            force_share: _,
            format1,
            format2,
            strict,
            progress,
            quiet,
            allow_probed_backing,
            file1,
            file2,
        } => compare::cmd_compare(&compare::CompareArgs {
            files: [&file1, &file2],
            formats: [format1.as_deref(), format2.as_deref()],
            strict,
            progress,
            quiet,
            allow_probed_backing,
        }),
        Cmd::Measure {
            force_share: _,
            output,
            out_format,
            options,
            size,
            format,
            allow_probed_backing,
            file,
        } => measure::cmd_measure(&measure::MeasureArgs {
            file: file.as_deref(),
            size,
            format: format.as_deref(),
            out_format: &out_format,
            options: options.as_deref(),
            output,
            allow_probed_backing,
        }),
        Cmd::Map {
            force_share: _,
            output,
            start_offset,
            max_length,
            format,
            allow_probed_backing,
            file,
        } => map::cmd_map(
            &file,
            format.as_deref(),
            output,
            start_offset,
            max_length,
            allow_probed_backing,
        ),
        Cmd::Check {
            repair,
            format,
            output,
            quiet,
            file,
        } => about(
            &file,
            cmd_check(&file, format.as_deref(), repair.as_deref(), &output, quiet),
        ),
        Cmd::Snapshot(a) => lifecycle::snapshot::run(a, list_snapshots),
        Cmd::Resize(a) => Ok(lifecycle::resize::run(a)?),
        Cmd::Commit(a) => Ok(lifecycle::commit::run(a)?),
        Cmd::Rebase(a) => Ok(lifecycle::rebase::run(a)?),
        Cmd::Amend(a) => Ok(lifecycle::amend::run(a)?),
        Cmd::Convert {
            progress,
            input_format,
            output_format,
            options,
            compress,
            cache,
            backing,
            backing_format,
            sizes,
            input,
            output,
        } => {
            let backing = backing_arg(backing.as_deref(), backing_format.as_deref())?;
            cmd_convert(&ConvertArgs {
                input: &input,
                input_format: input_format.as_deref(),
                output: &output,
                output_format: &output_format,
                options: options.as_deref(),
                compress,
                cache: cache.parse()?,
                sizes,
                progress,
                backing,
            })
        }
        Cmd::Bench {
            count,
            depth,
            format,
            cache,
            nocache,
            aio,
            offset,
            size,
            step,
            write,
            pattern,
            flush_interval,
            no_drain,
            quiet,
            sizes,
            file,
        } => {
            let cache = if nocache {
                CacheMode::None
            } else {
                cache.parse()?
            };
            let size = parse_size(&size)?;
            let step = match step {
                Some(s) => parse_size(&s)?,
                None => size,
            };
            cmd_bench(
                &file,
                format.as_deref(),
                cache,
                &aio,
                count,
                depth,
                parse_size(&offset)?,
                size,
                step,
                write,
                pattern,
                flush_interval,
                no_drain,
                quiet,
                sizes,
            )
        }
        Cmd::Write {
            pattern,
            zero,
            unmap,
            cache,
            range,
        } => {
            let op = if zero {
                RwOp::Zero(unmap)
            } else {
                RwOp::Write(pattern)
            };
            cmd_rw(&range, cache.parse()?, op)
        }
        Cmd::Read { pattern, range } => cmd_rw(&range, CacheMode::Writeback, RwOp::Read(pattern)),
        Cmd::Discard { range } => cmd_rw(&range, CacheMode::Writeback, RwOp::Discard),
    }
}

/// Runs keel-img with a command line (`args[0]` is the program name), printing
/// to stdout and stderr as the `keel-img` binary does, and returns its exit
/// status.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version exit 0; a bad command line exits 1, as qemu-img's.
            return ExitCode::from(u8::from(e.use_stderr()));
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            print_error(&e);
            ExitCode::from(1)
        }
    }
}

/// Prints `keel-img: step: cause: cause ...` to stderr.
fn print_error(e: &CliError) {
    let mut msg = format!("keel-img: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_size_flags_reach_the_qcow2_options() {
        let cli = Cli::try_parse_from([
            "keel-img",
            "bench",
            "--l2-cache-size",
            "4M",
            "--refcount-cache-size=128k",
            "-t",
            "none",
            "disk.qcow2",
        ])
        .unwrap();
        let Cmd::Bench { sizes, .. } = cli.cmd else {
            panic!("parsed as another command")
        };
        assert_eq!(
            sizes,
            CacheSizes {
                l2: Some(4 << 20),
                refcount: Some(128 << 10),
                allow_probed_backing: false,
            }
        );
        let o = sizes.open_options(false, CacheMode::DirectSync);
        assert_eq!(o.qcow2.cache_sizes.l2, Some(4 << 20));
        assert_eq!(o.qcow2.cache_sizes.refcount, Some(128 << 10));
        assert!(o.file.cache.dsync() && !o.file.read_only);

        for cmd in ["read", "write", "discard"] {
            let cli =
                Cli::try_parse_from(["keel-img", cmd, "--l2-cache-size=64k", "d.qcow2", "0", "4k"])
                    .unwrap();
            let sizes = match cli.cmd {
                Cmd::Read { range, .. } | Cmd::Write { range, .. } | Cmd::Discard { range } => {
                    range.sizes
                }
                _ => panic!("{cmd} parsed as another command"),
            };
            assert_eq!(sizes.l2, Some(64 << 10), "{cmd}");
            assert_eq!(sizes.refcount, None, "{cmd}");
        }
        let cli =
            Cli::try_parse_from(["keel-img", "convert", "--refcount-cache-size=1M", "a", "b"])
                .unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Convert {
                sizes: CacheSizes {
                    l2: None,
                    refcount: Some(0x10_0000),
                    ..
                },
                ..
            }
        ));
        let e = Cli::try_parse_from(["keel-img", "bench", "--l2-cache-size=lots", "d.qcow2"])
            .err()
            .expect("a bad size is refused");
        assert!(e.to_string().contains("l2-cache-size"), "{e}");
    }
}

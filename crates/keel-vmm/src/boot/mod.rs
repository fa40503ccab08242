//! Loading a kernel and building what its boot protocol hands it.
//!
//! Three kinds of image are accepted, recognised by content:
//! - an ELF with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`): PVH's 32-bit entry, EBX pointing
//!   at `hvm_start_info` (command line, memory map, initrd module, RSDP);
//! - a bzImage: the Linux 64-bit boot protocol at load address + 0x200, RSI pointing at the
//!   zero page (boot_params with the e820 map, command line, initrd);
//! - any other ELF64 (a plain vmlinux, a bare-metal payload): 64-bit entry at `e_entry`,
//!   with the same zero page.
//!
//! Guest physical addresses used below 1 MiB:
//!
//! | address | content |
//! |---|---|
//! | 0x500-0x4069 | GDT, IDT, TSS (keel-kvm `BootTables`) |
//! | 0x6000 | `hvm_start_info`, then the initrd module entry and the memory map |
//! | 0x7000 | zero page (`boot_params`) |
//! | 0x8ff0 | initial stack for the 64-bit entry |
//! | 0x9000-0xefff | identity page tables (0-4 GiB) |
//! | 0x20000 | command line |
//! | 0xe0000 | ACPI tables (RSDP first) |

pub mod acpi;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, GuestAddress, GuestMemoryError};

use keel_memory::{GuestMemoryMmap, MemoryLayout};

/// PVH start info address.
pub const PVH_INFO_START: u64 = 0x6000;
const PVH_MODLIST_START: u64 = 0x6040;
const PVH_MEMMAP_START: u64 = 0x6100;
/// Zero page address.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Command line address.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted (bytes, without the terminating NUL).
pub const CMDLINE_MAX: usize = 4095;
/// Where kernels are loaded unless their headers say otherwise.
pub const KERNEL_START: u64 = 0x10_0000;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Highest initrd end the 64-bit protocol allows when the header does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const LOADFLAG_LOADED_HIGH: u8 = 0x1;
const MAX_E820: usize = 128;

/// Errors while loading a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image is neither ELF nor bzImage. (No cause: the first bytes are simply not a
    /// known header.)
    #[error("{image} is not a kernel keel can boot (expected an ELF64 image or a bzImage)")]
    UnknownFormat {
        /// Which image: its path, or "the built-in test guest".
        image: String,
    },
    /// linux-loader refused the image, or its command line.
    #[error("cannot load kernel {path}")]
    Load {
        /// Its path.
        path: String,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is too long or has invalid characters.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The initrd is not a regular file (a device or a pipe, whose size is not known
    /// before it is read: `/dev/zero` would be read until the host runs out of memory).
    #[error("the initrd {path} is not a regular file")]
    InitrdNotAFile {
        /// Its path.
        path: String,
    },
    /// The initrd does not fit in low memory.
    #[error("initrd of {size} bytes does not fit below {max:#x} after the kernel")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The highest address it may reach.
        max: u64,
    },
    /// Writing boot structures failed.
    #[error("cannot write the boot parameters")]
    Params(#[source] linux_loader::configurator::Error),
    /// Writing into guest memory failed.
    #[error("cannot write into guest memory")]
    Memory(#[from] GuestMemoryError),
}

/// Result alias for boot set-up.
pub type Result<T> = std::result::Result<T, Error>;

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode at `entry`, EBX = `start_info`.
    Pvh {
        /// Entry point.
        entry: u64,
        /// `hvm_start_info` address.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, RSI = `boot_params`.
    Linux64 {
        /// Entry point.
        entry: u64,
        /// Zero page address.
        boot_params: u64,
    },
}

/// Where the kernel image comes from.
pub enum KernelSource<'a> {
    /// A file.
    Path(&'a Path),
    /// An image in memory (keel's built-in test guest).
    Bytes(&'a [u8]),
}

/// What to boot.
pub struct BootSpec<'a> {
    /// The kernel image.
    pub kernel: KernelSource<'a>,
    /// An optional initial ramdisk.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The PCI segment's MCFG entry, for the ACPI tables (MCFG and the DSDT's `\\_SB.PCI0`).
    pub pci: Option<keel_pci::McfgEntry>,
}

enum Kind {
    Elf,
    BzImage,
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn sniff<F: Read + Seek>(f: &mut F, name: &str) -> Result<Kind> {
    let err = |source| Error::Read {
        what: "kernel",
        path: name.to_string(),
        source,
    };
    let mut head = [0u8; 0x206];
    let n = f.read(&mut head).map_err(err)?;
    f.seek(SeekFrom::Start(0)).map_err(err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Kind::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(Kind::BzImage)
    } else {
        Err(Error::UnknownFormat {
            image: name.to_string(),
        })
    }
}

/// Loads the kernel and initrd, writes the command line, the boot parameters and the ACPI
/// tables, and returns where the boot vCPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    vcpus: u8,
    spec: &BootSpec<'_>,
) -> Result<Entry> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX + 1).map_err(Error::Cmdline)?;
    if !spec.cmdline.is_empty() {
        cmdline.insert_str(spec.cmdline).map_err(Error::Cmdline)?;
    }
    let (kind, loaded, name) = match spec.kernel {
        KernelSource::Path(p) => {
            let mut f = open("kernel", p)?;
            let name = p.display().to_string();
            let kind = sniff(&mut f, &name)?;
            let loaded = load_kernel(mem, &kind, &mut f, &name)?;
            (kind, loaded, name)
        }
        KernelSource::Bytes(b) => {
            let mut c = std::io::Cursor::new(b);
            let name = "the built-in test guest".to_string();
            let kind = sniff(&mut c, &name)?;
            let loaded = load_kernel(mem, &kind, &mut c, &name)?;
            (kind, loaded, name)
        }
    };
    let load_err = |source| Error::Load {
        path: name.clone(),
        source,
    };
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(load_err)?;
    let rsdp = acpi::write_tables(mem, layout, vcpus, spec.pci.as_ref())?;

    let kernel_end = loaded.kernel_end.max(loaded.kernel_load.raw_value());
    let initrd_max = loaded
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, layout, p, kernel_end, initrd_max)?),
        None => None,
    };
    let cmdline_len = spec.cmdline.len() as u32;

    if let (Kind::Elf, PvhBootCapability::PvhEntryPresent(entry)) = (&kind, loaded.pvh_boot_cap) {
        write_pvh(mem, layout, rsdp.0, initrd)?;
        return Ok(Entry::Pvh {
            entry: entry.raw_value(),
            start_info: PVH_INFO_START,
        });
    }

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADFLAG_LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    let e820 = layout.e820();
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter().take(MAX_E820)) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.len,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(MAX_E820) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::Params)?;
    let entry = match kind {
        // The 64-bit entry of a bzImage's protected-mode kernel is 0x200 bytes in.
        Kind::BzImage => loaded.kernel_load.raw_value() + 0x200,
        Kind::Elf => loaded.kernel_load.raw_value(),
    };
    Ok(Entry::Linux64 {
        entry,
        boot_params: ZERO_PAGE_START,
    })
}

fn load_kernel<F: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    kind: &Kind,
    f: &mut F,
    name: &str,
) -> Result<linux_loader::loader::KernelLoaderResult> {
    match kind {
        Kind::Elf => Elf::load(mem, None, f, Some(GuestAddress(KERNEL_START))),
        Kind::BzImage => BzImage::load(mem, None, f, Some(GuestAddress(KERNEL_START))),
    }
    .map_err(|source| Error::Load {
        path: name.to_string(),
        source,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel_end: u64,
    initrd_max: u64,
) -> Result<(u64, u64)> {
    let f = open("initrd", path)?;
    let err = |source| Error::Read {
        what: "initrd",
        path: path.display().to_string(),
        source,
    };
    let meta = f.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(Error::InitrdNotAFile {
            path: path.display().to_string(),
        });
    }
    let size = meta.len();
    // The highest page-aligned spot that ends below both the protocol's limit and the end
    // of low RAM, and starts after the kernel.
    let low_ram_end = layout
        .e820()
        .iter()
        .filter(|e| e.kind == keel_memory::E820Kind::Ram && e.addr < (1 << 32))
        .map(|e| e.addr + e.len)
        .max()
        .unwrap_or(0);
    let top = low_ram_end.min(initrd_max.saturating_add(1));
    let too_big = Error::InitrdTooBig { size, max: top };
    let start = top.checked_sub(size).ok_or(too_big)? & !0xfff;
    if start < kernel_end.next_multiple_of(0x1000) {
        return Err(Error::InitrdTooBig { size, max: top });
    }
    // No more than it said it holds, even if it grows meanwhile.
    let mut data = Vec::with_capacity(size as usize);
    f.take(size).read_to_end(&mut data).map_err(err)?;
    vm_memory::Bytes::write_slice(mem, &data, GuestAddress(start))?;
    Ok((start, size))
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .e820()
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.len,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some((paddr, size)) = initrd {
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_START),
        );
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(Error::Params)
}

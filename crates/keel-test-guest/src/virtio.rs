//! A virtio driver core (virtio 1.2) for both transports the guest knows:
//! virtio-pci modern (section 4.1: vendor capabilities, common
//! configuration, notifications, MSI-X) and virtio-mmio version 2 (section
//! 4.2, announced on the command line as Linux's
//! `virtio_mmio.device=<size>@<base>:<irq>`). Above the transports: device
//! status, feature negotiation, queue set-up and split virtqueues
//! (section 2.7) in static memory, polled at CPL3: one in the main area
//! (rings of up to 256 entries, indirect tables, buffer pools) and one in
//! a small ring-only area (up to 64 entries, for a second queue).
//!
//! The virtqueue and the buffers live in this guest's `.bss`. The guest is
//! linked at 1 MiB as a non-PIE image (link.ld) and runs on the identity map
//! of 0-4 GiB, so a static's address is its guest-physical address: the
//! addresses handed to the device are the statics' own addresses.

use core::cell::UnsafeCell;
use core::fmt::Write;
use core::sync::atomic::{fence, AtomicBool, Ordering};

use crate::acpi::Acpi;
use crate::arch::{
    mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8,
    DEVICE_TIMEOUT_CYCLES,
};
use crate::pci::{self, Func};
use crate::text::Text;

pub type Res<T> = Result<T, Text<160>>;

/// Device status bits (section 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
}

pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// Split-ring descriptor flags.
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;
/// used->flags: the device asks not to be notified.
const USED_F_NO_NOTIFY: u16 = 1;

pub const PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the device type.
pub const PCI_MODERN_BASE: u16 = 0x1040;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// virtio-pci capability types (`cfg_type`).
const PCI_CAP_COMMON: u8 = 1;
const PCI_CAP_NOTIFY: u8 = 2;
const PCI_CAP_ISR: u8 = 3;
const PCI_CAP_DEVICE: u8 = 4;

/// `struct virtio_pci_common_cfg` (section 4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Size of the structure up to `queue_device` (what we touch).
    pub const LEN: u32 = 0x38;
}

/// virtio-mmio registers (section 4.2.2).
mod mmio {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
    /// "virt"
    pub const MAGIC_VALUE: u32 = 0x7472_6976;
}

/// InterruptStatus bits (virtio-mmio) and ISR bits (virtio-pci).
pub const INT_USED: u32 = 1;
pub const INT_CONFIG: u32 = 2;

const FOUR_GIB: u64 = 1 << 32;

// ---------------------------------------------------------------------
// virtio-pci

/// One virtio-pci capability: BAR, offset, length.
#[derive(Clone, Copy, Default)]
pub struct PciCap {
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
}

/// A virtio-pci modern function, its structures located through its
/// vendor capabilities and its BARs placed.
pub struct PciTransport {
    pub func: Func,
    pub vendor: u16,
    pub device: u16,
    pub device_type: u16,
    pub caps: [PciCap; 5],
    pub notify_multiplier: u32,
    pub bar_base: [u64; 6],
    pub msix: pci::Msix,
    common: u64,
    notify: u64,
    isr: u64,
    device_cfg: u64,
}

/// The virtio device type of a PCI function, if it is a virtio device:
/// 0x1040 + type (modern), or 0x1000-0x103f (transitional) with the type
/// in the subsystem ID.
pub fn pci_device_type(f: &Func) -> Option<u16> {
    if f.vendor() != PCI_VENDOR {
        return None;
    }
    match f.device_id() {
        d @ 0x1041..=0x107f => Some(d - PCI_MODERN_BASE),
        0x1000..=0x103f => Some(f.read16(0x2e)),
        _ => None,
    }
}

/// The first virtio-pci function on bus 0 of device type `ty`.
pub fn find_pci(acpi: &Acpi, ty: u16) -> Option<Func> {
    let access = pci::access(acpi);
    let (found, n) = pci::enumerate(access);
    found[..n]
        .iter()
        .flatten()
        .map(|f| Func::new(access, f.dev, f.func))
        .find(|f| pci_device_type(f) == Some(ty))
}

impl PciTransport {
    /// Locate the common, notify, ISR and device-configuration structures
    /// (the first capability of each type, section 4.1.4), place every BAR
    /// they and the MSI-X table use, and enable memory decoding and bus
    /// mastering.
    pub fn open(func: Func) -> Res<PciTransport> {
        let mut caps: [Option<PciCap>; 5] = [None; 5];
        let mut multiplier = 0;
        let mut after = 0u8;
        // At most 48 capabilities fit in configuration space.
        for _ in 0..48 {
            let Some(at) = func.find_cap(pci::CAP_VENDOR, after) else {
                break;
            };
            after = at;
            let c = u16::from(at);
            let (len, ty, bar) = (func.read8(c + 2), func.read8(c + 3), func.read8(c + 4));
            if !(PCI_CAP_COMMON..=PCI_CAP_DEVICE).contains(&ty) || bar > 5 {
                continue;
            }
            if len < 16 || (ty == PCI_CAP_NOTIFY && len < 20) {
                crate::fail!("virtio capability at {at:#x} (type {ty}) is only {len} bytes long");
            }
            if caps[usize::from(ty)].is_some() {
                continue;
            }
            caps[usize::from(ty)] = Some(PciCap {
                bar,
                offset: func.read32(c + 8),
                length: func.read32(c + 12),
            });
            if ty == PCI_CAP_NOTIFY {
                multiplier = func.read32(c + 16);
            }
        }
        let names = [
            "",
            "common configuration",
            "notification",
            "ISR",
            "device configuration",
        ];
        let mut got = [PciCap::default(); 5];
        for ty in 1..5 {
            match caps[ty] {
                Some(c) => got[ty] = c,
                None => crate::fail!(
                    "{:02x}.{}: no virtio {} capability (vendor cap 0x09, cfg_type {ty})",
                    func.dev,
                    func.func,
                    names[ty]
                ),
            }
        }
        let Some(mcap) = func.find_cap(pci::CAP_MSIX, 0) else {
            crate::fail!("{:02x}.{}: no MSI-X capability", func.dev, func.func);
        };
        let table_bir = (func.read32(u16::from(mcap) + 4) & 7) as u8;
        let pba_bir = (func.read32(u16::from(mcap) + 8) & 7) as u8;

        let mut bar_base = [0u64; 6];
        let mut bar_size = [0u64; 6];
        let bars = [
            got[1].bar, got[2].bar, got[3].bar, got[4].bar, table_bir, pba_bir,
        ];
        for &b in &bars {
            if b > 5 {
                crate::fail!("{:02x}.{}: MSI-X names BAR{b}", func.dev, func.func);
            }
            if bar_size[usize::from(b)] != 0 {
                continue;
            }
            let (addr, size, _) = pci::ensure_bar(&func, b)?;
            if addr.checked_add(size).is_none_or(|end| end > FOUR_GIB) {
                crate::fail!(
                    "BAR{b} at {addr:#x} ({size:#x} bytes) is above 4 GiB, which is not mapped"
                );
            }
            bar_base[usize::from(b)] = addr;
            bar_size[usize::from(b)] = size;
        }
        for ty in 1..5 {
            let c = got[ty];
            let size = bar_size[usize::from(c.bar)];
            if u64::from(c.offset) + u64::from(c.length) > size {
                crate::fail!(
                    "virtio {} at BAR{}+{:#x}, {:#x} bytes, overruns the BAR ({size:#x} bytes)",
                    names[ty],
                    c.bar,
                    c.offset,
                    c.length
                );
            }
        }
        if got[1].length < common::LEN {
            crate::fail!(
                "virtio common configuration is {:#x} bytes, at least {:#x} needed",
                got[1].length,
                common::LEN
            );
        }
        let Some(msix) = pci::Msix::find(&func) else {
            crate::fail!("{:02x}.{}: no MSI-X capability", func.dev, func.func);
        };
        let at = |ty: u8| {
            let c = got[usize::from(ty)];
            bar_base[usize::from(c.bar)] + u64::from(c.offset)
        };
        Ok(PciTransport {
            func,
            vendor: func.vendor(),
            device: func.device_id(),
            device_type: pci_device_type(&func).unwrap_or(0),
            caps: got,
            notify_multiplier: multiplier,
            bar_base,
            msix,
            common: at(PCI_CAP_COMMON),
            notify: at(PCI_CAP_NOTIFY),
            isr: at(PCI_CAP_ISR),
            device_cfg: at(PCI_CAP_DEVICE),
        })
    }

    fn r8(&self, off: u64) -> u8 {
        // SAFETY: a field of the common configuration structure, inside the
        // BAR `open` placed and checked (below 4 GiB, identity-mapped).
        unsafe { mmio_read8(self.common + off) }
    }
    fn r16(&self, off: u64) -> u16 {
        // SAFETY: as r8; the field is 16-bit aligned.
        unsafe { mmio_read16(self.common + off) }
    }
    fn r32(&self, off: u64) -> u32 {
        // SAFETY: as r8; the field is 32-bit aligned.
        unsafe { mmio_read32(self.common + off) }
    }
    fn w8(&self, off: u64, v: u8) {
        // SAFETY: as r8; writes have the effects section 4.1.4.3 defines.
        unsafe { mmio_write8(self.common + off, v) }
    }
    fn w16(&self, off: u64, v: u16) {
        // SAFETY: as w8.
        unsafe { mmio_write16(self.common + off, v) }
    }
    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as w8.
        unsafe { mmio_write32(self.common + off, v) }
    }

    /// Program MSI-X table entry `entry` to deliver `vector` to this CPU.
    pub fn route(&self, entry: u16, vector: u8) {
        self.msix.set_entry(entry, vector, false);
    }

    /// Turn MSI-X on for the function.
    pub fn enable_msix(&self) {
        self.msix.enable(&self.func);
    }
}

// ---------------------------------------------------------------------
// virtio-mmio

/// One `virtio_mmio.device=` word of the command line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MmioWord {
    pub size: u64,
    pub base: u64,
    pub irq: u32,
}

/// An unsigned integer the way the kernel's `simple_strtoull(.., 0)` reads
/// it: `0x` hexadecimal, a leading `0` octal, else decimal. Returns the
/// value and the rest of the string.
fn parse_c_int(s: &str) -> Option<(u64, &str)> {
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (16, h)
    } else if s.starts_with('0') && s.len() > 1 {
        (8, &s[1..])
    } else {
        (10, s)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        // "0" alone, or "0" followed by a non-digit, is zero.
        return if radix == 8 { Some((0, digits)) } else { None };
    }
    let v = u64::from_str_radix(&digits[..end], radix).ok()?;
    Some((v, &digits[end..]))
}

/// The kernel's `memparse`: a number with an optional K/M/G/T/P/E suffix.
fn memparse(s: &str) -> Option<(u64, &str)> {
    let (v, rest) = parse_c_int(s)?;
    let shift = match rest.as_bytes().first() {
        Some(b'k' | b'K') => 10,
        Some(b'm' | b'M') => 20,
        Some(b'g' | b'G') => 30,
        Some(b't' | b'T') => 40,
        Some(b'p' | b'P') => 50,
        Some(b'e' | b'E') => 60,
        _ => return Some((v, rest)),
    };
    Some((v.checked_mul(1 << shift)?, &rest[1..]))
}

fn parse_decimal(s: &str) -> Option<(u64, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// Parse the value of `virtio_mmio.device=`: `<size>@<base>:<irq>[:<id>]`
/// (Linux, drivers/virtio/virtio_mmio.c: `memparse`, then
/// `"@%lli:%u%n:%d%n"`).
pub fn parse_mmio_word(v: &str) -> Option<MmioWord> {
    let (size, rest) = memparse(v)?;
    let rest = rest.strip_prefix('@')?;
    let (base, rest) = parse_c_int(rest)?;
    let rest = rest.strip_prefix(':')?;
    let (irq, rest) = parse_decimal(rest)?;
    let rest = match rest.strip_prefix(':') {
        Some(id) => parse_decimal(id)?.1,
        None => rest,
    };
    if !rest.is_empty() || size == 0 {
        return None;
    }
    Some(MmioWord {
        size,
        base,
        irq: u32::try_from(irq).ok()?,
    })
}

/// Every `virtio_mmio.device=` word on the command line, parsed (`Err`
/// holds a word that does not parse).
pub fn mmio_words(cmdline: &str) -> impl Iterator<Item = Result<MmioWord, &str>> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .map(|v| parse_mmio_word(v).ok_or(v))
}

/// A virtio-mmio version 2 device.
#[derive(Clone, Copy)]
pub struct MmioTransport {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
    pub device_id: u32,
    pub vendor_id: u32,
}

/// What the command line offers, and the first virtio-mmio device of type
/// `ty` among it.
pub struct MmioSearch {
    pub words: usize,
    pub found: Option<MmioTransport>,
}

fn mmio_reg(base: u64, r: u64) -> u32 {
    // SAFETY: a 32-bit register of a virtio-mmio window the command line
    // announced, checked to lie below 4 GiB (identity-mapped); reads of
    // these registers have no side effects.
    unsafe { mmio_read32(base + r) }
}

/// Probe every `virtio_mmio.device=` word for a device of type `ty`.
/// `name` prefixes the lines printed about words that are skipped. A
/// device of the right type that is not version 2 fails.
pub fn find_mmio(name: &str, cmdline: &str, ty: u32) -> Res<MmioSearch> {
    let mut s = MmioSearch {
        words: 0,
        found: None,
    };
    for w in mmio_words(cmdline) {
        s.words += 1;
        let w = match w {
            Ok(w) => w,
            Err(bad) => {
                println!("keel-test: {name}: cannot parse virtio_mmio.device={bad}; skipped");
                continue;
            }
        };
        if w.size < 0x100 || w.base.checked_add(w.size).is_none_or(|e| e > FOUR_GIB) {
            println!(
                "keel-test: {name}: virtio-mmio window {:#x}@{:#x} is too small or not below 4 GiB; skipped",
                w.size, w.base
            );
            continue;
        }
        let magic = mmio_reg(w.base, mmio::MAGIC);
        if magic != mmio::MAGIC_VALUE {
            println!(
                "keel-test: {name}: no virtio-mmio magic at {:#x} (reads {magic:#x}); skipped",
                w.base
            );
            continue;
        }
        let id = mmio_reg(w.base, mmio::DEVICE_ID);
        if id != ty || s.found.is_some() {
            continue;
        }
        let version = mmio_reg(w.base, mmio::VERSION);
        if version != 2 {
            crate::fail!(
                "virtio-mmio device type {ty:#x} at {:#x} is version {version}{}; only version 2 is supported",
                w.base,
                if version == 1 {
                    " (legacy; QEMU: -global virtio-mmio.force-legacy=false)"
                } else {
                    ""
                }
            );
        }
        s.found = Some(MmioTransport {
            base: w.base,
            size: w.size,
            irq: w.irq,
            device_id: id,
            vendor_id: mmio_reg(w.base, mmio::VENDOR_ID),
        });
    }
    Ok(s)
}

impl MmioTransport {
    fn r(&self, reg: u64) -> u32 {
        mmio_reg(self.base, reg)
    }
    fn w(&self, reg: u64, v: u32) {
        // SAFETY: a 32-bit register of this device's window (checked below
        // 4 GiB by `find_mmio`); writes have the effects of section 4.2.2.
        unsafe { mmio_write32(self.base + reg, v) }
    }
}

// ---------------------------------------------------------------------
// The transport-independent view.

pub enum Transport {
    Pci(PciTransport),
    Mmio(MmioTransport),
}

impl Transport {
    pub fn status(&self) -> u8 {
        match self {
            Transport::Pci(p) => p.r8(common::DEVICE_STATUS),
            Transport::Mmio(m) => m.r(mmio::STATUS) as u8,
        }
    }

    pub fn set_status(&self, s: u8) {
        match self {
            Transport::Pci(p) => p.w8(common::DEVICE_STATUS, s),
            Transport::Mmio(m) => m.w(mmio::STATUS, u32::from(s)),
        }
    }

    /// Reset: write 0, then wait (bounded) until the status reads 0.
    pub fn reset(&self) -> Res<()> {
        self.set_status(0);
        if !crate::arch::wait_for(DEVICE_TIMEOUT_CYCLES, || self.status() == 0) {
            crate::fail!(
                "device status reads {:#x} after a reset (wrote 0)",
                self.status()
            );
        }
        Ok(())
    }

    /// The 64 feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        let mut f = 0;
        for sel in 0..2u32 {
            let v = match self {
                Transport::Pci(p) => {
                    p.w32(common::DEVICE_FEATURE_SELECT, sel);
                    p.r32(common::DEVICE_FEATURE)
                }
                Transport::Mmio(m) => {
                    m.w(mmio::DEVICE_FEATURES_SEL, sel);
                    m.r(mmio::DEVICE_FEATURES)
                }
            };
            f |= u64::from(v) << (32 * sel);
        }
        f
    }

    pub fn set_driver_features(&self, f: u64) {
        for sel in 0..2u32 {
            let v = (f >> (32 * sel)) as u32;
            match self {
                Transport::Pci(p) => {
                    p.w32(common::DRIVER_FEATURE_SELECT, sel);
                    p.w32(common::DRIVER_FEATURE, v);
                }
                Transport::Mmio(m) => {
                    m.w(mmio::DRIVER_FEATURES_SEL, sel);
                    m.w(mmio::DRIVER_FEATURES, v);
                }
            }
        }
    }

    /// Write `features`, set FEATURES_OK on top of ACKNOWLEDGE|DRIVER and
    /// report whether the device kept it (section 3.1.1 steps 5-6).
    pub fn offer_features(&self, features: u64) -> bool {
        self.set_driver_features(features);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status() & status::FEATURES_OK != 0
    }

    /// Reset, ACKNOWLEDGE, DRIVER: ready to negotiate.
    pub fn begin(&self) -> Res<()> {
        self.reset()?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let s = self.status();
        if s != status::ACKNOWLEDGE | status::DRIVER {
            crate::fail!("device status reads {s:#x} after ACKNOWLEDGE|DRIVER (expected 0x3)");
        }
        Ok(())
    }

    /// Set DRIVER_OK and check the device took it without asking for a
    /// reset.
    pub fn driver_ok(&self) -> Res<u8> {
        let want = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.set_status(want);
        let s = self.status();
        if s & status::DEVICE_NEEDS_RESET != 0 {
            crate::fail!("device status reads {s:#x} after DRIVER_OK: DEVICE_NEEDS_RESET");
        }
        if s != want {
            crate::fail!("device status reads {s:#x} after DRIVER_OK (expected {want:#x})");
        }
        Ok(s)
    }

    pub fn config_generation(&self) -> u32 {
        match self {
            Transport::Pci(p) => u32::from(p.r8(common::CONFIG_GENERATION)),
            Transport::Mmio(m) => m.r(mmio::CONFIG_GENERATION),
        }
    }

    /// Bytes of device configuration the transport exposes.
    pub fn config_len(&self) -> u64 {
        match self {
            Transport::Pci(p) => u64::from(p.caps[usize::from(PCI_CAP_DEVICE)].length),
            Transport::Mmio(m) => m.size - mmio::CONFIG,
        }
    }

    fn config_addr(&self, off: u64) -> u64 {
        match self {
            Transport::Pci(p) => p.device_cfg + off,
            Transport::Mmio(m) => m.base + mmio::CONFIG + off,
        }
    }

    /// A 32-bit device configuration field (callers keep `off + 4` within
    /// `config_len`).
    pub fn config_read32(&self, off: u64) -> u32 {
        // SAFETY: device configuration of a placed/announced window below
        // 4 GiB; an aligned 32-bit access for a 32-bit field.
        unsafe { mmio_read32(self.config_addr(off)) }
    }

    /// A 16-bit device configuration field (`off` 2-byte aligned).
    pub fn config_read16(&self, off: u64) -> u16 {
        // SAFETY: as config_read32, an aligned 16-bit access for a 16-bit
        // field.
        unsafe { mmio_read16(self.config_addr(off)) }
    }

    /// A 64-bit device configuration field as two 32-bit reads, low half
    /// first (virtio-mmio allows nothing wider; section 4.2.2.2). Callers
    /// read it inside `config_consistent`.
    pub fn config_read64(&self, off: u64) -> u64 {
        u64::from(self.config_read32(off)) | (u64::from(self.config_read32(off + 4)) << 32)
    }

    pub fn config_read8(&self, off: u64) -> u8 {
        // SAFETY: as config_read32, an 8-bit access for an 8-bit field.
        unsafe { mmio_read8(self.config_addr(off)) }
    }

    pub fn config_write8(&self, off: u64, v: u8) {
        // SAFETY: as config_read8; the caller writes a field the device
        // defines as writable.
        unsafe { mmio_write8(self.config_addr(off), v) }
    }

    /// Write a 32-bit device configuration field (`off` 4-byte aligned).
    pub fn config_write32(&self, off: u64, v: u32) {
        // SAFETY: as config_read32; the caller writes a field the device
        // defines as writable.
        unsafe { mmio_write32(self.config_addr(off), v) }
    }

    /// Read device configuration consistently: repeat `read` until
    /// config_generation is the same before and after (section 2.5.1).
    pub fn config_consistent<T>(&self, mut read: impl FnMut(&Self) -> T) -> Res<T> {
        for _ in 0..16 {
            let g = self.config_generation();
            let v = read(self);
            if self.config_generation() == g {
                return Ok(v);
            }
        }
        crate::fail!("config_generation kept changing across 16 reads of device configuration")
    }

    /// virtio-mmio InterruptStatus (0 on PCI, where MSI-X vectors say why).
    pub fn interrupt_status(&self) -> u32 {
        match self {
            Transport::Pci(_) => 0,
            Transport::Mmio(m) => m.r(mmio::INTERRUPT_STATUS),
        }
    }

    /// virtio-pci: the ISR status byte; reading it clears it (section
    /// 4.1.4.5). `None` on virtio-mmio.
    pub fn read_isr(&self) -> Option<u8> {
        match self {
            // SAFETY: the ISR capability's byte, inside a BAR `open` placed;
            // the read clears the ISR, which only this driver uses.
            Transport::Pci(p) => Some(unsafe { mmio_read8(p.isr) }),
            Transport::Mmio(_) => None,
        }
    }

    /// virtio-mmio InterruptACK (no-op on PCI).
    pub fn ack(&self, bits: u32) {
        if let Transport::Mmio(m) = self {
            m.w(mmio::INTERRUPT_ACK, bits);
        }
    }

    /// PCI: point the configuration-change interrupt at MSI-X entry
    /// `entry` and return what the device reads back (NO_VECTOR: refused).
    pub fn set_config_vector(&self, entry: u16) -> u16 {
        match self {
            Transport::Pci(p) => {
                p.w16(common::CONFIG_MSIX_VECTOR, entry);
                p.r16(common::CONFIG_MSIX_VECTOR)
            }
            Transport::Mmio(_) => entry,
        }
    }

    /// Set up queue `index` in the main virtqueue memory (section
    /// 4.1.5.1.3 / 4.2.3.2): select it, read its maximum size, choose a
    /// size, write the three addresses, the MSI-X vector (PCI, `vector`),
    /// and enable it.
    pub fn setup_queue(&self, index: u16, vector: Option<u16>, event_idx: bool) -> Res<Vq> {
        self.setup_queue_in(QueueMem::Main, index, vector, event_idx)
    }

    /// `setup_queue` with the rings in `mem` (which also caps the size).
    pub fn setup_queue_in(
        &self,
        mem: QueueMem,
        index: u16,
        vector: Option<u16>,
        event_idx: bool,
    ) -> Res<Vq> {
        let max = match self {
            Transport::Pci(p) => {
                let n = p.r16(common::NUM_QUEUES);
                if index >= n {
                    crate::fail!("queue {index} requested, the device has {n} queues");
                }
                p.w16(common::QUEUE_SELECT, index);
                if p.r16(common::QUEUE_ENABLE) != 0 {
                    crate::fail!("queue {index} is already enabled after a reset");
                }
                p.r16(common::QUEUE_SIZE)
            }
            Transport::Mmio(m) => {
                m.w(mmio::QUEUE_SEL, u32::from(index));
                if m.r(mmio::QUEUE_READY) != 0 {
                    crate::fail!("queue {index} is already ready after a reset");
                }
                m.r(mmio::QUEUE_NUM_MAX).min(0xffff) as u16
            }
        };
        if max == 0 {
            crate::fail!("queue {index} is not available (maximum size 0)");
        }
        // The largest power of two the device and our memory allow.
        let cap = max.min(mem.capacity() as u16);
        let size = 1u16 << (15 - cap.leading_zeros());
        let mut vq = Vq::claim(mem, index, size, event_idx)?;
        vq.max = max;
        let (desc, driver, device) = (vq.desc_addr(), vq.avail_addr(), vq.used_addr());
        match self {
            Transport::Pci(p) => {
                p.w16(common::QUEUE_SIZE, size);
                let back = p.r16(common::QUEUE_SIZE);
                if back != size {
                    crate::fail!("queue {index}: wrote size {size}, reads back {back}");
                }
                p.w32(common::QUEUE_DESC, desc as u32);
                p.w32(common::QUEUE_DESC + 4, (desc >> 32) as u32);
                p.w32(common::QUEUE_DRIVER, driver as u32);
                p.w32(common::QUEUE_DRIVER + 4, (driver >> 32) as u32);
                p.w32(common::QUEUE_DEVICE, device as u32);
                p.w32(common::QUEUE_DEVICE + 4, (device >> 32) as u32);
                if let Some(v) = vector {
                    p.w16(common::QUEUE_MSIX_VECTOR, v);
                    let back = p.r16(common::QUEUE_MSIX_VECTOR);
                    if back != v {
                        crate::fail!(
                            "queue {index}: queue_msix_vector {v} refused (reads {back:#x})"
                        );
                    }
                }
                let off = p.r16(common::QUEUE_NOTIFY_OFF);
                let at = u64::from(off) * u64::from(p.notify_multiplier);
                let len = u64::from(p.caps[usize::from(PCI_CAP_NOTIFY)].length);
                if at + 2 > len {
                    crate::fail!(
                        "queue {index}: notify offset {off} x multiplier {} is beyond the notify structure ({len:#x} bytes)",
                        p.notify_multiplier
                    );
                }
                vq.notify_addr = p.notify + at;
                p.w16(common::QUEUE_ENABLE, 1);
                if p.r16(common::QUEUE_ENABLE) != 1 {
                    crate::fail!("queue {index}: queue_enable does not read back 1");
                }
            }
            Transport::Mmio(m) => {
                m.w(mmio::QUEUE_NUM, u32::from(size));
                m.w(mmio::QUEUE_DESC_LOW, desc as u32);
                m.w(mmio::QUEUE_DESC_HIGH, (desc >> 32) as u32);
                m.w(mmio::QUEUE_DRIVER_LOW, driver as u32);
                m.w(mmio::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
                m.w(mmio::QUEUE_DEVICE_LOW, device as u32);
                m.w(mmio::QUEUE_DEVICE_HIGH, (device >> 32) as u32);
                vq.notify_addr = m.base + mmio::QUEUE_NOTIFY;
                m.w(mmio::QUEUE_READY, 1);
                if m.r(mmio::QUEUE_READY) != 1 {
                    crate::fail!("queue {index}: QueueReady does not read back 1");
                }
            }
        }
        Ok(vq)
    }

    /// Tell the device queue `vq` has new buffers.
    pub fn notify(&self, vq: &Vq) {
        match self {
            // SAFETY: this queue's doorbell in the notify structure (checked
            // in setup_queue); the write only notifies the device.
            Transport::Pci(_) => unsafe { mmio_write16(vq.notify_addr, vq.index) },
            // SAFETY: the QueueNotify register of this device's window.
            Transport::Mmio(_) => unsafe { mmio_write32(vq.notify_addr, u32::from(vq.index)) },
        }
    }
}

// ---------------------------------------------------------------------
// The split virtqueue and its buffers, in static memory.

/// Largest queue this driver sets up.
pub const QMAX: usize = 256;
/// Size of each of the two buffer pools.
pub const POOL: usize = 128 * 1024;
/// Room for indirect descriptor tables (16 bytes a descriptor).
pub const INDIRECT: usize = 16 * 1024;

/// Descriptor table, driver area (avail ring), device area (used ring),
/// each on its own page; then the indirect tables and two buffer pools
/// (device-readable "out", device-writable "in").
#[repr(C, align(4096))]
struct VqMem {
    desc: [u8; 4096],
    avail: [u8; 4096],
    used: [u8; 4096],
    indirect: [u8; INDIRECT],
    out: [u8; POOL],
    inp: [u8; POOL],
}

struct Shared(UnsafeCell<VqMem>);

// SAFETY: the memory is only reached through raw pointers by the one `Vq`
// that holds the claim (`VQ_CLAIMED`), and by the device.
unsafe impl Sync for Shared {}

/// Largest queue the small ring area holds.
pub const QMAX_SMALL: usize = 64;
/// The small area's layout in its one page: descriptor table (64 x 16
/// bytes), then the avail ring (4 + 2 x 64 + 2 bytes), then the used ring
/// (4 + 8 x 64 + 2 bytes).
const SMALL_AVAIL: u64 = 1024;
const SMALL_USED: u64 = 2048;

/// The rings of a second queue (no indirect area, no pools), one page.
#[repr(C, align(4096))]
struct SmallMem([u8; 4096]);

struct SmallShared(UnsafeCell<SmallMem>);

// SAFETY: as `Shared`, with `SMALL_CLAIMED`.
unsafe impl Sync for SmallShared {}

static SMALL_MEM: SmallShared = SmallShared(UnsafeCell::new(SmallMem([0; 4096])));
static SMALL_CLAIMED: AtomicBool = AtomicBool::new(false);

/// How many more small ring areas there are (for devices with up to five
/// queues: the balloon's four; virtio-net's two pairs and control queue).
pub const EXTRA_AREAS: usize = 3;

#[repr(C, align(4096))]
struct ExtraMem([SmallMem; EXTRA_AREAS]);

struct ExtraShared(UnsafeCell<ExtraMem>);

// SAFETY: as `Shared`, each page with its own flag in `EXTRA_CLAIMED`.
unsafe impl Sync for ExtraShared {}

static EXTRA_MEM: ExtraShared = ExtraShared(UnsafeCell::new(ExtraMem([
    SmallMem([0; 4096]),
    SmallMem([0; 4096]),
    SmallMem([0; 4096]),
])));
static EXTRA_CLAIMED: [AtomicBool; EXTRA_AREAS] = [
    AtomicBool::new(false),
    AtomicBool::new(false),
    AtomicBool::new(false),
];

/// Where a virtqueue's rings live.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum QueueMem {
    /// Rings of up to `QMAX` entries, the indirect area and the two buffer
    /// pools.
    Main,
    /// Rings only, of up to `QMAX_SMALL` entries (for a second queue).
    Small,
    /// Like `Small`, in extra area `n` (below `EXTRA_AREAS`), for a third
    /// and fourth queue.
    Extra(usize),
}

impl QueueMem {
    /// Largest queue the area holds.
    pub fn capacity(self) -> usize {
        match self {
            QueueMem::Main => QMAX,
            QueueMem::Small | QueueMem::Extra(_) => QMAX_SMALL,
        }
    }
    fn claim_flag(self) -> &'static AtomicBool {
        match self {
            QueueMem::Main => &VQ_CLAIMED,
            QueueMem::Small => &SMALL_CLAIMED,
            QueueMem::Extra(n) => &EXTRA_CLAIMED[n % EXTRA_AREAS],
        }
    }
    /// Addresses of the descriptor table, avail ring and used ring, and the
    /// bytes the three span.
    fn rings(self) -> (u64, u64, u64, usize) {
        match self {
            QueueMem::Main => {
                let b = VQ_MEM.0.get() as u64;
                (b, b + 4096, b + 2 * 4096, 3 * 4096)
            }
            QueueMem::Small => {
                let b = SMALL_MEM.0.get() as u64;
                (b, b + SMALL_AVAIL, b + SMALL_USED, 4096)
            }
            QueueMem::Extra(n) => {
                let b = EXTRA_MEM.0.get() as u64 + 4096 * (n % EXTRA_AREAS) as u64;
                (b, b + SMALL_AVAIL, b + SMALL_USED, 4096)
            }
        }
    }
}

static VQ_MEM: Shared = Shared(UnsafeCell::new(VqMem {
    desc: [0; 4096],
    avail: [0; 4096],
    used: [0; 4096],
    indirect: [0; INDIRECT],
    out: [0; POOL],
    inp: [0; POOL],
}));
static VQ_CLAIMED: AtomicBool = AtomicBool::new(false);

/// Which buffer pool.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Device-readable.
    Out,
    /// Device-writable.
    In,
}

/// The driver side of one split virtqueue (section 2.7).
pub struct Vq {
    pub index: u16,
    pub size: u16,
    /// The device's maximum for this queue.
    pub max: u16,
    pub event_idx: bool,
    notify_addr: u64,
    /// Which ring area the queue claimed.
    pub area: QueueMem,
    desc: u64,
    avail: u64,
    used: u64,
    mem: *mut VqMem,
    free: [u16; QMAX],
    nfree: usize,
    /// Heads handed to the device and not yet returned.
    busy: [bool; QMAX],
    /// Next avail index to publish (shadow of avail->idx).
    avail_idx: u16,
    /// Avail entries written but not yet published.
    pending: u16,
    last_used: u16,
    pub kicks: u32,
    pub kicks_suppressed: u32,
}

impl Drop for Vq {
    fn drop(&mut self) {
        self.area.claim_flag().store(false, Ordering::Release);
    }
}

/// `vring_need_event` (section 2.7.10): does moving from `old` to `new`
/// pass `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Vq {
    fn claim(area: QueueMem, index: u16, size: u16, event_idx: bool) -> Res<Vq> {
        if usize::from(size) > area.capacity() {
            crate::fail!("queue {index}: {size} entries do not fit the {area:?} ring area");
        }
        if area.claim_flag().swap(true, Ordering::AcqRel) {
            crate::fail!("the {area:?} virtqueue memory is already in use");
        }
        let (desc, avail, used, span) = area.rings();
        // SAFETY: we hold the claim, so nothing else (the device included:
        // the queue is not enabled yet) uses the rings; zero all three
        // (`span` bytes of the claimed static from `desc`).
        unsafe {
            core::ptr::write_bytes(desc as *mut u8, 0, span);
        }
        let mut free = [0u16; QMAX];
        for (i, f) in free.iter_mut().enumerate().take(usize::from(size)) {
            // Pop from the end: hand out descriptors 0, 1, 2, ... first.
            *f = size - 1 - i as u16;
        }
        Ok(Vq {
            index,
            size,
            max: 0,
            event_idx,
            notify_addr: 0,
            area,
            desc,
            avail,
            used,
            mem: VQ_MEM.0.get(),
            free,
            nfree: usize::from(size),
            busy: [false; QMAX],
            avail_idx: 0,
            pending: 0,
            last_used: 0,
            kicks: 0,
            kicks_suppressed: 0,
        })
    }

    /// The main area's base; only a queue in it has the indirect area
    /// and the pools.
    fn base(&self) -> u64 {
        assert!(
            self.area == QueueMem::Main,
            "queue {}: the small ring area has no indirect area or pools",
            self.index
        );
        self.mem as u64
    }
    pub fn desc_addr(&self) -> u64 {
        self.desc
    }
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }
    pub fn used_addr(&self) -> u64 {
        self.used
    }
    pub fn indirect_addr(&self) -> u64 {
        self.base() + 3 * 4096
    }
    fn pool_base(&self, p: Pool) -> u64 {
        let first = 3 * 4096 + INDIRECT as u64;
        match p {
            Pool::Out => self.base() + first,
            Pool::In => self.base() + first + POOL as u64,
        }
    }

    /// Guest-physical address of byte `off` of pool `p`.
    pub fn pool_addr(&self, p: Pool, off: usize) -> u64 {
        assert!(off <= POOL, "pool offset {off} out of range");
        self.pool_base(p) + off as u64
    }

    pub fn pool_get(&self, p: Pool, off: usize) -> u8 {
        assert!(off < POOL, "pool offset {off} out of range");
        // SAFETY: inside the claimed static pool; the device may write it
        // concurrently, hence a volatile byte read through a raw pointer.
        unsafe { core::ptr::read_volatile((self.pool_base(p) + off as u64) as *const u8) }
    }

    pub fn pool_set(&self, p: Pool, off: usize, v: u8) {
        assert!(off < POOL, "pool offset {off} out of range");
        // SAFETY: as pool_get; only buffers not handed to the device are
        // written.
        unsafe { core::ptr::write_volatile((self.pool_base(p) + off as u64) as *mut u8, v) }
    }

    fn put16(&self, addr: u64, v: u16) {
        // SAFETY: `addr` is inside the claimed rings or indirect area
        // (callers compute it from `size`, at most QMAX), 2-byte aligned.
        unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
    }
    fn get16(&self, addr: u64) -> u16 {
        // SAFETY: as put16.
        unsafe { core::ptr::read_volatile(addr as *const u16) }
    }
    fn get32(&self, addr: u64) -> u32 {
        // SAFETY: as put16, 4-byte aligned.
        unsafe { core::ptr::read_volatile(addr as *const u32) }
    }

    /// Write one descriptor at `at` (a table entry's address).
    fn write_desc_at(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: `at` is a 16-byte descriptor slot inside the claimed
        // descriptor table or indirect area, not owned by the device.
        unsafe {
            core::ptr::write_volatile(at as *mut u64, addr);
            core::ptr::write_volatile((at + 8) as *mut u32, len);
            core::ptr::write_volatile((at + 12) as *mut u16, flags);
            core::ptr::write_volatile((at + 14) as *mut u16, next);
        }
    }

    fn desc_flags(&self, i: u16) -> u16 {
        self.get16(self.desc_addr() + 16 * u64::from(i) + 12)
    }
    fn desc_next(&self, i: u16) -> u16 {
        self.get16(self.desc_addr() + 16 * u64::from(i) + 14)
    }

    /// Entry `i` of indirect table space (256 bytes apart is not required:
    /// tables are any run of entries, 16-byte aligned).
    pub fn write_indirect(&self, entry: usize, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(entry < INDIRECT / 16, "indirect entry {entry} out of range");
        self.write_desc_at(
            self.indirect_addr() + 16 * entry as u64,
            addr,
            len,
            flags,
            next,
        );
    }

    pub fn free_descriptors(&self) -> usize {
        self.nfree
    }

    /// Buffers in flight (handed to the device, not yet returned).
    pub fn in_flight(&self) -> usize {
        usize::from(self.size) - self.nfree
    }

    fn put_avail(&mut self, head: u16) {
        let slot = self.avail_idx.wrapping_add(self.pending) % self.size;
        self.put16(self.avail_addr() + 4 + 2 * u64::from(slot), head);
        self.pending += 1;
        self.busy[usize::from(head)] = true;
    }

    /// Chain `bufs` (address, length, device-writable) into descriptors
    /// and put the head on the avail ring (not yet published). `None`:
    /// not enough free descriptors.
    pub fn add(&mut self, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > 8 || bufs.len() > self.nfree {
            return None;
        }
        let n = bufs.len();
        let mut ids = [0u16; 8];
        for id in ids.iter_mut().take(n) {
            self.nfree -= 1;
            *id = self.free[self.nfree];
        }
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let mut flags = if write { DESC_WRITE } else { 0 };
            let next = if k + 1 < n {
                flags |= DESC_NEXT;
                ids[k + 1]
            } else {
                0
            };
            self.write_desc_at(
                self.desc_addr() + 16 * u64::from(ids[k]),
                addr,
                len,
                flags,
                next,
            );
        }
        self.put_avail(ids[0]);
        Some(ids[0])
    }

    /// One ring descriptor pointing at `entries` descriptors of indirect
    /// table space starting at `first` (written with `write_indirect`).
    pub fn add_indirect(&mut self, first: usize, entries: usize) -> Option<u16> {
        if self.nfree == 0 || first + entries > INDIRECT / 16 || entries == 0 {
            return None;
        }
        self.nfree -= 1;
        let id = self.free[self.nfree];
        let table = self.indirect_addr() + 16 * first as u64;
        self.write_desc_at(
            self.desc_addr() + 16 * u64::from(id),
            table,
            16 * entries as u32,
            DESC_INDIRECT,
            0,
        );
        self.put_avail(id);
        Some(id)
    }

    /// One ring descriptor pointing at an indirect table of `entries`
    /// descriptors at guest-physical `table` (16-byte aligned), which the
    /// caller wrote in memory it owns and keeps until the head is used.
    pub fn add_indirect_at(&mut self, table: u64, entries: usize) -> Option<u16> {
        if self.nfree == 0 || entries == 0 || entries > usize::from(self.size) || table % 16 != 0 {
            return None;
        }
        self.nfree -= 1;
        let id = self.free[self.nfree];
        self.write_desc_at(
            self.desc_addr() + 16 * u64::from(id),
            table,
            16 * entries as u32,
            DESC_INDIRECT,
            0,
        );
        self.put_avail(id);
        Some(id)
    }

    /// Without EVENT_IDX: ask the device not to interrupt (avail->flags
    /// bit 0, VIRTQ_AVAIL_F_NO_INTERRUPT), or to interrupt again.
    pub fn set_no_interrupt(&self, quiet: bool) {
        self.put16(self.avail_addr(), u16::from(quiet));
        fence(Ordering::SeqCst);
    }

    /// Ask for an interrupt once the used index passes `v` (EVENT_IDX:
    /// the avail ring's trailing `used_event`).
    pub fn set_used_event(&self, v: u16) {
        self.put16(self.avail_addr() + 4 + 2 * u64::from(self.size), v);
        // The device must see it before we look at the used ring again.
        fence(Ordering::SeqCst);
    }

    /// Publish the pending avail entries and notify the device unless it
    /// asked not to be (EVENT_IDX: `avail_event`; else used->flags).
    /// Returns whether it was notified.
    pub fn submit(&mut self, t: &Transport) -> bool {
        let old = self.avail_idx;
        let new = old.wrapping_add(self.pending);
        self.pending = 0;
        self.avail_idx = new;
        // Descriptors and ring entries before the index (section 2.7.13).
        fence(Ordering::Release);
        self.put16(self.avail_addr() + 2, new);
        // The index must be visible before we read the device's
        // suppression state (a store-load barrier, section 2.7.13.4).
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            need_event(self.avail_event(), new, old)
        } else {
            self.get16(self.used_addr()) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            t.notify(self);
            self.kicks += 1;
        } else {
            self.kicks_suppressed += 1;
        }
        kick
    }

    /// The device's `avail_event` (the used ring's trailing field).
    pub fn avail_event(&self) -> u16 {
        self.get16(self.used_addr() + 4 + 8 * u64::from(self.size))
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// used->idx as the device last wrote it.
    pub fn used_idx(&self) -> u16 {
        let v = self.get16(self.used_addr() + 2);
        // Ring entries are read only after the index (section 2.7.14).
        fence(Ordering::Acquire);
        v
    }

    /// The next used index the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Used entries waiting to be consumed.
    pub fn used_pending(&self) -> u16 {
        self.used_idx().wrapping_sub(self.last_used)
    }

    /// The next used element (id, len), if any.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let at = self.used_addr() + 4 + 8 * slot;
        let e = (self.get32(at), self.get32(at + 4));
        self.last_used = self.last_used.wrapping_add(1);
        Some(e)
    }

    /// Take back the chain whose head the device returned. `false`: `id`
    /// is not a head the driver has in flight.
    pub fn complete(&mut self, id: u32) -> bool {
        let Ok(head) = u16::try_from(id) else {
            return false;
        };
        if head >= self.size || !self.busy[usize::from(head)] {
            return false;
        }
        self.busy[usize::from(head)] = false;
        let mut i = head;
        // A chain is at most `size` long: a bound against a corrupt table.
        for _ in 0..self.size {
            self.free[self.nfree] = i;
            self.nfree += 1;
            let flags = self.desc_flags(i);
            if flags & DESC_NEXT == 0 {
                break;
            }
            i = self.desc_next(i);
        }
        true
    }

    /// Wait (bounded) until at least `n` used entries are waiting.
    pub fn wait_used(&self, n: u16, cycles: u64) -> bool {
        crate::arch::wait_for(cycles, || self.used_pending() >= n)
    }
}

/// Text for a feature set, for failure reasons.
pub fn feature_names(f: u64) -> Text<64> {
    let mut t = Text::new();
    for (bit, name) in [
        (F_VERSION_1, "VERSION_1"),
        (F_INDIRECT_DESC, "INDIRECT_DESC"),
        (F_EVENT_IDX, "EVENT_IDX"),
    ] {
        if f & bit != 0 {
            if !t.as_str().is_empty() {
                t.push_str("|");
            }
            t.push_str(name);
        }
    }
    let rest = f & !(F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX);
    if rest != 0 {
        let _ = write!(
            t,
            "{}{rest:#x}",
            if t.as_str().is_empty() { "" } else { "|" }
        );
    }
    if t.as_str().is_empty() {
        t.push_str("none");
    }
    t
}

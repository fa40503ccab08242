//! PCI on segment 0, bus 0: configuration access through mechanism #1
//! (ports 0xcf8/0xcfc) and through ECAM (found in the ACPI MCFG),
//! enumeration, BARs, capabilities, MSI-X; and the `pci` scenario.

use core::fmt::Write;

use crate::acpi::Acpi;
use crate::arch::{self, inb, inl, inw, mmio_read32, mmio_write32, outb, outl, outw};
use crate::irq;
use crate::text::Text;
use crate::Outcome;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const COMMAND: u16 = 0x04;
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
const STATUS_CAP_LIST: u16 = 1 << 4;
pub const CAP_MSIX: u8 = 0x11;
pub const CAP_VENDOR: u8 = 0x09;

/// How configuration space is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Configuration mechanism #1, ports 0xcf8/0xcfc.
    Port,
    /// Memory-mapped (ECAM) at this base, for bus 0.
    Ecam(u64),
}

/// One function on bus 0.
#[derive(Clone, Copy)]
pub struct Func {
    pub access: Access,
    pub dev: u8,
    pub func: u8,
}

impl Func {
    pub fn new(access: Access, dev: u8, func: u8) -> Func {
        Func { access, dev, func }
    }

    fn port_address(&self, off: u16) -> u32 {
        0x8000_0000
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(off & 0xfc)
    }

    fn ecam(&self, base: u64, off: u16) -> u64 {
        base + (u64::from(self.dev) << 15) + (u64::from(self.func) << 12) + u64::from(off)
    }

    pub fn read32(&self, off: u16) -> u32 {
        match self.access {
            // SAFETY: configuration mechanism #1: select, then read the data port.
            Access::Port => unsafe {
                outl(CONFIG_ADDRESS, self.port_address(off));
                inl(CONFIG_DATA)
            },
            // SAFETY: the ECAM window the MCFG describes, identity-mapped;
            // configuration reads have no side effects.
            Access::Ecam(b) => unsafe { mmio_read32(self.ecam(b, off & !3)) },
        }
    }

    pub fn read16(&self, off: u16) -> u16 {
        match self.access {
            // SAFETY: as read32, 16 bits at the dword's byte offset.
            Access::Port => unsafe {
                outl(CONFIG_ADDRESS, self.port_address(off));
                inw(CONFIG_DATA + (off & 2))
            },
            // SAFETY: as read32.
            Access::Ecam(b) => unsafe { arch::mmio_read16(self.ecam(b, off & !1)) },
        }
    }

    pub fn read8(&self, off: u16) -> u8 {
        match self.access {
            // SAFETY: as read32, 8 bits at the dword's byte offset.
            Access::Port => unsafe {
                outl(CONFIG_ADDRESS, self.port_address(off));
                inb(CONFIG_DATA + (off & 3))
            },
            // SAFETY: as read32.
            Access::Ecam(b) => unsafe { arch::mmio_read8(self.ecam(b, off)) },
        }
    }

    pub fn write32(&self, off: u16, v: u32) {
        match self.access {
            // SAFETY: configuration write to a function this guest drives.
            Access::Port => unsafe {
                outl(CONFIG_ADDRESS, self.port_address(off));
                outl(CONFIG_DATA, v)
            },
            // SAFETY: as above, through ECAM.
            Access::Ecam(b) => unsafe { mmio_write32(self.ecam(b, off & !3), v) },
        }
    }

    /// A real 16-bit write (a 32-bit read-modify-write of COMMAND would
    /// write back STATUS's write-one-to-clear bits).
    pub fn write16(&self, off: u16, v: u16) {
        match self.access {
            // SAFETY: configuration write to a function this guest drives.
            Access::Port => unsafe {
                outl(CONFIG_ADDRESS, self.port_address(off));
                outw(CONFIG_DATA + (off & 2), v)
            },
            // SAFETY: as above, through ECAM.
            Access::Ecam(b) => unsafe { arch::mmio_write16(self.ecam(b, off & !1), v) },
        }
    }

    #[allow(dead_code)] // no user yet; kept with the other widths
    pub fn write8(&self, off: u16, v: u8) {
        match self.access {
            // SAFETY: configuration write to a function this guest drives.
            Access::Port => unsafe {
                outl(CONFIG_ADDRESS, self.port_address(off));
                outb(CONFIG_DATA + (off & 3), v)
            },
            // SAFETY: as above, through ECAM.
            Access::Ecam(b) => unsafe { arch::mmio_write8(self.ecam(b, off), v) },
        }
    }

    pub fn vendor(&self) -> u16 {
        self.read16(0)
    }

    pub fn device_id(&self) -> u16 {
        self.read16(2)
    }

    pub fn set_command(&self, set: u16, clear: u16) {
        let cmd = self.read16(COMMAND);
        self.write16(COMMAND, (cmd & !clear) | set);
    }

    /// Address of BAR `i` (memory BARs; 64-bit ones include the high half).
    pub fn bar_address(&self, i: u8) -> u64 {
        let lo = self.read32(0x10 + 4 * u16::from(i));
        if lo & 1 != 0 {
            return u64::from(lo & !3);
        }
        let mut a = u64::from(lo & !0xf);
        if (lo >> 1) & 3 == 2 && i < 5 {
            a |= u64::from(self.read32(0x14 + 4 * u16::from(i))) << 32;
        }
        a
    }

    /// Size a memory BAR (decoding must be off): returns (raw read-back
    /// of the all-ones write, size). The original value is restored.
    pub fn size_bar(&self, i: u8) -> (u32, u64) {
        let off = 0x10 + 4 * u16::from(i);
        let orig = self.read32(off);
        self.write32(off, u32::MAX);
        let got = self.read32(off);
        self.write32(off, orig);
        let mut mask = u64::from(got & !0xf) | 0xffff_ffff_0000_0000;
        if (orig >> 1) & 3 == 2 && i < 5 {
            let hi = self.read32(off + 4);
            self.write32(off + 4, u32::MAX);
            let h = self.read32(off + 4);
            self.write32(off + 4, hi);
            mask = (u64::from(h) << 32) | u64::from(got & !0xf);
        }
        (got, (!mask).wrapping_add(1))
    }

    /// Program memory BAR `i` (both halves of a 64-bit BAR).
    pub fn set_bar(&self, i: u8, addr: u64) {
        let off = 0x10 + 4 * u16::from(i);
        let orig = self.read32(off);
        self.write32(off, addr as u32);
        if (orig >> 1) & 3 == 2 && i < 5 {
            self.write32(off + 4, (addr >> 32) as u32);
        }
    }

    /// Offset of the first capability with `id` at or after the one
    /// `after` points to (0: from the start of the list).
    pub fn find_cap(&self, id: u8, after: u8) -> Option<u8> {
        if self.read16(0x06) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut ptr = if after == 0 {
            self.read8(0x34)
        } else {
            self.read8(u16::from(after) + 1)
        } & 0xfc;
        // At most 48 capabilities fit in 192 bytes: a bound against loops.
        for _ in 0..48 {
            if ptr < 0x40 {
                return None;
            }
            if self.read8(u16::from(ptr)) == id {
                return Some(ptr);
            }
            ptr = self.read8(u16::from(ptr) + 1) & 0xfc;
        }
        None
    }
}

/// A function found on the bus.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub dev: u8,
    pub func: u8,
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass, programming interface, revision.
    pub class_rev: u32,
}

pub const MAX_FOUND: usize = 32;
const EMPTY: Found = Found {
    dev: 0,
    func: 0,
    vendor: 0xffff,
    device: 0xffff,
    class_rev: 0,
};

/// Every function on bus 0 (all 32 devices; functions 1-7 of
/// multi-function devices).
pub fn enumerate(access: Access) -> ([Option<Found>; MAX_FOUND], usize) {
    let mut out = [None; MAX_FOUND];
    let mut n = 0;
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let f = Func::new(access, dev, func);
            let id = f.read32(0);
            if id as u16 == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            if n < MAX_FOUND {
                out[n] = Some(Found {
                    dev,
                    func,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    class_rev: f.read32(0x08),
                });
                n += 1;
            }
            if func == 0 && f.read8(0x0e) & 0x80 == 0 {
                break;
            }
        }
    }
    (out, n)
}

/// ECAM base for segment 0, bus 0, from the MCFG.
pub fn ecam_base(acpi: &Acpi) -> Option<u64> {
    acpi.mcfg
        .filter(|&(_, seg, start, end)| seg == 0 && start == 0 && end >= start)
        .map(|(base, ..)| base)
}

/// The best configuration access: ECAM when the MCFG names one, else ECAM
/// at the DSDT's `_CBA` (QEMU microvm with `pcie=on` has neither an MCFG
/// nor ports 0xcf8/0xcfc), else the ports.
pub fn access(acpi: &Acpi) -> Access {
    ecam_base(acpi)
        .or(acpi.dsdt_cba)
        .map_or(Access::Port, Access::Ecam)
}

/// Where unassigned memory BARs are placed (the 32-bit MMIO window keel
/// and QEMU microvm share is 0xc0000000-0xdfffffff; assignments go from
/// its upper half down so they stay clear of what a VMM placed).
static NEXT_BAR: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0xd800_0000);

/// Make sure memory BAR `i` has an address: if it reads 0, size it and
/// place it in the window above. Returns (address, size, newly assigned).
pub fn ensure_bar(f: &Func, i: u8) -> Result<(u64, u64, bool), Text<160>> {
    f.set_command(0, CMD_MEMORY);
    let (raw, size) = f.size_bar(i);
    let mut t = Text::new();
    if raw & 1 != 0 || raw == 0 || size == 0 || size > (1 << 28) {
        let _ = write!(
            t,
            "BAR{i} of {:02x}.{} is not a usable memory BAR (reads {raw:#x} after all ones)",
            f.dev, f.func
        );
        return Err(t);
    }
    let mut addr = f.bar_address(i);
    let fresh = addr == 0;
    if fresh {
        use core::sync::atomic::Ordering;
        let next = NEXT_BAR.load(Ordering::Relaxed);
        addr = (next + size - 1) & !(size - 1);
        NEXT_BAR.store(addr + size, Ordering::Relaxed);
        f.set_bar(i, addr);
    }
    f.set_command(CMD_MEMORY | CMD_BUS_MASTER, 0);
    Ok((addr, size, fresh))
}

/// A function's MSI-X table and pending-bit array.
pub struct Msix {
    pub cap: u8,
    pub vectors: u16,
    pub table: u64,
    pub pba: u64,
}

impl Msix {
    /// Find the capability; BARs must already be placed.
    pub fn find(f: &Func) -> Option<Msix> {
        let cap = f.find_cap(CAP_MSIX, 0)?;
        let ctrl = f.read16(u16::from(cap) + 2);
        let t = f.read32(u16::from(cap) + 4);
        let p = f.read32(u16::from(cap) + 8);
        Some(Msix {
            cap,
            vectors: (ctrl & 0x7ff) + 1,
            table: f.bar_address((t & 7) as u8) + u64::from(t & !7),
            pba: f.bar_address((p & 7) as u8) + u64::from(p & !7),
        })
    }

    /// Program entry `i`: fixed delivery of `vector` to this CPU.
    pub fn set_entry(&self, i: u16, vector: u8, masked: bool) {
        let e = self.table + 16 * u64::from(i);
        let dest = irq::apic_id();
        // SAFETY: the function's MSI-X table in its (placed) BAR.
        unsafe {
            mmio_write32(e + 12, 1); // masked while changing it
            mmio_write32(e, 0xfee0_0000 | (dest << 12));
            mmio_write32(e + 4, 0);
            mmio_write32(e + 8, u32::from(vector));
            mmio_write32(e + 12, u32::from(masked));
        }
    }

    pub fn mask(&self, i: u16, masked: bool) {
        // SAFETY: vector control word of entry i of this table.
        unsafe { mmio_write32(self.table + 16 * u64::from(i) + 12, u32::from(masked)) }
    }

    pub fn pending(&self, i: u16) -> bool {
        // SAFETY: the PBA in the function's BAR; reads have no side effects.
        let w = unsafe { mmio_read32(self.pba + 4 * u64::from(i / 32)) };
        w & (1 << (i % 32)) != 0
    }

    /// Enable MSI-X (function mask off).
    pub fn enable(&self, f: &Func) {
        let off = u16::from(self.cap) + 2;
        let ctrl = f.read16(off);
        f.write16(off, (ctrl | 0x8000) & !0x4000);
    }
}

const TEST_VENDOR: u16 = 0x6b65;
const TEST_DEVICE: u16 = 0x0001;
const TEST_MAGIC: u32 = 0x4c45_454b;
const REG_MAGIC: u64 = 0x0;
const REG_SCRATCH: u64 = 0x4;
const REG_DOORBELL: u64 = 0x8;
const REG_RUNG: u64 = 0xc;

/// Short wait in which an interrupt that should not come would have come.
pub const QUIET_CYCLES: u64 = 1 << 26;

fn reg(base: u64, r: u64) -> u32 {
    // SAFETY: a register of the test device's BAR 0 (identity-mapped MMIO).
    unsafe { mmio_read32(base + r) }
}

fn set_reg(base: u64, r: u64, v: u32) {
    // SAFETY: as reg; writes only have the documented device effects.
    unsafe { mmio_write32(base + r, v) }
}

/// Scenario `pci`.
pub fn scenario(acpi: &Acpi) -> Outcome {
    let Some(ecam) = ecam_base(acpi) else {
        match acpi.mcfg {
            Some((b, seg, s, e)) => crate::fail!(
                "MCFG entry {b:#x} segment {seg} buses {s}-{e} does not cover segment 0 bus 0"
            ),
            None => crate::fail!(
                "no ACPI MCFG table (RSDP {:#x}): no ECAM to compare with",
                acpi.rsdp
            ),
        }
    };
    println!("keel-test: pci: MCFG: ECAM at {ecam:#x} for segment 0 bus 0");

    let (by_port, np) = enumerate(Access::Port);
    let (by_ecam, ne) = enumerate(Access::Ecam(ecam));
    for f in by_port[..np].iter().flatten() {
        println!(
            "keel-test: pci: 00:{:02x}.{} {:04x}:{:04x} class {:06x}",
            f.dev,
            f.func,
            f.vendor,
            f.device,
            f.class_rev >> 8
        );
    }
    if np == 0 {
        crate::fail!("no PCI function answers through ports 0xcf8/0xcfc");
    }
    if np != ne {
        crate::fail!("CF8/CFC finds {np} functions, ECAM finds {ne}");
    }
    if let Some(i) = (0..np).find(|&i| by_port[i] != by_ecam[i]) {
        let (a, b) = (by_port[i].unwrap_or(EMPTY), by_ecam[i].unwrap_or(EMPTY));
        crate::fail!(
            "function {i}: CF8/CFC sees 00:{:02x}.{} {:04x}:{:04x} class {:#x}, ECAM sees 00:{:02x}.{} {:04x}:{:04x} class {:#x}",
            a.dev, a.func, a.vendor, a.device, a.class_rev, b.dev, b.func, b.vendor, b.device, b.class_rev
        );
    }
    println!("keel-test: pci: CF8/CFC and ECAM enumerate the same {np} functions");
    match by_port[0] {
        Some(f) if f.dev == 0 && f.func == 0 && f.class_rev >> 16 == 0x0600 => {}
        _ => crate::fail!("no host bridge (class 06/00) at 00:00.0"),
    }
    let Some(t) = by_port[..np]
        .iter()
        .flatten()
        .find(|f| f.vendor == TEST_VENDOR && f.device == TEST_DEVICE)
    else {
        crate::fail!(
            "no PCI test device ({TEST_VENDOR:04x}:{TEST_DEVICE:04x}) on bus 0 (keel: --device pci-test)"
        );
    };
    // BAR moves through the ports, checks through ECAM, MSI-X through ECAM.
    let port = Func::new(Access::Port, t.dev, t.func);
    let mm = Func::new(Access::Ecam(ecam), t.dev, t.func);

    let old = port.bar_address(0);
    port.set_command(0, CMD_MEMORY);
    let (raw, size) = port.size_bar(0);
    if raw != 0xffff_f000 {
        crate::fail!("BAR0 reads {raw:#x} after writing all ones; expected 0xfffff000 (4 KiB, 32-bit memory)");
    }
    let new = if old == 0xd000_0000 {
        0xd001_0000
    } else {
        0xd000_0000
    };
    port.set_bar(0, new);
    port.set_command(CMD_MEMORY | CMD_BUS_MASTER, 0);
    let back = mm.read32(0x10);
    if u64::from(back) != new {
        crate::fail!("BAR0 written {new:#x} through CF8/CFC reads {back:#x} through ECAM");
    }
    println!("keel-test: pci: BAR0 was {old:#x}, size {size:#x}; moved to {new:#x}");
    let magic = reg(new, REG_MAGIC);
    if magic != TEST_MAGIC {
        crate::fail!("magic at the new BAR0 {new:#x} reads {magic:#x}, expected {TEST_MAGIC:#x}");
    }
    if old != 0 {
        let stale = reg(old, REG_MAGIC);
        if stale != u32::MAX {
            crate::fail!(
                "the old BAR0 address {old:#x} still reads {stale:#x} (expected all ones)"
            );
        }
    }
    for v in [0x1234_5678u32, 0xa5a5_5a5a] {
        set_reg(new, REG_SCRATCH, v);
        let got = reg(new, REG_SCRATCH);
        if got != v {
            crate::fail!("scratch register wrote {v:#x}, read {got:#x}");
        }
    }
    println!("keel-test: pci: magic {magic:#x} at the new address, all ones at the old one, scratch read back");

    let Some(msix) = Msix::find(&mm) else {
        crate::fail!("the test device has no MSI-X capability");
    };
    println!(
        "keel-test: pci: MSI-X capability at {:#x}: {} vectors, table {:#x}, PBA {:#x}",
        msix.cap, msix.vectors, msix.table, msix.pba
    );
    if msix.table != new + 0x800 || msix.pba != new + 0xc00 {
        crate::fail!(
            "MSI-X table/PBA at {:#x}/{:#x}, expected BAR0+0x800/+0xc00",
            msix.table,
            msix.pba
        );
    }
    irq::lapic_enable();
    let vec = crate::idt::VEC_COUNTED;
    msix.set_entry(0, vec, false);
    msix.enable(&mm);
    let rung = reg(new, REG_RUNG);
    let base = irq::vec_count(0);
    set_reg(new, REG_DOORBELL, 0);
    if !arch::wait_for(arch::DEVICE_TIMEOUT_CYCLES, || irq::vec_count(0) > base) {
        crate::fail!("no MSI-X interrupt (vector {vec:#x}) after ringing doorbell 0");
    }
    let rung_now = reg(new, REG_RUNG);
    if rung_now != rung.wrapping_add(1) {
        crate::fail!("doorbell count went from {rung} to {rung_now}, expected +1");
    }
    println!(
        "keel-test: pci: MSI-X vector 0 arrived on vector {vec:#x} (doorbells rung: {rung_now})"
    );

    msix.mask(0, true);
    let base = irq::vec_count(0);
    set_reg(new, REG_DOORBELL, 0);
    arch::wait_for(QUIET_CYCLES, || false);
    if irq::vec_count(0) != base {
        crate::fail!("an interrupt arrived while MSI-X vector 0 was masked");
    }
    if !msix.pending(0) {
        crate::fail!("masked vector 0 rang, but its PBA bit is clear");
    }
    println!("keel-test: pci: masked: no interrupt, PBA bit 0 set");
    msix.mask(0, false);
    if !arch::wait_for(arch::DEVICE_TIMEOUT_CYCLES, || irq::vec_count(0) > base) {
        crate::fail!("unmasking vector 0 did not deliver the pending interrupt");
    }
    arch::wait_for(QUIET_CYCLES, || false);
    let got = irq::vec_count(0) - base;
    if got != 1 {
        crate::fail!("unmasking vector 0 delivered {got} interrupts, expected exactly 1");
    }
    if msix.pending(0) {
        crate::fail!("PBA bit 0 still set after the pending interrupt was delivered");
    }
    println!("keel-test: pci: unmasked: the pending interrupt arrived exactly once, PBA bit clear");
    Ok(())
}

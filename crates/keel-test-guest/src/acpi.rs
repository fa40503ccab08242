//! Just enough ACPI: RSDP -> XSDT/RSDT -> FADT (how to power off) and
//! MADT (CPUs, IOAPIC, ISA overrides). Tables are read in place through the
//! identity map, with lengths and checksums checked.

use crate::arch::phys_slice;

pub const MAX_CPUS: usize = 32;
pub const MAX_IOAPICS: usize = 4;

#[derive(Clone, Copy)]
pub struct Acpi {
    pub rsdp: u64,
    pub found_fadt: bool,
    /// PM1a/PM1b control block ports (0 = none).
    pub pm1a_cnt: u16,
    pub pm1b_cnt: u16,
    /// PM1a event block port (PM1_STS, then PM1_EN) and the block's length (0 = none).
    pub pm1a_evt: u16,
    pub pm1_evt_len: u8,
    /// The SCI's ISA IRQ (FADT SCI_INT).
    pub sci_int: u16,
    /// SMI command port and the value that turns ACPI mode on (0 = always on).
    pub smi_cmd: u16,
    pub acpi_enable: u8,
    /// Hardware-reduced sleep control register (0 = none).
    pub sleep_ctl: u64,
    /// ACPI address space of `sleep_ctl`: 0 = memory, 1 = I/O.
    pub sleep_ctl_space: u8,
    /// SLP_TYP for S5: from the DSDT's `\_S5` package, else 5.
    pub slp_typ_s5: u8,
    pub slp_typ_from_dsdt: bool,
    pub found_madt: bool,
    /// Where `cpus` came from: "MADT", "MP table" or "" (nowhere).
    pub cpu_source: &'static str,
    pub lapic_addr: u64,
    /// APIC IDs of enabled local APICs, in MADT order.
    pub cpus: [u32; MAX_CPUS],
    pub ncpus: usize,
    /// Enabled local APICs beyond MAX_CPUS.
    pub cpus_dropped: usize,
    pub ioapic_addr: u64,
    pub ioapic_gsi_base: u32,
    /// Every IOAPIC in the MADT: (address, GSI base).
    pub ioapics: [(u64, u32); MAX_IOAPICS],
    pub nioapics: usize,
    /// First MCFG entry: ECAM base, segment, start bus, end bus.
    pub mcfg: Option<(u64, u16, u8, u8)>,
    /// ECAM base from a DSDT `_CBA` (QEMU microvm describes its PCIe host
    /// bridge only there, without an MCFG).
    pub dsdt_cba: Option<u64>,
    /// ISA IRQ -> (GSI, MPS flags) from interrupt source overrides.
    pub isa_override: [Option<(u32, u16)>; 16],
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from(le32(b, o)) | (u64::from(le32(b, o + 4)) << 32)
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

/// Map a table at `addr`: header sanity, length and checksum.
fn table(addr: u64) -> Option<&'static [u8]> {
    if addr == 0 || addr >= (1 << 32) - 36 {
        return None;
    }
    // SAFETY: below 4 GiB, identity-mapped; ACPI tables are never written.
    let hdr = unsafe { phys_slice(addr, 36) };
    let len = le32(hdr, 4) as usize;
    if !(36..=(1 << 20)).contains(&len) || addr + len as u64 > (1 << 32) {
        return None;
    }
    // SAFETY: as above, for the length the header gives.
    let t = unsafe { phys_slice(addr, len) };
    checksum_ok(t).then_some(t)
}

fn rsdp_ok(addr: u64) -> bool {
    // SAFETY: callers pass identity-mapped addresses below 1 MiB or the
    // VMM-provided RSDP address (checked below 4 GiB).
    let r = unsafe { phys_slice(addr, 20) };
    &r[..8] == b"RSD PTR " && checksum_ok(r)
}

fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && hint < (1 << 32) - 36 && rsdp_ok(hint) {
        return Some(hint);
    }
    // Legacy search: the EBDA's first KiB, then 0xE0000-0xFFFFF.
    // SAFETY: the BDA word at 0x40e is in identity-mapped low memory.
    let ebda = u64::from(unsafe { core::ptr::read_volatile(0x40e as *const u16) }) << 4;
    let ebda_range = if (0x80000..0xa0000).contains(&ebda) {
        ebda..ebda + 1024
    } else {
        0..0
    };
    ebda_range
        .chain(0xe0000..0x100000)
        .step_by(16)
        .find(|&a| rsdp_ok(a))
}

impl Acpi {
    pub fn discover(rsdp_hint: u64) -> Acpi {
        let mut a = Acpi {
            rsdp: 0,
            found_fadt: false,
            pm1a_cnt: 0,
            pm1b_cnt: 0,
            pm1a_evt: 0,
            pm1_evt_len: 0,
            sci_int: 0,
            smi_cmd: 0,
            acpi_enable: 0,
            sleep_ctl: 0,
            sleep_ctl_space: 0,
            slp_typ_s5: 5,
            slp_typ_from_dsdt: false,
            found_madt: false,
            cpu_source: "",
            lapic_addr: 0xfee0_0000,
            cpus: [0; MAX_CPUS],
            ncpus: 0,
            cpus_dropped: 0,
            ioapic_addr: 0,
            ioapic_gsi_base: 0,
            ioapics: [(0, 0); MAX_IOAPICS],
            nioapics: 0,
            mcfg: None,
            dsdt_cba: None,
            isa_override: [None; 16],
        };
        a.parse_acpi(rsdp_hint);
        if !a.found_madt {
            // Firecracker before ACPI support, SeaBIOS without ACPI, ...
            a.parse_mptable();
        }
        a
    }

    fn parse_acpi(&mut self, rsdp_hint: u64) {
        let a = self;
        let Some(rsdp) = find_rsdp(rsdp_hint) else {
            return;
        };
        a.rsdp = rsdp;
        // SAFETY: RSDP validated above; the v2 part is 36 bytes.
        let r = unsafe { phys_slice(rsdp, 36) };
        let (sdt, entry) = if r[15] >= 2 && le64(r, 24) != 0 {
            (table(le64(r, 24)), 8)
        } else {
            (table(u64::from(le32(r, 16))), 4)
        };
        let Some(sdt) = sdt else {
            return;
        };
        for off in (36..sdt.len() - entry + 1).step_by(entry) {
            let addr = if entry == 8 {
                le64(sdt, off)
            } else {
                u64::from(le32(sdt, off))
            };
            let Some(t) = table(addr) else { continue };
            match &t[..4] {
                b"FACP" => a.parse_fadt(t),
                b"APIC" => a.parse_madt(t),
                // MCFG: header, 8 reserved bytes, then 16-byte entries
                // {u64 base, u16 segment, u8 start bus, u8 end bus, u32 reserved}.
                b"MCFG" if t.len() >= 60 && a.mcfg.is_none() => {
                    a.mcfg = Some((le64(t, 44), le16(t, 52), t[54], t[55]));
                }
                _ => {}
            }
        }
    }

    /// Intel MultiProcessor Specification table: the `_MP_` floating
    /// pointer (EBDA, last KiB of base memory, or 0xF0000-0xFFFFF), then
    /// the `PCMP` configuration table's processor and IOAPIC entries.
    fn parse_mptable(&mut self) {
        let mp_ok = |a: u64| {
            // SAFETY: identity-mapped low memory below 1 MiB.
            let f = unsafe { phys_slice(a, 16) };
            &f[..4] == b"_MP_" && f[8] == 1 && checksum_ok(f)
        };
        // SAFETY: the BDA words at 0x40e (EBDA segment) and 0x413 (base KiB).
        let (ebda, base_kib) = unsafe {
            (
                u64::from(core::ptr::read_volatile(0x40e as *const u16)) << 4,
                u64::from(core::ptr::read_volatile(0x413 as *const u16)),
            )
        };
        let ebda = if (0x80000..0xa0000).contains(&ebda) {
            ebda..ebda + 1024
        } else {
            0..0
        };
        let top = if (512..=640).contains(&base_kib) {
            base_kib * 1024 - 1024
        } else {
            0x9fc00
        };
        let Some(fp) = ebda
            .chain(top..top + 1024)
            .chain(0xf0000..0x100000)
            .step_by(16)
            .find(|&a| mp_ok(a))
        else {
            return;
        };
        // SAFETY: validated floating pointer structure.
        let cfg = u64::from(le32(unsafe { phys_slice(fp, 16) }, 4));
        if cfg == 0 || cfg >= (1 << 32) - 44 {
            return;
        }
        // SAFETY: identity-mapped; the header is 44 bytes.
        let hdr = unsafe { phys_slice(cfg, 44) };
        let len = usize::from(le16(hdr, 4));
        if &hdr[..4] != b"PCMP" || len < 44 {
            return;
        }
        // SAFETY: as above, for the base table length the header gives.
        let t = unsafe { phys_slice(cfg, len) };
        if !checksum_ok(t) {
            return;
        }
        self.cpu_source = "MP table";
        self.lapic_addr = u64::from(le32(t, 36));
        let mut off = 44;
        while off < len {
            match t[off] {
                0 if off + 20 <= len => {
                    self.add_cpu(u32::from(t[off + 1]), u32::from(t[off + 3] & 1));
                    off += 20;
                }
                2 if off + 8 <= len => {
                    if self.ioapic_addr == 0 && t[off + 3] & 1 != 0 {
                        self.ioapic_addr = u64::from(le32(t, off + 4));
                        self.ioapics[0] = (self.ioapic_addr, 0);
                        self.nioapics = 1;
                    }
                    off += 8;
                }
                1 | 3 | 4 => off += 8,
                _ => break,
            }
        }
    }

    fn parse_fadt(&mut self, f: &[u8]) {
        self.found_fadt = true;
        if f.len() >= 72 {
            self.pm1a_cnt = le32(f, 64) as u16;
            self.pm1b_cnt = le32(f, 68) as u16;
            self.sci_int = le16(f, 46);
            self.smi_cmd = le32(f, 48) as u16;
            self.acpi_enable = f[52];
            self.pm1a_evt = le32(f, 56) as u16;
        }
        if f.len() >= 89 {
            self.pm1_evt_len = f[88];
        }
        // SLEEP_CONTROL_REG, a Generic Address Structure at 244 (ACPI 5+).
        if f.len() >= 256 && le64(f, 248) != 0 {
            self.sleep_ctl_space = f[244];
            self.sleep_ctl = le64(f, 248);
        }
        let dsdt = if f.len() >= 148 && le64(f, 140) != 0 {
            le64(f, 140)
        } else {
            u64::from(le32(f, 40))
        };
        if let Some(typ) = table(dsdt).and_then(s5_slp_typ) {
            self.slp_typ_s5 = typ;
            self.slp_typ_from_dsdt = true;
        }
        self.dsdt_cba = table(dsdt).and_then(cba);
    }

    fn parse_madt(&mut self, m: &[u8]) {
        self.found_madt = true;
        self.cpu_source = "MADT";
        if m.len() < 44 {
            return;
        }
        self.lapic_addr = u64::from(le32(m, 36));
        let mut off = 44;
        while off + 2 <= m.len() {
            let (kind, len) = (m[off], m[off + 1] as usize);
            if len < 2 || off + len > m.len() {
                break;
            }
            let e = &m[off..off + len];
            match kind {
                0 if len >= 8 => self.add_cpu(u32::from(e[3]), le32(e, 4)),
                9 if len >= 16 => self.add_cpu(le32(e, 4), le32(e, 8)),
                1 if len >= 12 => {
                    if self.ioapic_addr == 0 {
                        self.ioapic_addr = u64::from(le32(e, 4));
                        self.ioapic_gsi_base = le32(e, 8);
                    }
                    if self.nioapics < MAX_IOAPICS {
                        self.ioapics[self.nioapics] = (u64::from(le32(e, 4)), le32(e, 8));
                        self.nioapics += 1;
                    }
                }
                2 if len >= 10 && e[2] == 0 && e[3] < 16 => {
                    self.isa_override[usize::from(e[3])] = Some((le32(e, 4), le16(e, 8)));
                }
                5 if len >= 12 => self.lapic_addr = le64(e, 4),
                _ => {}
            }
            off += len;
        }
    }

    fn add_cpu(&mut self, apic_id: u32, flags: u32) {
        if flags & 1 == 0 {
            return;
        }
        if self.ncpus < MAX_CPUS {
            self.cpus[self.ncpus] = apic_id;
            self.ncpus += 1;
        } else {
            self.cpus_dropped += 1;
        }
    }

    /// GSI and (active-low, level) for an ISA IRQ.
    pub fn isa_irq(&self, irq: u8) -> (u32, bool, bool) {
        match self.isa_override[usize::from(irq & 15)] {
            Some((gsi, flags)) => (gsi, flags & 3 == 3, (flags >> 2) & 3 == 3),
            None => (u32::from(irq), false, false),
        }
    }
}

/// SLP_TYPa of `\_S5` from the DSDT's AML: `Name(_S5, Package(){a, ...})`.
/// A byte search, as is usual for small kernels without an AML interpreter.
fn s5_slp_typ(dsdt: &[u8]) -> Option<u8> {
    let aml = &dsdt[36..];
    let i = aml.windows(4).position(|w| w == b"_S5_")?;
    // Must be a NameOp (0x08), optionally with a root prefix '\'.
    let named =
        (i >= 1 && aml[i - 1] == 0x08) || (i >= 2 && aml[i - 1] == b'\\' && aml[i - 2] == 0x08);
    let rest = &aml[i + 4..];
    if !named || rest.first() != Some(&0x12) {
        return None;
    }
    // PkgLength: top two bits of the lead byte = number of extra bytes.
    let pkg_len_bytes = 1 + usize::from(rest.get(1)? >> 6);
    let elems = rest.get(1 + pkg_len_bytes + 1..)?;
    match *elems.first()? {
        0x00 => Some(0),               // ZeroOp
        0x01 => Some(1),               // OneOp
        0x0a => elems.get(1).copied(), // BytePrefix
        b if b < 8 => Some(b),
        _ => None,
    }
}

/// The value of the first `_CBA` (PCIe ECAM base) in the DSDT's AML, as
/// `Name(_CBA, n)` or `Method(_CBA) { Return (n) }`. A byte search like
/// `s5_slp_typ`: enough for the AML QEMU generates (gpex-acpi.c).
fn cba(dsdt: &[u8]) -> Option<u64> {
    let aml = &dsdt[36..];
    let i = aml.windows(4).position(|w| w == b"_CBA")?;
    let rest = &aml[i + 4..];
    let value = if i >= 1 && aml[i - 1] == 0x08 {
        // NameOp _CBA DataObject
        rest
    } else if i >= 2 && aml[i - 2] == 0x14 && aml[i - 1] < 0x40 {
        // MethodOp PkgLength(1 byte) _CBA MethodFlags ReturnOp DataObject
        if rest.get(1) != Some(&0xa4) {
            return None;
        }
        rest.get(2..)?
    } else {
        return None;
    };
    let int = |n: usize| -> Option<u64> {
        let b = value.get(1..1 + n)?;
        Some(b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
    };
    match *value.first()? {
        0x0a => int(1), // BytePrefix
        0x0b => int(2), // WordPrefix
        0x0c => int(4), // DWordPrefix
        0x0e => int(8), // QWordPrefix
        _ => None,
    }
}

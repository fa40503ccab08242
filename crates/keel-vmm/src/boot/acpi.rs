//! ACPI tables: RSDP, XSDT, FADT, MADT, MCFG and a DSDT with `\_S5` and the PCI root
//! bridge `\_SB.PCI0`.
//!
//! Enough for a guest to find every vCPU and the IOAPIC (MADT), power off (FADT PM1a
//! control block plus `\_S5`), reset (FADT reset register: 0xfe to port 0x64), and find the
//! PCI segment: its ECAM window (MCFG) and the bus numbers, I/O ports and MMIO windows its
//! root bridge decodes (`PCI0._CRS`).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use keel_memory::x86::{IOAPIC_START, LAPIC_START, PCI_PIO_SIZE, PCI_PIO_START};
use keel_memory::{GuestMemoryMmap, MemoryLayout, RegionKind};
use keel_pci::segment::CONFIG_IO_PORT;
use keel_pci::McfgEntry;

use crate::devices::{I8042_CMD_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT, SLP_TYP_S5};

/// Where the tables go: the RSDP must be in 0xe0000-0xfffff for guests that scan for it.
pub const ACPI_START: u64 = 0xe_0000;
/// The ACPI SCI interrupt.
pub const SCI_IRQ: u16 = 9;

const OEM_ID: &[u8; 6] = b"KEEL  ";
const OEM_TABLE_ID: &[u8; 8] = b"KEELVMM ";

/// Two's-complement checksum so the bytes sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// An ACPI table under construction: the standard 36-byte header, then a body.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(signature);
        b.extend_from_slice(&[0; 4]); // length, fixed in finish()
        b.push(revision);
        b.push(0); // checksum
        b.extend_from_slice(OEM_ID);
        b.extend_from_slice(OEM_TABLE_ID);
        b.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        b.extend_from_slice(b"KEEL"); // creator ID
        b.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Sdt(b)
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A Generic Address Structure for an I/O port register.
    fn gas_io(&mut self, port: u16, bits: u8) -> &mut Self {
        self.u8(1) // system I/O
            .u8(bits)
            .u8(0)
            .u8(bits.div_ceil(8).next_power_of_two().trailing_zeros() as u8 + 1)
            .u64(u64::from(port))
    }
    fn put_at(&mut self, at: usize, b: &[u8]) {
        self.0[at..at + b.len()].copy_from_slice(b);
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.put_at(4, &len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// Just enough AML (ACPI 6.5, chapter 20) and resource-descriptor encoding (6.4) for
/// the DSDT.
mod aml {
    /// A PkgLength followed by `body`: the length counts its own bytes too.
    fn with_pkg_length(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + 4);
        let len = body.len();
        if len < 0x3f {
            out.push((len + 1) as u8);
        } else {
            // Lead byte: the count of following bytes in bits 7:6, the low nibble in 3:0.
            let extra = if len + 2 < 1 << 12 {
                1
            } else if len + 3 < 1 << 20 {
                2
            } else {
                3
            };
            let total = len + 1 + extra;
            assert!(total < 1 << 28, "AML package too large");
            out.push(((extra as u8) << 6) | (total & 0xf) as u8);
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
        }
        out.extend_from_slice(body);
        out
    }

    /// `Name (seg, value)`.
    pub fn name(seg: &[u8; 4], value: &[u8]) -> Vec<u8> {
        [&[0x08][..], seg, value].concat()
    }

    /// An integer in the smallest encoding.
    pub fn int(v: u64) -> Vec<u8> {
        match v {
            0 => vec![0x00],
            1 => vec![0x01],
            v if v <= 0xff => vec![0x0a, v as u8],
            v if v <= 0xffff => [&[0x0b][..], &(v as u16).to_le_bytes()].concat(),
            v if v <= 0xffff_ffff => [&[0x0c][..], &(v as u32).to_le_bytes()].concat(),
            v => [&[0x0e][..], &v.to_le_bytes()].concat(),
        }
    }

    /// `EISAID ("PNP0A08")`: a compressed EISA ID, as a DWord as iasl encodes it.
    pub fn eisa_id(id: &[u8; 7]) -> Vec<u8> {
        let letter = |c: u8| u16::from(c - b'@') & 0x1f;
        let vendor = (letter(id[0]) << 10) | (letter(id[1]) << 5) | letter(id[2]);
        let hex = |c: u8| (c as char).to_digit(16).expect("EISA ID product digit") as u8;
        let product = [
            (hex(id[3]) << 4) | hex(id[4]),
            (hex(id[5]) << 4) | hex(id[6]),
        ];
        let [v0, v1] = vendor.to_be_bytes();
        vec![0x0c, v0, v1, product[0], product[1]]
    }

    /// `Buffer () { bytes }`.
    pub fn buffer(bytes: &[u8]) -> Vec<u8> {
        let body = [int(bytes.len() as u64).as_slice(), bytes].concat();
        [&[0x11][..], &with_pkg_length(&body)].concat()
    }

    /// `Scope (name) { terms }`.
    pub fn scope(name: &[u8], terms: &[Vec<u8>]) -> Vec<u8> {
        let body = [name, &terms.concat()].concat();
        [&[0x10][..], &with_pkg_length(&body)].concat()
    }

    /// `Device (seg) { terms }`.
    pub fn device(seg: &[u8; 4], terms: &[Vec<u8>]) -> Vec<u8> {
        let body = [&seg[..], &terms.concat()].concat();
        [&[0x5b, 0x82][..], &with_pkg_length(&body)].concat()
    }

    /// `Package () { elements }`.
    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let body = [&[elements.len() as u8][..], &elements.concat()].concat();
        [&[0x12][..], &with_pkg_length(&body)].concat()
    }

    /// Resource descriptors for a `_CRS` buffer.
    pub mod res {
        /// Address space resource type: memory.
        pub const MEMORY: u8 = 0;
        /// I/O space.
        pub const IO: u8 = 1;
        /// Bus number range.
        pub const BUS: u8 = 2;
        /// General flags of a window the bridge produces: MaxFixed, MinFixed, PosDecode,
        /// ResourceProducer.
        const PRODUCER_FIXED: u8 = 0b1100;

        /// `IO (Decode16, min, min, 1, len)`: ports the device itself consumes.
        pub fn io(min: u16, len: u8) -> Vec<u8> {
            let mut d = vec![0x47, 0x01];
            d.extend_from_slice(&min.to_le_bytes());
            d.extend_from_slice(&min.to_le_bytes());
            d.extend_from_slice(&[1, len]);
            d
        }

        /// `WordBusNumber` / `WordIO` (`type_flags` 3: EntireRange) for a window
        /// `[min, min + len)` the bridge produces.
        pub fn word(kind: u8, type_flags: u8, min: u16, len: u16) -> Vec<u8> {
            let mut d = vec![0x88, 13, 0, kind, PRODUCER_FIXED, type_flags];
            for v in [0, min, min + (len - 1), 0, len] {
                d.extend_from_slice(&v.to_le_bytes()); // gran, min, max, translation, len
            }
            d
        }

        /// `DWordMemory` (`type_flags`: ReadWrite and cacheability) for a window.
        pub fn dword(type_flags: u8, min: u32, len: u32) -> Vec<u8> {
            let mut d = vec![0x87, 23, 0, MEMORY, PRODUCER_FIXED, type_flags];
            for v in [0, min, min + (len - 1), 0, len] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        }

        /// `QWordMemory` for a window.
        pub fn qword(type_flags: u8, min: u64, len: u64) -> Vec<u8> {
            let mut d = vec![0x8a, 43, 0, MEMORY, PRODUCER_FIXED, type_flags];
            for v in [0, min, min + (len - 1), 0, len] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d
        }

        /// The end tag (checksum 0: "the checksum is not computed").
        pub const END: [u8; 2] = [0x79, 0x00];
    }
}

/// Memory type-specific flags: ReadWrite, NonCacheable (the 32-bit window, as QEMU has it).
const MEM_RW_NONCACHEABLE: u8 = 0b0001;
/// ReadWrite, Cacheable (the 64-bit window, which takes prefetchable BARs too).
const MEM_RW_CACHEABLE: u8 = 0b0011;

/// `PCI0._CRS`: the bus numbers of `pci`, the configuration ports, and the I/O port and
/// MMIO windows keel-memory's allocator places BARs in.
fn pci0_crs(layout: &MemoryLayout, pci: &McfgEntry) -> Vec<u8> {
    use aml::res;
    let buses = u16::from(pci.end_bus) - u16::from(pci.start_bus) + 1;
    let mut crs = res::word(res::BUS, 0, u16::from(pci.start_bus), buses);
    crs.extend(res::io(CONFIG_IO_PORT as u16, 8));
    crs.extend(res::word(
        res::IO,
        0b11, // EntireRange
        PCI_PIO_START as u16,
        PCI_PIO_SIZE as u16,
    ));
    for (kind, flags) in [
        (RegionKind::PciMmio32, MEM_RW_NONCACHEABLE),
        (RegionKind::PciMmio64, MEM_RW_CACHEABLE),
    ] {
        let Some(r) = layout.region(kind).filter(|r| r.len > 0) else {
            continue;
        };
        match (u32::try_from(r.base), u32::try_from(r.end() - 1)) {
            (Ok(base), Ok(_)) => crs.extend(res::dword(flags, base, r.len as u32)),
            _ => crs.extend(res::qword(flags, r.base, r.len)),
        }
    }
    crs.extend(res::END);
    crs
}

fn dsdt(layout: &MemoryLayout, pci: Option<&McfgEntry>) -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    // Name (\_S5, Package (4) { SLP_TYP_S5, 0, 0, 0 })
    t.u8(0x08).bytes(b"\\_S5_").bytes(&aml::package(&[
        aml::int(u64::from(SLP_TYP_S5)),
        aml::int(0),
        aml::int(0),
        aml::int(0),
    ]));
    if let Some(e) = pci {
        let pci0 = aml::device(
            b"PCI0",
            &[
                aml::name(b"_HID", &aml::eisa_id(b"PNP0A08")),
                aml::name(b"_CID", &aml::eisa_id(b"PNP0A03")),
                aml::name(b"_SEG", &aml::int(u64::from(e.segment))),
                aml::name(b"_BBN", &aml::int(u64::from(e.start_bus))),
                // One root bridge per segment: the segment number is a unique ID.
                aml::name(b"_UID", &aml::int(u64::from(e.segment))),
                aml::name(b"_CRS", &aml::buffer(&pci0_crs(layout, e))),
            ],
        );
        t.bytes(&aml::scope(b"\\_SB_", &[pci0]));
    }
    t.finish()
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"FACP", 6);
    t.u32(0) // FIRMWARE_CTRL: no FACS
        .u32(dsdt as u32)
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ)
        .u32(0) // SMI_CMD: none, so ACPI mode is always on
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .u32(u32::from(PM1A_EVT_PORT))
        .u32(0) // PM1b_EVT_BLK
        .u32(u32::from(PM1A_CNT_PORT))
        .u32(0) // PM1b_CNT_BLK
        .u32(0) // PM2_CNT_BLK
        .u32(0) // PM_TMR_BLK
        .u32(0)
        .u32(0) // GPE0_BLK, GPE1_BLK
        .u8(4) // PM1_EVT_LEN
        .u8(2) // PM1_CNT_LEN
        .u8(0)
        .u8(0) // PM2_CNT_LEN, PM_TMR_LEN
        .u8(0)
        .u8(0)
        .u8(0) // GPE0_BLK_LEN, GPE1_BLK_LEN, GPE1_BASE
        .u8(0) // CST_CNT
        .u16(0x65)
        .u16(0x3e9) // P_LVL2_LAT, P_LVL3_LAT: not supported
        .u16(0)
        .u16(0) // FLUSH_SIZE, FLUSH_STRIDE
        .u8(0)
        .u8(0) // DUTY_OFFSET, DUTY_WIDTH
        .u8(0)
        .u8(0)
        .u8(0) // DAY_ALRM, MON_ALRM, CENTURY
        .u16((1 << 1) | (1 << 2)) // IAPC_BOOT_ARCH: 8042 present, no VGA
        .u8(0)
        // Flags: WBINVD, PROC_C1, SLP_BUTTON (none), RESET_REG_SUP.
        .u32((1 << 0) | (1 << 2) | (1 << 5) | (1 << 10))
        .gas_io(I8042_CMD_PORT, 8) // RESET_REG: the i8042 command port
        .u8(0xfe) // RESET_VALUE
        .u16(0) // ARM_BOOT_ARCH
        .u8(0) // FADT minor version
        .u64(0) // X_FIRMWARE_CTRL
        .u64(dsdt) // X_DSDT
        .gas_io(PM1A_EVT_PORT, 32) // X_PM1a_EVT_BLK
        .bytes(&[0; 12]) // X_PM1b_EVT_BLK
        .gas_io(PM1A_CNT_PORT, 16) // X_PM1a_CNT_BLK
        .bytes(&[0; 12 * 6]) // X_PM1b_CNT, X_PM2_CNT, X_PM_TMR, X_GPE0, X_GPE1, SLEEP_CONTROL
        .bytes(&[0; 12]) // SLEEP_STATUS_REG
        .bytes(b"KEELVMM\0"); // hypervisor vendor identity
    let t = t.finish();
    debug_assert_eq!(t.len(), 276);
    t
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC_START as u32).u32(1); // PCAT_COMPAT: there is an 8259
    for id in 0..vcpus {
        // Processor local APIC: UID, APIC ID, enabled.
        t.u8(0).u8(8).u8(id).u8(id).u32(1);
    }
    // IOAPIC 0 at its usual address, GSI base 0.
    t.u8(1).u8(12).u8(0).u8(0).u32(IOAPIC_START as u32).u32(0);
    // The SCI is level-triggered, active high.
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ as u8)
        .u32(u32::from(SCI_IRQ))
        .u16(0xd);
    // LINT1 of every processor is NMI.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

fn mcfg(e: &McfgEntry) -> Vec<u8> {
    let mut t = Sdt::new(b"MCFG", 1);
    t.u64(0) // reserved
        .u64(e.base)
        .u16(e.segment)
        .u8(e.start_bus)
        .u8(e.end_bus)
        .u32(0);
    t.finish()
}

/// Writes the tables for a VM with `vcpus` vCPUs laid out as `layout` (and, with `pci`, the
/// MCFG entry and root bridge of its PCI segment) at [`ACPI_START`] and returns the RSDP's
/// address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    vcpus: u8,
    pci: Option<&McfgEntry>,
) -> Result<GuestAddress, GuestMemoryError> {
    let rsdp_addr = ACPI_START;
    let mut next = ACPI_START + 64; // the RSDP is 36 bytes; keep tables 16-aligned
    let mut place = |bytes: &[u8]| -> Result<u64, GuestMemoryError> {
        let at = next;
        mem.write_slice(bytes, GuestAddress(at))?;
        next = (at + bytes.len() as u64).next_multiple_of(16);
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(layout, pci))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus))?;
    let mut xsdt = Sdt::new(b"XSDT", 1);
    xsdt.u64(fadt_addr).u64(madt_addr);
    if let Some(e) = pci {
        xsdt.u64(place(&mcfg(e))?);
    }
    let xsdt_addr = place(&xsdt.finish())?;

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.push(0); // extended checksum
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::{MemoryOptions, SystemAllocator, GIB, MIB};

    fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn table(mem: &GuestMemoryMmap, at: u64) -> Vec<u8> {
        let len = u32::from_le_bytes(read(mem, at + 4, 4).try_into().unwrap()) as usize;
        let t = read(mem, at, len);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        t
    }

    /// Walks the tables the way a guest does: RSDP, XSDT, then each table.
    #[test]
    fn guest_walk_finds_every_table() {
        let mem = MemoryLayout::new(16 * MIB)
            .unwrap()
            .create_guest_memory(&MemoryOptions::default())
            .unwrap();
        let pci = McfgEntry {
            base: 0xe000_0000,
            segment: 0,
            start_bus: 0,
            end_bus: 0,
        };
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let rsdp = write_tables(&mem, &layout, 3, Some(&pci)).unwrap().0;
        let r = read(&mem, rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = table(&mem, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|&a| table(&mem, a)[..4].to_vec())
            .collect();
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
        let mcfg = table(&mem, entries[2]);
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            0xe000_0000
        );
        assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus 0 only");

        let fadt = table(&mem, entries[0]);
        assert_eq!(fadt.len(), 276);
        let pm1a_cnt = u32::from_le_bytes(fadt[64..68].try_into().unwrap());
        assert_eq!(pm1a_cnt, u32::from(PM1A_CNT_PORT));
        let dsdt = table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));

        let madt = table(&mem, entries[1]);
        let mut apic_ids = Vec::new();
        let mut ioapics = Vec::new();
        let mut i = 44;
        while i < madt.len() {
            let (kind, len) = (madt[i], madt[i + 1] as usize);
            match kind {
                0 => apic_ids.push(madt[i + 3]),
                1 => ioapics.push(u32::from_le_bytes(madt[i + 4..i + 8].try_into().unwrap())),
                _ => {}
            }
            i += len;
        }
        assert_eq!(apic_ids, vec![0, 1, 2]);
        assert_eq!(ioapics, vec![IOAPIC_START as u32]);
    }

    /// An AML data object, as far as keel's DSDT uses them.
    #[derive(Debug, PartialEq)]
    enum Obj {
        Int(u64),
        Buf(Vec<u8>),
        Pkg(Vec<Obj>),
    }

    /// An AML term, as far as keel's DSDT uses them.
    #[derive(Debug)]
    enum Term {
        Name(Vec<u8>, Obj),
        Scope(Vec<u8>, Vec<Term>),
        Device(Vec<u8>, Vec<Term>),
    }

    /// A strict reader for the AML subset keel emits: any other opcode, or a package whose
    /// length does not match its contents, fails the test.
    struct Aml<'a> {
        b: &'a [u8],
        at: usize,
    }

    impl Aml<'_> {
        fn byte(&mut self) -> u8 {
            self.at += 1;
            self.b[self.at - 1]
        }
        fn le(&mut self, n: usize) -> u64 {
            (0..n).fold(0, |v, i| v | (u64::from(self.byte()) << (8 * i)))
        }
        /// Reads a PkgLength and returns where the package ends.
        fn pkg_end(&mut self) -> usize {
            let start = self.at;
            let lead = self.byte();
            let extra = usize::from(lead >> 6);
            let mut len = usize::from(if extra == 0 { lead & 0x3f } else { lead & 0xf });
            for i in 0..extra {
                len |= usize::from(self.byte()) << (4 + 8 * i);
            }
            start + len
        }
        fn name(&mut self) -> Vec<u8> {
            let mut n = Vec::new();
            if self.b[self.at] == b'\\' {
                n.push(self.byte());
            }
            n.extend((0..4).map(|_| self.byte()));
            n
        }
        fn obj(&mut self) -> Obj {
            match self.byte() {
                0x00 => Obj::Int(0),
                0x01 => Obj::Int(1),
                0x0a => Obj::Int(self.le(1)),
                0x0b => Obj::Int(self.le(2)),
                0x0c => Obj::Int(self.le(4)),
                0x0e => Obj::Int(self.le(8)),
                0x11 => {
                    let end = self.pkg_end();
                    let Obj::Int(size) = self.obj() else {
                        panic!("buffer size is not an integer")
                    };
                    assert_eq!(self.at + size as usize, end, "buffer size");
                    self.at = end;
                    Obj::Buf(self.b[end - size as usize..end].to_vec())
                }
                0x12 => {
                    let end = self.pkg_end();
                    let count = usize::from(self.byte());
                    let mut elements = Vec::new();
                    while self.at < end {
                        elements.push(self.obj());
                    }
                    assert_eq!((self.at, elements.len()), (end, count), "package");
                    Obj::Pkg(elements)
                }
                op => panic!("unexpected data opcode {op:#x} at {}", self.at - 1),
            }
        }
        fn terms(&mut self, end: usize) -> Vec<Term> {
            let mut terms = Vec::new();
            while self.at < end {
                terms.push(match self.byte() {
                    0x08 => Term::Name(self.name(), self.obj()),
                    0x10 => {
                        let end = self.pkg_end();
                        Term::Scope(self.name(), self.terms(end))
                    }
                    0x5b if self.byte() == 0x82 => {
                        let end = self.pkg_end();
                        Term::Device(self.name(), self.terms(end))
                    }
                    op => panic!("unexpected term opcode {op:#x} at {}", self.at - 1),
                });
            }
            assert_eq!(self.at, end, "a package overran its length");
            terms
        }
    }

    /// A `_CRS` resource descriptor.
    #[derive(Debug, PartialEq)]
    enum Res {
        /// Decode16 I/O ports the device uses.
        Io { min: u16, max: u16, len: u8 },
        /// An address-space window the bridge produces (min and max fixed, positive decode).
        Window {
            kind: u8,
            min: u64,
            max: u64,
            len: u64,
        },
    }

    fn resources(b: &[u8]) -> Vec<Res> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let tag = b[i];
            if tag & 0x80 == 0 {
                let len = usize::from(tag & 7);
                let d = &b[i + 1..i + 1 + len];
                match tag >> 3 {
                    0x08 => {
                        assert_eq!((len, d[0]), (7, 1), "IO, Decode16");
                        out.push(Res::Io {
                            min: u16::from_le_bytes([d[1], d[2]]),
                            max: u16::from_le_bytes([d[3], d[4]]),
                            len: d[6],
                        })
                    }
                    0x0f => {
                        assert_eq!(i + 2, b.len(), "the end tag ends the template");
                        return out;
                    }
                    t => panic!("unexpected small descriptor {t:#x}"),
                }
                i += 1 + len;
            } else {
                let len = usize::from(u16::from_le_bytes([b[i + 1], b[i + 2]]));
                let d = &b[i + 3..i + 3 + len];
                let width = match tag {
                    0x88 => 2,
                    0x87 => 4,
                    0x8a => 8,
                    t => panic!("unexpected large descriptor {t:#x}"),
                };
                assert_eq!(len, 3 + 5 * width, "descriptor length");
                assert_eq!(d[1], 0b1100, "producer, min and max fixed, positive decode");
                let field = |k: usize| {
                    let at = 3 + k * width;
                    d[at..at + width]
                        .iter()
                        .rev()
                        .fold(0u64, |v, &x| (v << 8) | u64::from(x))
                };
                assert_eq!((field(0), field(3)), (0, 0), "granularity, translation");
                let w = Res::Window {
                    kind: d[0],
                    min: field(1),
                    max: field(2),
                    len: field(4),
                };
                out.push(w);
                i += 3 + len;
            }
        }
    }

    /// `EISAID` decoded back to its 7 characters.
    fn eisa(v: u64) -> String {
        let b = (v as u32).to_le_bytes();
        let vendor = u16::from_be_bytes([b[0], b[1]]);
        let letters = [10, 5, 0].map(|s| char::from(b'@' + ((vendor >> s) & 0x1f) as u8));
        format!(
            "{}{}{:02X}{:02X}",
            String::from_iter(letters),
            "",
            b[2],
            b[3]
        )
    }

    /// The DSDT's `\_SB.PCI0`: the names it defines.
    fn pci0(dsdt: &[u8]) -> Vec<(Vec<u8>, Obj)> {
        let mut aml = Aml { b: dsdt, at: 36 };
        let mut found = None;
        for t in aml.terms(dsdt.len()) {
            match t {
                Term::Name(n, Obj::Pkg(p)) if n == b"\\_S5_" => {
                    assert_eq!(p.first(), Some(&Obj::Int(u64::from(SLP_TYP_S5))))
                }
                Term::Scope(n, terms) if n == b"\\_SB_" => {
                    for t in terms {
                        if let Term::Device(n, names) = t {
                            assert_eq!(n, b"PCI0");
                            found = Some(
                                names
                                    .into_iter()
                                    .map(|t| match t {
                                        Term::Name(n, o) => (n, o),
                                        t => panic!("unexpected {t:?} in PCI0"),
                                    })
                                    .collect(),
                            );
                        }
                    }
                }
                t => panic!("unexpected top-level {t:?}"),
            }
        }
        found.expect("no \\_SB.PCI0")
    }

    /// The root bridge in the DSDT decodes exactly the segment's buses, the configuration
    /// ports and the windows keel-memory's allocator hands BARs out from.
    #[test]
    fn dsdt_describes_the_pci_root_bridge() {
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let mem = layout
            .create_guest_memory(&MemoryOptions::default())
            .unwrap();
        let segment = keel_pci::PciSegment::new(
            std::sync::Arc::new(keel_bus::MmioBus::new()),
            std::sync::Arc::new(keel_bus::PioBus::new()),
            keel_memory::x86::ECAM_START,
        );
        let mcfg = segment.mcfg();
        let rsdp = write_tables(&mem, &layout, 1, Some(&mcfg)).unwrap().0;
        let xsdt = table(
            &mem,
            u64::from_le_bytes(read(&mem, rsdp + 24, 8).try_into().unwrap()),
        );
        let fadt = table(&mem, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt = table(&mem, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        // Also a layout with RAM above 4 GiB, which moves and resizes the 64-bit window.
        let big = MemoryLayout::with_mmio64_size(6 * GIB, 16 * GIB).unwrap();
        let big_dsdt = super::dsdt(&big, Some(&mcfg));
        assert_eq!(big_dsdt.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);

        for (layout, dsdt) in [(&layout, dsdt), (&big, big_dsdt)] {
            let names = pci0(&dsdt);
            let get = |n: &[u8; 4]| {
                let found: Vec<&Obj> = names
                    .iter()
                    .filter(|(k, _)| k == n)
                    .map(|(_, o)| o)
                    .collect();
                assert_eq!(found.len(), 1, "{}", String::from_utf8_lossy(n));
                found[0]
            };
            let int = |n: &[u8; 4]| match get(n) {
                Obj::Int(v) => *v,
                o => panic!("{} is {o:?}", String::from_utf8_lossy(n)),
            };
            assert_eq!(int(b"_HID"), 0x080a_d041);
            assert_eq!(eisa(int(b"_HID")), "PNP0A08");
            assert_eq!(eisa(int(b"_CID")), "PNP0A03");
            assert_eq!(int(b"_SEG"), u64::from(mcfg.segment));
            assert_eq!(int(b"_BBN"), u64::from(mcfg.start_bus));
            assert_eq!(int(b"_UID"), 0);
            let Obj::Buf(crs) = get(b"_CRS") else {
                panic!("_CRS is not a buffer")
            };
            let crs = resources(crs);
            let window = |kind: RegionKind| {
                let r = layout.region(kind).unwrap();
                Res::Window {
                    kind: aml::res::MEMORY,
                    min: r.base,
                    max: r.end() - 1,
                    len: r.len,
                }
            };
            let buses = u64::from(mcfg.end_bus - mcfg.start_bus) + 1;
            assert_eq!(
                crs,
                vec![
                    Res::Window {
                        kind: aml::res::BUS,
                        min: u64::from(mcfg.start_bus),
                        max: u64::from(mcfg.end_bus),
                        len: buses,
                    },
                    Res::Io {
                        min: 0xcf8,
                        max: 0xcf8,
                        len: 8
                    },
                    Res::Window {
                        kind: aml::res::IO,
                        min: PCI_PIO_START,
                        max: PCI_PIO_START + PCI_PIO_SIZE - 1,
                        len: PCI_PIO_SIZE,
                    },
                    window(RegionKind::PciMmio32),
                    window(RegionKind::PciMmio64),
                ]
            );
            // Each window is exactly what the allocator hands out: its first allocation is
            // at the window's start, and the whole window can be allocated at once.
            let alloc = || SystemAllocator::new(layout, 5).unwrap();
            type Pool = fn(
                &mut SystemAllocator,
                u64,
                u64,
            ) -> Result<(u64, u64), keel_memory::AllocatorError>;
            for (res, pool) in [
                (&crs[2], SystemAllocator::allocate_pio as Pool),
                (&crs[3], SystemAllocator::allocate_mmio32),
                (&crs[4], SystemAllocator::allocate_mmio64),
            ] {
                let Res::Window { min, len, .. } = *res else {
                    unreachable!()
                };
                assert_eq!(pool(&mut alloc(), 16, 16).unwrap().0, min);
                assert_eq!(pool(&mut alloc(), len, 16).unwrap(), (min, len));
                assert!(pool(&mut alloc(), len + 16, 16).is_err());
            }
        }

        // Without a PCI segment there is no root bridge.
        let plain = super::dsdt(&layout, None);
        let mut aml = Aml { b: &plain, at: 36 };
        let terms = aml.terms(plain.len());
        assert!(matches!(&terms[..], [Term::Name(n, Obj::Pkg(_))] if n == b"\\_S5_"));
    }
}

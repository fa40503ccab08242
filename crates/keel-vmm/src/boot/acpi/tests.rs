//! The tables read back the way a guest reads them.

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
        type Pool =
            fn(&mut SystemAllocator, u64, u64) -> Result<(u64, u64), keel_memory::AllocatorError>;
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

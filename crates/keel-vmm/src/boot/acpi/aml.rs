//! Just enough AML (ACPI 6.5, chapter 20) and resource-descriptor encoding (6.4) for
//! keel's DSDT: names, integers, EISA IDs, buffers, packages, scopes and devices, and the
//! `_CRS` descriptors of a PCI root bridge. Table assembly lives in the parent module.

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

/// `Name (path, value)`: `path` is one name segment (`_HID`) or a rooted one (`\_S5_`).
pub fn name(path: &[u8], value: &[u8]) -> Vec<u8> {
    [&[0x08][..], path, value].concat()
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

/// Resource descriptors for a `_CRS` buffer (ACPI 6.4), each a packed struct with the
/// specification's field names.
pub mod res {
    use std::mem::size_of;

    use zerocopy::byteorder::little_endian::{U16, U32, U64};
    use zerocopy::{Immutable, IntoBytes};

    /// Address space resource type: memory.
    pub const MEMORY: u8 = 0;
    /// I/O space.
    pub const IO: u8 = 1;
    /// Bus number range.
    pub const BUS: u8 = 2;
    /// I/O range type-specific flags: the window decodes ISA and non-ISA ports alike
    /// (EntireRange).
    pub const IO_ENTIRE_RANGE: u8 = 0b11;
    /// General flags of a window the bridge produces: MaxFixed, MinFixed, PosDecode,
    /// ResourceProducer.
    const PRODUCER_FIXED: u8 = 0b1100;

    /// Small I/O port descriptor (6.4.2.5): tag 0x47 (type 0x08, 7 bytes of data).
    #[repr(C, packed)]
    #[derive(Clone, Copy, IntoBytes, Immutable)]
    struct IoPort {
        tag: u8,
        information: u8,
        range_minimum: U16,
        range_maximum: U16,
        alignment: u8,
        range_length: u8,
    }

    /// I/O port information: the device decodes 16 address bits.
    const DECODE16: u8 = 1;

    /// `IO (Decode16, min, min, 1, len)`: ports the device itself consumes.
    pub fn io(min: u16, len: u8) -> Vec<u8> {
        IoPort {
            tag: 0x47,
            information: DECODE16,
            range_minimum: U16::new(min),
            range_maximum: U16::new(min),
            alignment: 1,
            range_length: len,
        }
        .as_bytes()
        .to_vec()
    }

    /// Word, DWord or QWord Address Space Descriptor (6.4.3.5.1-3): a large item whose
    /// five range fields are `W` wide.
    #[repr(C, packed)]
    #[derive(Clone, Copy, IntoBytes, Immutable)]
    struct AddressSpace<W> {
        tag: u8,
        length: U16,
        resource_type: u8,
        general_flags: u8,
        type_specific_flags: u8,
        granularity: W,
        range_minimum: W,
        range_maximum: W,
        translation_offset: W,
        range_length: W,
    }

    impl<W: IntoBytes + Immutable + Default> AddressSpace<W> {
        /// A window `[min, max]` of `len` units that the bridge produces.
        fn producer(tag: u8, resource_type: u8, type_flags: u8, min: W, max: W, len: W) -> Self {
            AddressSpace {
                tag,
                // A large item's length counts the bytes after the tag and length fields.
                length: U16::new((size_of::<Self>() - 3) as u16),
                resource_type,
                general_flags: PRODUCER_FIXED,
                type_specific_flags: type_flags,
                granularity: W::default(),
                range_minimum: min,
                range_maximum: max,
                translation_offset: W::default(),
                range_length: len,
            }
        }
    }

    /// `WordBusNumber` / `WordIO` (`type_flags` [`IO_ENTIRE_RANGE`] for I/O) for a window
    /// `[min, min + len)` the bridge produces.
    pub fn word(kind: u8, type_flags: u8, min: u16, len: u16) -> Vec<u8> {
        let max = min + (len - 1);
        let d = AddressSpace::producer(
            0x88,
            kind,
            type_flags,
            U16::new(min),
            U16::new(max),
            U16::new(len),
        );
        d.as_bytes().to_vec()
    }

    /// `DWordMemory` (`type_flags`: ReadWrite and cacheability) for a window.
    pub fn dword(type_flags: u8, min: u32, len: u32) -> Vec<u8> {
        let max = min + (len - 1);
        let d = AddressSpace::producer(
            0x87,
            MEMORY,
            type_flags,
            U32::new(min),
            U32::new(max),
            U32::new(len),
        );
        d.as_bytes().to_vec()
    }

    /// `QWordMemory` for a window.
    pub fn qword(type_flags: u8, min: u64, len: u64) -> Vec<u8> {
        let max = min + (len - 1);
        let d = AddressSpace::producer(
            0x8a,
            MEMORY,
            type_flags,
            U64::new(min),
            U64::new(max),
            U64::new(len),
        );
        d.as_bytes().to_vec()
    }

    /// The end tag (6.4.2.9), checksum 0: "the checksum is not computed".
    pub const END: [u8; 2] = [0x79, 0x00];
}

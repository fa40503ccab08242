//! Turning a guest's descriptor chain into a checked block request.
//!
//! A request is a header (`virtio_blk_outhdr`: type, ioprio, sector), then data, then one
//! status byte (virtio 1.2 section 5.2.6). The driver may split these across descriptors
//! any way it likes (Windows drivers put the header and data in one buffer, Linux uses
//! three): the parser works on the byte streams of the readable and the writable
//! descriptors (each an [`Iov`] of guest ranges), never on descriptor boundaries. Every
//! guest-controlled value is checked here, before anything touches the disk: lengths,
//! sector ranges, segment counts, flags.

use std::mem::{offset_of, size_of};

use keel_block::iov::{GuestRange, Iov};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// The sector size of the virtio-blk protocol: the unit of `virtio_blk_outhdr::sector`
/// and of every sector count, whatever the disk's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes in a request header (`virtio_blk_outhdr`).
pub const HEADER_LEN: u64 = size_of::<virtio_blk_outhdr>() as u64;
/// Bytes in one discard / write-zeroes segment (`virtio_blk_discard_write_zeroes`).
pub const SEGMENT_LEN: u64 = size_of::<virtio_blk_discard_write_zeroes>() as u64;
/// Bytes of the ID a GET_ID request returns.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// A status byte the device writes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = VIRTIO_BLK_S_OK as u8,
    /// The request failed, or was malformed.
    IoErr = VIRTIO_BLK_S_IOERR as u8,
    /// The request type or one of its flags is not supported.
    Unsupp = VIRTIO_BLK_S_UNSUPP as u8,
}

/// Why a request is refused. Each maps to the status the driver sees ([`Error::status`]);
/// chains too broken to carry a status at all are [`Error::NoStatus`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No device-writable byte for the status (or the chain itself is unreadable): the
    /// request cannot even be failed; it is returned with nothing written.
    #[error("the chain has no writable status byte")]
    NoStatus,
    /// Fewer readable bytes than a header.
    #[error("the header needs 16 readable bytes, the chain has {0}")]
    ShortHeader(u64),
    /// A readable descriptor follows a writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// The request type is not one the device implements.
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    /// A data length that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// Sectors past the end of the disk.
    #[error("sectors {sector}+{count} run past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A discard / write-zeroes payload that is not a whole number of segments, or has
    /// more segments than the device allows.
    #[error("{len} bytes of segments (at most {max} segments of 16 bytes)")]
    BadSegments {
        /// Payload bytes.
        len: u64,
        /// Segments allowed.
        max: u32,
    },
    /// A segment longer than the device allows.
    #[error("a segment of {0} sectors exceeds the device's limit")]
    SegmentTooLong(u32),
    /// Flags the request type does not accept.
    #[error("flags {0:#x} are not supported for this request type")]
    UnsupportedFlags(u32),
    /// A data buffer is not (wholly) in guest memory.
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    DataOutsideMemory {
        /// Guest-physical address of the buffer.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// More segments than the device advertises (`seg_max`).
    #[error("more than {max} data segments")]
    TooManySegments {
        /// Segments allowed.
        max: u32,
    },
    /// A data segment longer than the device advertises (`size_max`).
    #[error("a data segment of {len} bytes exceeds size_max ({max})")]
    SegmentTooLarge {
        /// Its length.
        len: usize,
        /// Bytes allowed.
        max: u32,
    },
    /// Guest memory named by the chain cannot be read.
    #[error("reading the request from guest memory at {addr:#x}")]
    Memory {
        /// Guest-physical address of the range that failed.
        addr: u64,
        /// Why it cannot be read.
        #[source]
        source: GuestMemoryError,
    },
}

impl Error {
    /// The status byte the driver sees for this error.
    pub fn status(&self) -> Status {
        match self {
            Error::UnsupportedType(_) | Error::UnsupportedFlags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// One range of a discard or write-zeroes request, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// WRITE_ZEROES may deallocate.
    pub unmap: bool,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `data.len()` bytes at `offset` into the (device-writable) ranges.
    Read {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Write the (device-readable) ranges at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device ID into the (device-writable) ranges.
    GetId,
    /// Discard the ranges.
    Discard(Vec<Range>),
    /// Zero the ranges.
    WriteZeroes(Vec<Range>),
}

/// A parsed, checked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// The data buffers: device-writable for reads and GET_ID, device-readable for
    /// writes; empty otherwise.
    pub data: Iov<GuestRange>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.len() as u64
    }
}

/// What the device allows; the parser enforces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Segments per discard request (0: discard not offered).
    pub max_discard_seg: u32,
    /// Sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Segments per write-zeroes request (0: write-zeroes not offered).
    pub max_write_zeroes_seg: u32,
    /// Sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Bytes in one data segment (the advertised `size_max`).
    pub size_max: u32,
    /// Data segments in one request (the advertised `seg_max`); a chain may hold two
    /// more non-empty descriptors (header and status).
    pub seg_max: u32,
}

/// The readable and writable byte streams of a chain.
struct Streams {
    readable: Iov<GuestRange>,
    writable: Iov<GuestRange>,
}

/// Reads `buf.len()` bytes from the start of `segs`.
fn read_bytes<M: GuestMemory>(
    mem: &M,
    segs: &Iov<GuestRange>,
    buf: &mut [u8],
) -> Result<(), Error> {
    let mut pos = 0usize;
    for r in segs.range(0, buf.len()) {
        mem.read_slice(&mut buf[pos..pos + r.len], r.addr)
            .map_err(|source| Error::Memory {
                addr: r.addr.0,
                source,
            })?;
        pos += r.len;
    }
    Ok(())
}

/// The little-endian `u32` at `at` in `b` (which holds it).
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian `u64` at `at` in `b` (which holds it).
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The chain's byte streams; `Err(TooManySegments)` once it has more than `max`
/// non-empty descriptors (an indirect table may hold thousands), before they are stored.
fn streams(descs: impl Iterator<Item = Descriptor>, max: usize) -> Result<Streams, Error> {
    let mut st = Streams {
        readable: Iov::new(),
        writable: Iov::new(),
    };
    let mut n = 0usize;
    for d in descs {
        if d.len() == 0 {
            continue;
        }
        n += 1;
        if n > max {
            return Err(Error::TooManySegments {
                max: max.saturating_sub(2).try_into().unwrap_or(u32::MAX),
            });
        }
        let seg = GuestRange::new(d.addr(), d.len() as usize);
        if d.is_write_only() {
            st.writable.push(seg);
        } else if !st.writable.is_empty() {
            return Err(Error::ReadableAfterWritable);
        } else {
            st.readable.push(seg);
        }
    }
    Ok(st)
}

/// Where the status byte goes: the last writable byte of the chain.
pub fn status_address(descs: impl Iterator<Item = Descriptor>) -> Option<GuestAddress> {
    // As `streams` sees it, without storing the chain (it may be long).
    let mut last = None;
    for d in descs.filter(|d| d.len() > 0) {
        if d.is_write_only() {
            last = Some(GuestRange::new(d.addr(), d.len() as usize));
        } else if last.is_some() {
            return None;
        }
    }
    Some(last?.last_addr())
}

fn check_range(sector: u64, bytes: u64, capacity: u64) -> Result<(), Error> {
    let count = bytes / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(Error::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

fn ranges<M: GuestMemory>(
    mem: &M,
    payload: &Iov<GuestRange>,
    limits: &Limits,
    max_seg: u32,
    max_sectors: u32,
    unmap_allowed: bool,
) -> Result<Vec<Range>, Error> {
    let len = payload.len() as u64;
    if len == 0 || len % SEGMENT_LEN != 0 || len / SEGMENT_LEN > u64::from(max_seg) {
        return Err(Error::BadSegments { len, max: max_seg });
    }
    let mut raw = vec![0u8; len as usize];
    read_bytes(mem, payload, &mut raw)?;
    raw.chunks_exact(SEGMENT_LEN as usize)
        .map(|c| {
            let sector = le64(c, offset_of!(virtio_blk_discard_write_zeroes, sector));
            let num = le32(c, offset_of!(virtio_blk_discard_write_zeroes, num_sectors));
            let flags = le32(c, offset_of!(virtio_blk_discard_write_zeroes, flags));
            let allowed = if unmap_allowed {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(Error::UnsupportedFlags(flags));
            }
            if num > max_sectors {
                return Err(Error::SegmentTooLong(num));
            }
            let bytes = u64::from(num) * SECTOR_SIZE;
            check_range(sector, bytes, limits.capacity)?;
            Ok(Range {
                offset: sector * SECTOR_SIZE,
                len: bytes,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

/// Parses the descriptors of one chain (as virtio-queue's `DescriptorChain` yields them,
/// indirect tables followed) against `limits`; the data buffers of an `Ok` request lie
/// in `mem`. On `Err`, the caller writes
/// [`Error::status`] to [`status_address`] (unless it is [`Error::NoStatus`]).
pub fn parse<M: GuestMemory>(
    mem: &M,
    descs: impl Iterator<Item = Descriptor>,
    limits: &Limits,
) -> Result<Request, Error> {
    let max_descs = usize::try_from(limits.seg_max)
        .unwrap_or(usize::MAX)
        .saturating_add(2);
    let st = streams(descs, max_descs)?;
    let Some(last) = st.writable.last() else {
        return Err(Error::NoStatus);
    };
    let status = last.last_addr();
    let writable_len = st.writable.len();
    let readable_len = st.readable.len() as u64;
    if readable_len < HEADER_LEN {
        return Err(Error::ShortHeader(readable_len));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_bytes(mem, &st.readable, &mut header)?;
    let kind = le32(&header, offset_of!(virtio_blk_outhdr, type_));
    let sector = le64(&header, offset_of!(virtio_blk_outhdr, sector));
    // Device-readable bytes after the header, device-writable ones before the status.
    let payload = st.readable.skip(HEADER_LEN as usize);
    let out = st.writable.take(writable_len - 1);
    let (op, data) = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            let data = if write { payload } else { out };
            let len = data.len() as u64;
            if len % SECTOR_SIZE != 0 {
                return Err(Error::Unaligned(len));
            }
            if write && limits.read_only {
                return Err(Error::ReadOnly);
            }
            check_range(sector, len, limits.capacity)?;
            let offset = sector * SECTOR_SIZE;
            let op = if write {
                Op::Write { offset }
            } else {
                Op::Read { offset }
            };
            (op, data)
        }
        VIRTIO_BLK_T_FLUSH => (Op::Flush, Iov::new()),
        VIRTIO_BLK_T_GET_ID => (Op::GetId, out.take(ID_BYTES)),
        VIRTIO_BLK_T_DISCARD if limits.max_discard_seg > 0 => {
            if limits.read_only {
                return Err(Error::ReadOnly);
            }
            let r = ranges(
                mem,
                &payload,
                limits,
                limits.max_discard_seg,
                limits.max_discard_sectors,
                false,
            )?;
            (Op::Discard(r), Iov::new())
        }
        VIRTIO_BLK_T_WRITE_ZEROES if limits.max_write_zeroes_seg > 0 => {
            if limits.read_only {
                return Err(Error::ReadOnly);
            }
            let r = ranges(
                mem,
                &payload,
                limits,
                limits.max_write_zeroes_seg,
                limits.max_write_zeroes_sectors,
                true,
            )?;
            (Op::WriteZeroes(r), Iov::new())
        }
        other => return Err(Error::UnsupportedType(other)),
    };
    // The device stores into the buffers of reads and GET_ID, loads from those of writes.
    let access = if matches!(op, Op::Write { .. }) {
        Permissions::Read
    } else {
        Permissions::Write
    };
    if data.segments().len() > limits.seg_max as usize {
        return Err(Error::TooManySegments {
            max: limits.seg_max,
        });
    }
    if let Some(r) = data.iter().find(|r| r.len > limits.size_max as usize) {
        return Err(Error::SegmentTooLarge {
            len: r.len,
            max: limits.size_max,
        });
    }
    if let Some(r) = data
        .iter()
        .find(|r| !mem.check_range(r.addr, r.len, access))
    {
        return Err(Error::DataOutsideMemory {
            addr: r.addr.0,
            len: r.len,
        });
    }
    Ok(Request { op, data, status })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::GuestMemoryMmap;

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity: 2048,
            read_only: false,
            max_discard_seg: 2,
            max_discard_sectors: 1024,
            max_write_zeroes_seg: 2,
            max_write_zeroes_sectors: 1024,
            size_max: 1 << 20,
            seg_max: 8,
        }
    }

    fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn any_split_of_header_data_and_status_parses_the_same() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 8);
        let want = |r: Request| {
            assert_eq!(r.op, Op::Read { offset: 4096 });
            assert_eq!(r.data_len(), 1024);
            r.status
        };
        // Linux: header, data, status in three descriptors.
        let s = want(
            parse(
                &m,
                [d(0x1000, 16, 0), d(0x2000, 1024, W), d(0x3000, 1, W)].into_iter(),
                &limits(),
            )
            .unwrap(),
        );
        assert_eq!(s, GuestAddress(0x3000));
        // Data and status in one buffer; the header split in two.
        let s = want(
            parse(
                &m,
                [d(0x1000, 5, 0), d(0x1005, 11, 0), d(0x2000, 1025, W)].into_iter(),
                &limits(),
            )
            .unwrap(),
        );
        assert_eq!(s, GuestAddress(0x2400));
        // Data in many small pieces, status at the end of the last.
        let r = parse(
            &m,
            [
                d(0x1000, 16, 0),
                d(0x4000, 512, W),
                d(0x5000, 100, W),
                d(0x6000, 413, W),
            ]
            .into_iter(),
            &limits(),
        )
        .unwrap();
        assert_eq!(r.data_len(), 1024);
        assert_eq!(r.data.last().unwrap().len, 412);
        assert_eq!(r.status, GuestAddress(0x6000 + 412));
        // A write: header and data in one readable buffer.
        header(&m, 0x7000, VIRTIO_BLK_T_OUT, 2);
        let r = parse(
            &m,
            [d(0x7000, 16 + 512, 0), d(0x8000, 1, W)].into_iter(),
            &limits(),
        )
        .unwrap();
        assert_eq!(r.op, Op::Write { offset: 1024 });
        assert_eq!(
            r.data.segments(),
            [GuestRange::new(GuestAddress(0x7010), 512)]
        );
    }

    #[test]
    fn malformed_requests_get_the_right_status() {
        let m = mem();
        let l = limits();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        type Want = fn(&Error) -> bool;
        let cases: Vec<(Vec<Descriptor>, Want)> = vec![
            (vec![d(0x1000, 16, 0)], |e| matches!(e, Error::NoStatus)),
            (vec![d(0x1000, 8, 0), d(0x3000, 1, W)], |e| {
                matches!(e, Error::ShortHeader(8))
            }),
            (
                vec![d(0x1000, 16, 0), d(0x2000, 100, W), d(0x3000, 1, W)],
                |e| matches!(e, Error::Unaligned(100)),
            ),
            (vec![d(0x3000, 1, W), d(0x1000, 16, 0)], |e| {
                matches!(e, Error::ReadableAfterWritable)
            }),
            (vec![d(0x20_0000, 16, 0), d(0x3000, 1, W)], |e| {
                matches!(
                    e,
                    Error::Memory {
                        addr: 0x20_0000,
                        ..
                    }
                )
            }),
        ];
        for (descs, want) in cases {
            let e = parse(&m, descs.into_iter(), &l).unwrap_err();
            assert!(want(&e), "{e:?}");
        }
        // Past the end of the disk.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 2047);
        let e = parse(
            &m,
            [d(0x1000, 16, 0), d(0x2000, 1024, W), d(0x3000, 1, W)].into_iter(),
            &l,
        )
        .unwrap_err();
        assert_eq!(e.status(), Status::IoErr);
        assert!(matches!(
            e,
            Error::OutOfRange {
                sector: 2047,
                count: 2,
                ..
            }
        ));
        // A sector number that would overflow.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        assert!(matches!(
            parse(
                &m,
                [d(0x1000, 16, 0), d(0x2000, 512, W), d(0x3000, 1, W)].into_iter(),
                &l
            ),
            Err(Error::OutOfRange { .. })
        ));
        // Unknown type: UNSUPP.
        header(&m, 0x1000, 0xff, 0);
        let e = parse(&m, [d(0x1000, 16, 0), d(0x3000, 1, W)].into_iter(), &l).unwrap_err();
        assert!(matches!(e, Error::UnsupportedType(0xff)), "{e:?}");
        assert_eq!(e.status(), Status::Unsupp);
        // Writes to a read-only disk: IOERR.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let ro = Limits {
            read_only: true,
            ..l
        };
        let e = parse(
            &m,
            [d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x3000, 1, W)].into_iter(),
            &ro,
        )
        .unwrap_err();
        assert!(matches!(e, Error::ReadOnly), "{e:?}");
        assert_eq!(e.status(), Status::IoErr);
    }

    #[test]
    fn discard_and_write_zeroes_segments_are_checked() {
        let m = mem();
        let l = limits();
        let seg = |at: u64, sector: u64, num: u32, flags: u32| {
            m.write_obj(sector, GuestAddress(at)).unwrap();
            m.write_obj(num, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        };
        let run = |kind: u32, segs: u32| {
            header(&m, 0x1000, kind, 0);
            parse(
                &m,
                [d(0x1000, 16, 0), d(0x2000, 16 * segs, 0), d(0x3000, 1, W)].into_iter(),
                &l,
            )
        };
        seg(0x2000, 8, 16, 0);
        seg(0x2010, 100, 8, 1);
        assert_eq!(
            run(VIRTIO_BLK_T_WRITE_ZEROES, 2).unwrap().op,
            Op::WriteZeroes(vec![
                Range {
                    offset: 4096,
                    len: 8192,
                    unmap: false
                },
                Range {
                    offset: 51200,
                    len: 4096,
                    unmap: true
                },
            ])
        );
        // UNMAP is not a discard flag.
        assert!(matches!(
            run(VIRTIO_BLK_T_DISCARD, 2),
            Err(Error::UnsupportedFlags(1))
        ));
        seg(0x2010, 100, 8, 0);
        assert!(matches!(
            run(VIRTIO_BLK_T_DISCARD, 2).unwrap().op,
            Op::Discard(ref r) if r.len() == 2
        ));
        // Too many segments, a partial segment, a segment too long or past the end.
        assert!(matches!(
            run(VIRTIO_BLK_T_DISCARD, 3),
            Err(Error::BadSegments { len: 48, max: 2 })
        ));
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        assert!(matches!(
            parse(
                &m,
                [d(0x1000, 16, 0), d(0x2000, 10, 0), d(0x3000, 1, W)].into_iter(),
                &l
            ),
            Err(Error::BadSegments { len: 10, .. })
        ));
        seg(0x2000, 0, 2000, 0);
        assert!(matches!(
            run(VIRTIO_BLK_T_DISCARD, 1),
            Err(Error::SegmentTooLong(2000))
        ));
        seg(0x2000, 2000, 100, 0);
        assert!(matches!(
            run(VIRTIO_BLK_T_WRITE_ZEROES, 1),
            Err(Error::OutOfRange { .. })
        ));
        // Not offered: UNSUPP.
        let none = Limits {
            max_discard_seg: 0,
            ..l
        };
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(0x2000, 0, 8, 0);
        let e = parse(
            &m,
            [d(0x1000, 16, 0), d(0x2000, 16, 0), d(0x3000, 1, W)].into_iter(),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.status(), Status::Unsupp);
    }
}

//! ACPI tables: RSDP, XSDT, FADT, MADT, MCFG and a DSDT with `\_S5` and the PCI root
//! bridge `\_SB.PCI0`.
//!
//! Enough for a guest to find every vCPU and the IOAPIC (MADT), power off (FADT PM1a
//! control block plus `\_S5`), reset (FADT reset register: 0xfe to port 0x64), and find the
//! PCI segment: its ECAM window (MCFG) and the bus numbers, I/O ports and MMIO windows its
//! root bridge decodes (`PCI0._CRS`).
//!
//! Every fixed-layout structure is a `#[repr(C, packed)]` struct whose fields are named as
//! in the ACPI specification (6.5) and whose multi-byte fields are little-endian types, so
//! the bytes written are exactly the struct's; the DSDT's AML comes from [`aml`].

mod aml;
#[cfg(test)]
mod tests;

use std::mem::size_of;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{Immutable, IntoBytes};

use keel_memory::x86::{IOAPIC_START, LAPIC_START, PCI_PIO_SIZE, PCI_PIO_START};
use keel_memory::{GuestMemoryMmap, MemoryLayout, RegionKind};
use keel_pci::segment::CONFIG_IO_PORT;
use keel_pci::McfgEntry;

use crate::devices::{I8042_CMD_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT, SLP_TYP_S5};

/// Where the tables go: the RSDP must be in 0xe0000-0xfffff for guests that scan for it.
pub const ACPI_START: u64 = 0xe_0000;
/// The ACPI SCI interrupt.
pub const SCI_IRQ: u16 = 9;

const OEM_ID: [u8; 6] = *b"KEEL  ";
const OEM_TABLE_ID: [u8; 8] = *b"KEELVMM ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"KEEL";
const CREATOR_REVISION: u32 = 1;

/// Two's-complement checksum of `parts` taken together, so that their bytes plus the
/// checksum sum to zero.
fn checksum(parts: &[&[u8]]) -> u8 {
    let sum = parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(0u8, |a, b| a.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// The Root System Description Pointer's ACPI 1.0 part: what the first checksum covers.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct RsdpV1 {
    signature: [u8; 8],
    checksum: u8,
    oem_id: [u8; 6],
    revision: u8,
    rsdt_address: U32,
}

/// The Root System Description Pointer (ACPI 5.2.5.3), revision 2.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct Rsdp {
    v1: RsdpV1,
    length: U32,
    xsdt_address: U64,
    extended_checksum: u8,
    reserved: [u8; 3],
}

impl Rsdp {
    /// An RSDP pointing at the XSDT only (no RSDT), both checksums set.
    fn new(xsdt_address: u64) -> Self {
        let mut v1 = RsdpV1 {
            signature: *b"RSD PTR ",
            checksum: 0,
            oem_id: OEM_ID,
            revision: 2, // ACPI 2.0 and later
            rsdt_address: U32::ZERO,
        };
        v1.checksum = checksum(&[v1.as_bytes()]);
        let mut rsdp = Rsdp {
            v1,
            length: U32::new(size_of::<Rsdp>() as u32),
            xsdt_address: U64::new(xsdt_address),
            extended_checksum: 0,
            reserved: [0; 3],
        };
        rsdp.extended_checksum = checksum(&[rsdp.as_bytes()]);
        rsdp
    }
}

/// The header every System Description Table starts with (ACPI 5.2.6).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct SdtHeader {
    signature: [u8; 4],
    length: U32,
    revision: u8,
    checksum: u8,
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: U32,
    creator_id: [u8; 4],
    creator_revision: U32,
}

/// A whole table: the header for `signature` and `revision`, then `body` (the table's own
/// fields and structures, already encoded), with the length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[&[u8]]) -> Vec<u8> {
    let body_len: usize = body.iter().map(|p| p.len()).sum();
    let mut header = SdtHeader {
        signature: *signature,
        length: U32::new((size_of::<SdtHeader>() + body_len) as u32),
        revision,
        checksum: 0,
        oem_id: OEM_ID,
        oem_table_id: OEM_TABLE_ID,
        oem_revision: U32::new(OEM_REVISION),
        creator_id: CREATOR_ID,
        creator_revision: U32::new(CREATOR_REVISION),
    };
    header.checksum = checksum(&[&[header.as_bytes()][..], body].concat());
    let mut table = header.as_bytes().to_vec();
    for part in body {
        table.extend_from_slice(part);
    }
    table
}

/// Generic Address Structure (ACPI 5.2.3.2).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct Gas {
    address_space_id: u8,
    register_bit_width: u8,
    register_bit_offset: u8,
    access_size: u8,
    address: U64,
}

impl Gas {
    const SYSTEM_IO: u8 = 1;

    /// A register of `bits` bits at I/O port `port`, accessed whole.
    fn io(port: u16, bits: u8) -> Self {
        // Access size: 1 = byte, 2 = word, 3 = dword, 4 = qword.
        let access_size = bits.div_ceil(8).next_power_of_two().trailing_zeros() as u8 + 1;
        Gas {
            address_space_id: Self::SYSTEM_IO,
            register_bit_width: bits,
            register_bit_offset: 0,
            access_size,
            address: U64::new(u64::from(port)),
        }
    }
}

/// The Fixed ACPI Description Table's fields after the header (ACPI 5.2.9, revision 6).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, IntoBytes, Immutable)]
struct FadtBody {
    firmware_ctrl: U32,
    dsdt: U32,
    reserved0: u8,
    preferred_pm_profile: u8,
    sci_int: U16,
    smi_cmd: U32,
    acpi_enable: u8,
    acpi_disable: u8,
    s4bios_req: u8,
    pstate_cnt: u8,
    pm1a_evt_blk: U32,
    pm1b_evt_blk: U32,
    pm1a_cnt_blk: U32,
    pm1b_cnt_blk: U32,
    pm2_cnt_blk: U32,
    pm_tmr_blk: U32,
    gpe0_blk: U32,
    gpe1_blk: U32,
    pm1_evt_len: u8,
    pm1_cnt_len: u8,
    pm2_cnt_len: u8,
    pm_tmr_len: u8,
    gpe0_blk_len: u8,
    gpe1_blk_len: u8,
    gpe1_base: u8,
    cst_cnt: u8,
    p_lvl2_lat: U16,
    p_lvl3_lat: U16,
    flush_size: U16,
    flush_stride: U16,
    duty_offset: u8,
    duty_width: u8,
    day_alrm: u8,
    mon_alrm: u8,
    century: u8,
    iapc_boot_arch: U16,
    reserved1: u8,
    flags: U32,
    reset_reg: Gas,
    reset_value: u8,
    arm_boot_arch: U16,
    fadt_minor_version: u8,
    x_firmware_ctrl: U64,
    x_dsdt: U64,
    x_pm1a_evt_blk: Gas,
    x_pm1b_evt_blk: Gas,
    x_pm1a_cnt_blk: Gas,
    x_pm1b_cnt_blk: Gas,
    x_pm2_cnt_blk: Gas,
    x_pm_tmr_blk: Gas,
    x_gpe0_blk: Gas,
    x_gpe1_blk: Gas,
    sleep_control_reg: Gas,
    sleep_status_reg: Gas,
    hypervisor_vendor_identity: [u8; 8],
}

const _: () = assert!(size_of::<SdtHeader>() + size_of::<FadtBody>() == 276);

/// FADT `IAPC_BOOT_ARCH`: an 8042 is present.
const IAPC_8042: u16 = 1 << 1;
/// FADT `IAPC_BOOT_ARCH`: no VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT flags: WBINVD works.
const FADT_WBINVD: u32 = 1 << 0;
/// FADT flags: C1 is supported on every processor.
const FADT_PROC_C1: u32 = 1 << 2;
/// FADT flags: there is no sleep button (none as a fixed feature or a device).
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// FADT flags: the reset register is supported.
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// `P_LVL2_LAT` above 100: C2 is not supported.
const C2_NOT_SUPPORTED: u16 = 0x65;
/// `P_LVL3_LAT` above 1000: C3 is not supported.
const C3_NOT_SUPPORTED: u16 = 0x3e9;
/// What the i8042 command port takes to reset the machine.
const I8042_RESET: u8 = 0xfe;

fn fadt(dsdt: u64) -> Vec<u8> {
    let body = FadtBody {
        // No FACS; the 32-bit DSDT address too, for older guests.
        dsdt: U32::new(dsdt as u32),
        sci_int: U16::new(SCI_IRQ),
        // No SMI command port: ACPI mode is always on.
        pm1a_evt_blk: U32::new(u32::from(PM1A_EVT_PORT)),
        pm1a_cnt_blk: U32::new(u32::from(PM1A_CNT_PORT)),
        pm1_evt_len: 4,
        pm1_cnt_len: 2,
        p_lvl2_lat: U16::new(C2_NOT_SUPPORTED),
        p_lvl3_lat: U16::new(C3_NOT_SUPPORTED),
        iapc_boot_arch: U16::new(IAPC_8042 | IAPC_VGA_NOT_PRESENT),
        flags: U32::new(FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_RESET_REG_SUP),
        reset_reg: Gas::io(I8042_CMD_PORT, 8),
        reset_value: I8042_RESET,
        x_dsdt: U64::new(dsdt),
        x_pm1a_evt_blk: Gas::io(PM1A_EVT_PORT, 32),
        x_pm1a_cnt_blk: Gas::io(PM1A_CNT_PORT, 16),
        hypervisor_vendor_identity: *b"KEELVMM\0",
        ..Default::default()
    };
    sdt(b"FACP", 6, &[body.as_bytes()])
}

/// The Multiple APIC Description Table's fields after the header (ACPI 5.2.12).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct MadtBody {
    local_apic_address: U32,
    flags: U32,
}

/// MADT flags: the platform also has dual 8259s (`PCAT_COMPAT`).
const MADT_PCAT_COMPAT: u32 = 1;

/// MADT Processor Local APIC structure (type 0).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApic {
    type_: u8,
    length: u8,
    acpi_processor_uid: u8,
    apic_id: u8,
    flags: U32,
}

/// Local APIC flags: enabled.
const LOCAL_APIC_ENABLED: u32 = 1;

/// MADT I/O APIC structure (type 1).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct IoApic {
    type_: u8,
    length: u8,
    io_apic_id: u8,
    reserved: u8,
    io_apic_address: U32,
    global_system_interrupt_base: U32,
}

/// MADT Interrupt Source Override structure (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    type_: u8,
    length: u8,
    bus: u8,
    source: u8,
    global_system_interrupt: U32,
    flags: U16,
}

/// MPS INTI flags: active high.
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
/// MPS INTI flags: level-triggered.
const MPS_INTI_LEVEL: u16 = 0b11 << 2;

/// MADT Local APIC NMI structure (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    type_: u8,
    length: u8,
    acpi_processor_uid: u8,
    flags: U16,
    local_apic_lint: u8,
}

/// `acpi_processor_uid` meaning every processor.
const ALL_PROCESSORS: u8 = 0xff;

/// The length field of a MADT structure: its size.
fn madt_len<T>() -> u8 {
    size_of::<T>() as u8
}

fn madt(vcpus: u8) -> Vec<u8> {
    let header = MadtBody {
        local_apic_address: U32::new(LAPIC_START as u32),
        flags: U32::new(MADT_PCAT_COMPAT),
    };
    let mut body = header.as_bytes().to_vec();
    for id in 0..vcpus {
        let lapic = LocalApic {
            type_: 0,
            length: madt_len::<LocalApic>(),
            acpi_processor_uid: id,
            apic_id: id,
            flags: U32::new(LOCAL_APIC_ENABLED),
        };
        body.extend_from_slice(lapic.as_bytes());
    }
    let ioapic = IoApic {
        type_: 1,
        length: madt_len::<IoApic>(),
        io_apic_id: 0,
        reserved: 0,
        io_apic_address: U32::new(IOAPIC_START as u32),
        global_system_interrupt_base: U32::ZERO,
    };
    body.extend_from_slice(ioapic.as_bytes());
    // The SCI is level-triggered, active high, on the IOAPIC pin of its ISA IRQ.
    let sci = InterruptSourceOverride {
        type_: 2,
        length: madt_len::<InterruptSourceOverride>(),
        bus: 0, // ISA
        source: SCI_IRQ as u8,
        global_system_interrupt: U32::new(u32::from(SCI_IRQ)),
        flags: U16::new(MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL),
    };
    body.extend_from_slice(sci.as_bytes());
    // LINT1 of every processor is NMI.
    let nmi = LocalApicNmi {
        type_: 4,
        length: madt_len::<LocalApicNmi>(),
        acpi_processor_uid: ALL_PROCESSORS,
        flags: U16::ZERO, // as the bus conforms
        local_apic_lint: 1,
    };
    body.extend_from_slice(nmi.as_bytes());
    sdt(b"APIC", 5, &[&body])
}

/// One MCFG entry: the ECAM window of a PCI segment's bus range.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct McfgAllocation {
    base_address: U64,
    pci_segment_group: U16,
    start_bus: u8,
    end_bus: u8,
    reserved: [u8; 4],
}

fn mcfg(e: &McfgEntry) -> Vec<u8> {
    let reserved = [0u8; 8];
    let allocation = McfgAllocation {
        base_address: U64::new(e.base),
        pci_segment_group: U16::new(e.segment),
        start_bus: e.start_bus,
        end_bus: e.end_bus,
        reserved: [0; 4],
    };
    sdt(b"MCFG", 1, &[&reserved, allocation.as_bytes()])
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let entries: Vec<U64> = entries.iter().map(|&a| U64::new(a)).collect();
    sdt(b"XSDT", 1, &[entries.as_bytes()])
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
        res::IO_ENTIRE_RANGE,
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
    // Name (\_S5, Package (4) { SLP_TYP_S5, 0, 0, 0 })
    let mut aml = aml::name(
        b"\\_S5_",
        &aml::package(&[
            aml::int(u64::from(SLP_TYP_S5)),
            aml::int(0),
            aml::int(0),
            aml::int(0),
        ]),
    );
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
        aml.extend(aml::scope(b"\\_SB_", &[pci0]));
    }
    sdt(b"DSDT", 2, &[&aml])
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
    let mut entries = vec![place(&fadt(dsdt_addr))?, place(&madt(vcpus))?];
    if let Some(e) = pci {
        entries.push(place(&mcfg(e))?);
    }
    let xsdt_addr = place(&xsdt(&entries))?;
    mem.write_slice(Rsdp::new(xsdt_addr).as_bytes(), GuestAddress(rsdp_addr))?;
    Ok(GuestAddress(rsdp_addr))
}

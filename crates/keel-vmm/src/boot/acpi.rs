//! ACPI tables: RSDP, XSDT, FADT, MADT and a DSDT with `\_S5`.
//!
//! Enough for a guest to find every vCPU and the IOAPIC (MADT), power off (FADT PM1a
//! control block plus `\_S5`) and reset (FADT reset register: 0xfe to port 0x64).

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use keel_memory::x86::{IOAPIC_START, LAPIC_START};
use keel_memory::GuestMemoryMmap;
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

fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    // Name (\_S5, Package (4) { SLP_TYP_S5, 0, 0, 0 })
    t.bytes(&[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a])
        .u8(SLP_TYP_S5 as u8)
        .bytes(&[0x00, 0x00, 0x00]);
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

/// Writes the tables for a VM with `vcpus` vCPUs (and, with `pci`, the MCFG entry of its
/// PCI segment) at [`ACPI_START`] and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
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
    let dsdt_addr = place(&dsdt())?;
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
    use keel_memory::{MemoryLayout, MemoryOptions, MIB};

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
        let rsdp = write_tables(&mem, 3, Some(&pci)).unwrap().0;
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
}

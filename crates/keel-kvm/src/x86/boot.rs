//! Descriptor and page tables in guest memory, and the entry register states of the boot
//! protocols: real mode, the Linux 64-bit boot protocol, PVH's 32-bit entry, and a 64-bit
//! user-mode (CPL3) entry for bare-metal test guests.
//!
//! Guest physical addresses used (all below the EBDA, in RAM every layout has):
//!
//! | range | content |
//! |---|---|
//! | `gdt` (default 0x500) .. +0x40 | GDT: see the `SEL_*` selectors |
//! | `idt` (default 0x1000) .. +0x1000 | IDT, 256 zeroed gates, for the guest to fill |
//! | `tss` (default 0x2000) .. +0x2069 | 64-bit TSS (RSP0) and an I/O bitmap allowing every port |
//!
//! Why an I/O bitmap: user-mode test guests use `in`/`out`. Setting RFLAGS.IOPL=3 is the
//! textbook way, but on software nested hypervisors such as PVM, native CPL3 code runs with
//! IOPL forced to 0 (and IF forced to 1); the port access then traps and KVM's emulator
//! checks the TSS I/O bitmap, which this TSS fills with zeros (every port allowed).
//! | `pml4` (default 0x9000) .. +0x6000 | PML4, PDPT and 4 page directories mapping 0-4 GiB |

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use super::gdt::{gdt_entry, segment};

/// 32-bit flat code segment (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// 64-bit kernel code segment (`__BOOT_CS` of the Linux boot protocol).
pub const SEL_CODE64: u16 = 0x10;
/// Flat data segment (`__BOOT_DS`).
pub const SEL_DATA: u16 = 0x18;
/// 64-bit TSS (a 16-byte system descriptor: slots 0x20 and 0x28).
pub const SEL_TSS: u16 = 0x20;
/// User data segment, DPL 3 (use with RPL 3: 0x33).
pub const SEL_USER_DATA: u16 = 0x30;
/// User 64-bit code segment, DPL 3 (use with RPL 3: 0x3b).
pub const SEL_USER_CODE64: u16 = 0x38;

const GDT_LEN: u64 = 0x40;
/// The TSS proper; the I/O bitmap follows it.
const TSS_LEN: u64 = 0x68;
/// 65536 ports, one bit each, plus the all-ones terminator byte the CPU requires.
const IO_BITMAP_LEN: u64 = 0x2000 + 1;

/// CR0: protection enable.
pub const CR0_PE: u64 = 1;
/// CR0: monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// CR0: extension type.
pub const CR0_ET: u64 = 1 << 4;
/// CR0: numeric error.
pub const CR0_NE: u64 = 1 << 5;
/// CR0: write protect.
pub const CR0_WP: u64 = 1 << 16;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4: FXSAVE/FXRSTOR and SSE enabled.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4: unmasked SIMD exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: the always-one bit.
pub const RFLAGS_FIXED: u64 = 1 << 1;
/// RFLAGS: I/O privilege level 3.
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// Where the boot tables go in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootTables {
    /// GDT base.
    pub gdt: u64,
    /// TSS base, followed by its I/O bitmap (0x2069 bytes in all).
    pub tss: u64,
    /// IDT base (one page).
    pub idt: u64,
    /// PML4 base; PDPT and page directories follow (6 pages in all).
    pub pml4: u64,
}

impl Default for BootTables {
    fn default() -> Self {
        BootTables {
            gdt: 0x500,
            tss: 0x2000,
            idt: 0x1000,
            pml4: 0x9000,
        }
    }
}

impl BootTables {
    fn gdt_entries(&self) -> [u64; 8] {
        let tss = self.tss;
        // A long-mode TSS descriptor is 16 bytes: the usual 8, then base bits 32-63.
        [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 0x08 code32
            gdt_entry(0xa09b, 0, 0xfffff), // 0x10 code64
            gdt_entry(0xc093, 0, 0xfffff), // 0x18 data
            gdt_entry(0x008b, tss as u32, (TSS_LEN + IO_BITMAP_LEN - 1) as u32), // 0x20 TSS
            tss >> 32,                     // 0x28 TSS high
            gdt_entry(0xc0f3, 0, 0xfffff), // 0x30 user data
            gdt_entry(0xa0fb, 0, 0xfffff), // 0x38 user code64
        ]
    }

    /// Writes the GDT, a TSS whose RSP0 is `kernel_stack` with an I/O bitmap allowing every
    /// port, and a zeroed IDT.
    pub fn write_descriptor_tables<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        kernel_stack: u64,
    ) -> Result<(), GuestMemoryError> {
        for (i, e) in self.gdt_entries().iter().enumerate() {
            mem.write_obj(*e, GuestAddress(self.gdt + 8 * i as u64))?;
        }
        let mut tss = vec![0u8; (TSS_LEN + IO_BITMAP_LEN) as usize];
        tss[4..12].copy_from_slice(&kernel_stack.to_le_bytes()); // RSP0
        tss[0x66..0x68].copy_from_slice(&(TSS_LEN as u16).to_le_bytes()); // I/O bitmap base
        *tss.last_mut().expect("non-empty") = 0xff; // bitmap terminator
        mem.write_slice(&tss, GuestAddress(self.tss))?;
        mem.write_slice(&[0u8; 4096], GuestAddress(self.idt))
    }

    /// Writes every table: descriptor tables (RSP0 = `kernel_stack`) and the identity map
    /// (user-accessible with `user`). Do this once per VM, before any vCPU runs: the
    /// tables are shared by all vCPUs, and rewriting page tables under a running vCPU
    /// confuses shadow paging even when the bytes are unchanged.
    pub fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        kernel_stack: u64,
        user: bool,
    ) -> Result<(), GuestMemoryError> {
        self.write_descriptor_tables(mem, kernel_stack)?;
        self.write_identity_page_tables(mem, user)
    }

    /// Writes page tables identity-mapping 0-4 GiB with 2 MiB pages. With `user`, every
    /// page is accessible from CPL3 (for test guests whose code runs in user mode).
    pub fn write_identity_page_tables<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        user: bool,
    ) -> Result<(), GuestMemoryError> {
        const PRESENT_RW: u64 = 0b11;
        const USER: u64 = 1 << 2;
        const PAGE_SIZE_2M: u64 = 1 << 7;
        let flags = PRESENT_RW | if user { USER } else { 0 };
        let pdpt = self.pml4 + 0x1000;
        let pd = self.pml4 + 0x2000;
        let mut page = [0u64; 512];
        page[0] = pdpt | flags;
        write_table(mem, self.pml4, &page)?;
        let mut page = [0u64; 512];
        for (i, e) in page.iter_mut().take(4).enumerate() {
            *e = (pd + 0x1000 * i as u64) | flags;
        }
        write_table(mem, pdpt, &page)?;
        for dir in 0..4u64 {
            let mut page = [0u64; 512];
            for (i, e) in page.iter_mut().enumerate() {
                *e = ((dir << 30) + ((i as u64) << 21)) | flags | PAGE_SIZE_2M;
            }
            write_table(mem, pd + 0x1000 * dir, &page)?;
        }
        Ok(())
    }

    fn load(&self, sregs: &mut kvm_sregs) {
        let gdt = self.gdt_entries();
        sregs.gdt.base = self.gdt;
        sregs.gdt.limit = (GDT_LEN - 1) as u16;
        sregs.idt.base = self.idt;
        sregs.idt.limit = 0xfff;
        sregs.tr = segment(gdt[(SEL_TSS / 8) as usize], SEL_TSS);
        // The TSS base above 4 GiB lives in the second half of the descriptor.
        sregs.tr.base |= gdt[(SEL_TSS / 8) as usize + 1] << 32;
    }
}

fn write_table<M: GuestMemory + ?Sized>(
    mem: &M,
    at: u64,
    t: &[u64; 512],
) -> Result<(), GuestMemoryError> {
    let bytes: Vec<u8> = t.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at))
}

/// Real mode, starting at linear address `entry` (below 1 MiB): CS:IP = entry>>4 : entry&0xf.
pub fn real_mode(sregs: &mut kvm_sregs, regs: &mut kvm_regs, entry: u64) {
    let selector = (entry >> 4) as u16;
    sregs.cs.selector = selector;
    sregs.cs.base = u64::from(selector) << 4;
    *regs = kvm_regs {
        rip: entry - sregs.cs.base,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    };
}

/// Which privilege level 64-bit code starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpl {
    /// Kernel mode (CPL0), as the Linux boot protocol requires.
    Kernel,
    /// User mode (CPL3) with IOPL 3 and every port open in the TSS I/O bitmap, so that
    /// `in`/`out` work. Needs page tables written with `user = true`. Interrupts switch to
    /// RSP0 from the TSS.
    User,
}

/// 64-bit long mode with paging, as the Linux 64-bit boot protocol specifies: the boot GDT
/// (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18), CR3 at the identity map, PAE, LME/LMA.
/// `rsi` carries the boot_params address for Linux.
pub fn long_mode(
    sregs: &mut kvm_sregs,
    regs: &mut kvm_regs,
    tables: &BootTables,
    cpl: Cpl,
    entry: u64,
    stack: u64,
    rsi: u64,
) {
    let gdt = tables.gdt_entries();
    let (cs_sel, ds_sel, rflags) = match cpl {
        Cpl::Kernel => (SEL_CODE64, SEL_DATA, RFLAGS_FIXED),
        Cpl::User => (
            SEL_USER_CODE64 | 3,
            SEL_USER_DATA | 3,
            RFLAGS_FIXED | RFLAGS_IOPL3,
        ),
    };
    let data = segment(gdt[(ds_sel / 8) as usize], ds_sel);
    sregs.cs = segment(gdt[(cs_sel / 8) as usize], cs_sel);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    tables.load(sregs);
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = tables.pml4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    *regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi,
        rflags,
        ..Default::default()
    };
}

/// PVH's 32-bit entry: protected mode, paging off, flat 4 GiB CS/DS/ES/SS, a busy TSS,
/// and EBX pointing at `hvm_start_info`.
pub fn pvh(
    sregs: &mut kvm_sregs,
    regs: &mut kvm_regs,
    tables: &BootTables,
    entry: u64,
    start_info: u64,
) {
    let gdt = tables.gdt_entries();
    let data = segment(gdt[(SEL_DATA / 8) as usize], SEL_DATA);
    sregs.cs = segment(gdt[(SEL_CODE32 / 8) as usize], SEL_CODE32);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    tables.load(sregs);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    *regs = kvm_regs {
        rip: entry,
        rbx: start_info,
        rflags: RFLAGS_FIXED,
        ..Default::default()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_memory::{MemoryLayout, MemoryOptions, MIB};

    #[test]
    fn identity_map_translates_addresses() {
        let mem = MemoryLayout::new(64 * MIB)
            .unwrap()
            .create_guest_memory(&MemoryOptions::default())
            .unwrap();
        let t = BootTables::default();
        t.write_identity_page_tables(&mem, true).unwrap();
        // Walk the tables by hand for a few addresses, LAPIC included.
        for va in [0u64, 0x20_1234, 0x3fff_ffff, 0xfee0_0020, 0xffff_ffff] {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(t.pml4 + 8 * ((va >> 39) & 511)))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + 8 * ((va >> 30) & 511)))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((va >> 21) & 511)))
                .unwrap();
            assert_eq!(pde & 0x87, 0x87, "present, writable, user, 2 MiB");
            assert_eq!((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff), va);
        }
    }

    #[test]
    fn long_mode_user_state() {
        let mut sregs = kvm_sregs::default();
        let mut regs = kvm_regs::default();
        let t = BootTables::default();
        long_mode(
            &mut sregs,
            &mut regs,
            &t,
            Cpl::User,
            0x10_0000,
            0x20_0000,
            0,
        );
        assert_eq!(sregs.cs.selector, 0x3b);
        assert_eq!((sregs.cs.dpl, sregs.cs.l), (3, 1));
        assert_eq!((sregs.ss.selector, sregs.ss.dpl), (0x33, 3));
        assert_eq!(regs.rflags & RFLAGS_IOPL3, RFLAGS_IOPL3);
        assert_eq!(sregs.tr.base, t.tss);
        assert_eq!(sregs.tr.limit, 0x68 + 0x2000);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
    }

    #[test]
    fn real_mode_entry_split() {
        let mut sregs = kvm_sregs::default();
        let mut regs = kvm_regs::default();
        real_mode(&mut sregs, &mut regs, 0x7c05);
        assert_eq!(
            (sregs.cs.selector, sregs.cs.base, regs.rip),
            (0x7c0, 0x7c00, 5)
        );
    }
}

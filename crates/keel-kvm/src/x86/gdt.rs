//! GDT entries and their conversion to KVM segment registers.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from access/flags (`0xF0FF` layout: flags in the top nibble, access in
/// the low byte), a 32-bit base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
}

/// The `kvm_segment` a selector pointing at `entry` loads. `selector` includes the RPL.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment(e, 0x10);
        assert_eq!((s.l, s.db, s.g, s.present, s.dpl, s.s), (1, 0, 1, 1, 0, 1));
        assert_eq!((s.type_, s.limit, s.base), (0xb, 0xffff_ffff, 0));
    }

    #[test]
    fn data_and_tss_segments() {
        let d = segment(gdt_entry(0xc0f3, 0x1234_5678, 0xfffff), 0x33);
        assert_eq!((d.base, d.dpl, d.db, d.type_), (0x1234_5678, 3, 1, 3));
        let t = segment(gdt_entry(0x008b, 0x580, 0x67), 0x20);
        assert_eq!(
            (t.base, t.limit, t.s, t.g, t.type_),
            (0x580, 0x67, 0, 0, 0xb)
        );
        assert_eq!(segment(0, 0).unusable, 1);
    }
}

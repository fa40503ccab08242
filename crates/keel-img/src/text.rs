//! Text keel-img prints in qemu-img's layout.

use keel_block::qcow2::snapshot::Snapshot;

/// A size as QEMU's `size_to_str` prints it (`0 B`, `1.5 MiB`).
pub(crate) fn size_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut x = v as f64;
    while x >= 1024.0 && i < UNITS.len() - 1 {
        x /= 1024.0;
        i += 1;
    }
    // %0.3g: three significant digits, trailing zeros dropped.
    let digits = if x >= 100.0 {
        0
    } else if x >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{x:.digits$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

/// Local date and time as `YYYY-MM-DD HH:MM:SS`.
fn local_time(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of this plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live, properly aligned locals;
    // localtime_r is the thread-safe variant and writes only into `tm`.
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    if !ok {
        return "????-??-?? ??:??:??".into();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The listing `qemu-img snapshot -l` prints, line for line, in the layout of current
/// QEMU (10.x: `VM_SIZE`, `VM_CLOCK` with four-digit hours).
pub fn snapshot_listing(snaps: &[Snapshot]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            sn.id,
            sn.name,
            size_str(sn.vm_state_size),
            local_time(sn.date_sec),
            clock,
            icount
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(size_str(0), "0 B");
        assert_eq!(size_str(1536), "1.5 KiB");
        assert_eq!(size_str(10 << 20), "10 MiB");
        assert_eq!(size_str(123 << 30), "123 GiB");
    }
}

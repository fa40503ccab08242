//! Port I/O, MMIO, TSC and the C memory primitives.
//!
//! Everything here runs at CPL3: port I/O is allowed by the all-zero I/O
//! permission bitmap in each CPU's TSS, MMIO by the user-accessible
//! identity map of 0-4 GiB.

use core::arch::asm;

/// # Safety
/// Writing an I/O port can have any side effect on the machine.
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: the caller vouches for the side effects of this port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// # Safety
/// See [`outb`].
pub unsafe fn outw(port: u16, v: u16) {
    // SAFETY: the caller vouches for the side effects of this port.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

/// # Safety
/// See [`outb`].
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: the caller vouches for the side effects of this port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// # Safety
/// Reading an I/O port can have side effects (e.g. clearing status).
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller vouches for the side effects of this port.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// # Safety
/// See [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: the caller vouches for the side effects of this port.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// # Safety
/// See [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: the caller vouches for the side effects of this port.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Read an 8-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register (or RAM) below 4 GiB.
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: the caller guarantees `addr` is mapped (identity map).
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Write an 8-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register and the write must be harmless.
pub unsafe fn mmio_write8(addr: u64, v: u8) {
    // SAFETY: the caller guarantees `addr` is mapped (identity map).
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

/// Read a 16-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register (or RAM) below 4 GiB, aligned.
pub unsafe fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: the caller guarantees `addr` is mapped (identity map) and aligned.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Write a 16-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register and the write must be harmless.
pub unsafe fn mmio_write16(addr: u64, v: u16) {
    // SAFETY: the caller guarantees `addr` is mapped (identity map) and aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}

/// Read a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register (or RAM) below 4 GiB.
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees `addr` is mapped (identity map) and aligned.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Write a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a mapped device register and the write must be harmless.
pub unsafe fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: the caller guarantees `addr` is mapped (identity map) and aligned.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Read a physical address below 4 GiB (identity-mapped) as bytes.
///
/// # Safety
/// `[addr, addr + len)` must be mapped memory that nothing writes meanwhile.
pub unsafe fn phys_slice<'a>(addr: u64, len: usize) -> &'a [u8] {
    // SAFETY: the caller guarantees the range is mapped and stable.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear so CPL3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC cycles we allow for things that take microseconds on any VMM.
/// The TSC frequency is not known without calibration; 1 G cycles is
/// 0.3-1 s on anything from 1 to 3.5 GHz.
pub const TIMEOUT_CYCLES: u64 = 1 << 30;

/// TSC cycles we allow for an answer that needs another host thread (a
/// VMM's device worker or event loop, a new vCPU thread): on a busy host
/// that thread may wait for a CPU for seconds. 32 G cycles is 10-34 s; only
/// a failure waits that long.
pub const DEVICE_TIMEOUT_CYCLES: u64 = 1 << 35;

/// Spin until `done()` is true or `cycles` TSC cycles have passed.
pub fn wait_for(cycles: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = rdtsc();
    loop {
        if done() {
            return true;
        }
        if rdtsc().wrapping_sub(start) > cycles {
            return done();
        }
        core::hint::spin_loop();
    }
}

extern "C" {
    /// boot.s: `hlt` at CPL3; the #GP handler halts the CPU at CPL0.
    fn keel_park() -> !;
    /// boot.s: `hlt` at CPL3; the #GP handler waits for an interrupt at CPL0
    /// (`sti; hlt`) and returns.
    fn keel_idle_wait();
}

/// Wait for the next interrupt without spinning on the host (about ten
/// emulated CPL0 instructions each way). An interrupt taken just before the
/// wait is not seen by it: callers need a periodic interrupt to bound it.
pub fn idle_wait() {
    // SAFETY: keel_idle_wait takes no arguments, touches no memory and
    // returns after an interrupt.
    unsafe { keel_idle_wait() }
}

/// Stop this CPU for good without spinning on the host.
pub fn park() -> ! {
    // SAFETY: keel_park takes no arguments and never returns.
    unsafe { keel_park() }
}

pub fn cs() -> u16 {
    let v: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

// The host target's compiler_builtins does not export the mem* functions
// (libc normally does), so provide them. `rep movsb`/`rep stosb` keep the
// compiler from turning these loops back into calls to themselves.

/// # Safety
/// C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: C memcpy contract: both ranges valid, non-overlapping.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy for overlapping dst > src; DF restored by cld.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

/// # Safety
/// C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: C memset contract: the range is valid for writes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: C memcmp contract: both ranges valid for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

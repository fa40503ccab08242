//! vCPU exit cost and cold start.
//!
//! `cargo bench -p keel-benches --bench vcpu`
//!
//! * `pio_exit/bare_kvm_ioctls`: a bare `VcpuFd::run` loop counting `IoOut` exits.
//! * `pio_exit/keel_run_loop`: the same guest through `Vcpu::run`, the PIO bus (with other
//!   devices around the target, so dispatch does a real search) and a device.
//! * `cold_start/*`: from `Vm::new` to the first guest exit, with and without irqchip.
//!
//! The guest is `1: out %al, $0x10; jmp 1b` in real mode, so every iteration is one exit.
//! Needs /dev/kvm; prints one skip line without it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use keel_bus::{BusRange, PioDevice};
use keel_kvm::{Buses, DirtyLog, Vcpu, VcpuExitReason, VcpuHandle, Vm};
use keel_memory::{x86, MemoryLayout, MemoryOptions, MIB};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

const LOOP: [u8; 4] = [0xe6, 0x10, 0xeb, 0xfc]; // out %al,$0x10; jmp .-4
const ENTRY: u64 = 0x1000;

/// Counts writes and stops its vCPU after `limit` of them.
struct StopAfter {
    seen: AtomicU64,
    limit: AtomicU64,
    handle: OnceLock<VcpuHandle>,
}

impl PioDevice for StopAfter {
    fn pio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn pio_write(&self, _: u64, _: &[u8]) {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.limit.load(Ordering::Relaxed) {
            if let Some(h) = self.handle.get() {
                h.stop();
            }
        }
    }
}

/// A placeholder device that is never hit, to give the bus a realistic population.
struct Idle;
impl PioDevice for Idle {
    fn pio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn pio_write(&self, _: u64, _: &[u8]) {}
}

fn guest() -> (Vm, Vcpu) {
    let layout = MemoryLayout::new(16 * MIB).unwrap();
    let opts = MemoryOptions::default();
    let mem = layout.create_guest_memory(&opts).unwrap();
    mem.write_slice(&LOOP, GuestAddress(ENTRY)).unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, DirtyLog::Off).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.setup_real_mode(ENTRY).unwrap();
    (vm, vcpu)
}

fn pio_exit(c: &mut Criterion) {
    let mut g = c.benchmark_group("pio_exit");
    g.measurement_time(Duration::from_secs(5));

    let (_vm, mut bare) = guest();
    g.bench_function("bare_kvm_ioctls", |b| {
        b.iter_custom(|iters| {
            let fd = bare.fd_mut();
            let start = Instant::now();
            let mut n = 0;
            while n < iters {
                match fd.run() {
                    Ok(VcpuExit::IoOut(0x10, _)) => n += 1,
                    other => panic!("unexpected exit {other:?}"),
                }
            }
            start.elapsed()
        })
    });

    let (_vm2, mut vcpu) = guest();
    let dev = Arc::new(StopAfter {
        seen: AtomicU64::new(0),
        limit: AtomicU64::new(0),
        handle: OnceLock::new(),
    });
    let _ = dev.handle.set(vcpu.handle());
    let buses = Buses::default();
    // A bus populated like a PC's: the target sits among others.
    for (base, len) in [
        (0x20, 2),
        (0x40, 4),
        (0x60, 1),
        (0x64, 1),
        (0x70, 2),
        (0x80, 1),
    ] {
        buses
            .pio
            .insert(BusRange::new(base, len).unwrap(), Arc::new(Idle))
            .unwrap();
    }
    for base in [0x2f8, 0x3f8, 0x3e8, 0x2e8, 0xcf8, 0x600] {
        buses
            .pio
            .insert(BusRange::new(base, 8).unwrap(), Arc::new(Idle))
            .unwrap();
    }
    buses
        .pio
        .insert(BusRange::new(0x10, 1).unwrap(), dev.clone())
        .unwrap();
    g.bench_function("keel_run_loop", |b| {
        b.iter_custom(|iters| {
            dev.seen.store(0, Ordering::Relaxed);
            dev.limit.store(iters, Ordering::Relaxed);
            let start = Instant::now();
            let r = vcpu.run(&buses).unwrap();
            let t = start.elapsed();
            assert_eq!(r, VcpuExitReason::Stopped);
            assert_eq!(dev.seen.load(Ordering::Relaxed), iters);
            t
        })
    });
    g.finish();
}

fn cold_start(c: &mut Criterion) {
    let mut g = c.benchmark_group("cold_start");
    g.sample_size(50);
    for irqchip in [false, true] {
        let name = if irqchip {
            "to_first_exit_irqchip"
        } else {
            "to_first_exit"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let layout = MemoryLayout::new(128 * MIB).unwrap();
                    let opts = MemoryOptions::default();
                    let mem = layout.create_guest_memory(&opts).unwrap();
                    mem.write_slice(&LOOP, GuestAddress(ENTRY)).unwrap();
                    let vm = Vm::new().unwrap();
                    vm.register_memory(&mem, DirtyLog::Off).unwrap();
                    if irqchip {
                        vm.set_identity_map_address(GuestAddress(x86::IDENTITY_MAP_START))
                            .unwrap();
                        vm.set_tss_address(GuestAddress(x86::TSS_START)).unwrap();
                        vm.setup_irqchip().unwrap();
                    }
                    let mut vcpu = vm.create_vcpu(0).unwrap();
                    if irqchip {
                        vcpu.configure(&vm, 1, true).unwrap();
                    }
                    vcpu.setup_real_mode(ENTRY).unwrap();
                    match vcpu.fd_mut().run() {
                        Ok(VcpuExit::IoOut(0x10, _)) => {}
                        other => panic!("unexpected exit {other:?}"),
                    }
                    total += start.elapsed();
                    // Tearing the VM down (slow with a PIT) is not part of the figure.
                    drop((vcpu, vm, mem));
                }
                total
            })
        });
    }
    g.finish();
}

fn all(c: &mut Criterion) {
    if !keel_kvm::kvm_available() {
        println!("skipped: /dev/kvm unavailable");
        return;
    }
    pio_exit(c);
    cold_start(c);
}

criterion_group!(benches, all);
criterion_main!(benches);

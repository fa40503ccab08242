//! The 8254 programmable interval timer and port 0x61.
//!
//! Three 16-bit down-counters clocked at 1.193182 MHz. Counts are computed from a
//! [`Clock`] when the guest reads them, so the model costs nothing while nobody looks.
//! Modelled: modes 0-5, binary and BCD counting, LSB/MSB/word access, the counter latch
//! command, the read-back command (count and status), and channel 2's gate and output
//! through port 0x61 (bit 0 gate, bit 1 speaker data, bit 4 the refresh toggle, bit 5
//! channel 2's output), which is how Linux and firmware calibrate the TSC.
//!
//! Channel 0's output drives ISA IRQ 0; [`Pit::next_irq`] says when its next rising edge
//! is due, so that a VMM can arm a host timer and raise the line then.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use keel_bus::PioDevice;

/// The input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Channel 0's data port; channels 1 and 2 follow, then the mode/command port.
pub const PIT_PORT: u16 = 0x40;
/// NMI status and control: channel 2's gate (bit 0) and output (bit 5).
pub const PORT_61: u16 = 0x61;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Port 0x61 bit 4 toggles with each DRAM refresh request, every 15.085 us.
const REFRESH_NS: u64 = 15_085;

/// A monotonic time source in nanoseconds.
pub trait Clock: Send {
    /// Nanoseconds since an arbitrary, fixed origin.
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock, from when it was made.
#[derive(Clone, Copy, Debug)]
pub struct HostClock(Instant);

impl Default for HostClock {
    fn default() -> Self {
        HostClock(Instant::now())
    }
}

impl HostClock {
    /// The host time `ns` nanoseconds after this clock's origin.
    pub fn instant(&self, ns: u64) -> Instant {
        self.0 + std::time::Duration::from_nanos(ns)
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

fn ticks_at(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// The first nanosecond at which `ticks` ticks have elapsed.
fn ns_of(ticks: u64) -> u64 {
    (u128::from(ticks) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ)) as u64
}

fn to_bcd(v: u32) -> u16 {
    let v = v % 10_000;
    (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
}

fn from_bcd(v: u16) -> u32 {
    let d = |s: u32| ((u32::from(v) >> s) & 0xf).min(9);
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Lsb,
    Msb,
    Word,
}

#[derive(Clone, Debug)]
struct Channel {
    mode: u8,
    bcd: bool,
    access: Access,
    /// Initial count, 1 to 65536 (10000 in BCD); 0 written means the maximum.
    reload: u32,
    /// Whether the counter is counting down from `reload` (or, in modes 0 and 4, paused
    /// by its gate), as opposed to waiting for a count or a gate trigger.
    counting: bool,
    /// When the current stretch of counting began, if the counter runs now.
    start_ns: Option<u64>,
    /// Ticks counted before `start_ns` (a mode 0 or 4 count paused by the gate).
    held: u64,
    gate: bool,
    null_count: bool,
    latch: Option<u16>,
    status: Option<u8>,
    /// Word access: the next read or write is the MSB.
    read_msb: bool,
    write_msb: bool,
    write_lsb: u8,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            bcd: false,
            access: Access::Word,
            reload: 0x10000,
            counting: false,
            start_ns: None,
            held: 0,
            gate,
            null_count: true,
            latch: None,
            status: None,
            read_msb: false,
            write_msb: false,
            write_lsb: 0,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x10000
        }
    }

    /// Ticks counted since the count began.
    fn elapsed(&self, now: u64) -> u64 {
        // On the clock's global tick grid, as the 8254's input clock runs continuously.
        self.held
            + self
                .start_ns
                .map_or(0, |s| ticks_at(now).saturating_sub(ticks_at(s)))
    }

    fn count(&self, now: u64) -> u32 {
        let n = u64::from(self.reload);
        if !self.counting {
            return self.reload;
        }
        let d = self.elapsed(now);
        let m = self.modulus();
        let c = match self.mode {
            2 => n - d % n,
            3 => {
                // Counts down by two each tick, through the reload value twice per period.
                let half = d % n.div_ceil(2).max(1);
                n - (2 * half).min(n - 1)
            }
            // Modes 0, 1, 4, 5: down from the reload value, then on round the modulus.
            _ => {
                if d <= n {
                    n - d
                } else {
                    (m - (d - n) % m) % m
                }
            }
        };
        (c % m) as u32
    }

    fn out(&self, now: u64) -> bool {
        let n = u64::from(self.reload);
        if !self.counting {
            // Mode 0's output goes low when it is programmed; the others stay high.
            return self.mode != 0;
        }
        let d = self.elapsed(now);
        match self.mode {
            0 => d >= n,
            1 => d >= n,
            2 => n == 1 || d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    fn status_byte(&self, now: u64) -> u8 {
        let access = match self.access {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::Word => 3,
        };
        (u8::from(self.out(now)) << 7)
            | (u8::from(self.null_count) << 6)
            | (access << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn encode(&self, count: u32) -> u16 {
        if self.bcd {
            to_bcd(count)
        } else {
            count as u16
        }
    }

    fn latch_count(&mut self, now: u64) {
        if self.latch.is_none() {
            self.latch = Some(self.encode(self.count(now)));
            self.read_msb = false;
        }
    }

    fn program(&mut self, val: u8) {
        self.access = match (val >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        let mode = (val >> 1) & 7;
        self.mode = if mode > 5 { mode - 4 } else { mode };
        self.bcd = val & 1 != 0;
        self.counting = false;
        self.start_ns = None;
        self.held = 0;
        self.null_count = true;
        self.latch = None;
        self.status = None;
        self.read_msb = false;
        self.write_msb = false;
    }

    fn load(&mut self, raw: u16, now: u64) {
        let v = if self.bcd {
            from_bcd(raw)
        } else {
            u32::from(raw)
        };
        self.reload = if v == 0 { self.modulus() as u32 } else { v };
        self.null_count = false;
        match self.mode {
            // Modes 1 and 5 wait for a rising gate.
            1 | 5 => {}
            _ => {
                self.counting = true;
                self.held = 0;
                self.start_ns = self.gate.then_some(now);
            }
        }
    }

    fn write(&mut self, val: u8, now: u64) {
        match self.access {
            Access::Lsb => self.load(u16::from(val), now),
            Access::Msb => self.load(u16::from(val) << 8, now),
            Access::Word => {
                if self.write_msb {
                    self.write_msb = false;
                    self.load(u16::from(self.write_lsb) | (u16::from(val) << 8), now);
                } else {
                    self.write_lsb = val;
                    self.write_msb = true;
                    // Mode 0: writing the first byte stops the count.
                    if self.mode == 0 && self.counting {
                        self.counting = false;
                        self.start_ns = None;
                    }
                }
            }
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let (value, latched) = match self.latch {
            Some(l) => (l, true),
            None => (self.encode(self.count(now)), false),
        };
        let (byte, done) = match self.access {
            Access::Lsb => (value as u8, true),
            Access::Msb => ((value >> 8) as u8, true),
            Access::Word => {
                let msb = self.read_msb;
                self.read_msb = !msb;
                (if msb { (value >> 8) as u8 } else { value as u8 }, msb)
            }
        };
        if latched && done {
            self.latch = None;
        }
        byte
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        match self.mode {
            // Counting is enabled by the gate level.
            0 | 4 => {
                if !self.counting {
                    return;
                }
                if gate {
                    self.start_ns = Some(now);
                } else {
                    self.held = self.elapsed(now);
                    self.start_ns = None;
                }
            }
            // Modes 1, 2, 3 and 5 restart from the reload value on a rising gate; 2 and 3
            // stop (output high) while it is low.
            _ => {
                if gate && !self.null_count {
                    self.counting = true;
                    self.held = 0;
                    self.start_ns = Some(now);
                } else if !gate && matches!(self.mode, 2 | 3) {
                    self.held = 0;
                    self.start_ns = None;
                    self.counting = false;
                }
            }
        }
    }

    /// The time of the output's next rising edge after `now`, if one is coming.
    fn next_rise(&self, now: u64) -> Option<u64> {
        let start = self.start_ns?;
        let n = u64::from(self.reload);
        let d = self.elapsed(now);
        let at_tick = match self.mode {
            0 | 1 => (d < n).then_some(n)?,
            2 | 3 => (d / n + 1) * n,
            _ => (d <= n).then_some(n + 1)?,
        };
        // `at_tick` ticks in total; `held` of them were counted before `start`.
        Some(ns_of(ticks_at(start) + at_tick - self.held))
    }
}

/// The 8254 PIT with port 0x61 (see the module documentation). Put it on a port bus with
/// [`PitPorts`].
#[derive(Debug)]
pub struct Pit<C: Clock = HostClock> {
    channels: [Channel; 3],
    speaker: bool,
    clock: C,
}

impl Default for Pit<HostClock> {
    fn default() -> Self {
        Pit::new(HostClock::default())
    }
}

impl<C: Clock> Pit<C> {
    /// A PIT at power-on, timed by `clock`: every channel waits for a mode and a count;
    /// channels 0 and 1 have their gates tied high, channel 2's is port 0x61 bit 0 (low).
    pub fn new(clock: C) -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            speaker: false,
            clock,
        }
    }

    /// The clock the PIT counts against.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// A guest read of `port` (0x40-0x43 or 0x61); other ports read 0xff.
    pub fn port_read(&mut self, port: u16) -> u8 {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.channels[usize::from(port - PIT_PORT)].read(now),
            PORT_61 => {
                let ch2 = &self.channels[2];
                u8::from(ch2.gate)
                    | (u8::from(self.speaker) << 1)
                    | (((now / REFRESH_NS) as u8 & 1) << 4)
                    | (u8::from(ch2.out(now)) << 5)
            }
            // The mode register is write-only.
            _ => 0xff,
        }
    }

    /// A guest write of `val` to `port` (0x40-0x43 or 0x61); others are ignored.
    pub fn port_write(&mut self, port: u16, val: u8) {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.channels[usize::from(port - PIT_PORT)].write(val, now),
            0x43 => self.command(val, now),
            PORT_61 => {
                self.speaker = val & 2 != 0;
                self.channels[2].set_gate(val & 1 != 0, now);
            }
            _ => {}
        }
    }

    fn command(&mut self, val: u8, now: u64) {
        let select = usize::from(val >> 6);
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches statuses.
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if val & (2 << i) == 0 {
                    continue;
                }
                if val & 0x20 == 0 {
                    ch.latch_count(now);
                }
                if val & 0x10 == 0 && ch.status.is_none() {
                    ch.status = Some(ch.status_byte(now));
                }
            }
            return;
        }
        let ch = &mut self.channels[select];
        if (val >> 4) & 3 == 0 {
            ch.latch_count(now);
        } else {
            ch.program(val);
        }
    }

    /// Channel `channel`'s output now (0-2).
    pub fn output(&self, channel: usize) -> bool {
        self.channels
            .get(channel)
            .is_some_and(|c| c.out(self.clock.now_ns()))
    }

    /// When (in the clock's nanoseconds) channel 0's output next rises, which raises
    /// IRQ 0; `None` while it is not counting towards one.
    pub fn next_irq(&self) -> Option<u64> {
        self.channels[0].next_rise(self.clock.now_ns())
    }
}

/// A PIT's ports on a port bus: insert one at [`PIT_PORT`] (4 ports) and one at
/// [`PORT_61`] (1 port), sharing one [`Pit`].
#[derive(Debug)]
pub struct PitPorts<C: Clock = HostClock> {
    pit: Arc<Mutex<Pit<C>>>,
    base: u16,
}

impl<C: Clock> PitPorts<C> {
    /// The ports from `base` of `pit`.
    pub fn new(pit: Arc<Mutex<Pit<C>>>, base: u16) -> Self {
        PitPorts { pit, base }
    }

    fn pit(&self) -> std::sync::MutexGuard<'_, Pit<C>> {
        self.pit.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<C: Clock> PioDevice for PitPorts<C> {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        let port = self.base.wrapping_add(offset as u16);
        let v = self.pit().port_read(port);
        data.fill(0xff);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn pio_write(&self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            let port = self.base.wrapping_add(offset as u16);
            self.pit().port_write(port, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone, Default)]
    struct TestClock(Arc<AtomicU64>);
    impl Clock for TestClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
    impl TestClock {
        /// Moves time on by `ticks` PIT ticks (exactly: to the first ns of that tick).
        fn advance_ticks(&self, ticks: u64) {
            let t = ticks_at(self.now_ns()) + ticks;
            self.0.store(ns_of(t), Ordering::SeqCst);
        }
    }

    fn pit() -> (Pit<TestClock>, TestClock) {
        let c = TestClock::default();
        (Pit::new(c.clone()), c)
    }

    fn latched(p: &mut Pit<TestClock>, ch: u8) -> u16 {
        p.port_write(0x43, ch << 6);
        let lo = p.port_read(0x40 + u16::from(ch));
        let hi = p.port_read(0x40 + u16::from(ch));
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn ticks_and_nanoseconds_round_trip() {
        for t in [0, 1, 2, 1000, PIT_HZ, 10 * PIT_HZ + 7] {
            assert_eq!(ticks_at(ns_of(t)), t);
            assert_eq!(ticks_at(ns_of(t) - u64::from(t > 0)), t.saturating_sub(1));
        }
        assert_eq!(to_bcd(1234), 0x1234);
        assert_eq!(from_bcd(0x9999), 9999);
    }

    /// The test guest's TSC calibration: channel 0, mode 2, full range, latched reads.
    #[test]
    fn mode2_rate_generator_counts_down_and_wraps() {
        let (mut p, c) = pit();
        p.port_write(0x43, 0x34);
        p.port_write(0x40, 0);
        p.port_write(0x40, 0);
        assert_eq!(
            latched(&mut p, 0),
            0,
            "65536 reads as 0 before the first tick"
        );
        c.advance_ticks(1);
        assert_eq!(latched(&mut p, 0), 0xffff);
        c.advance_ticks(1000);
        assert_eq!(latched(&mut p, 0), 0xffff - 1000);
        // A latched value holds until read, whatever the time.
        p.port_write(0x43, 0x00);
        c.advance_ticks(500);
        p.port_write(0x43, 0x00); // a second latch before the read is ignored
        let lo = p.port_read(0x40);
        let hi = p.port_read(0x40);
        assert_eq!(u16::from_le_bytes([lo, hi]), 0xffff - 1000);
        // Wraps every 65536 ticks.
        c.advance_ticks(65536);
        assert_eq!(latched(&mut p, 0), 0xffff - 1500);
        // Output: low for one tick when the count reaches 1, and IRQ 0 rises after it.
        let (mut p, c) = pit();
        p.port_write(0x43, 0x34);
        p.port_write(0x40, 100);
        p.port_write(0x40, 0);
        assert!(p.output(0));
        c.advance_ticks(99);
        assert_eq!(latched(&mut p, 0), 1);
        assert!(!p.output(0));
        assert_eq!(p.next_irq(), Some(ns_of(100)));
        c.advance_ticks(1);
        assert!(p.output(0));
        assert_eq!(latched(&mut p, 0), 100);
        assert_eq!(p.next_irq(), Some(ns_of(200)));
    }

    #[test]
    fn mode0_interrupts_on_terminal_count_once() {
        let (mut p, c) = pit();
        p.port_write(0x43, 0x30);
        assert!(!p.output(0), "low once programmed");
        p.port_write(0x40, 0x10);
        assert_eq!(p.next_irq(), None, "half a count: still waiting");
        p.port_write(0x40, 0x00);
        assert_eq!(p.next_irq(), Some(ns_of(16)));
        c.advance_ticks(15);
        assert!(!p.output(0));
        assert_eq!(latched(&mut p, 0), 1);
        c.advance_ticks(1);
        assert!(p.output(0));
        assert_eq!(p.next_irq(), None, "one shot");
        // The counter keeps going down through 0.
        c.advance_ticks(2);
        assert_eq!(latched(&mut p, 0), 0xfffe);
        assert!(p.output(0));
    }

    #[test]
    fn mode3_square_wave() {
        let (mut p, c) = pit();
        p.port_write(0x43, 0x36);
        p.port_write(0x40, 10);
        p.port_write(0x40, 0);
        let mut outs = Vec::new();
        for _ in 0..20 {
            outs.push(p.output(0));
            c.advance_ticks(1);
        }
        let high = outs.iter().filter(|&&o| o).count();
        assert_eq!(high, 10, "half of each period high: {outs:?}");
        assert!(outs[..5].iter().all(|&o| o) && outs[5..10].iter().all(|&o| !o));
        // Counts down by two.
        let a = latched(&mut p, 0);
        c.advance_ticks(1);
        let b = latched(&mut p, 0);
        assert_eq!(a - b, 2, "{a} then {b}");
        assert_eq!(p.next_irq(), Some(ns_of(30)));
    }

    /// Linux's `pit_calibrate_tsc`: gate high, speaker off, channel 2 mode 0, then poll
    /// port 0x61 bit 5 until the output goes high.
    #[test]
    fn channel2_gate_and_output_through_port_61() {
        let (mut p, c) = pit();
        assert_eq!(p.port_read(0x61) & 0x21, 0, "gate low, output low");
        let v = (p.port_read(0x61) & !0x02) | 0x01;
        p.port_write(0x61, v);
        p.port_write(0x43, 0xb0);
        p.port_write(0x42, 0xe8);
        p.port_write(0x42, 0x03); // 1000
        c.advance_ticks(999);
        assert_eq!(p.port_read(0x61) & 0x20, 0);
        c.advance_ticks(1);
        assert_eq!(p.port_read(0x61) & 0x21, 0x21);
        // Gate low pauses mode 0; gate high resumes it.
        p.port_write(0x43, 0xb0);
        p.port_write(0x42, 100);
        p.port_write(0x42, 0);
        c.advance_ticks(10);
        p.port_write(0x61, 0);
        c.advance_ticks(1000);
        assert_eq!(latched(&mut p, 2), 90);
        p.port_write(0x61, 1);
        c.advance_ticks(5);
        assert_eq!(latched(&mut p, 2), 85);
        // Mode 2 on channel 2 restarts from the reload value on a rising gate.
        p.port_write(0x43, 0xb4);
        p.port_write(0x42, 50);
        p.port_write(0x42, 0);
        c.advance_ticks(20);
        assert_eq!(latched(&mut p, 2), 30);
        p.port_write(0x61, 0);
        assert_eq!(latched(&mut p, 2), 50);
        assert_ne!(p.port_read(0x61) & 0x20, 0, "output high while stopped");
        c.advance_ticks(7);
        p.port_write(0x61, 1);
        c.advance_ticks(3);
        assert_eq!(latched(&mut p, 2), 47);
        // The speaker bit reads back; the refresh bit toggles.
        p.port_write(0x61, 3);
        assert_eq!(p.port_read(0x61) & 3, 3);
        let r0 = p.port_read(0x61) & 0x10;
        c.0.fetch_add(REFRESH_NS, Ordering::SeqCst);
        assert_ne!(p.port_read(0x61) & 0x10, r0);
    }

    #[test]
    fn read_back_status_and_access_modes() {
        let (mut p, c) = pit();
        p.port_write(0x43, 0x14); // channel 0, LSB only, mode 2
        p.port_write(0x40, 200);
        c.advance_ticks(50);
        // Read-back of count and status of channel 0.
        p.port_write(0x43, 0xc2);
        let status = p.port_read(0x40);
        assert_eq!(status, 0x80 | (1 << 4) | (2 << 1));
        assert_eq!(p.port_read(0x40), 150);
        // MSB only.
        p.port_write(0x43, 0x64); // channel 1, MSB, mode 2
        p.port_write(0x41, 0x02); // 0x200
        c.advance_ticks(0x100);
        assert_eq!(p.port_read(0x41), 0x01);
        // Null count until a count is written.
        p.port_write(0x43, 0x80 | 0x30);
        p.port_write(0x43, 0xe8); // read-back status of channel 2
        assert_eq!(p.port_read(0x42) & 0x40, 0x40);
        // BCD.
        p.port_write(0x43, 0x35); // channel 0, word, mode 2, BCD
        p.port_write(0x40, 0x00);
        p.port_write(0x40, 0x10); // 1000 in BCD
        c.advance_ticks(1);
        assert_eq!(latched(&mut p, 0), 0x0999);
        // The command port and unknown ports read all ones.
        assert_eq!(p.port_read(0x43), 0xff);
        assert_eq!(p.port_read(0x44), 0xff);
    }

    #[test]
    fn modes_1_4_and_5() {
        let (mut p, c) = pit();
        // Mode 1 on channel 2: waits for a rising gate, output low while counting.
        p.port_write(0x43, 0xb2);
        p.port_write(0x42, 10);
        p.port_write(0x42, 0);
        assert!(p.output(2));
        p.port_write(0x61, 1);
        assert!(!p.output(2));
        c.advance_ticks(10);
        assert!(p.output(2));
        // Mode 4: a one-tick low pulse at terminal count.
        p.port_write(0x43, 0x38);
        p.port_write(0x40, 5);
        p.port_write(0x40, 0);
        c.advance_ticks(5);
        assert!(!p.output(0));
        c.advance_ticks(1);
        assert!(p.output(0));
        // Mode 5: like mode 4, started by the gate.
        p.port_write(0x61, 0);
        p.port_write(0x43, 0xba);
        p.port_write(0x42, 3);
        p.port_write(0x42, 0);
        c.advance_ticks(10);
        assert!(p.output(2));
        p.port_write(0x61, 1);
        c.advance_ticks(3);
        assert!(!p.output(2));
    }

    #[test]
    fn ports_on_a_bus_with_the_host_clock() {
        use keel_bus::{BusRange, PioBus};
        let pit = Arc::new(Mutex::new(Pit::default()));
        let bus = PioBus::new();
        bus.insert(
            BusRange::new(0x40, 4).unwrap(),
            Arc::new(PitPorts::new(pit.clone(), PIT_PORT)),
        )
        .unwrap();
        bus.insert(
            BusRange::new(0x61, 1).unwrap(),
            Arc::new(PitPorts::new(pit.clone(), PORT_61)),
        )
        .unwrap();
        bus.write(0x43, &[0x34]).unwrap();
        bus.write(0x40, &[0]).unwrap();
        bus.write(0x40, &[0]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        bus.write(0x43, &[0]).unwrap();
        let (mut lo, mut hi) = ([0u8], [0u8]);
        bus.read(0x40, &mut lo).unwrap();
        bus.read(0x40, &mut hi).unwrap();
        let count = u16::from_le_bytes([lo[0], hi[0]]);
        // At least 2 ms (2386 ticks) have passed, and under a second.
        assert!(
            u32::from(count) < 65536 - 2386 || count == 0,
            "count {count}"
        );
        bus.write(0x61, &[1]).unwrap();
        let mut b = [0u8];
        bus.read(0x61, &mut b).unwrap();
        assert_eq!(b[0] & 1, 1);
    }
}

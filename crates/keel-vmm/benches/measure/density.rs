//! Density: many VMs of the same size started at once, each running an idle guest.
//!
//! The guest is a PVH ELF whose 32-bit entry prints [`READY`] on COM1 and then halts with
//! interrupts off, for good: from then on neither VMM has anything to do for it. (The test
//! guest's `idle` scenario first calibrates its TSC against the PIT, ~60 ms of busy polling
//! per try with three PIT reads per sample; 32 of them at once on a loaded 2-CPU host
//! failed 50 tries in a row, and on a quiet one the time until all run would mostly
//! measure that polling under KVM's instruction emulator rather than the VMMs.)
//!
//! A run spawns every VMM process back to back and times, from the first spawn, until each
//! guest's ready line has arrived on its serial console; then it reads each process's
//! `/proc/PID/smaps_rollup`: RSS (every resident page the process maps, shared ones counted
//! in full) and PSS (shared pages divided among the processes that map them: the honest
//! per-VM figure, since the VMM's binary and libraries are shared). Then it ends every VMM
//! with SIGTERM (SIGKILL for any that has not exited 10 s later, which fails the run) and
//! reaps it. A VMM that fails or is left behind by a panic is killed and reaped too, and
//! the kernel kills every VMM of a run whose bench process is killed.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{qemu_base, KEEL};

/// How many VMs run at once.
pub const VMS: usize = 32;

/// Guest RAM of each VM, in MiB.
pub const MEMORY_MIB: u32 = 128;

/// The line that says a guest runs (and will idle from then on).
pub const READY: &str = "READY";

/// How long all VMs may take to be ready before the run fails.
pub const LIMIT: Duration = Duration::from_secs(300);

/// Writes the idle guest into `dir` and returns its path.
pub fn idle_guest(dir: &Path) -> PathBuf {
    let path = dir.join("idle.elf");
    keel_testutil::assemble_pvh(IDLE_GUEST, &path);
    path
}

/// keel running `guest` in its default configuration.
pub fn keel(guest: &Path) -> Command {
    let mut cmd = Command::new(KEEL);
    cmd.args(["--memory", &MEMORY_MIB.to_string(), "--kernel"])
        .arg(guest);
    cmd
}

/// QEMU running `guest` in its fastest configuration that runs it, as in the boot
/// comparison: `-M microvm,acpi=off,pit=off,pic=off,rtc=off`.
pub fn qemu(guest: &Path) -> Command {
    let mut cmd = qemu_base("microvm,acpi=off,pit=off,pic=off,rtc=off", MEMORY_MIB);
    cmd.arg("-kernel").arg(guest);
    cmd
}

/// The idle guest: prints "READY" on COM1, then `hlt` with interrupts off, forever.
const IDLE_GUEST: &str = r#"
    cli
    mov $0x3f8, %dx
    lea msg, %esi
    mov $6, %ecx
1:  lodsb
    out %al, %dx
    loop 1b
2:  hlt
    jmp 2b
msg:
    .ascii "READY
"
"#;

/// One run's figures.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// From the first spawn to the last guest's ready line.
    pub all_running: Duration,
    /// Sum of the VMM processes' RSS, KiB.
    pub rss_kib: u64,
    /// Sum of the VMM processes' PSS, KiB.
    pub pss_kib: u64,
}

/// `Rss` and `Pss` of process `pid`, in KiB, from /proc/PID/smaps_rollup.
pub fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {path}"))
    };
    (field("Rss:"), field("Pss:"))
}

/// A guest's serial console as one thread drains it.
enum Event {
    Ready(usize, Instant),
    /// The console ended (the VMM exited) before the ready line.
    Ended(usize),
}

/// The VMM processes of a run; dropping it kills and reaps any still running.
struct Fleet {
    children: Vec<Child>,
    readers: Vec<JoinHandle<String>>,
}

impl Fleet {
    /// Ends every VMM with SIGTERM, then SIGKILL after `grace`; returns the indices of
    /// those that needed it.
    fn stop(&mut self, grace: Duration) -> Vec<usize> {
        for c in &self.children {
            // SAFETY: kill(2) on our own unreaped child's pid; no memory is involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        let mut killed = Vec::new();
        for (i, c) in self.children.iter_mut().enumerate() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        killed.push(i);
                        break;
                    }
                }
            }
        }
        self.children.clear();
        killed
    }

    /// The serial output of every VM, once their consoles have ended.
    fn logs(&mut self) -> Vec<String> {
        self.readers
            .drain(..)
            .map(|r| r.join().unwrap_or_default())
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

/// Starts `vms` VMMs made by `make` at once and measures one run (see the module comment).
pub fn run(vms: usize, make: impl Fn() -> Command) -> Sample {
    let (tx, rx) = mpsc::channel();
    let mut fleet = Fleet {
        children: Vec::with_capacity(vms),
        readers: Vec::with_capacity(vms),
    };
    let start = Instant::now();
    for i in 0..vms {
        let mut cmd = make();
        // SAFETY: the closure runs in the forked child before exec and calls only prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies without ending the VMMs (SIGKILL), the kernel does.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let out = BufReader::new(child.stdout.take().unwrap());
        fleet.children.push(child);
        let tx = tx.clone();
        // Drains the console to its end, so that no guest ever waits on a full pipe.
        fleet.readers.push(std::thread::spawn(move || {
            let mut log = String::new();
            let mut ready = false;
            for line in out.lines() {
                let Ok(line) = line else { break };
                if !ready && line == READY {
                    ready = true;
                    let _ = tx.send(Event::Ready(i, Instant::now()));
                }
                if log.len() < 64 * 1024 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            if !ready {
                let _ = tx.send(Event::Ended(i));
            }
            log
        }));
    }
    drop(tx);
    let mut last = start;
    let mut ready = vec![false; vms];
    let mut failed = None;
    while ready.iter().any(|r| !r) {
        let left = LIMIT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Event::Ready(i, at)) => {
                ready[i] = true;
                last = last.max(at);
            }
            Ok(Event::Ended(i)) => {
                failed = Some((format!("VM {i} ended before its ready line"), i));
                break;
            }
            Err(_) => {
                let waiting = ready.iter().filter(|r| !**r).count();
                let first = ready.iter().position(|r| !r).unwrap_or(0);
                failed = Some((format!("{waiting} VMs not ready after {LIMIT:?}"), first));
                break;
            }
        }
    }
    if let Some((why, i)) = failed {
        let program = make().get_program().to_string_lossy().into_owned();
        fleet.stop(Duration::ZERO);
        let logs = fleet.logs();
        panic!(
            "density run of {program} failed: {why}; VM {i}'s console:\n{}",
            logs[i]
        );
    }
    let all_running = last - start;
    let (mut rss_kib, mut pss_kib) = (0, 0);
    for c in &fleet.children {
        let (rss, pss) = rss_pss_kib(c.id());
        rss_kib += rss;
        pss_kib += pss;
    }
    let program = make().get_program().to_string_lossy().into_owned();
    let killed = fleet.stop(Duration::from_secs(10));
    let logs = fleet.logs();
    if let Some(&i) = killed.first() {
        panic!(
            "{} of {vms} VMMs ({program}) ignored SIGTERM for 10 s; VM {i}'s console:\n{}",
            killed.len(),
            logs[i]
        );
    }
    Sample {
        all_running,
        rss_kib,
        pss_kib,
    }
}

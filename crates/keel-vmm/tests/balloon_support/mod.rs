//! A VM with a balloon, driven from a test or a benchmark, and QEMU as the peer; both
//! measured from outside (`/proc/PID/status` VmRSS).
//!
//! keel has no control socket yet, so the host drives the balloon through keel-vmm's
//! Rust-level handle (`vmm::run_with` hands out a `VmHandle`): the test binary runs
//! itself again as a child (`--vmm-child`), which runs the VM in-process through
//! keel-vmm's library and reads commands (`target PAGES`, `counters`, `stats`, `off`) on
//! stdin. The parent measures the child's resident memory, as it measures QEMU's, which
//! it drives through QMP (`balloon`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use keel_testutil::TempDir;
use keel_vmm::vmm::{run_with, SerialFile, SerialMode, Transport, VmConfig};

pub const MIB: u64 = 1 << 20;

/// Resident memory of process `pid`, in bytes (VmRSS of /proc/PID/status).
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The child side: `--vmm-child TRANSPORT MEMORY_MIB BALLOON_OPTIONS SERIAL_FILE CMDLINE`.
pub fn child(args: &[String]) {
    let [transport, memory, balloon, serial, cmdline] = args else {
        panic!("--vmm-child TRANSPORT MEMORY_MIB BALLOON SERIAL CMDLINE, got {args:?}");
    };
    let cfg = VmConfig {
        kernel: None,
        initrd: None,
        cmdline: cmdline.clone(),
        memory_mib: memory.parse().unwrap(),
        vcpus: 1,
        serial: SerialMode::File(SerialFile::new(serial)),
        devices: vec![],
        transport: if transport == "mmio" {
            Transport::Mmio
        } else {
            Transport::Pci
        },
        disks: vec![],
        nets: vec![],
        balloon: Some(keel_vmm::balloon::parse_balloon(balloon).unwrap()),
        name: None,
        qmp: None,
        debug_exit: true,
        // The VM's threads filtered, as keel's (this thread is not: see `run_with`).
        seccomp: Default::default(),
        irqchip: keel_vmm::irqchip::Irqchip::default(),
        vcpu_affinity: None,
    };
    let exit = run_with(&cfg, |vm| {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let b = vm.balloon().expect("a balloon").clone();
            let mut out = std::io::stdout();
            let _ = writeln!(out, "started");
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                let reply = match words.as_slice() {
                    ["target", n] => {
                        b.set_target_pages(n.parse().unwrap());
                        "ok".to_string()
                    }
                    ["counters"] => {
                        let c = b.counters();
                        format!(
                            "counters held={} released={} reported={} actual={}",
                            c.held_pages,
                            c.released_bytes,
                            c.reported_bytes,
                            b.actual_pages()
                        )
                    }
                    ["stats"] => match b.stats() {
                        Some(s) => {
                            let mut r =
                                format!("stats age_ms={}", s.received.elapsed().as_millis());
                            for t in keel_virtio_balloon::StatTag::ALL {
                                if let Some(v) = s.get(t) {
                                    r.push_str(&format!(" {}={v}", t.name()));
                                }
                            }
                            r
                        }
                        None => "stats none".to_string(),
                    },
                    ["off"] => {
                        vm.power_off();
                        "ok".to_string()
                    }
                    _ => format!("unknown command {line:?}"),
                };
                let _ = writeln!(out, "{reply}");
            }
            vm.power_off();
        });
    })
    .expect("the VM runs");
    println!("exit {}", exit.status());
}

/// The guest's serial output so far.
fn serial_text(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A VMM process running the test guest with a balloon: keel (through the child) or QEMU.
pub struct BalloonVm {
    pub what: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Option<Receiver<String>>,
    qmp: Option<BufReader<UnixStream>>,
    serial: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    _dir: TempDir,
}

impl BalloonVm {
    /// keel (this test binary as the child) with `balloon` options.
    pub fn keel(transport: &str, memory_mib: u64, balloon: &str, cmdline: &str) -> BalloonVm {
        let dir = TempDir::new("balloon-keel");
        let serial = dir.path().join("serial.log");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--vmm-child")
            .args([transport, &memory_mib.to_string(), balloon])
            .arg(&serial)
            .arg(cmdline)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the VMM child");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let vm = BalloonVm {
            what: "keel",
            child,
            stdin,
            replies: Some(rx),
            qmp: None,
            serial,
            memory_mib,
            _dir: dir,
        };
        let started = vm.reply(Duration::from_secs(30));
        assert_eq!(started, "started");
        vm
    }

    /// QEMU (`-M microvm,pcie=on`, `virtio-balloon-pci` with `device_opts`), driven
    /// through QMP.
    pub fn qemu(memory_mib: u64, device_opts: &str, cmdline: &str) -> BalloonVm {
        let dir = TempDir::new("balloon-qemu");
        let serial = dir.path().join("serial.log");
        let qmp_path = dir.path().join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args(["-enable-kvm", "-M", "microvm,pcie=on", "-cpu", "kvm64"])
            .args(["-m", &memory_mib.to_string(), "-smp", "1"])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-device", &format!("virtio-balloon-pci{device_opts}")])
            .args(["-kernel", crate::support::GUEST, "-append", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-system-x86_64 (Debian package qemu-system-x86)");
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP socket: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut vm = BalloonVm {
            what: "QEMU",
            child,
            stdin: None,
            replies: None,
            qmp: Some(BufReader::new(stream)),
            serial,
            memory_mib,
            _dir: dir,
        };
        let greeting = vm.qmp_line();
        assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
        vm.qmp_execute(r#"{"execute":"qmp_capabilities"}"#);
        vm
    }

    fn reply(&self, limit: Duration) -> String {
        self.replies
            .as_ref()
            .unwrap()
            .recv_timeout(limit)
            .expect("a reply from the VMM child")
    }

    fn qmp_line(&mut self) -> String {
        let mut line = String::new();
        self.qmp
            .as_mut()
            .unwrap()
            .read_line(&mut line)
            .expect("QMP");
        line
    }

    /// Sends a QMP command and returns its `return` line (events are skipped).
    fn qmp_execute(&mut self, cmd: &str) -> String {
        let s = self.qmp.as_mut().unwrap().get_mut();
        s.write_all(cmd.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        loop {
            let line = self.qmp_line();
            assert!(!line.is_empty(), "QMP closed");
            if line.contains("\"return\"") {
                return line;
            }
            assert!(!line.contains("\"error\""), "QMP {cmd}: {line}");
        }
    }

    /// Sends a command to the keel child and returns its reply.
    fn command(&mut self, cmd: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        self.reply(Duration::from_secs(10))
    }

    /// Sets the balloon's target: `bytes` the guest should give back.
    pub fn set_target(&mut self, bytes: u64) {
        if self.qmp.is_some() {
            // QEMU's `balloon` takes the memory the guest should be left with.
            let value = self.memory_mib * MIB - bytes;
            self.qmp_execute(&format!(
                r#"{{"execute":"balloon","arguments":{{"value":{value}}}}}"#
            ));
        } else {
            assert_eq!(self.command(&format!("target {}", bytes / 4096)), "ok");
        }
    }

    /// keel's counters line.
    pub fn counters(&mut self) -> String {
        self.command("counters")
    }

    /// keel's last statistics, as `name=value` words.
    pub fn stats(&mut self) -> String {
        self.command("stats")
    }

    /// QEMU's `query-balloon` answer.
    pub fn query_balloon(&mut self) -> String {
        self.qmp_execute(r#"{"execute":"query-balloon"}"#)
    }

    /// The VMM's resident memory.
    pub fn rss(&self) -> u64 {
        rss(self.child.id())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's serial output.
    pub fn serial(&self) -> String {
        serial_text(&self.serial)
    }

    /// Waits until the serial output has `n` lines containing `needle`; returns the last.
    pub fn wait_line(&mut self, needle: &str, n: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.serial();
            // Whole lines only: the guest may be in the middle of one.
            let done = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            let hits: Vec<&str> = done.lines().filter(|l| l.contains(needle)).collect();
            if hits.len() >= n {
                return hits[n - 1].to_string();
            }
            if text.contains("keel-test: FAIL") {
                panic!("{}: the guest failed:\n{text}", self.what);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} ended ({status}) before `{needle}`:\n{text}", self.what);
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for `{needle}` (x{n}):\n{text}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Powers the VM off and waits for the process.
    pub fn stop(mut self) {
        if self.qmp.is_some() {
            let _ = self.qmp_execute(r#"{"execute":"quit"}"#);
        } else {
            let _ = self.command("off");
            drop(self.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not end after power-off", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for BalloonVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

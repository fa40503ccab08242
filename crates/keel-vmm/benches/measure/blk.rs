//! virtio-blk runs: the test guest's `blk-bench` scenario (4 KiB random reads and writes,
//! depth 1 and 32, polled at CPL3) on a raw or qcow2 image of 256 MiB, fully written first
//! (so reads hit data, not holes). Each row is timed on the host from the arrival of the
//! guest's `begin`/`end` lines on the serial console; the guest's own TSC-timed figure is
//! kept beside it where it could calibrate its TSC.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_virtio::affinity::CpuSet;

use super::{qemu_base, KEEL, TEST_GUEST};

/// Guest RAM of every blk run, in MiB.
pub const MEMORY_MIB: u32 = 256;

/// The image formats compared.
pub const FORMATS: [&str; 2] = ["raw", "qcow2"];

/// One row of the guest's blk-bench: a fio-style operation at a queue depth.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// `randread` or `randwrite` (fio's names too).
    pub op: &'static str,
    pub depth: u32,
}

impl Row {
    /// The row's name as the guest prints it, e.g. `randread depth 32`.
    pub fn name(&self) -> String {
        format!("{} depth {}", self.op, self.depth)
    }
}

/// The guest's rows, in the order it runs them.
pub const ROWS: [Row; 4] = [
    Row {
        op: "randread",
        depth: 1,
    },
    Row {
        op: "randwrite",
        depth: 1,
    },
    Row {
        op: "randread",
        depth: 32,
    },
    Row {
        op: "randwrite",
        depth: 32,
    },
];

/// Host-timed and (where the guest could calibrate its TSC) guest-timed IOPS of one row.
#[derive(Clone, Copy, Debug, Default)]
pub struct Iops {
    pub host: f64,
    pub guest: Option<f64>,
}

/// The figures of one run, a row each.
pub type RunIops = [Iops; 4];

fn sh(cmd: &mut Command) {
    let st = cmd.status().expect("run");
    assert!(st.success(), "{cmd:?} failed");
}

/// The fully written 256 MiB image of format `fmt` in `dir`, made with qemu-img and
/// qemu-io the first time.
pub fn image(dir: &Path, fmt: &str) -> PathBuf {
    let p = dir.join(format!("disk.{fmt}"));
    if !p.exists() {
        sh(Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(&p)
            .arg("256M"));
        sh(Command::new("qemu-io")
            .args(["-f", fmt, "-c", "write -P 0x5a 0 256M"])
            .arg(&p)
            .stdout(Stdio::null()));
    }
    p
}

/// The directory of the blk images: target/bench-blk.
pub fn image_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-blk");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Where the VMMs' threads run (`--place VCPU:IO`): the vCPU on host CPU `vcpu`, the
/// disk's I/O thread (keel's queue worker, QEMU's iothread) on `io`, e.g. the CPU that
/// takes the host disk's interrupts (`/proc/interrupts`). keel places its own threads
/// (`--vcpu-affinity`, `affinity=`); QEMU's are moved by name once they exist.
#[derive(Clone, Copy, Debug)]
pub struct Place {
    pub vcpu: usize,
    pub io: usize,
}

impl Place {
    /// `VCPU:IO`, two CPU numbers.
    pub fn parse(s: &str) -> Option<Place> {
        let (v, i) = s.split_once(':')?;
        Some(Place {
            vcpu: v.parse().ok()?,
            io: i.parse().ok()?,
        })
    }
}

/// Moves thread `tid` onto host CPU `cpu` alone.
fn pin(tid: i32, cpu: usize) {
    let set = CpuSet::single(cpu).expect("a CPU below 1024");
    set.apply_to(tid)
        .unwrap_or_else(|e| panic!("pinning thread {tid} to CPU {cpu}: {e}"));
}

/// Pins QEMU's (`pid`, started with `debug-threads=on`) vCPU and iothread as `place` says,
/// waiting up to 10 s for both threads to exist; false if they never do.
fn place_qemu(pid: u32, place: Place) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut vcpu, mut io) = (None, None);
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let tid = t.file_name().to_string_lossy().parse::<i32>().ok();
            match comm.trim() {
                "CPU 0/KVM" => vcpu = tid,
                "IO io0" => io = tid,
                _ => {}
            }
        }
        if let (Some(v), Some(i)) = (vcpu, io) {
            pin(v, place.vcpu);
            pin(i, place.io);
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The guest's command line for `requests` requests per row.
pub fn cmdline(requests: u64) -> String {
    format!("keel.test=blk-bench keel.blk_n={requests}")
}

/// keel with the image on virtio-pci (`cache=none`: O_DIRECT, io_uring), its threads
/// where `place` says.
pub fn keel(img: &Path, fmt: &str, requests: u64, place: Option<Place>) -> Command {
    let mut k = Command::new(KEEL);
    k.args([
        "--debug-exit",
        "--memory",
        &MEMORY_MIB.to_string(),
        "--serial",
        "stdio",
        "--cmdline",
        &cmdline(requests),
    ])
    .arg("--disk");
    match place {
        Some(p) => k
            .arg(format!(
                "path={},format={fmt},cache=none,affinity={}",
                img.display(),
                p.io
            ))
            .args(["--vcpu-affinity", &p.vcpu.to_string()]),
        None => k.arg(format!("path={},format={fmt},cache=none", img.display())),
    };
    k
}

/// QEMU with the image on `virtio-blk-pci` (`-M microvm,pcie=on`), `cache=none,aio=io_uring`,
/// on an iothread (`-object iothread,id=io0`, `iothread=io0`: QEMU's dataplane, which it
/// recommends for I/O).
pub fn qemu(img: &Path, fmt: &str, requests: u64) -> Command {
    let mut q = qemu_base("microvm,pcie=on", MEMORY_MIB);
    // Thread names ("CPU 0/KVM", "IO io0"), for `--place`.
    q.args(["-name", "blk-bench,debug-threads=on"])
        .args(["-smp", "1"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(["-kernel", TEST_GUEST, "-append", &cmdline(requests)])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format={fmt},cache=none,aio=io_uring",
            img.display()
        ))
        .args(["-object", "iothread,id=io0"])
        .args(["-device", "virtio-blk-pci,drive=d0,iothread=io0"]);
    q
}

/// Runs `cmd` (one of the above) to its end and reads each row's figures off its serial
/// console; the guest must PASS.
/// `qemu_place`: QEMU's threads are moved there once they exist (keel places its own,
/// [`keel`]).
pub fn run(mut cmd: Command, requests: u64, qemu_place: Option<Place>) -> RunIops {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    if let Some(p) = qemu_place {
        if !place_qemu(child.id(), p) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU's vCPU and iothread never appeared");
        }
    }
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut begin = [None; 4];
    let mut result = RunIops::default();
    let mut log = String::new();
    let names = ROWS.map(|r| r.name());
    for line in out.lines() {
        let line = line.unwrap();
        let now = Instant::now();
        log.push_str(&line);
        log.push('\n');
        let Some(rest) = line.strip_prefix("keel-test: blk-bench: ") else {
            continue;
        };
        for (i, row) in names.iter().enumerate() {
            if rest == format!("begin {row}") {
                begin[i] = Some(now);
            } else if rest == format!("end {row} requests {requests}") {
                let t: Duration = now - begin[i].expect("end before begin");
                result[i].host = requests as f64 / t.as_secs_f64();
            } else if let Some(v) = rest
                .strip_prefix(&format!("{row}: "))
                .and_then(|r| r.strip_suffix(" IOPS"))
                .and_then(|r| r.rsplit(' ').next())
            {
                result[i].guest = v.parse().ok();
            }
        }
    }
    let _ = child.wait();
    assert!(
        log.contains("keel-test: PASS blk-bench"),
        "the guest failed:\n{log}"
    );
    result
}

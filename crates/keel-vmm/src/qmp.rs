//! keel's control socket: the QMP commands keel implements on top of keel-qmp, and the
//! events it sends.
//!
//! | command | what it does |
//! |---|---|
//! | `query-status`, `query-name`, `query-cpus-fast` | the run state, `--name`, the vCPUs and their threads |
//! | `stop`, `cont` | park every vCPU thread, then every virtio device's workers (after the requests they took complete) / let them run (`STOP`, `RESUME`) |
//! | `system_reset` | the VM is torn down and built again; the guest boots again (`RESET`) |
//! | `system_powerdown` | presses the ACPI power button: PM1_STS.PWRBTN_STS and the SCI (`POWERDOWN`) |
//! | `quit` | ends keel in order: vCPUs stopped, devices dropped, disks flushed and closed (`SHUTDOWN`) |
//! | `query-balloon`, `balloon` | through [`Balloon`]; `DeviceNotActive` without a balloon |
//! | `query-block`, `query-blockstats` | each `--disk` (`disk0`, `disk1`, ...): image, limits, and the device's own I/O totals |
//! | `block_set_io_throttle` | a disk's `iops`/`bps` limits, changed while the guest runs |
//! | `block_resize` | grows a raw disk; the guest gets a configuration-change interrupt |
//! | `set_link` | takes a `--net` device's link (`net0`, `net1`, ...) down or up; the guest gets a configuration-change interrupt |
//! | `x-query-net-stats` | keel's own (QEMU has no such command): each `--net` device's MAC, link and counters per queue pair (frames, bytes, drops, errors each way) and of its control queue, since the VM was last built (keel's start or `system_reset`); `name` picks one |
//!
//! `SHUTDOWN` is also sent when the guest powers off or resets (`guest: true`) and when
//! keel gets a termination signal. `BLOCK_IO_ERROR` is sent when the host fails a disk
//! request (action `report`: the guest gets an I/O error and runs on), at most one per
//! disk every [`IO_ERROR_PERIOD`], the latest error held until then, as QEMU throttles it
//! ([`IoErrorEvents`]).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use keel_kvm::VcpuHandle;
use keel_qmp::{Arguments, CommandError, ErrorClass, Events, Handler};
use keel_virtio_balloon::spec::BALLOON_PAGE;
use keel_virtio_balloon::BalloonHandle;
use serde_json::{json, Value};

use keel_block::image::Format;
use keel_block::{BlockBackend, CacheMode, RawFile};
use keel_virtio_blk::{BlockHandle, IoError, IoErrorSink};
use keel_virtio_net::{DirStats, NetHandle};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::AcpiPm;
use crate::disk::DiskSpec;
use crate::exit::{ExitSignal, VmExit};
use crate::shared_device::SharedDevice;

/// What the balloon commands need from a balloon device.
pub trait Balloon: Send + Sync {
    /// The guest's memory as the balloon sees it (QAPI `BalloonInfo.actual`), in bytes:
    /// RAM less the pages the balloon holds.
    fn actual(&self) -> u64;
    /// Asks the guest to give back or take memory until it has `target` bytes.
    fn set_target(&self, target: u64);
}

/// keel's virtio-balloon as the balloon commands see it.
pub struct GuestBalloon {
    /// The device's handle.
    pub handle: BalloonHandle,
    /// The VM's RAM.
    pub ram_bytes: u64,
}

impl Balloon for GuestBalloon {
    fn actual(&self) -> u64 {
        let held = u64::from(self.handle.actual_pages()) * BALLOON_PAGE;
        self.ram_bytes.saturating_sub(held)
    }

    fn set_target(&self, target: u64) {
        // QEMU's `balloon` value is the memory the guest keeps; the device's target is
        // what the balloon holds.
        self.handle
            .set_target_bytes(self.ram_bytes.saturating_sub(target));
    }
}

/// A `--disk` as the block commands see it.
pub struct DiskInfo {
    /// The name commands use: `disk0`, `disk1`, ... in `--disk` order.
    pub name: String,
    /// How it was opened.
    pub spec: DiskSpec,
    /// The image format (probed or given).
    pub format: Format,
    /// The image's virtual size in bytes when opened.
    pub size: u64,
    /// The file of a raw image (`block_resize` grows it).
    pub raw: Option<Arc<RawFile>>,
    /// The device's statistics and limits.
    pub handle: BlockHandle,
}

impl DiskInfo {
    /// QAPI `BlockInfo`.
    fn block_info(&self) -> Value {
        let (iops, bps) = self.handle.limits();
        let file = self.spec.path.display().to_string();
        let cache = self.spec.image.file.cache;
        json!({
            "device": self.name,
            "qdev": qom_path(&self.name),
            "type": "unknown",
            "removable": false,
            "locked": false,
            "io-status": "ok",
            "inserted": {
                "file": file,
                "node-name": self.name,
                "ro": self.spec.image.file.read_only,
                "drv": format_name(self.format),
                "backing_file_depth": 0,
                "encrypted": false,
                "detect_zeroes": "off",
                "bps": bps, "bps_rd": 0, "bps_wr": 0,
                "iops": iops, "iops_rd": 0, "iops_wr": 0,
                "write_threshold": 0,
                "cache": {
                    "writeback": !cache.dsync(),
                    "direct": cache.direct(),
                    "no-flush": cache == CacheMode::Unsafe,
                },
                "image": {
                    "filename": file,
                    "format": format_name(self.format),
                    "virtual-size": self.virtual_size(),
                },
            },
        })
    }

    fn virtual_size(&self) -> u64 {
        self.raw.as_ref().map_or(self.size, |r| r.size())
    }

    /// `block_resize`: grows a raw image and tells the device (the guest gets a
    /// configuration-change interrupt).
    fn resize(&self, size: u64) -> Result<Value, CommandError> {
        let Some(raw) = &self.raw else {
            return Err(CommandError::generic(format!(
                "keel resizes raw images only; '{}' is {}",
                self.name,
                format_name(self.format)
            )));
        };
        if self.spec.image.file.read_only {
            return Err(CommandError::generic(format!(
                "Device '{}' is read only",
                self.name
            )));
        }
        if size % 512 != 0 || size < raw.size() {
            return Err(CommandError::generic(format!(
                "keel grows disks only, in whole 512-byte sectors: {size} is not above {} \
                 or not a multiple of 512",
                raw.size()
            )));
        }
        raw.set_len(size).map_err(|e| {
            CommandError::generic(format!(
                "resizing {}: {}",
                self.name,
                keel_bus::ErrorChain(&e)
            ))
        })?;
        self.handle.capacity_changed();
        Ok(json!({}))
    }

    /// QAPI `BlockStats`.
    fn block_stats(&self) -> Value {
        let s = self.handle.stats();
        json!({
            "device": self.name,
            "node-name": self.name,
            "qdev": qom_path(&self.name),
            "stats": {
                "rd_bytes": s.read.bytes,
                "wr_bytes": s.write.bytes,
                "rd_operations": s.read.operations,
                "wr_operations": s.write.operations,
                "flush_operations": s.flush.operations,
                "failed_rd_operations": s.read.failed,
                "failed_wr_operations": s.write.failed,
                "failed_flush_operations": s.flush.failed,
                "rd_total_time_ns": s.read.total_time_ns,
                "wr_total_time_ns": s.write.total_time_ns,
                "flush_total_time_ns": s.flush.total_time_ns,
                "account_invalid": false,
                "account_failed": true,
            },
        })
    }
}

/// The QOM path QEMU gives a `-device virtio-blk-pci` without an id: keel names its disks'
/// the same way in `query-block`, `query-blockstats` and `BLOCK_IO_ERROR`.
fn qom_path(disk: &str) -> String {
    format!("/machine/peripheral-anon/{disk}/virtio-backend")
}

/// QAPI `BLOCK_IO_ERROR`'s data for a request `disk` failed: keel's action is always
/// `report` (the guest gets VIRTIO_BLK_S_IOERR, the VM runs on).
pub fn block_io_error(disk: &str, e: &IoError) -> Value {
    json!({
        "qom-path": qom_path(disk),
        "device": disk,
        "node-name": disk,
        "operation": if e.op.is_read() { "read" } else { "write" },
        "action": "report",
        "nospace": e.nospace(),
        "reason": strerror(e.errno),
    })
}

/// The C library's text for `errno` (what QEMU puts in `reason`).
fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: the XSI strerror_r (libc's `strerror_r` on glibc and musl) writes at most
    // `buf.len()` bytes, NUL-terminated, into a buffer this function owns.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if rc != 0 || end == 0 {
        return format!("Unknown error {errno}");
    }
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The shortest time between two `BLOCK_IO_ERROR`s of one disk (QEMU's throttle for
/// guest-triggerable events, which BLOCK_IO_ERROR is since QEMU 9.2).
pub const IO_ERROR_PERIOD: Duration = Duration::from_secs(1);

/// `BLOCK_IO_ERROR`s on their way from the disks' queue workers, which must not block, to
/// the control socket's clients, which may be slow; throttled as QEMU throttles them. A
/// guest can make thousands of requests fail a second: each disk holds at most one event
/// (the latest), so nothing grows. A disk's first error is sent at once; errors within
/// [`IO_ERROR_PERIOD`] of a sent one are held, the latest replacing the one before, and
/// the one held is sent when the period ends (and opens a new period).
pub struct IoErrorEvents {
    disks: Mutex<Vec<DiskSlot>>,
    wake: EventFd,
}

/// One disk's state in [`IoErrorEvents`].
struct DiskSlot {
    name: String,
    /// The latest error not yet sent.
    latest: Option<IoError>,
    /// Until when the disk's events are held (a period opened by the last one sent).
    held_until: Option<Instant>,
}

impl IoErrorEvents {
    /// No disks yet.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(IoErrorEvents {
            disks: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    fn disks(&self) -> MutexGuard<'_, Vec<DiskSlot>> {
        self.disks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Readable when a disk has an error to send.
    pub fn event_fd(&self) -> &EventFd {
        &self.wake
    }

    /// The sink for disk `name`'s device.
    pub fn sink(self: &Arc<Self>, name: &str) -> Arc<dyn IoErrorSink> {
        let mut d = self.disks();
        d.push(DiskSlot {
            name: name.to_owned(),
            latest: None,
            held_until: None,
        });
        Arc::new(DiskErrors {
            events: self.clone(),
            index: d.len() - 1,
        })
    }

    /// Sends the events due at `now` through `machine` (called by the event loop) and
    /// returns when the next held one is due, if any.
    pub fn deliver(&self, machine: &Machine, now: Instant) -> Option<Instant> {
        let _ = self.wake.read();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for d in self.disks().iter_mut() {
            if d.held_until.is_some_and(|t| now >= t) {
                d.held_until = None;
            }
            match (&d.latest, d.held_until) {
                (Some(e), None) => {
                    due.push(block_io_error(&d.name, e));
                    d.latest = None;
                    d.held_until = Some(now + IO_ERROR_PERIOD);
                }
                (Some(_), Some(t)) => next = Some(next.map_or(t, |n| n.min(t))),
                (None, _) => {}
            }
        }
        for data in due {
            machine.emit("BLOCK_IO_ERROR", Some(data));
        }
        next
    }
}

/// One disk's way into [`IoErrorEvents`].
struct DiskErrors {
    events: Arc<IoErrorEvents>,
    index: usize,
}

impl IoErrorSink for DiskErrors {
    fn io_error(&self, error: &IoError) {
        let mut disks = self.events.disks();
        let Some(d) = disks.get_mut(self.index) else {
            return;
        };
        let was_pending = d.latest.replace(*error).is_some();
        drop(disks);
        // One wake-up per event to send; while one waits, later errors only replace it.
        if !was_pending {
            let _ = self.events.wake.write(1);
        }
    }
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    }
}

/// `block_set_io_throttle`'s arguments (QAPI `BlockIOThrottle`): keel limits totals only,
/// so the per-direction limits must be 0; bursts and groups are accepted and unused only
/// when left at their defaults.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Throttle {
    device: Option<String>,
    id: Option<String>,
    bps: u64,
    bps_rd: u64,
    bps_wr: u64,
    iops: u64,
    iops_rd: u64,
    iops_wr: u64,
}

/// `block_resize`'s arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    device: Option<String>,
    #[serde(rename = "node-name")]
    node_name: Option<String>,
    size: u64,
}

/// One boot of the VM: what commands act on.
pub struct Boot {
    /// Every vCPU.
    pub vcpus: Vec<VcpuHandle>,
    /// Each vCPU thread's Linux thread ID, once it has started (0 before).
    pub thread_ids: Arc<[AtomicI32]>,
    /// How the VM is asked to end.
    pub exit: Arc<ExitSignal>,
    /// The PM block with the power button.
    pub pm: Arc<AcpiPm>,
    /// Every virtio device, to park on `stop`.
    pub devices: Vec<SharedDevice>,
    /// The disks.
    pub disks: Vec<DiskInfo>,
    /// The network devices, by name (`net0`, `net1`, ... in `--net` order).
    pub nets: Vec<(String, NetHandle)>,
    /// The balloon device, if the VM has one.
    pub balloon: Option<Arc<dyn Balloon>>,
}

struct State {
    paused: bool,
    boot: Option<Boot>,
    /// An exit asked for while no boot was attached (before the first one, or during a
    /// reset): the next boot ends at once.
    pending_exit: Option<VmExit>,
    balloon: Option<Arc<dyn Balloon>>,
    /// `actual` when last polled, for `BALLOON_CHANGE`.
    balloon_actual: Option<u64>,
}

/// The machine as the control socket sees it, across reboots.
pub struct Machine {
    state: Mutex<State>,
    events: OnceLock<Events>,
    name: Option<String>,
}

impl Machine {
    /// A machine called `name` (`--name`), running, not yet booted.
    pub fn new(name: Option<String>) -> Self {
        Machine {
            state: Mutex::new(State {
                paused: false,
                boot: None,
                pending_exit: None,
                balloon: None,
                balloon_actual: None,
            }),
            events: OnceLock::new(),
            name,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where events go (the server, once it exists).
    pub fn set_events(&self, events: Events) {
        let _ = self.events.set(events);
    }

    /// Sends an event, if there is a control socket.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        if let Some(e) = self.events.get() {
            e.emit(name, data);
        }
    }

    /// A boot's vCPUs and devices, before its vCPU threads run: if the machine is
    /// stopped, they start parked.
    pub fn attach(&self, boot: Boot) {
        let mut st = self.state();
        if st.paused {
            boot.vcpus.iter().for_each(VcpuHandle::request_pause);
            boot.vcpus.iter().for_each(VcpuHandle::wait_paused);
            boot.devices.iter().for_each(SharedDevice::pause);
        }
        if let Some(why) = st.pending_exit.take() {
            boot.exit.request(why);
        }
        st.balloon = boot.balloon.clone();
        st.balloon_actual = None;
        st.boot = Some(boot);
    }

    /// Forgets the boot (it is being torn down).
    pub fn detach(&self) {
        self.state().boot = None;
    }

    /// The balloon device the balloon commands act on (a boot brings its own).
    #[cfg(test)]
    fn set_balloon(&self, balloon: Arc<dyn Balloon>) {
        self.state().balloon = Some(balloon);
    }

    /// Sends `BALLOON_CHANGE` if the balloon's `actual` moved since the last call: called
    /// periodically while a balloon exists (QEMU rate-limits this event too).
    pub fn poll_balloon(&self) {
        let mut st = self.state();
        let Some(actual) = st.balloon.as_ref().map(|b| b.actual()) else {
            return;
        };
        let last = st.balloon_actual.replace(actual);
        drop(st);
        if last.is_some_and(|l| l != actual) {
            self.emit("BALLOON_CHANGE", Some(json!({"actual": actual})));
        }
    }

    /// The `SHUTDOWN` event for how the VM ended, if it is one QEMU reports.
    pub fn shutdown_event(why: &VmExit) -> Option<Value> {
        let (guest, reason) = match why {
            VmExit::PowerOff => (true, "guest-shutdown"),
            VmExit::Reset | VmExit::TripleFault { .. } => (true, "guest-reset"),
            VmExit::Quit => (false, "host-qmp-quit"),
            VmExit::Signal(_) => (false, "host-signal"),
            _ => return None,
        };
        Some(json!({"guest": guest, "reason": reason}))
    }

    fn stop(&self) {
        let mut st = self.state();
        if st.paused {
            return;
        }
        st.paused = true;
        if let Some(b) = &st.boot {
            // vCPUs first (no new requests), then the devices (what they have taken
            // completes, then their workers park). Every vCPU is asked before any is
            // waited for: one finishing a long exit (a device reset waits for the
            // device's worker) must not leave the others running, and feeding that
            // worker, meanwhile.
            b.vcpus.iter().for_each(VcpuHandle::request_pause);
            b.vcpus.iter().for_each(VcpuHandle::wait_paused);
            b.devices.iter().for_each(SharedDevice::pause);
        }
        drop(st);
        self.emit("STOP", None);
    }

    fn cont(&self) {
        let mut st = self.state();
        if !st.paused {
            return;
        }
        st.paused = false;
        if let Some(b) = &st.boot {
            b.devices.iter().for_each(SharedDevice::resume);
            b.vcpus.iter().for_each(VcpuHandle::resume);
        }
        drop(st);
        self.emit("RESUME", None);
    }

    fn request(&self, why: VmExit) {
        let mut st = self.state();
        match &st.boot {
            Some(b) => b.exit.request(why),
            None => {
                // A quit wins over a reset asked for earlier.
                if !matches!(st.pending_exit, Some(VmExit::Quit)) {
                    st.pending_exit = Some(why);
                }
            }
        }
    }

    fn cpus(&self) -> Value {
        let (vcpus, thread_ids) = {
            let st = self.state();
            let Some(b) = &st.boot else {
                return json!([]);
            };
            (b.vcpus.clone(), b.thread_ids.clone())
        };
        // Each vCPU thread records its ID as it starts: a query right after boot can come
        // first (a loaded host may not have run the thread yet), so give them a moment.
        let deadline = Instant::now() + Duration::from_millis(500);
        while thread_ids.iter().any(|t| t.load(Ordering::SeqCst) == 0) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let cpus = vcpus.iter().map(|v| {
            let i = usize::from(v.id());
            let tid = thread_ids.get(i).map_or(0, |t| t.load(Ordering::SeqCst));
            json!({
                "cpu-index": i,
                "qom-path": format!("/machine/unattached/device[{i}]"),
                "thread-id": tid,
                "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
                "target": "x86_64",
            })
        });
        Value::Array(cpus.collect())
    }

    fn disks(&self, f: fn(&DiskInfo) -> Value) -> Value {
        let st = self.state();
        let disks = st.boot.as_ref().map_or(&[][..], |b| &b.disks[..]);
        Value::Array(disks.iter().map(f).collect())
    }

    fn with_disk<T>(&self, name: &str, f: impl FnOnce(&DiskInfo) -> T) -> Result<T, CommandError> {
        let st = self.state();
        st.boot
            .as_ref()
            .and_then(|b| b.disks.iter().find(|d| d.name == name))
            .map(f)
            .ok_or_else(|| {
                CommandError::new(
                    ErrorClass::DeviceNotFound,
                    format!("Device '{name}' not found"),
                )
            })
    }

    fn with_net<T>(
        &self,
        name: &str,
        f: impl FnOnce(&str, &NetHandle) -> T,
    ) -> Result<T, CommandError> {
        let st = self.state();
        st.boot
            .as_ref()
            .and_then(|b| b.nets.iter().find(|(n, _)| n == name))
            .map(|(n, h)| f(n, h))
            .ok_or_else(|| {
                CommandError::new(
                    ErrorClass::DeviceNotFound,
                    format!("Device '{name}' not found"),
                )
            })
    }

    fn balloon(&self) -> Result<Arc<dyn Balloon>, CommandError> {
        self.state().balloon.clone().ok_or_else(|| {
            CommandError::new(
                ErrorClass::DeviceNotActive,
                "No balloon device has been activated",
            )
        })
    }
}

/// `set_link`'s arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLink {
    name: String,
    up: bool,
}

/// `x-query-net-stats`'s arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NetStatsArgs {
    name: Option<String>,
}

/// One `--net` device in `x-query-net-stats`.
fn net_stats(name: &str, h: &NetHandle) -> Value {
    let dir = |d: &DirStats| json!({"frames": d.frames, "bytes": d.bytes, "drops": d.drops, "errors": d.errors});
    let s = h.stats();
    json!({
        "name": name,
        "mac": h.mac().to_string(),
        "link": h.link_up(),
        "queues": s.queues.iter().map(|q| json!({"rx": dir(&q.rx), "tx": dir(&q.tx)})).collect::<Vec<_>>(),
        "control": {"ok": s.ctrl.ok, "errors": s.ctrl.errors},
    })
}

/// `balloon`'s arguments.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonArgs {
    value: i64,
}

impl Handler for Machine {
    fn commands(&self) -> &[&'static str] {
        &[
            "query-status",
            "query-name",
            "query-cpus-fast",
            "stop",
            "cont",
            "system_reset",
            "system_powerdown",
            "quit",
            "query-balloon",
            "balloon",
            "query-block",
            "query-blockstats",
            "block_set_io_throttle",
            "block_resize",
            "set_link",
            "x-query-net-stats",
        ]
    }

    fn execute(&self, command: &str, args: Arguments) -> Result<Value, CommandError> {
        if command == "balloon" {
            let a: BalloonArgs = args.parse()?;
            let b = self.balloon()?;
            if a.value <= 0 {
                return Err(CommandError::generic("Parameter 'target' expects a size"));
            }
            b.set_target(a.value as u64);
            return Ok(json!({}));
        }
        if command == "block_set_io_throttle" {
            let t: Throttle = args.parse()?;
            let name = t
                .device
                .or(t.id)
                .ok_or_else(|| CommandError::generic("Need exactly one of 'device' and 'id'"))?;
            if t.bps_rd | t.bps_wr | t.iops_rd | t.iops_wr != 0 {
                return Err(CommandError::generic(
                    "keel limits totals only: bps_rd, bps_wr, iops_rd and iops_wr must be 0",
                ));
            }
            return self.with_disk(&name, |d| {
                d.handle.set_limits(t.iops, t.bps);
                Ok(json!({}))
            })?;
        }
        if command == "set_link" {
            let a: SetLink = args.parse()?;
            return self.with_net(&a.name, |_, h| {
                h.set_link(a.up);
                json!({})
            });
        }
        if command == "x-query-net-stats" {
            let a: NetStatsArgs = args.parse()?;
            if let Some(name) = a.name {
                return self.with_net(&name, |n, h| json!([net_stats(n, h)]));
            }
            let st = self.state();
            let nets = st.boot.as_ref().map_or(&[][..], |b| &b.nets[..]);
            return Ok(nets.iter().map(|(n, h)| net_stats(n, h)).collect());
        }
        if command == "block_resize" {
            let r: Resize = args.parse()?;
            let name = r.device.or(r.node_name).ok_or_else(|| {
                CommandError::generic("Need exactly one of 'device' and 'node-name'")
            })?;
            // QEMU looks the name up as a drive or a node: its error says so.
            return self.with_disk(&name, |d| d.resize(r.size)).map_err(|_| {
                CommandError::generic(format!(
                    "Cannot find device='{name}' nor node-name='{name}'"
                ))
            })?;
        }
        args.none()?;
        match command {
            "query-status" => {
                let paused = self.state().paused;
                Ok(json!({
                    "status": if paused { "paused" } else { "running" },
                    "running": !paused,
                }))
            }
            "query-name" => Ok(match &self.name {
                Some(n) => json!({"name": n}),
                None => json!({}),
            }),
            "query-cpus-fast" => Ok(self.cpus()),
            "stop" => {
                self.stop();
                Ok(json!({}))
            }
            "cont" => {
                self.cont();
                Ok(json!({}))
            }
            "system_reset" => {
                self.request(VmExit::ResetRequested);
                Ok(json!({}))
            }
            "system_powerdown" => {
                if let Some(b) = &self.state().boot {
                    b.pm.press_power_button();
                }
                self.emit("POWERDOWN", None);
                Ok(json!({}))
            }
            "quit" => {
                self.request(VmExit::Quit);
                Ok(json!({}))
            }
            "query-balloon" => Ok(json!({"actual": self.balloon()?.actual()})),
            "query-block" => Ok(self.disks(DiskInfo::block_info)),
            "query-blockstats" => Ok(self.disks(DiskInfo::block_stats)),
            other => Err(CommandError::not_found(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    struct FakeBalloon(AtomicU64);
    impl Balloon for FakeBalloon {
        fn actual(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        fn set_target(&self, target: u64) {
            self.0.store(target, Ordering::SeqCst);
        }
    }

    fn run(m: &Machine, cmd: &str, args: Value) -> Result<Value, CommandError> {
        let Value::Object(a) = args else { panic!() };
        m.execute(cmd, Arguments(a))
    }

    #[test]
    fn net_commands_name_their_device() {
        let m = Machine::new(None);
        assert_eq!(run(&m, "x-query-net-stats", json!({})).unwrap(), json!([]));
        for (cmd, args) in [
            ("x-query-net-stats", json!({"name": "net0"})),
            ("set_link", json!({"name": "net0", "up": false})),
        ] {
            let e = run(&m, cmd, args).unwrap_err();
            assert_eq!(e.class, ErrorClass::DeviceNotFound);
            assert_eq!(e.desc, "Device 'net0' not found");
        }
        let e = run(&m, "x-query-net-stats", json!({"nme": "net0"})).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError, "{}", e.desc);
    }

    #[test]
    fn balloon_commands_need_a_balloon_and_check_their_argument() {
        let m = Machine::new(None);
        for (cmd, args) in [
            ("query-balloon", json!({})),
            ("balloon", json!({"value": 1 << 30})),
        ] {
            let e = run(&m, cmd, args).unwrap_err();
            assert_eq!(e.class, ErrorClass::DeviceNotActive);
            assert_eq!(e.desc, "No balloon device has been activated");
        }
        m.set_balloon(Arc::new(FakeBalloon(AtomicU64::new(128 << 20))));
        assert_eq!(
            run(&m, "query-balloon", json!({})).unwrap(),
            json!({"actual": 128u64 << 20})
        );
        run(&m, "balloon", json!({"value": 64 << 20})).unwrap();
        assert_eq!(
            run(&m, "query-balloon", json!({})).unwrap()["actual"],
            64 << 20
        );
        for bad in [json!({"value": 0}), json!({"value": "x"}), json!({})] {
            assert_eq!(
                run(&m, "balloon", bad).unwrap_err().class,
                ErrorClass::GenericError
            );
        }
    }

    #[test]
    fn block_io_error_has_qemus_shape() {
        let full = IoError {
            op: keel_virtio_blk::IoOp::Write,
            errno: libc::ENOSPC,
        };
        assert_eq!(
            block_io_error("disk0", &full),
            json!({
                "qom-path": "/machine/peripheral-anon/disk0/virtio-backend",
                "device": "disk0",
                "node-name": "disk0",
                "operation": "write",
                "action": "report",
                "nospace": true,
                "reason": "No space left on device",
            })
        );
        let eio = IoError {
            op: keel_virtio_blk::IoOp::Read,
            errno: libc::EIO,
        };
        let ev = block_io_error("disk1", &eio);
        assert_eq!(
            (&ev["operation"], &ev["nospace"], &ev["reason"]),
            (&json!("read"), &json!(false), &json!("Input/output error"))
        );
    }

    #[test]
    fn io_error_events_are_throttled_per_disk_latest_wins() {
        let q = IoErrorEvents::new().unwrap();
        let m = Machine::new(None);
        let err = |errno| IoError {
            op: keel_virtio_blk::IoOp::Write,
            errno,
        };
        let latest = |i: usize| q.disks()[i].latest;
        let (a, b) = (q.sink("disk0"), q.sink("disk1"));
        let t0 = Instant::now();
        assert_eq!(q.deliver(&m, t0), None, "nothing to send");
        // disk0's first error goes at once and opens a period.
        a.io_error(&err(libc::EIO));
        assert_eq!(q.deliver(&m, t0), None);
        assert_eq!(latest(0), None);
        // Thousands more within the period: one held, the latest.
        for _ in 0..5000 {
            a.io_error(&err(libc::EIO));
        }
        a.io_error(&err(libc::ENOSPC));
        let t1 = t0 + Duration::from_millis(300);
        assert_eq!(q.deliver(&m, t1), Some(t0 + IO_ERROR_PERIOD));
        assert_eq!(latest(0), Some(err(libc::ENOSPC)));
        // Another disk is not held back by the first.
        b.io_error(&err(libc::EIO));
        assert_eq!(q.deliver(&m, t1), Some(t0 + IO_ERROR_PERIOD));
        assert_eq!(latest(1), None);
        // The period over, the held one goes and opens the next period.
        let t2 = t0 + IO_ERROR_PERIOD;
        assert_eq!(q.deliver(&m, t2), None);
        assert_eq!(latest(0), None);
        a.io_error(&err(libc::EIO));
        assert_eq!(q.deliver(&m, t2), Some(t2 + IO_ERROR_PERIOD));
        // That one goes when the period ends; after a quiet period the next error goes
        // at once again.
        let t3 = t2 + IO_ERROR_PERIOD;
        assert_eq!(q.deliver(&m, t3), None);
        assert_eq!(latest(0), None);
        let t4 = t3 + IO_ERROR_PERIOD;
        a.io_error(&err(libc::EIO));
        assert_eq!(q.deliver(&m, t4), None);
        assert_eq!(latest(0), None);
    }

    #[test]
    fn status_and_name() {
        let m = Machine::new(Some("vm0".into()));
        assert_eq!(
            run(&m, "query-status", json!({})).unwrap(),
            json!({"status": "running", "running": true})
        );
        run(&m, "stop", json!({})).unwrap();
        assert_eq!(
            run(&m, "query-status", json!({})).unwrap()["status"],
            "paused"
        );
        assert_eq!(
            run(&m, "query-name", json!({})).unwrap(),
            json!({"name": "vm0"})
        );
        assert_eq!(
            run(&m, "cont", json!({"x": 1})).unwrap_err().desc,
            "Parameter 'x' is unexpected"
        );
    }
}

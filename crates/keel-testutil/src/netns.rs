//! A network namespace of the test's own with a tap in it (`ip netns add`, `ip tuntap add`):
//! the host side of Keel's network tests and benchmarks, which talk only to addresses inside
//! it. Needs root and iproute2.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The host's address on the tap.
pub const HOST_IP: &str = "10.0.2.2";

/// How the tap is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct TapOpts {
    /// IFF_MULTI_QUEUE (for a VMM's `queues=2`).
    pub multi_queue: bool,
    /// The tap's MTU (default 1500).
    pub mtu: Option<u16>,
}

/// A network namespace with `tap0` at 10.0.2.2/24, up (and `lo` up); deleted on drop.
/// The tap is persistent: VMMs started in the namespace attach to it one after another.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

/// Runs `ip ARGS`, panicking with its output unless it succeeds.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (Debian package iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A fresh namespace named after `tag`, this process and a counter, with its tap.
    pub fn new(tag: &str, opts: TapOpts) -> NetNs {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "keel-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        // From here on the namespace is deleted on every path.
        let ns = NetNs { name };
        let mut tuntap = vec![
            "-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ];
        if opts.multi_queue {
            tuntap.push("multi_queue");
        }
        ip(&tuntap);
        let addr = format!("{HOST_IP}/24");
        ip(&["-n", &ns.name, "addr", "add", &addr, "dev", "tap0"]);
        if let Some(mtu) = opts.mtu {
            let mtu = mtu.to_string();
            ip(&["-n", &ns.name, "link", "set", "tap0", "mtu", &mtu]);
        }
        // Room for 10000 frames on their way to the VMM (500 by default): a test's burst
        // is not dropped while the VMM or the guest is off the CPU for a while.
        ip(&["-n", &ns.name, "link", "set", "tap0", "txqueuelen", "10000"]);
        ip(&["-n", &ns.name, "link", "set", "tap0", "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name (`ip -n NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME program`: a command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Waits up to `limit` until the tap's carrier is up as the host's stack sees it
    /// (`operstate` UP), panicking if it isn't. A tap has carrier only while a VMM holds
    /// it open, and the kernel turns its queueing discipline on only when its link-watch
    /// work gets to the carrier change, later and on its own thread (longer when other
    /// namespaces are being torn down): until then the host drops whatever it sends to
    /// the tap, silently. Call this before the host sends to a guest.
    pub fn wait_carrier(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let out = Command::new("ip")
                .args(["-n", &self.name, "-j", "link", "show", "tap0"])
                .output()
                .unwrap_or_else(|e| panic!("cannot run ip (Debian package iproute2): {e}"));
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("\"operstate\":\"UP\"") {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "the carrier of tap0 in {} is not up after {limit:?}: {text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `f` on a thread that entered the namespace: its sockets are the namespace's.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on a namespace file we hold open; it changes this thread's
            // network namespace only and touches no memory of ours.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Runs `f` inside the namespace and returns what it returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .expect("a thread in the namespace panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Whether this process can make network namespaces and taps (root, and iproute2).
pub fn netns_available() -> bool {
    Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        // SAFETY: geteuid(2) has no arguments and no failure.
        && unsafe { libc::geteuid() } == 0
}

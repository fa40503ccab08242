//! `--net tap=NAME|fd=N|socket=PATH[,mac=MAC][,mtu=N][,queues=N][,bps=N][,pps=N]`:
//! parsing the option and opening the backend behind a virtio-net device.

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

use keel_virtio_net::backend::{Backend, SocketBackend, SocketError, Tap, TapError};
use keel_virtio_net::{MacAddr, Net, NetOptions, RateLimit};

/// Where a network device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// An existing tap interface, by name (`tap=`).
    Tap(String),
    /// A tap queue keel inherited, opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    /// (`fd=`): keel then needs no CAP_NET_ADMIN.
    Fd(RawFd),
    /// A Unix datagram socket (`socket=`): bound at the path if nothing is, else
    /// connected to what is (two VMs given one path are linked).
    Socket(PathBuf),
}

/// One `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The backend.
    pub backend: NetBackendSpec,
    /// The MAC address (`mac=`); `None`: one is made up, the same for the same VM name
    /// (or process) and device index.
    pub mac: Option<MacAddr>,
    /// MTU (`mtu=`, default 1500).
    pub mtu: u16,
    /// Queue pairs (`queues=`, default 1; more need a multi-queue tap).
    pub queues: u16,
    /// Limits each way (`bps=` bytes and `pps=` frames per second; 0: none).
    pub limit: RateLimit,
}

/// What is wrong with a `--net` value; the message names the option and what it takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionError {
    /// A part is not `KEY=VALUE`.
    #[error("'{0}': expected KEY=VALUE")]
    NotKeyValue(String),
    /// An unknown key.
    #[error("'{0}': unknown net option")]
    Unknown(String),
    /// A number was expected.
    #[error("{key}={value}: expected a number")]
    Number {
        /// The option.
        key: String,
        /// What was given.
        value: String,
    },
    /// `mac=` is not a unicast MAC address.
    #[error("mac={0}: expected a unicast address like 52:54:00:12:34:56")]
    Mac(String),
    /// `mtu=` is outside 68 to 65535.
    #[error("mtu={0}: expected 68 to 65535")]
    Mtu(String),
    /// `queues=` is outside 1 to 16, or above 1 without `tap=`.
    #[error("queues={0}: expected 1 to 16 (more than 1 only with tap=)")]
    Queues(String),
    /// `fd=` is not a descriptor number.
    #[error("fd={0}: expected an open descriptor number")]
    Fd(String),
    /// None, or more than one, of `tap=`, `fd=`, `socket=`.
    #[error("exactly one of tap=NAME, fd=N or socket=PATH is required")]
    Backend,
}

/// Parses the option's value.
pub fn parse_net(s: &str) -> Result<NetSpec, OptionError> {
    let mut backend = None;
    let mut backends = 0;
    let mut spec = NetSpec {
        backend: NetBackendSpec::Fd(-1),
        mac: None,
        mtu: 1500,
        queues: 1,
        limit: RateLimit::default(),
    };
    let number = |k: &str, v: &str| {
        v.parse::<u64>().map_err(|_| OptionError::Number {
            key: k.into(),
            value: v.into(),
        })
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| OptionError::NotKeyValue(part.into()))?;
        match k {
            "tap" | "socket" if v.is_empty() => return Err(OptionError::Backend),
            "tap" => {
                backends += 1;
                backend = Some(NetBackendSpec::Tap(v.into()));
            }
            "fd" => {
                backends += 1;
                let fd = v
                    .parse::<RawFd>()
                    .ok()
                    .filter(|&fd| fd >= 0)
                    .ok_or_else(|| OptionError::Fd(v.into()))?;
                backend = Some(NetBackendSpec::Fd(fd));
            }
            "socket" => {
                backends += 1;
                backend = Some(NetBackendSpec::Socket(PathBuf::from(v)));
            }
            "mac" => {
                let mac: MacAddr = v.parse().map_err(|_| OptionError::Mac(v.into()))?;
                if mac.0[0] & 1 != 0 {
                    return Err(OptionError::Mac(v.into()));
                }
                spec.mac = Some(mac);
            }
            "mtu" => {
                spec.mtu = u16::try_from(number(k, v)?)
                    .ok()
                    .filter(|&m| m >= 68)
                    .ok_or_else(|| OptionError::Mtu(v.into()))?
            }
            "queues" => match number(k, v)? {
                n @ 1..=16 => spec.queues = n as u16,
                _ => return Err(OptionError::Queues(v.into())),
            },
            "bps" => spec.limit.bytes_per_sec = number(k, v)?,
            "pps" => spec.limit.packets_per_sec = number(k, v)?,
            _ => return Err(OptionError::Unknown(part.into())),
        }
    }
    match backend {
        Some(b) if backends == 1 => spec.backend = b,
        _ => return Err(OptionError::Backend),
    }
    if spec.queues > 1 && !matches!(spec.backend, NetBackendSpec::Tap(_)) {
        return Err(OptionError::Queues(spec.queues.to_string()));
    }
    Ok(spec)
}

/// Errors opening a network device's backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tap cannot be opened.
    #[error("net tap={name}")]
    Tap {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: TapError,
    },
    /// The inherited descriptor cannot be used.
    #[error("net fd={fd}")]
    Fd {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: TapError,
    },
    /// The inherited descriptor is not open.
    #[error("net fd={fd}: cannot duplicate the descriptor")]
    Dup {
        /// The descriptor.
        fd: RawFd,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket cannot be set up.
    #[error("net socket={path}")]
    Socket {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: SocketError,
    },
    /// The device refused the options.
    #[error("net device {index}")]
    Device {
        /// Its index among the `--net` options.
        index: usize,
        /// Why.
        #[source]
        source: keel_virtio_net::Error,
    },
}

/// Queue size of every network device's queues.
const QUEUE_SIZE: u16 = 256;

/// The MAC address of device `index` of the VM called `name` (or of this process).
pub fn default_mac(name: Option<&str>, index: usize) -> MacAddr {
    use std::hash::{Hash, Hasher};
    // `DefaultHasher::new` has fixed keys: the same address every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match name {
        Some(n) => n.hash(&mut h),
        None => std::process::id().hash(&mut h),
    }
    index.hash(&mut h);
    MacAddr::local(h.finish())
}

/// Opens the backend (one per queue pair) and builds the device.
pub fn open(spec: &NetSpec, index: usize, vm_name: Option<&str>) -> Result<Box<Net>, Error> {
    let backends: Vec<Box<dyn Backend>> = match &spec.backend {
        NetBackendSpec::Tap(name) => Tap::open(name, spec.queues)
            .map_err(|source| Error::Tap {
                name: name.clone(),
                source,
            })?
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Backend>)
            .collect(),
        NetBackendSpec::Fd(fd) => {
            // A duplicate: the VM may be built again (system_reset) from the same one.
            // SAFETY: only borrowed for the duplication; fcntl checks it is open.
            let owned: OwnedFd = unsafe { BorrowedFd::borrow_raw(*fd) }
                .try_clone_to_owned()
                .map_err(|source| Error::Dup { fd: *fd, source })?;
            let tap = Tap::from_fd(owned).map_err(|source| Error::Fd { fd: *fd, source })?;
            vec![Box::new(tap)]
        }
        NetBackendSpec::Socket(path) => {
            let s = SocketBackend::at_path(path).map_err(|source| Error::Socket {
                path: path.display().to_string(),
                source,
            })?;
            vec![Box::new(s)]
        }
    };
    let opts = NetOptions {
        mac: spec.mac.unwrap_or_else(|| default_mac(vm_name, index)),
        mtu: spec.mtu,
        queue_size: QUEUE_SIZE,
        rx_limit: spec.limit,
        tx_limit: spec.limit,
        ..NetOptions::default()
    };
    let net = Net::new(backends, opts).map_err(|source| Error::Device { index, source })?;
    Ok(Box::new(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let n =
            parse_net("tap=tap0,mac=52:54:00:12:34:56,mtu=9000,queues=2,bps=1000,pps=10").unwrap();
        assert_eq!(
            n,
            NetSpec {
                backend: NetBackendSpec::Tap("tap0".into()),
                mac: Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
                mtu: 9000,
                queues: 2,
                limit: RateLimit {
                    bytes_per_sec: 1000,
                    packets_per_sec: 10
                },
            }
        );
        assert_eq!(parse_net("fd=3").unwrap().backend, NetBackendSpec::Fd(3));
        let s = parse_net("socket=/tmp/x.sock").unwrap();
        assert_eq!(s.backend, NetBackendSpec::Socket("/tmp/x.sock".into()));
        assert_eq!((s.mac, s.mtu, s.queues), (None, 1500, 1));
        let st = String::from;
        for (bad, want, why) in [
            (
                "mac=52:54:00:12:34:56",
                OptionError::Backend,
                "exactly one of",
            ),
            ("tap=a,socket=b", OptionError::Backend, "exactly one of"),
            ("tap=", OptionError::Backend, "exactly one of"),
            (
                "tap=a,mac=01:00:5e:00:00:01",
                OptionError::Mac(st("01:00:5e:00:00:01")),
                "unicast",
            ),
            ("tap=a,mac=nope", OptionError::Mac(st("nope")), "mac=nope"),
            ("tap=a,mtu=67", OptionError::Mtu(st("67")), "mtu=67"),
            (
                "tap=a,mtu=65536",
                OptionError::Mtu(st("65536")),
                "mtu=65536",
            ),
            ("tap=a,queues=0", OptionError::Queues(st("0")), "queues=0"),
            (
                "tap=a,queues=17",
                OptionError::Queues(st("17")),
                "queues=17",
            ),
            (
                "socket=a,queues=2",
                OptionError::Queues(st("2")),
                "only with tap=",
            ),
            ("fd=-1", OptionError::Fd(st("-1")), "fd=-1"),
            (
                "tap=a,bps=fast",
                OptionError::Number {
                    key: st("bps"),
                    value: st("fast"),
                },
                "bps=fast: expected a number",
            ),
            (
                "tap=a,vhost=on",
                OptionError::Unknown(st("vhost=on")),
                "unknown net option",
            ),
            (
                "tap=a,oops",
                OptionError::NotKeyValue(st("oops")),
                "expected KEY=VALUE",
            ),
        ] {
            let e = parse_net(bad).unwrap_err();
            assert_eq!(e, want, "{bad}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn made_up_macs_are_stable_and_distinct() {
        let a = default_mac(Some("vm1"), 0);
        assert_eq!(a, default_mac(Some("vm1"), 0));
        assert_ne!(a, default_mac(Some("vm1"), 1));
        assert_ne!(a, default_mac(Some("vm2"), 0));
        assert_eq!(a.0[0] & 3, 2, "locally administered unicast");
    }
}

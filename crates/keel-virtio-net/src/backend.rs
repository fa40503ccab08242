//! Where frames go: the [`Backend`] trait, and its two implementations, a tap device
//! ([`Tap`]) and a Unix datagram socket ([`SocketBackend`]).
//!
//! A backend moves whole frames, each preceded by the 12-byte virtio-net header
//! (`virtio_net_hdr_v1`), straight between its file descriptor and guest memory: the
//! device hands it the guest's buffers as [`GuestSlice`]s, and the backend reads or writes
//! them with one `readv`/`writev` (or `recvmsg`/`sendmsg`). No frame is ever copied
//! through a host buffer, and a backend keeps no queue of its own: a frame the guest has
//! no buffer for stays in the kernel.

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use keel_memory::GuestMemoryMmap;
use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
};
use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::{Bytes, VolatileSlice};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};

/// A piece of guest memory a frame is read into or written from.
pub type GuestSlice<'a> = VolatileSlice<'a, MS<'a, GuestMemoryMmap>>;

/// Bytes of the virtio-net header in front of every frame (`virtio_net_hdr_v1`: the
/// header of every VIRTIO_F_VERSION_1 device, with `num_buffers` whether or not
/// VIRTIO_NET_F_MRG_RXBUF is negotiated).
pub const NET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();

/// What the host may hand the guest besides plain, checksummed frames: what the driver
/// negotiated with VIRTIO_NET_F_GUEST_* (the tap is told with `TUNSETOFFLOAD`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Frames with partial checksums (VIRTIO_NET_F_GUEST_CSUM).
    pub csum: bool,
    /// TCPv4 segments larger than the MTU (VIRTIO_NET_F_GUEST_TSO4).
    pub tso4: bool,
    /// TCPv6 segments larger than the MTU (VIRTIO_NET_F_GUEST_TSO6).
    pub tso6: bool,
    /// TSO segments with ECN (VIRTIO_NET_F_GUEST_ECN).
    pub ecn: bool,
}

impl Offloads {
    /// From the negotiated features. TSO without checksum offload is not offered (virtio
    /// 1.2 5.1.3.1: GUEST_TSO4/6 require GUEST_CSUM), so it is dropped here too.
    pub fn from_features(features: u64) -> Offloads {
        let has = |bit: u32| features & (1 << bit) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        let tso4 = csum && has(VIRTIO_NET_F_GUEST_TSO4);
        let tso6 = csum && has(VIRTIO_NET_F_GUEST_TSO6);
        Offloads {
            csum,
            tso4,
            tso6,
            ecn: (tso4 || tso6) && has(VIRTIO_NET_F_GUEST_ECN),
        }
    }

    /// Whether the host may hand over segments larger than the MTU.
    pub fn tso(self) -> bool {
        self.tso4 || self.tso6
    }

    /// The `TUN_F_*` flags of `TUNSETOFFLOAD`.
    pub fn tun_flags(self) -> libc::c_uint {
        let mut f = 0;
        for (on, flag) in [
            (self.csum, libc::TUN_F_CSUM),
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.ecn, libc::TUN_F_TSO_ECN),
        ] {
            if on {
                f |= flag;
            }
        }
        f
    }
}

/// Where a device's frames go and come from, for one queue pair.
///
/// Both directions carry the virtio-net header in front of the frame. A backend whose
/// [`Backend::supports_offloads`] is false (a socket) never sees a header with offloads
/// set, because the device does not offer them; it strips the header on send and puts a
/// zeroed one in front of what it receives.
pub trait Backend: Send {
    /// Reads one frame, header first, into `bufs` (in order) and returns its length with
    /// the header. A frame that does not fit must come back with a length past the end
    /// of `bufs` (the device then drops it rather than hand the guest a cut frame): a
    /// tap reads the excess into a spill buffer of its own, a socket asks `recvmsg` for
    /// the datagram's real length (MSG_TRUNC). An error of kind
    /// [`io::ErrorKind::WouldBlock`]: no frame is waiting.
    fn recv(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<usize>;
    /// Writes one frame, header first, gathered from `bufs`. An error of kind
    /// [`io::ErrorKind::WouldBlock`]: the backend is full; the device tries again when
    /// [`Backend::fd`] is writable.
    fn send(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<()>;
    /// The descriptor the device polls: readable when a frame is waiting, writable when a
    /// frame may be sent.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Whether the backend can carry checksum and segmentation offloads (the device
    /// offers VIRTIO_NET_F_CSUM, HOST_TSO*, GUEST_* only then).
    fn supports_offloads(&self) -> bool;
    /// Which offloads the guest accepts, from now on (set at each activation: a guest
    /// that negotiated none gets plain frames).
    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()>;
    /// Whether the device uses this queue pair (multi-queue: the driver chose how many
    /// pairs with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET). A tap detaches the queue, so that the
    /// kernel hands its frames to the queues that are read.
    fn set_enabled(&mut self, _enabled: bool) -> io::Result<()> {
        Ok(())
    }
}

/// The iovecs of `bufs`, with the guards that keep their pointers valid.
fn iovecs(
    bufs: &[GuestSlice<'_>],
) -> (
    Vec<libc::iovec>,
    Vec<vm_memory::volatile_memory::PtrGuardMut>,
) {
    let guards: Vec<_> = bufs.iter().map(|s| s.ptr_guard_mut()).collect();
    let iov = guards
        .iter()
        .zip(bufs)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect();
    (iov, guards)
}

/// Marks the first `n` bytes of `bufs` dirty (they were written behind vm-memory's back,
/// by the kernel).
fn mark_written(bufs: &[GuestSlice<'_>], mut n: usize) {
    for s in bufs {
        if n == 0 {
            break;
        }
        let k = n.min(s.len());
        s.bitmap().mark_dirty(0, k);
        n -= k;
    }
}

/// The number of iovecs a single call accepts.
const IOV_MAX: usize = 1024;

/// `readv(fd, bufs)`: reads into guest memory. Returns the bytes read.
pub fn readv(fd: BorrowedFd<'_>, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
    let (iov, _guards) = iovecs(bufs);
    let cnt = iov.len().min(IOV_MAX) as libc::c_int;
    // SAFETY: every iovec points at a live slice of guest memory of its length (the
    // guards keep the pointers valid until the call returns); the kernel writes at most
    // that many bytes into each.
    let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), cnt) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    mark_written(bufs, n as usize);
    Ok(n as usize)
}

/// `writev(fd, bufs)`: writes what `bufs` hold in guest memory. Returns the bytes written.
pub fn writev(fd: BorrowedFd<'_>, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
    let (iov, _guards) = iovecs(bufs);
    if iov.len() > IOV_MAX {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    // SAFETY: every iovec points at a live slice of guest memory of its length; the
    // kernel only reads them.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `bufs` without their first `skip` bytes.
pub fn skip<'a>(bufs: &[GuestSlice<'a>], mut skip: usize) -> Vec<GuestSlice<'a>> {
    let mut out = Vec::with_capacity(bufs.len());
    for s in bufs {
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        // In range: skip < s.len().
        if let Ok(rest) = s.offset(skip) {
            out.push(rest);
        }
        skip = 0;
    }
    out
}

/// Writes `data` at byte `at` of the concatenation of `bufs`; false if it does not fit.
pub fn write_at(bufs: &[GuestSlice<'_>], mut at: usize, mut data: &[u8]) -> bool {
    for s in bufs {
        if data.is_empty() {
            break;
        }
        if at >= s.len() {
            at -= s.len();
            continue;
        }
        let k = (s.len() - at).min(data.len());
        if s.write_slice(&data[..k], at).is_err() {
            return false;
        }
        data = &data[k..];
        at = 0;
    }
    data.is_empty()
}

/// Reads `out.len()` bytes at byte `at` of the concatenation of `bufs`; false if they
/// are not all there.
pub fn read_at(bufs: &[GuestSlice<'_>], mut at: usize, out: &mut [u8]) -> bool {
    let mut done = 0;
    for s in bufs {
        if done == out.len() {
            break;
        }
        if at >= s.len() {
            at -= s.len();
            continue;
        }
        let k = (s.len() - at).min(out.len() - done);
        if s.read_slice(&mut out[done..done + k], at).is_err() {
            return false;
        }
        done += k;
        at = 0;
    }
    done == out.len()
}

/// Errors from opening a tap.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapError {
    /// The interface name is empty or longer than IFNAMSIZ - 1 bytes.
    #[error("{0:?} is not a valid interface name")]
    Name(String),
    /// No network interface of that name exists (keel does not create taps: make one
    /// with `ip tuntap add NAME mode tap`).
    #[error("there is no network interface {0:?} (create it with `ip tuntap add {0} mode tap`)")]
    NoSuchInterface(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to attach to the interface (not a tap, or no permission, or a
    /// single-queue tap asked for several queues).
    #[error("cannot attach to tap {name:?} (TUNSETIFF)")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A descriptor handed in is not a tap opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    /// (The message does not name it: a caller that duplicated its descriptor first would
    /// see the copy's number; it names the one it was given.)
    #[error("not a tap opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR")]
    NotATap {
        /// The descriptor [`Tap::from_fd`] was given.
        fd: i32,
    },
    /// A set-up step on the tap failed.
    #[error("cannot {step} on the tap")]
    Setup {
        /// What was being done ("set the virtio-net header size").
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One queue of a tap device: frames with the virtio-net header (IFF_VNET_HDR, header
/// size 12), no packet information (IFF_NO_PI), non-blocking.
///
/// # Examples
///
/// ```no_run
/// use keel_virtio_net::backend::Tap;
///
/// // Two queues of an existing multi-queue tap (`ip tuntap add tap0 mode tap multi_queue`).
/// let queues = Tap::open("tap0", 2)?;
/// assert_eq!(queues.len(), 2);
/// # Ok::<(), keel_virtio_net::backend::TapError>(())
/// ```
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Where the part of a frame that does not fit the guest's buffers goes: a tap
    /// returns only what it copied, so a frame it had to cut would look whole. With this
    /// after the guest's buffers, a read longer than they are means the frame did not fit.
    spill: Box<[u8]>,
}

/// Bytes of a tap's spill buffer: more than any frame (64 KiB of GSO segment, the
/// Ethernet header and a VLAN tag, and the virtio-net header).
const SPILL: usize = 68 * 1024;

fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

impl Tap {
    /// Opens `queues` queues of the existing tap `name` (IFF_MULTI_QUEUE when more than
    /// one). The interface must exist; keel never creates one.
    pub fn open(name: &str, queues: u16) -> Result<Vec<Tap>, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::Name(name.to_string()))?;
        // SAFETY: a valid NUL-terminated string; the call only reads it.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NoSuchInterface(name.to_string()));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        (0..queues.max(1))
            .map(|_| {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open("/dev/net/tun")
                    .map_err(TapError::OpenTun)?;
                let mut req = ifreq(name, flags);
                // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
                let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as _, &mut req) };
                if r < 0 {
                    return Err(TapError::Attach {
                        name: name.to_string(),
                        source: io::Error::last_os_error(),
                    });
                }
                let tap = Tap {
                    file,
                    name: name.to_string(),
                    spill: vec![0; SPILL].into_boxed_slice(),
                };
                tap.set_up()?;
                Ok(tap)
            })
            .collect()
    }

    /// A tap queue opened by someone else (so that keel can run without CAP_NET_ADMIN):
    /// it must have been attached with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let mut req = ifreq("", 0);
        // SAFETY: TUNGETIFF writes an ifreq, which `req` is.
        let r = unsafe { ioctl_with_mut_ref(&file, libc::TUNGETIFF as _, &mut req) };
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if r < 0 || flags & want != want {
            return Err(TapError::NotATap { fd: raw });
        }
        let name: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            if fl < 0 || libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(TapError::Setup {
                    step: "make the descriptor non-blocking",
                    source: io::Error::last_os_error(),
                });
            }
        }
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&name).into_owned(),
            spill: vec![0; SPILL].into_boxed_slice(),
        };
        tap.set_up()?;
        Ok(tap)
    }

    fn set_up(&self) -> Result<(), TapError> {
        let size = NET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int, which `size` is.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.file, libc::TUNSETVNETHDRSZ as _, &size)
        };
        if r < 0 {
            return Err(TapError::Setup {
                step: "set the virtio-net header size (TUNSETVNETHDRSZ)",
                source: io::Error::last_os_error(),
            });
        }
        // Plain frames until a driver negotiates offloads.
        self.offload(0).map_err(|source| TapError::Setup {
            step: "turn offloads off (TUNSETOFFLOAD)",
            source,
        })
    }

    fn offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let r = unsafe { ioctl_with_val(&self.file, libc::TUNSETOFFLOAD as _, flags.into()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Backend for Tap {
    fn recv(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
        let (mut iov, _guards) = iovecs(bufs);
        iov.truncate(IOV_MAX - 1);
        let room: usize = iov.iter().map(|v| v.iov_len).sum();
        iov.push(libc::iovec {
            iov_base: self.spill.as_mut_ptr().cast(),
            iov_len: self.spill.len(),
        });
        // SAFETY: the iovecs point at live guest memory of their lengths (kept valid by
        // the guards) and at the spill buffer this backend owns exclusively (`&mut
        // self`); the kernel writes at most that many bytes into each.
        let n = unsafe {
            libc::readv(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        mark_written(bufs, n.min(room));
        // Past `room`: the frame did not fit (the device drops it).
        Ok(n)
    }

    fn send(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        writev(self.file.as_fd(), bufs).map(|_| ())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        self.offload(offloads.tun_flags())
    }

    fn set_enabled(&mut self, enabled: bool) -> io::Result<()> {
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = ifreq("", flag);
        // SAFETY: TUNSETQUEUE reads an ifreq, which `req` is.
        let r = unsafe { ioctl_with_mut_ref(&self.file, libc::TUNSETQUEUE as _, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // A single-queue tap has nothing to attach or detach.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}

/// Errors from setting up a socket backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Binding the socket's own path failed.
    #[error("cannot bind {path:?}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connecting to the peer's path failed.
    #[error("cannot connect to {path:?}")]
    Connect {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A set-up step on the socket failed.
    #[error("cannot {step}")]
    Setup {
        /// What was being done.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A Unix datagram socket carrying one Ethernet frame per datagram, without the
/// virtio-net header: links two VMs (or a VM and a test) without a tap or privileges.
///
/// A socket is either connected (a socketpair, or the side that found the path bound) and
/// sends to its peer, or bound to a path, when it sends to whoever sent to it last (the
/// connecting side greets it with an empty datagram, so it can send before its peer's
/// guest does).
///
/// # Examples
///
/// ```
/// use std::os::unix::net::UnixDatagram;
/// use keel_virtio_net::backend::{Backend, SocketBackend};
///
/// let (ours, _theirs) = UnixDatagram::pair()?;
/// let backend = SocketBackend::new(ours)?;
/// assert!(!backend.supports_offloads());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct SocketBackend {
    sock: UnixDatagram,
    /// The path this backend bound (removed when it is dropped).
    bound: Option<PathBuf>,
    /// For a bound socket: where the last datagram came from.
    peer: Option<(libc::sockaddr_un, libc::socklen_t)>,
    connected: bool,
}

impl SocketBackend {
    /// A backend over a connected socket (a `UnixDatagram::pair()` end, say).
    pub fn new(sock: UnixDatagram) -> io::Result<SocketBackend> {
        sock.set_nonblocking(true)?;
        Ok(SocketBackend {
            sock,
            bound: None,
            peer: None,
            connected: true,
        })
    }

    /// The backend of `socket=PATH`: if a socket is bound at `path`, connects to it (two
    /// VMs given the same path are linked); otherwise binds `path` and answers whoever
    /// sends to it.
    pub fn at_path(path: &Path) -> Result<SocketBackend, SocketError> {
        let nonblocking = |sock: UnixDatagram, bound: Option<PathBuf>| {
            sock.set_nonblocking(true)
                .map_err(|source| SocketError::Setup {
                    step: "make the socket non-blocking",
                    source,
                })?;
            Ok(SocketBackend {
                sock,
                connected: bound.is_none(),
                bound,
                peer: None,
            })
        };
        if path.exists() {
            let sock = UnixDatagram::unbound().map_err(|source| SocketError::Setup {
                step: "create a socket",
                source,
            })?;
            // An autobound (abstract) address, so that the bound side can answer.
            // SAFETY: an all-zero sockaddr_un with only the family set, bound with the
            // length of the family alone, asks the kernel for an abstract address.
            let r = unsafe {
                let mut a: libc::sockaddr_un = std::mem::zeroed();
                a.sun_family = libc::AF_UNIX as libc::sa_family_t;
                libc::bind(
                    sock.as_raw_fd(),
                    (&a as *const libc::sockaddr_un).cast(),
                    size_of::<libc::sa_family_t>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(SocketError::Setup {
                    step: "give the socket an address",
                    source: io::Error::last_os_error(),
                });
            }
            sock.connect(path).map_err(|source| SocketError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
            // An empty datagram tells the bound side where we are, so that it can send
            // before our guest does.
            sock.send(&[]).map_err(|source| SocketError::Setup {
                step: "greet the bound socket",
                source,
            })?;
            nonblocking(sock, None)
        } else {
            let sock = UnixDatagram::bind(path).map_err(|source| SocketError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
            nonblocking(sock, Some(path.to_path_buf()))
        }
    }
}

impl SocketBackend {
    /// A bound socket that has not heard from its peer yet looks at the first datagram
    /// waiting (without taking it, unless it is the empty greeting) to learn where the
    /// peer is.
    fn learn_peer(&mut self) {
        // SAFETY: an all-zero sockaddr_un is a valid value.
        let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: no data buffer (length 0); the kernel writes at most `len` bytes of
        // address into `from`, which outlives the call.
        let n = unsafe {
            libc::recvfrom(
                self.sock.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_un).cast(),
                &mut len,
            )
        };
        if n < 0 || len == 0 {
            return;
        }
        self.peer = Some((from, len));
        if n == 0 {
            // The greeting: taken off the queue.
            let _ = self.sock.recv(&mut []);
        }
    }
}

impl Drop for SocketBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.bound {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Backend for SocketBackend {
    fn recv(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
        let data = skip(bufs, NET_HDR_LEN);
        let (mut iov, _guards) = iovecs(&data);
        iov.truncate(IOV_MAX);
        // SAFETY: all-zero sockaddr_un and msghdr are valid values.
        let mut from: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_un>() as libc::socklen_t;
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` points at the iovecs (live guest memory of their lengths, kept
        // valid by the guards) and at `from`, all of which outlive the call; with
        // MSG_TRUNC the kernel still writes no more than the iovecs hold.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if !self.connected && msg.msg_namelen > 0 {
            self.peer = Some((from, msg.msg_namelen));
        }
        if n == 0 {
            // A peer's greeting (or an empty datagram): no frame.
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let room: usize = data.iter().map(|s| s.len()).sum();
        mark_written(&data, n.min(room));
        if !write_at(bufs, 0, &[0; NET_HDR_LEN]) {
            // Less room than a header: the frame does not fit.
            return Ok(NET_HDR_LEN + n + 1);
        }
        Ok(NET_HDR_LEN + n)
    }

    fn send(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let data = skip(bufs, NET_HDR_LEN);
        let (mut iov, _guards) = iovecs(&data);
        if iov.len() > IOV_MAX {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        // SAFETY: an all-zero msghdr is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        if !self.connected && self.peer.is_none() {
            self.learn_peer();
        }
        let mut peer = self.peer;
        if !self.connected {
            // Nobody has spoken to a bound socket yet: the frame has nowhere to go.
            let Some((addr, len)) = peer.as_mut() else {
                return Err(io::Error::from_raw_os_error(libc::ENOTCONN));
            };
            msg.msg_name = (addr as *mut libc::sockaddr_un).cast();
            msg.msg_namelen = *len;
        }
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        // SAFETY: `msg` points at the iovecs (live guest memory, only read) and at the
        // peer's address, all of which outlive the call.
        let n = unsafe {
            libc::sendmsg(
                self.sock.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn supports_offloads(&self) -> bool {
        false
    }

    fn set_offloads(&mut self, _offloads: Offloads) -> io::Result<()> {
        // Never offered, so never negotiated.
        Ok(())
    }
}

/// A backend that carries the virtio-net header in front of each frame over a Unix
/// datagram socket, as a tap carries it: offloads are offered and what the peer reads is
/// exactly what a tap would hand the host. For tests and fuzz targets (feature
/// `test-utils`); a frame longer than the guest's buffers is reported at its full length.
#[cfg(feature = "test-utils")]
pub struct HeaderSocket {
    sock: UnixDatagram,
    buf: Vec<u8>,
}

#[cfg(feature = "test-utils")]
impl HeaderSocket {
    /// The backend over `sock` (one end of a pair, or a connected socket).
    pub fn new(sock: UnixDatagram) -> HeaderSocket {
        HeaderSocket {
            sock,
            // Room for a header and the longest frame, and for peers that send more.
            buf: vec![0; 1 << 17],
        }
    }
}

#[cfg(feature = "test-utils")]
impl Backend for HeaderSocket {
    fn recv(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
        let n = self.sock.recv(&mut self.buf)?;
        let room: usize = bufs.iter().map(|s| s.len()).sum();
        write_at(bufs, 0, &self.buf[..n.min(room)]);
        Ok(n)
    }

    fn send(&mut self, bufs: &[GuestSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|s| s.len()).sum();
        let mut frame = vec![0u8; total];
        if !read_at(bufs, 0, &mut frame) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        self.sock.send(&frame).map(|_| ())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, _offloads: Offloads) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    #[test]
    fn offloads_follow_the_features_and_their_dependencies() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, b| a | 1 << b);
        assert_eq!(Offloads::from_features(0).tun_flags(), 0);
        let all = Offloads::from_features(f(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ]));
        assert_eq!(
            all.tun_flags(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        // TSO without checksum offload is not a valid combination.
        let bad = Offloads::from_features(f(&[VIRTIO_NET_F_GUEST_TSO4]));
        assert_eq!(bad.tun_flags(), 0);
    }

    #[test]
    fn split_buffers_read_and_write_at_offsets() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let a = mem.get_slice(GuestAddress(0), 5).unwrap();
        let b = mem.get_slice(GuestAddress(0x100), 7).unwrap();
        let bufs = [a, b];
        assert!(write_at(&bufs, 3, b"hello"));
        let mut out = [0u8; 5];
        assert!(read_at(&bufs, 3, &mut out));
        assert_eq!(&out, b"hello");
        assert_eq!(mem.read_obj::<[u8; 2]>(GuestAddress(3)).unwrap(), *b"he");
        assert_eq!(
            mem.read_obj::<[u8; 3]>(GuestAddress(0x100)).unwrap(),
            *b"llo"
        );
        assert!(!write_at(&bufs, 10, b"abc"), "past the end");
        let rest = skip(&bufs, 6);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].len(), 6);
    }
}

//! SIGINT/SIGTERM as a file descriptor the event loop can watch.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};

/// A non-blocking signalfd for a set of signals, which it blocks in the calling thread
/// (threads spawned afterwards inherit the mask, so only this fd sees the signals).
pub struct SignalFd(File);

impl SignalFd {
    /// Blocks `signals` and returns an fd that reports them.
    pub fn new(signals: &[libc::c_int]) -> io::Result<Self> {
        // SAFETY: an all-zero sigset_t is a valid value to initialise with sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe { libc::sigemptyset(&mut set) };
        for &s in signals {
            // SAFETY: as above; an invalid signal number makes sigaddset fail, checked.
            if unsafe { libc::sigaddset(&mut set, s) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: `set` is initialised; the old mask is not requested.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new fd; `set` is initialised.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(SignalFd(unsafe { File::from_raw_fd(fd) }))
    }

    /// A second descriptor for the same signalfd (one per VM the event loop runs).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(SignalFd(self.0.try_clone()?))
    }

    /// The next pending signal, if any.
    pub fn read(&mut self) -> io::Result<Option<i32>> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.0.read(&mut info) {
            Ok(n) if n == info.len() => {
                // ssi_signo is the first field, a u32.
                Ok(Some(
                    u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")) as i32,
                ))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

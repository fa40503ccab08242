//! Raw mode for an interactive console: when stdin is a terminal, keystrokes go to the
//! guest as typed (no line buffering, no local echo, Ctrl-C reaches the guest) and the
//! terminal is restored when keel ends.

use std::io;

/// Restores the terminal's previous settings on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `Ok(None)` otherwise.
    pub fn enable() -> io::Result<Option<RawTerminal>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: stdin is a terminal and `saved` is a valid termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so "\n" from the guest still returns the carriage.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(RawTerminal { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores settings read from this same terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

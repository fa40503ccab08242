//! qemu-img's `-p` progress line: `    (12.34/100%)` and a carriage return, printed
//! when the value grew by at least one point, and at 0 and 100.

use std::io::Write as _;

/// A progress line (a no-op when off).
pub(crate) struct Progress {
    on: bool,
    last: f64,
}

impl Progress {
    /// Starts a progress line, printing 0.00 when `on`.
    pub(crate) fn new(on: bool) -> Progress {
        let p = Progress { on, last: -1.0 };
        p.show(0.0);
        p
    }

    /// Reports `fraction` (0.0 to 1.0) done.
    pub(crate) fn update(&mut self, fraction: f64) {
        let pct = (fraction * 100.0 * 100.0).floor() / 100.0;
        if pct - self.last >= 1.0 || (pct >= 100.0 && self.last < 100.0) {
            self.show(pct);
            self.last = pct;
        }
    }

    /// Prints 100.00 and ends the line.
    pub(crate) fn finish(&self) {
        self.show(100.0);
        if self.on {
            println!();
        }
    }

    fn show(&self, pct: f64) {
        if self.on {
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }
}

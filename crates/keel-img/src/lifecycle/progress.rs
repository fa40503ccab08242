//! `-p`: progress as qemu-img prints it, `    (12.34/100%)` and a carriage
//! return, redrawn whenever it moved by at least one percent, then a newline.

use std::io::Write as _;

/// A progress line on stdout (or nothing, when not asked for).
pub(crate) struct Progress {
    shown: bool,
    last: f64,
}

impl Progress {
    /// A meter that prints when `shown`.
    pub(crate) fn new(shown: bool) -> Progress {
        Progress { shown, last: -1.0 }
    }

    /// Reports `pct` percent done.
    pub(crate) fn update(&mut self, pct: f64) {
        if !self.shown {
            return;
        }
        let pct = pct.clamp(0.0, 100.0);
        if self.last < 0.0 || pct - self.last >= 1.0 || (pct >= 100.0 && self.last < 100.0) {
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
            self.last = pct;
        }
    }

    /// Ends the line.
    pub(crate) fn finish(&mut self) {
        if self.shown {
            self.update(100.0);
            println!();
        }
    }
}

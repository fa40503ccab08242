//! Logging an error with its causes.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, `error: cause: cause's cause`, for
/// log lines (an error's own message never repeats its cause).
pub(crate) struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

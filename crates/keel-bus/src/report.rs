//! Printing an error with its causes.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, `error: cause: cause's cause`.
///
/// Keel's error messages name the failing step and never repeat their cause (it is the
/// `source()`), so a log line or a user-facing message prints the whole chain with this.
///
/// ```
/// use keel_bus::ErrorChain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("reading the config file")]
/// struct ReadConfig(#[source] std::io::Error);
///
/// let e = ReadConfig(std::io::Error::other("disk on fire"));
/// assert_eq!(ErrorChain(&e).to_string(), "reading the config file: disk on fire");
/// ```
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
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

//! Printing an error with its causes.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, `error: cause: cause's cause`.
///
/// Keel's error messages name the failing step and never repeat their cause (it is the
/// `source()`), so a log line or a user-facing message prints the whole chain with this.
/// Other crates' errors sometimes do repeat it (linux-loader's "failed to load ELF kernel
/// image: Invalid program header size" has that as its source too): a cause the message
/// before it already ends with is not printed again.
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
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let msg = e.to_string();
            if !last.ends_with(&msg) {
                write!(f, ": {msg}")?;
            }
            last = msg;
            cause = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading: {0}")]
    struct Flattened(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("bad header")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("booting")]
    struct Outer(#[source] Flattened);

    /// A cause its error's message already ends with is printed once.
    #[test]
    fn a_cause_flattened_into_its_error_is_not_repeated() {
        let e = Outer(Flattened(Inner));
        assert_eq!(ErrorChain(&e).to_string(), "booting: loading: bad header");
    }
}

//! The `--balloon` option: `[size=MiB][,deflate_on_oom=on|off][,free_page_reporting=on|off][,stats_period=S]`.

use std::time::Duration;

use keel_virtio_balloon::BalloonOptions;

/// What is wrong with a `--balloon` value.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalloonOptionError {
    /// A key this option does not have.
    #[error(
        "unknown key `{0}` (expected size, deflate_on_oom, free_page_reporting, stats_period)"
    )]
    UnknownKey(String),
    /// A key without `=value`.
    #[error("`{0}` needs a value")]
    MissingValue(String),
    /// A value that is not a number.
    #[error("{key}: `{value}` is not a whole number")]
    NotANumber {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A value that is neither `on` nor `off`.
    #[error("{key}: expected on or off, got `{value}`")]
    NotOnOff {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
}

fn on_off(key: &'static str, v: &str) -> Result<bool, BalloonOptionError> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(BalloonOptionError::NotOnOff {
            key,
            value: v.to_string(),
        }),
    }
}

fn number(key: &'static str, v: &str) -> Result<u64, BalloonOptionError> {
    v.parse().map_err(|_| BalloonOptionError::NotANumber {
        key,
        value: v.to_string(),
    })
}

/// Parses a `--balloon` value (empty: a balloon with no target).
///
/// # Examples
///
/// ```
/// use keel_vmm::balloon::parse_balloon;
///
/// let o = parse_balloon("size=64,free_page_reporting=on,stats_period=2").unwrap();
/// assert_eq!(o.target_bytes, 64 << 20);
/// assert!(o.free_page_reporting && !o.deflate_on_oom);
/// assert_eq!(o.stats_period, Some(std::time::Duration::from_secs(2)));
/// ```
pub fn parse_balloon(s: &str) -> Result<BalloonOptions, BalloonOptionError> {
    let mut o = BalloonOptions::default();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(BalloonOptionError::MissingValue(part.to_string()));
        };
        match k {
            "size" => o.target_bytes = number("size", v)?.saturating_mul(1 << 20),
            "deflate_on_oom" => o.deflate_on_oom = on_off("deflate_on_oom", v)?,
            "free_page_reporting" => o.free_page_reporting = on_off("free_page_reporting", v)?,
            "stats_period" => {
                let s = number("stats_period", v)?;
                o.stats_period = (s > 0).then(|| Duration::from_secs(s));
            }
            _ => return Err(BalloonOptionError::UnknownKey(k.to_string())),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(parse_balloon("").unwrap(), BalloonOptions::default());
        assert_eq!(
            parse_balloon("size=x"),
            Err(BalloonOptionError::NotANumber {
                key: "size",
                value: "x".into()
            })
        );
        assert_eq!(
            parse_balloon("deflate_on_oom=yes"),
            Err(BalloonOptionError::NotOnOff {
                key: "deflate_on_oom",
                value: "yes".into()
            })
        );
        assert_eq!(
            parse_balloon("colour=red"),
            Err(BalloonOptionError::UnknownKey("colour".into()))
        );
        assert_eq!(
            parse_balloon("size"),
            Err(BalloonOptionError::MissingValue("size".into()))
        );
        assert!(parse_balloon("deflate_on_oom=on").unwrap().deflate_on_oom);
    }
}

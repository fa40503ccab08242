//! Sizes with qemu-img's suffixes, parsed once for the command line and the
//! life-cycle verbs.

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeError {
    /// The last character is a letter that is not a known suffix.
    Suffix,
    /// A whole number whose product with the suffix overflows 64 bits.
    TooLarge,
    /// Not a non-negative number below 2^64.
    Number,
}

/// Parses a size: a number (fractions allowed) with an optional suffix b, k, M,
/// G, T, P (case-insensitive) and, when `exa`, E; bytes without one.
pub(crate) fn parse(s: &str, exa: bool) -> Result<u64, SizeError> {
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' if exa => 1 << 60,
                _ => return Err(SizeError::Suffix),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or(SizeError::TooLarge);
    }
    match num.parse::<f64>() {
        Ok(f) if f >= 0.0 && f * (mult as f64) < 1.8e19 => Ok((f * mult as f64) as u64),
        _ => Err(SizeError::Number),
    }
}

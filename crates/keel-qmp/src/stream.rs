//! Cutting a byte stream into JSON values, as QEMU's JSON streamer does: QMP has no
//! framing beyond the values themselves (clients may or may not end them with newlines).
//!
//! The splitter only balances brackets and strings; parsing the value is serde_json's job.
//! It bounds what a client can make the server hold: a value longer than the limit is an
//! error, after which the stream cannot be resynchronised and the client is dropped.

/// What went wrong while splitting the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// A value grew past the limit before it ended.
    #[error("a JSON value is longer than {limit} bytes")]
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// A closing bracket with nothing open.
    #[error("unbalanced '{0}' outside any JSON value")]
    Unbalanced(char),
}

/// Splits bytes into complete top-level JSON values (objects, arrays, or scalars).
///
/// # Examples
///
/// ```
/// use keel_qmp::stream::Splitter;
///
/// let mut s = Splitter::new(1024);
/// s.push(br#"{"execute": "stop"}{"execute":"#);
/// assert_eq!(s.next_value().unwrap().unwrap(), br#"{"execute": "stop"}"#);
/// assert!(s.next_value().is_none()); // the second value is incomplete
/// s.push(br#" "cont"}"#);
/// assert_eq!(s.next_value().unwrap().unwrap(), br#"{"execute": "cont"}"#);
/// ```
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    limit: usize,
    /// Next byte to scan.
    pos: usize,
    /// Start of the value being scanned, if one has started.
    start: Option<usize>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The value is a top-level scalar (number, keyword, or string).
    scalar: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Splitter {
    /// A splitter that refuses values longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            limit,
            pos: 0,
            start: None,
            depth: 0,
            in_string: false,
            escaped: false,
            scalar: false,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes `buf[start..end]` and forgets everything before `end`.
    fn take(&mut self, start: usize, end: usize) -> Vec<u8> {
        let value = self.buf[start..end].to_vec();
        self.buf.drain(..end);
        self.pos = 0;
        self.start = None;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.scalar = false;
        value
    }

    /// The next complete value, an error, or `None` until more bytes arrive. After
    /// [`SplitError::TooLong`] the stream is out of step: stop reading it.
    pub fn next_value(&mut self) -> Option<Result<Vec<u8>, SplitError>> {
        while self.pos < self.buf.len() {
            let i = self.pos;
            let b = self.buf[i];
            self.pos += 1;
            let Some(start) = self.start else {
                match b {
                    // Skipped; dropped with whatever precedes the next value (at once per
                    // call, not a byte at a time: that would be quadratic in the spaces).
                    _ if is_space(b) => {}
                    b'{' | b'[' => {
                        self.start = Some(i);
                        self.depth = 1;
                    }
                    b'}' | b']' => {
                        self.buf.drain(..=i);
                        self.pos = 0;
                        return Some(Err(SplitError::Unbalanced(char::from(b))));
                    }
                    _ => {
                        self.start = Some(i);
                        self.scalar = true;
                        self.in_string = b == b'"';
                    }
                }
                continue;
            };
            if i + 1 - start > self.limit {
                return Some(Err(SplitError::TooLong { limit: self.limit }));
            }
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.scalar {
                        return Some(Ok(self.take(start, i + 1)));
                    }
                }
                continue;
            }
            if self.scalar {
                // A number or keyword ends where something else starts.
                if is_space(b) || matches!(b, b'{' | b'[' | b'}' | b']' | b'"' | b',' | b':') {
                    self.pos = i;
                    return Some(Ok(self.take(start, i)));
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(Ok(self.take(start, i + 1)));
                    }
                }
                _ => {}
            }
        }
        if self.start.is_none() {
            // Only spaces were left.
            self.buf.clear();
            self.pos = 0;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &mut Splitter) -> Vec<Result<String, SplitError>> {
        std::iter::from_fn(|| s.next_value())
            .map(|r| r.map(|v| String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn values_back_to_back_and_split_anywhere() {
        let text = br#" {"a": "}{\"", "b": [1, {"c": 2}]}
[3] "str\\" 42 true{"x":1}"#;
        let want = vec![
            Ok(r#"{"a": "}{\"", "b": [1, {"c": 2}]}"#.to_string()),
            Ok("[3]".into()),
            Ok(r#""str\\""#.into()),
            Ok("42".into()),
            Ok("true".into()),
            Ok(r#"{"x":1}"#.into()),
        ];
        for cut in 0..text.len() {
            let mut s = Splitter::new(1000);
            s.push(&text[..cut]);
            let mut got = all(&mut s);
            s.push(&text[cut..]);
            got.extend(all(&mut s));
            // The trailing object is complete; a trailing keyword waits for a delimiter.
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn spaces_between_values_are_not_held() {
        let mut s = Splitter::new(64);
        s.push(&[b' '; 1 << 16]);
        assert!(s.next_value().is_none());
        assert_eq!(s.buffered(), 0, "64 KiB of spaces held");
        s.push(b"\n\t {\"execute\": \"stop\"}  \r\n  ");
        assert_eq!(all(&mut s), vec![Ok(r#"{"execute": "stop"}"#.to_string())]);
        assert_eq!(s.buffered(), 0);
        // Spaces before a value do not count against its limit.
        s.push(&[b' '; 100]);
        s.push(br#"{"execute": "cont"}"#);
        assert_eq!(all(&mut s), vec![Ok(r#"{"execute": "cont"}"#.to_string())]);
    }

    #[test]
    fn stray_closers_and_long_values_are_errors() {
        let mut s = Splitter::new(8);
        s.push(b"} {\"a\":1}");
        assert_eq!(s.next_value(), Some(Err(SplitError::Unbalanced('}'))));
        assert_eq!(s.next_value(), Some(Ok(b"{\"a\":1}".to_vec())));
        s.push(b"{\"abcdefgh\":1}");
        assert_eq!(s.next_value(), Some(Err(SplitError::TooLong { limit: 8 })));
    }

    #[test]
    fn a_long_string_fed_byte_by_byte_is_scanned_once() {
        let mut s = Splitter::new(1 << 20);
        s.push(b"{\"a\":\"");
        for _ in 0..100_000 {
            s.push(b"x");
            assert!(s.next_value().is_none());
        }
        s.push(b"\"}");
        assert_eq!(s.next_value().unwrap().unwrap().len(), 100_008);
        assert_eq!(s.buffered(), 0);
    }
}

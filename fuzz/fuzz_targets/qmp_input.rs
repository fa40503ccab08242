//! What a QMP client sends: the stream splitter, then the command parser, on arbitrary
//! bytes cut at an arbitrary point. Neither may panic, and the splitter must never hold
//! more than its limit plus one read.
#![no_main]

use keel_qmp::message::parse_request;
use keel_qmp::stream::Splitter;
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let mut s = Splitter::new(LIMIT);
    for part in [&rest[..cut], &rest[cut..]] {
        s.push(part);
        while let Some(v) = s.next_value() {
            match v {
                Ok(bytes) => {
                    assert!(bytes.len() <= LIMIT);
                    let _ = parse_request(&bytes);
                }
                Err(keel_qmp::stream::SplitError::TooLong { .. }) => return,
                Err(_) => {}
            }
        }
    }
});

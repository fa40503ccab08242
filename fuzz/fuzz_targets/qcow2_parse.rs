//! Fuzz qcow2 header, L1, L2 and refcount parsing: open arbitrary bytes as an
//! image, read, write, discard, write-zeroes and check it. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keel_block::qcow2::fuzz_image(data);
});

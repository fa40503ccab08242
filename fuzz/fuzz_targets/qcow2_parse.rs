//! Fuzz qcow2 header, L1, L2, refcount and snapshot parsing: open arbitrary bytes as an
//! image (read-write over a backing image, and read-only), read, write, compressed
//! write, discard, write-zeroes, check, and repair a copy (see `keel_fuzz::qcow2`). Must
//! never panic, hang or grow the image past its bound; a repair that reports success
//! must leave an image a second check finds clean.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keel_fuzz::qcow2::exercise_image(data);
});

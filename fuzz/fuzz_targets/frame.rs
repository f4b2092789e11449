//! Frame decoding and request/reply decoding, as after a datagram was received.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::exercise(data, Vec::new());
});

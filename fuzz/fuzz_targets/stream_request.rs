//! One request body through the native and OpenAI validation; the properties are in `tokenfan_testkit::fuzzing::stream_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenfan_testkit::fuzzing::stream_request(data));

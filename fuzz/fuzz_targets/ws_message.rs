//! Newline-separated WebSocket frames through one session; the properties are in `tokenfan_testkit::fuzzing::ws_messages`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenfan_testkit::fuzzing::ws_messages(data));

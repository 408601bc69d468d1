//! Last-Event-ID bytes and a query string through the events, poll and status endpoints; the properties are in `tokenfan_testkit::fuzzing::cursor`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenfan_testkit::fuzzing::cursor(data));

//! A JWT's raw text, or a JOSE header and claims signed with the edge's secret, through the verifier; the properties are in `tokenfan_testkit::fuzzing::jwt`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenfan_testkit::fuzzing::jwt(data));

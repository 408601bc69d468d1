//! Authorization and Cookie headers and a query string (API keys, JWTs, tickets) through request authentication; the properties are in `tokenfan_testkit::fuzzing::credentials`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tokenfan_testkit::fuzzing::credentials(data));

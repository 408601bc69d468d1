//! `tokenfan-testkit`: what tokenfan's tests share, kept out of the crates that ship.
//!
//! - [`servers`]: hermetic `nats-server` and `redis-server` processes (single, TLS, clusters)
//!   on free loopback ports, killed when dropped; [`tls`]: certificates made on the spot;
//!   [`temp`]: fresh temporary directories.
//! - [`conformance`]: the suites every [`tokenfan_edge::bus::Bus`] and
//!   [`tokenfan_edge::store::Store`] implementation must pass.
//! - [`edge`]: a real edge on a port-0 listener ([`edge::TestEdge`]), request bodies, stream
//!   creation and polling, and the text the mock generator answers; [`sse`] and [`ws`]: the
//!   SSE reader and the WebSocket client of the edge's protocol; [`wait::wait_until`];
//!   [`binary`]: checks on a binary's `--help`.
//! - [`fuzzing`]: the bodies of the cargo-fuzz targets in `fuzz/` (they panic when a property
//!   fails), whose committed corpus the unit tests here run on every `cargo test`.
//!
//! The edge's own integration tests use it as a dev-dependency (so do the generator's and the
//! loadgen's); it depends on `tokenfan-edge`, so the edge's unit tests in `src/` cannot use it.

pub mod binary;
pub mod conformance;
pub mod edge;
pub mod fuzzing;
pub mod servers;
pub mod sse;
pub mod temp;
pub mod tls;
pub mod wait;
pub mod ws;

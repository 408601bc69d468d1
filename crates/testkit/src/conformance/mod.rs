//! The behaviour every backend must have, one suite per trait, run against each implementation
//! (the in-memory ones and NATS/Redis in every shape the tests start).

pub mod bus;
pub mod store;

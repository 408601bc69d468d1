//! Generated gRPC code for the `tokenfan.v1` protocol (`proto/tokenfan/v1/generator.proto`).
//!
//! The proto file is the contract; this crate only compiles it. [`FILE_DESCRIPTOR_SET`] feeds
//! gRPC reflection.

#![allow(clippy::all, missing_docs)]

/// The `tokenfan.v1` package: messages, the `Generator` client and server.
pub mod v1 {
    tonic::include_proto!("tokenfan.v1");
}

/// Encoded `FileDescriptorSet` of every message and service in `proto/`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tokenfan_descriptor.bin"));

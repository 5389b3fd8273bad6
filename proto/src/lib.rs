//! The `hsm.v1` wire contract, generated from `proto/hsm/v1/*.proto`.
//!
//! Other teams' clients are written against these names: add fields and RPCs freely,
//! rename nothing.
#![allow(missing_docs, clippy::all)]

pub mod codec;

/// Package `hsm.v1`.
pub mod v1 {
    tonic::include_proto!("hsm.v1");
}

/// Encoded `FileDescriptorSet` of every hsm.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hsm_v1_descriptor");

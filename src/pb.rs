//! Generated protobuf and gRPC code for `locus.v1` (see `proto/locus/v1/`).
#![allow(missing_docs, clippy::all)]
tonic::include_proto!("locus.v1");

/// The encoded descriptor set of every `locus.v1` file (served by gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/locus_descriptor.bin"));

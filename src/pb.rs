//! Generated protobuf and gRPC code for `locus.v1` (see `proto/locus/v1/`).
#![allow(missing_docs, clippy::all)]
tonic::include_proto!("locus.v1");

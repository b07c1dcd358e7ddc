//! Generated types and service stubs of Sextant's native gRPC API, `sextant.v1`.
//! The source of truth is `proto/sextant/v1/registry.proto` at the repository root.
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("sextant.v1");
}

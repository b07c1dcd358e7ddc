//! Generated types and service stubs of Sextant's native gRPC API, `sextant.v1`, and of the
//! Nacos 2.x envelope the Nacos adapter speaks. The sources of truth are
//! `proto/sextant/v1/registry.proto` and `proto/nacos/nacos_grpc_service.proto`. With the
//! `model` feature, [`convert`] maps `sextant.v1` to and from `sextant-model` for the server
//! and the client SDK alike.
#[cfg(feature = "model")]
pub mod convert;

#[allow(clippy::all, missing_docs, non_camel_case_types)]
pub mod v1 {
    tonic::include_proto!("sextant.v1");
}

/// Nacos 2.x's `Payload` envelope and its `Request` / `BiRequestStream` services (the proto has
/// no package, so prost names its output `_`).
#[allow(clippy::all, missing_docs, non_camel_case_types)]
pub mod nacos {
    tonic::include_proto!("_");
}

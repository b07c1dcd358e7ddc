//! Compiles the sextant.v1 protos, the cluster's internal peer service and Nacos 2.x's gRPC envelope with a vendored protoc, so a fresh machine needs no system
//! protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; a build script's environment is its own.
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../../proto");
    tonic_prost_build::configure().compile_protos(
        &[
            "../../proto/sextant/v1/registry.proto",
            "../../proto/sextant/cluster/v1/peer.proto",
            "../../proto/nacos/nacos_grpc_service.proto",
        ],
        &["../../proto"],
    )?;
    Ok(())
}

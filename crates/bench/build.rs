//! Compiles, with a vendored protoc, the trimmed copy of etcd's v3 gRPC API (`proto/etcd`), so
//! the bench's etcd driver needs no system protoc (the `etcd-client` crate would). Nacos 2.x's
//! gRPC envelope comes from `sextant-proto`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; a build script's environment is its own.
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/etcd/rpc.proto"], &["proto"])?;
    Ok(())
}

//! Compiles etcd's v3 API protos (`proto/etcd`, vendored) into a gRPC client with a vendored
//! protoc, so a fresh machine needs no system protoc (etcd-client's own build script does).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; a build script's environment is its own.
    #[allow(clippy::disallowed_methods)]
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=../../proto/etcd");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &[
                "../../proto/etcd/api/mvccpb/kv.proto",
                "../../proto/etcd/api/authpb/auth.proto",
                "../../proto/etcd/api/etcdserverpb/rpc.proto",
            ],
            &["../../proto"],
        )?;
    Ok(())
}

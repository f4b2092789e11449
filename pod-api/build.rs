//! Generates the pod API's messages and its tonic client and server from
//! `proto/proto/flower/protocol/pods.proto` with the pure-Rust `protox` compiler.
//! Switchboard types (`Right`) come from `flower-proto`, not generated twice.

fn main() {
    const PROTO: &str = "../proto/proto/flower/protocol/pods.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["../proto/proto"]).expect("compile pods.proto");
    tonic_prost_build::configure()
        .btree_map(".")
        .extern_path(
            ".flower.protocol.switchboard",
            "::flower_proto::switchboard",
        )
        .compile_fds(fds)
        .expect("generate the pod API");
}

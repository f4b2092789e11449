//! Generates the NRI messages (upstream `pkg/api/api.proto`, vendored unchanged) and
//! ttrpc's envelope (`Request`, `Response`, `google.rpc.Status`) with the pure-Rust
//! `protox` compiler: no system protoc. See `proto/README.md` for where each file
//! comes from.

fn main() {
    const FILES: [&str; 3] = [
        "proto/nri/api.proto",
        "proto/ttrpc/request.proto",
        "proto/google/rpc/status.proto",
    ];
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(FILES, ["proto"]).expect("compile the NRI protocol files");
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(fds)
        .expect("generate the NRI protocol code");
}

//! Compiles the .proto files with the pure-Rust `protox` compiler (no system `protoc`)
//! and generates, from the same descriptors:
//! * one zero-sized type per RPC method implementing `crate::rpc::Method`, and
//! * `crate::fds::FdFields` for every message, listing its `Fd` fields,
//!
//! so no method or descriptor field is ever written out by hand.

use std::fmt::Write as _;
use std::path::PathBuf;

use prost_build::{Service, ServiceGenerator};
use prost_types::field_descriptor_proto::{Label, Type};

const PROTOS: &[&str] = &[
    "proto/flower/protocol/descriptor.proto",
    "proto/flower/protocol/frame.proto",
    "proto/flower/protocol/switchboard.proto",
    "proto/flower/protocol/server.proto",
    "proto/flower/protocol/egress.proto",
    "proto/flower/protocol/resolver.proto",
];
const FD_TYPE: &str = ".flower.protocol.Fd";

/// Emits `pub mod rpc { pub struct Method; impl Method for Method {...} }` per service.
struct MethodGenerator;

impl ServiceGenerator for MethodGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        writeln!(
            buf,
            "/// Methods of `{}.{}`.",
            service.package, service.proto_name
        )
        .unwrap();
        writeln!(buf, "pub mod rpc {{").unwrap();
        for m in &service.methods {
            let path = format!(
                "/{}.{}/{}",
                service.package, service.proto_name, m.proto_name
            );
            writeln!(
                buf,
                "    /// `{path}`\n    #[derive(Debug, Clone, Copy)]\n    pub struct {name};\n    \
                 impl crate::rpc::Method for {name} {{\n        \
                 const PATH: &'static str = \"{path}\";\n        \
                 const STREAMING: bool = {streaming};\n        \
                 type Request = super::{input};\n        \
                 type Response = super::{output};\n    }}",
                name = m.proto_name,
                streaming = m.server_streaming,
                input = m.input_type,
                output = m.output_type,
            )
            .unwrap();
        }
        writeln!(buf, "}}").unwrap();
    }
}

fn main() {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"]).expect("compile .proto files");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());

    // FdFields for every top-level message, from the descriptors themselves.
    let mut impls = String::new();
    for file in &fds.file {
        let package = file.package();
        let module: String = package.split('.').collect::<Vec<_>>().join("::");
        for msg in &file.message_type {
            let fields: Vec<&str> = msg
                .field
                .iter()
                .filter(|f| f.r#type() == Type::Message && f.type_name() == FD_TYPE)
                .inspect(|f| assert_ne!(f.label(), Label::Repeated, "repeated Fd unsupported"))
                .map(|f| f.name())
                .collect();
            let names = fields
                .iter()
                .map(|f| format!("\"{f}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let slots = fields
                .iter()
                .map(|f| format!("self.{f}.as_ref().map(|fd| fd.slot)"))
                .collect::<Vec<_>>()
                .join(", ");
            writeln!(
                impls,
                "impl crate::fds::FdFields for crate::pb::{module}::{name} {{\n    \
                 const FD_FIELDS: &'static [&'static str] = &[{names}];\n    \
                 fn fd_slots(&self) -> impl Iterator<Item = Option<u32>> {{ [{slots}].into_iter() }}\n}}",
                name = msg.name(),
            )
            .unwrap();
        }
    }
    std::fs::write(out.join("fd_fields.rs"), impls).unwrap();

    prost_build::Config::new()
        .btree_map(["."])
        .service_generator(Box::new(MethodGenerator))
        .include_file("_includes.rs")
        .compile_fds(fds)
        .expect("generate Rust code from descriptors");
}

//! Compiles the .proto files with the pure-Rust `protox` compiler (no system `protoc`)
//! and generates, from the same descriptors:
//! * per service, a typed trait for the answering side with its dispatcher, and typed
//!   async and blocking client stubs (see [`MethodGenerator`]),
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

/// Emits, per service, `pub mod rpc` holding:
/// * one zero-sized type per method implementing `crate::rpc::Method`;
/// * a trait named after the service, one typed method per RPC, for the answering
///   side, and `Serve<S>`, which turns an implementation into a `crate::rpc::Service`
///   (the one place where a method path is matched and a request decoded);
/// * `Client`, typed calls over an async `crate::rpc::Peer`, and `BlockingClient`,
///   the same over a `crate::blocking::Caller`.
struct MethodGenerator;

impl ServiceGenerator for MethodGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let svc = &service.proto_name;
        let full = format!("{}.{}", service.package, svc);
        let mut markers = String::new();
        let mut trait_fns = String::new();
        let mut arms = String::new();
        let mut client_fns = String::new();
        let mut blocking_fns = String::new();
        for m in &service.methods {
            let path = format!("/{full}/{}", m.proto_name);
            let (name, input, output) = (&m.proto_name, &m.input_type, &m.output_type);
            let fn_name = &m.name;
            write!(
                markers,
                "    /// `{path}`\n    #[derive(Debug, Clone, Copy)]\n    pub struct {name};\n    \
                 impl crate::rpc::Method for {name} {{\n        \
                 const PATH: &'static str = \"{path}\";\n        \
                 const STREAMING: bool = {streaming};\n        \
                 type Request = super::{input};\n        \
                 type Response = super::{output};\n    }}\n",
                streaming = m.server_streaming,
            )
            .unwrap();
            let doc = m
                .comments
                .leading
                .iter()
                .map(|l| format!("        ///{l}\n"))
                .collect::<String>();
            if m.server_streaming {
                writeln!(
                    trait_fns,
                    "{doc}        fn {fn_name}(&self, request: super::{input}, fds: crate::fds::Fds, \
                     stream: crate::rpc::Stream<super::{output}>) \
                     -> impl Future<Output = Result<(), crate::Status>> + Send;"
                )
                .unwrap();
                write!(
                    arms,
                    "                {name}::PATH => {{\n                    \
                     let (message, fds) = request.decode::<{name}>()?;\n                    \
                     self.0.{fn_name}(message, fds, crate::rpc::Stream::new(sink)).await?;\n                    \
                     Ok(crate::rpc::Response::default())\n                }}\n"
                )
                .unwrap();
                write!(
                    client_fns,
                    "        /// `{path}` (streaming)\n        \
                     pub async fn {fn_name}(&self, request: &super::{input}) \
                     -> Result<crate::rpc::Replies<{name}>, crate::Status> {{\n            \
                     self.0.call_streaming::<{name}>(request).await\n        }}\n"
                )
                .unwrap();
            } else {
                writeln!(
                    trait_fns,
                    "{doc}        fn {fn_name}(&self, request: super::{input}, fds: crate::fds::Fds) \
                     -> impl Future<Output = crate::rpc::Answer<super::{output}>> + Send;"
                )
                .unwrap();
                write!(
                    arms,
                    "                {name}::PATH => {{\n                    \
                     let (message, fds) = request.decode::<{name}>()?;\n                    \
                     let (reply, fds) = self.0.{fn_name}(message, fds).await?;\n                    \
                     Ok(crate::rpc::Response::new(&reply, fds.into_vec()))\n                }}\n"
                )
                .unwrap();
                write!(
                    client_fns,
                    "        /// `{path}`\n        \
                     pub async fn {fn_name}(&self, request: &super::{input}, fds: Vec<std::os::fd::OwnedFd>) \
                     -> Result<(super::{output}, crate::fds::Fds), crate::Status> {{\n            \
                     self.0.call::<{name}>(request, fds).await\n        }}\n"
                )
                .unwrap();
                write!(
                    blocking_fns,
                    "        /// `{path}`\n        \
                     pub fn {fn_name}(&mut self, request: &super::{input}, fds: Vec<std::os::fd::OwnedFd>) \
                     -> Result<(super::{output}, crate::fds::Fds), crate::Status> {{\n            \
                     self.0.call::<{name}>(request, fds)\n        }}\n"
                )
                .unwrap();
            }
        }
        write!(
            buf,
            "/// Methods of `{full}`.\npub mod rpc {{\n    #[allow(unused_imports)]\n    use crate::rpc::Method as _;\n\n{markers}\n    \
             /// The answering side of `{full}`: one method per RPC, each given its decoded\n    \
             /// request and the descriptors it carried.\n    \
             pub trait {svc}: Send + Sync + 'static {{\n{trait_fns}    }}\n\n    \
             /// Serves a [`{svc}`] on a channel: matches the method path, decodes the\n    \
             /// request, encodes the answer. Unknown methods are `UNIMPLEMENTED`.\n    \
             pub struct Serve<S>(pub S);\n\n    \
             impl<S: {svc}> crate::rpc::Service for Serve<S> {{\n        \
             fn call(self: std::sync::Arc<Self>, request: crate::rpc::Request, \
             #[allow(unused_variables)] sink: crate::rpc::StreamSink) \
             -> futures::future::BoxFuture<'static, Result<crate::rpc::Response, crate::Status>> {{\n            \
             Box::pin(async move {{\n                match request.method.as_str() {{\n{arms}                \
             other => Err(crate::Status::unimplemented(format!(\"Unknown method {{other}}\"))),\n                \
             }}\n            }})\n        }}\n    }}\n\n    \
             /// Typed calls of `{full}` over an async peer.\n    \
             #[derive(Clone, Copy)]\n    pub struct Client<'a>(pub &'a crate::rpc::Peer);\n\n    \
             impl Client<'_> {{\n{client_fns}    }}\n\n    \
             /// Typed calls of `{full}` over a blocking caller (unary methods only).\n    \
             pub struct BlockingClient<'a>(pub &'a mut crate::blocking::Caller);\n\n    \
             impl BlockingClient<'_> {{\n{blocking_fns}    }}\n}}\n"
        )
        .unwrap();
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

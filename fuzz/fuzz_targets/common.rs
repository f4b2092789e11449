//! What every fuzz target does with a decoded frame: what the switchboard and the
//! client libraries do with one.

use std::os::fd::OwnedFd;

use flower_proto::fds::{FdFields, Fds};
use flower_proto::frame::Kind;
use flower_proto::rpc::{Method, Request};
use flower_proto::switchboard::rpc as sb;
use flower_proto::{Frame, egress, resolver, server};
use flower_switchboard::labels::validate;
use flower_switchboard::rights::Rights;
use prost::Message;

/// Decodes `bytes` as a frame and its message as every request or reply it could be,
/// claiming `fds` as the receiver would. Nothing may panic; every descriptor must end
/// up owned or closed.
pub fn exercise(bytes: &[u8], mut fds: Vec<OwnedFd>) {
    let Ok(frame) = Frame::decode(bytes) else {
        return;
    };
    match frame.kind {
        Some(Kind::Call(call)) => {
            // The method decides the request type; try the named one with the
            // descriptors, and every other without.
            let message = call.message;
            macro_rules! each {
                ($($m:ty),*) => {$(
                    let these = if call.method == <$m>::PATH { std::mem::take(&mut fds) } else { Vec::new() };
                    request::<$m>(&message, these);
                )*};
            }
            each!(
                sb::Constrain,
                sb::ClientConnect,
                sb::EgressStart,
                sb::IngressConnect,
                sb::ResolverStart,
                sb::ServerStart,
                sb::List,
                server::rpc::Connect,
                egress::rpc::Connect,
                resolver::rpc::Resolve
            );
        }
        Some(Kind::Reply(reply)) => {
            let message = reply.message;
            macro_rules! each {
                ($($m:ty),*) => {$(
                    let these = std::mem::take(&mut fds);
                    response::<$m>(&message, these);
                )*};
            }
            each!(
                sb::Constrain,
                sb::ClientConnect,
                sb::EgressStart,
                sb::IngressConnect,
                sb::ResolverStart,
                sb::ServerStart,
                sb::List,
                server::rpc::Connect,
                egress::rpc::Connect,
                resolver::rpc::Resolve
            );
        }
        None => {}
    }
}

fn request<M: Method>(message: &[u8], fds: Vec<OwnedFd>) {
    let request = Request {
        method: M::PATH.to_owned(),
        message: message.to_vec(),
        fds,
    };
    if let Ok((decoded, _fds)) = request.decode::<M>() {
        check(&decoded.encode_to_vec());
    }
}

fn response<M: Method>(message: &[u8], fds: Vec<OwnedFd>) {
    if let Ok(decoded) = M::Response::decode(message) {
        let _ = Fds::claim(&decoded, fds);
        let _ = decoded.fd_slots().count();
    }
}

/// What the switchboard checks first in a decoded Constrain: rights and labels.
fn check(encoded: &[u8]) {
    if let Ok(c) = flower_proto::switchboard::ConstrainRequest::decode(encoded) {
        let _ = Rights::from_wire(&c.rights);
        let _ = validate(&c.in_labels);
        let _ = validate(&c.out_labels);
    }
}

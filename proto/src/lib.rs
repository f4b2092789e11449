//! The Flower wire protocol.
//!
//! * [`transport`]: SOCK_SEQPACKET channels carrying one frame and up to four
//!   descriptors per datagram, with the receive-side limits enforced.
//! * [`rpc`]: call/reply multiplexing over a channel (pipelining, out-of-order
//!   replies, streaming) and the [`rpc::Service`] trait for the answering side.
//! * [`frame`]: the frame codec both peers share (calls, replies, reply → result).
//! * [`inherited`]: the handle a parent passed down in `FLOWER_SWITCHBOARD_FD`.
//! * [`fds`]: the `Fd { slot }` convention tying message fields to descriptors.
//! * [`hash`]: the hasher for maps keyed by numbers we choose.
//! * [`client`]: the async client library applications and the tools use.
//! * [`blocking`]: a runtime-free client for one call at a time, with the lowest
//!   connect latency.
//!
//! Message types are generated from `proto/` at build time with a pure-Rust compiler.

#![deny(unsafe_code)]
// All of it is in `transport::sys`, which allows it for itself.

pub mod blocking;
pub mod client;
pub mod fds;
pub mod frame;
pub mod hash;
pub mod inherited;
pub mod rpc;
pub mod status;
pub mod transport;

mod pb {
    include!(concat!(env!("OUT_DIR"), "/_includes.rs"));
}
include!(concat!(env!("OUT_DIR"), "/fd_fields.rs"));

pub use pb::flower::protocol::{Call, Fd, Frame, Reply, egress, resolver, server, switchboard};
pub use status::{Code, Status};

/// A label set: UTF-8 keys (non-empty) to UTF-8 values, kept sorted.
pub type Labels = std::collections::BTreeMap<String, String>;

impl switchboard::Right {
    /// Every right, in enum order.
    pub const ALL: [switchboard::Right; 6] = [
        switchboard::Right::ClientConnect,
        switchboard::Right::EgressStart,
        switchboard::Right::IngressConnect,
        switchboard::Right::ResolverStart,
        switchboard::Right::ServerStart,
        switchboard::Right::List,
    ];
}

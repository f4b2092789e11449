//! The frame codec (docs/PROTOCOL.md §2): one datagram is one `Frame`, a `Call` or a `Reply`.
//!
//! Both peers, the async [`crate::rpc`] and the blocking [`crate::blocking`], build
//! calls and replies and turn a received reply into a result here, so the rules (a
//! non-zero code is the error; a reply that does not decode or whose descriptors do not
//! match is the answering side's fault, `INTERNAL`) live in one place.

use std::os::fd::OwnedFd;

use prost::Message;

use crate::fds::Fds;
use crate::rpc::Method;
use crate::{Call, Code, Frame, Reply, Status};

pub use crate::pb::flower::protocol::frame::Kind;

/// Encodes a call of `M` with the caller's `id`.
pub fn call<M: Method>(id: u64, request: &M::Request) -> Vec<u8> {
    encode(Kind::Call(Call {
        id,
        method: M::PATH.to_owned(),
        message: request.encode_to_vec(),
    }))
}

/// A reply frame to call `id`: the encoded message, or the error. `more` marks an
/// intermediate reply of a stream.
pub fn reply(id: u64, result: Result<Vec<u8>, Status>, more: bool) -> Reply {
    match result {
        Ok(message) => Reply {
            id,
            message,
            code: Code::Ok as i32,
            error: String::new(),
            more,
        },
        Err(status) => Reply {
            id,
            message: Vec::new(),
            code: status.code as i32,
            error: status.message,
            more,
        },
    }
}

pub fn encode(kind: Kind) -> Vec<u8> {
    Frame { kind: Some(kind) }.encode_to_vec()
}

/// Why a datagram is not a frame. Either way there is no call id to answer, so the
/// channel is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("undecodable frame: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("frame is neither call nor reply")]
    Empty,
}

pub fn decode(bytes: &[u8]) -> Result<Kind, FrameError> {
    Frame::decode(bytes)?.kind.ok_or(FrameError::Empty)
}

/// A received reply to a call of `M` as its result: the error it carries, or the
/// decoded message with its descriptors claimed.
pub fn reply_result<M: Method>(
    reply: Reply,
    fds: Vec<OwnedFd>,
) -> Result<(M::Response, Fds), Status> {
    if reply.code != Code::Ok as i32 {
        return Err(Status::new(Code::from_i32(reply.code), reply.error));
    }
    let malformed =
        |e: &dyn std::fmt::Display| Status::internal(format!("Malformed {} reply: {e}", M::PATH));
    let message = M::Response::decode(&reply.message[..]).map_err(|e| malformed(&e))?;
    let fds = Fds::claim(&message, fds).map_err(|e| malformed(&e))?;
    Ok((message, fds))
}

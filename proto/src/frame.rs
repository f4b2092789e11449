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
use crate::{Code, Frame, Reply, Status};

pub use crate::pb::flower::protocol::frame::Kind;

/// Encodes a call of `M` with the caller's `id`: the same bytes as encoding a
/// `Frame` holding that `Call`, written into one buffer of the right size (no
/// separately encoded message, no method string).
pub fn call<M: Method>(id: u64, request: &M::Request) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let path = M::PATH.as_bytes();
    let message_len = request.encoded_len();
    let field = |tag: u32, len: usize| key_len(tag) + encoded_len_varint(len as u64) + len;
    let call_len = if id != 0 {
        key_len(1) + encoded_len_varint(id)
    } else {
        0
    } + if path.is_empty() {
        0
    } else {
        field(2, path.len())
    } + if message_len == 0 {
        0
    } else {
        field(3, message_len)
    };
    let mut buf = Vec::with_capacity(field(1, call_len));
    encode_key(1, WireType::LengthDelimited, &mut buf);
    encode_varint(call_len as u64, &mut buf);
    if id != 0 {
        encode_key(1, WireType::Varint, &mut buf);
        encode_varint(id, &mut buf);
    }
    if !path.is_empty() {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(path.len() as u64, &mut buf);
        buf.extend_from_slice(path);
    }
    if message_len != 0 {
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(message_len as u64, &mut buf);
        request.encode(&mut buf).expect("a Vec grows as needed");
    }
    buf
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::switchboard::{self as sb, rpc};
    use crate::{Call, Labels};

    /// A call encoded in one pass is exactly the encoded `Frame` of that `Call`.
    #[test]
    fn calls_encode_as_their_frame() {
        let labels = Labels::from([("app".into(), "web".into()), ("x".into(), "".into())]);
        let request = sb::ClientConnectRequest { out_labels: labels };
        for id in [0, 1, 127, 128, 300, u64::MAX] {
            for request in [&request, &sb::ClientConnectRequest::default()] {
                let expected = encode(Kind::Call(Call {
                    id,
                    method: <rpc::ClientConnect as Method>::PATH.to_owned(),
                    message: request.encode_to_vec(),
                }));
                assert_eq!(call::<rpc::ClientConnect>(id, request), expected, "id {id}");
            }
        }
    }
}

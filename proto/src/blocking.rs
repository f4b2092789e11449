//! A blocking client for callers that have no async runtime or want the lowest
//! connect latency.
//!
//! Each call sends one frame and then blocks in `recvmsg` for the reply. No runtime,
//! no `epoll_wait`, no extra thread. A task blocked in `recv` wakes more cheaply than
//! one parked in an event loop (BENCHMARKS.md, runs 3 and 4). The trade-off is one
//! call at a time per handle, and a [`Server`] that acknowledges one connection at a
//! time: use [`crate::client`] to pipeline calls or to serve concurrently.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut sb = flower_proto::blocking::Switchboard::connect("/run/flower/switchboard".as_ref())?;
//! let labels = [("app".to_owned(), "web".to_owned())].into();
//! let conn = sb.client_connect(&labels)?;
//! # drop(conn); Ok(()) }
//! ```

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{self, SockType};

use prost::Message;

use crate::client::{ConnectError, Connection};
use crate::fds::Fds;
use crate::frame::Kind;
use crate::rpc::{Method, Request};
use crate::switchboard as sb;
use crate::transport::{self, RecvError};
use crate::{Call, Code, Frame, Labels, Reply, Status, server};

/// How long a call waits for its reply unless [`Switchboard::set_timeout`] says
/// otherwise. The switchboard bounds its own calls to registrants, so this only
/// fires when the switchboard itself is stuck.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A blocking handle to a switchboard. Not shared between threads: calls take
/// `&mut self` because each waits for its own reply on the one socket.
#[derive(Debug)]
pub struct Switchboard {
    fd: OwnedFd,
    next_id: u64,
}

impl Switchboard {
    /// Connects to the switchboard listening at `path` (a handle with all rights).
    /// When `FLOWER_SWITCHBOARD_FD` is set, uses that inherited handle instead
    /// ([`crate::inherited`]).
    pub fn connect(path: &Path) -> Result<Switchboard, ConnectError> {
        if let Some(inherited) = crate::inherited::take() {
            return inherited
                .and_then(Switchboard::from_fd)
                .map_err(|error| ConnectError {
                    path: crate::inherited::ENV.into(),
                    error,
                });
        }
        match transport::connect_blocking(path, Some(DEFAULT_TIMEOUT)) {
            Ok(fd) => Ok(Switchboard { fd, next_id: 1 }),
            Err(error) => Err(ConnectError {
                path: path.to_owned(),
                error,
            }),
        }
    }

    /// Wraps a handle received from elsewhere (for example a constrained handle a
    /// container runtime passed in). Fails unless it is a SOCK_SEQPACKET socket.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Switchboard> {
        if socket::getsockopt(&fd, socket::sockopt::SockType)? != SockType::SeqPacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptor is not a SOCK_SEQPACKET socket",
            ));
        }
        transport::set_nonblocking(fd.as_fd(), false)?;
        let sb = Switchboard { fd, next_id: 1 };
        sb.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(sb)
    }

    /// Bounds how long each call may wait to send its request and for its reply
    /// (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        transport::set_timeouts(self.fd.as_fd(), timeout)
    }

    /// Connects to the one target matching `out_labels`, as
    /// [`crate::client::Switchboard::client_connect`] does.
    pub fn client_connect(&mut self, out_labels: &Labels) -> Result<Connection, Status> {
        let request = sb::ClientConnectRequest {
            out_labels: out_labels.clone(),
        };
        let (reply, mut fds) = self.call::<sb::rpc::ClientConnect>(&request)?;
        Ok(Connection {
            socket: fds.take(reply.server, "server")?,
            labels: reply.connection_labels,
        })
    }

    /// Registers a server under `in_labels`, as
    /// [`crate::client::Switchboard::server_start`] does; connections arrive through
    /// [`Server::accept`]. The target disappears when the `Server` is dropped.
    pub fn server_start(&mut self, in_labels: &Labels) -> Result<Server, Status> {
        let request = sb::ServerStartRequest {
            in_labels: in_labels.clone(),
        };
        let (reply, mut fds) = self.call::<sb::rpc::ServerStart>(&request)?;
        let fd = fds.take(reply.server, "server")?;
        transport::set_nonblocking(fd.as_fd(), false)
            .map_err(|e| Status::internal(format!("Cannot use the registration: {e}")))?;
        Ok(Server { fd })
    }

    /// One unary call with no descriptors in the request.
    fn call<M: Method>(&mut self, request: &M::Request) -> Result<(M::Response, Fds), Status> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = Frame {
            kind: Some(Kind::Call(Call {
                id,
                method: M::PATH.to_owned(),
                message: request.encode_to_vec(),
            })),
        };
        transport::send_blocking(self.fd.as_fd(), &frame.encode_to_vec(), &[])
            .map_err(|e| Status::unavailable(format!("Cannot reach the switchboard: {e}")))?;
        loop {
            let datagram = match transport::recv_blocking(self.fd.as_fd()) {
                Ok(Ok(Some(datagram))) => datagram,
                Ok(Ok(None)) => {
                    return Err(Status::unavailable("The switchboard closed the handle"));
                }
                Ok(Err(RecvError::Io(e))) | Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(Status::deadline_exceeded(format!(
                        "No reply from the switchboard to {}",
                        M::PATH
                    )));
                }
                Ok(Err(e)) => return Err(Status::internal(format!("Bad reply datagram: {e}"))),
                Err(e) => return Err(Status::unavailable(format!("Cannot read the reply: {e}"))),
            };
            let reply = match Frame::decode(&datagram.bytes[..]) {
                // A call on a handle is not ours to answer; its descriptors close here.
                Ok(Frame {
                    kind: Some(Kind::Reply(reply)),
                }) => reply,
                Ok(_) => continue,
                Err(e) => return Err(Status::internal(format!("Undecodable reply: {e}"))),
            };
            // A late reply to an earlier call that timed out: its descriptors close here.
            if reply.id != id {
                continue;
            }
            if reply.code != 0 {
                return Err(Status::new(Code::from_i32(reply.code), reply.error));
            }
            let malformed = |e: &dyn std::fmt::Display| {
                Status::internal(format!("Malformed {} reply: {e}", M::PATH))
            };
            let message = M::Response::decode(&reply.message[..]).map_err(|e| malformed(&e))?;
            let fds = Fds::claim(&message, datagram.fds).map_err(|e| malformed(&e))?;
            return Ok((message, fds));
        }
    }
}

/// A registered server that waits for connections in `recvmsg`.
#[derive(Debug)]
pub struct Server {
    fd: OwnedFd,
}

impl Server {
    /// Waits for the next connection and acknowledges it to the switchboard.
    /// Calls that are not a well-formed `Server.Connect` get an error reply and are
    /// skipped, as the async server does.
    pub fn accept(&mut self) -> Result<Connection, Status> {
        loop {
            let datagram = match transport::recv_blocking(self.fd.as_fd()) {
                Ok(Ok(Some(datagram))) => datagram,
                Ok(Ok(None)) => {
                    return Err(Status::unavailable(
                        "The switchboard closed the registration",
                    ));
                }
                Ok(Err(e)) => return Err(Status::internal(format!("Bad call datagram: {e}"))),
                Err(e) => return Err(Status::unavailable(format!("Cannot read a call: {e}"))),
            };
            let call = match Frame::decode(&datagram.bytes[..]) {
                Ok(Frame {
                    kind: Some(Kind::Call(call)),
                }) => call,
                Ok(_) => continue,
                Err(e) => return Err(Status::internal(format!("Undecodable call: {e}"))),
            };
            let request = Request {
                method: call.method,
                message: call.message,
                fds: datagram.fds,
            };
            let connection = if request.method == server::rpc::Connect::PATH {
                request
                    .decode::<server::rpc::Connect>()
                    .and_then(|(message, mut fds)| {
                        Ok(Connection {
                            socket: fds.take(message.client, "client")?,
                            labels: message.connection_labels,
                        })
                    })
            } else {
                Err(Status::unimplemented(format!(
                    "Unknown method {}",
                    request.method
                )))
            };
            let reply = match &connection {
                Ok(_) => Reply {
                    id: call.id,
                    ..Reply::default()
                },
                Err(status) => Reply {
                    id: call.id,
                    code: status.code as i32,
                    error: status.message.clone(),
                    ..Reply::default()
                },
            };
            let frame = Frame {
                kind: Some(Kind::Reply(reply)),
            };
            transport::send_blocking(self.fd.as_fd(), &frame.encode_to_vec(), &[])
                .map_err(|e| Status::unavailable(format!("Cannot acknowledge: {e}")))?;
            if let Ok(connection) = connection {
                return Ok(connection);
            }
        }
    }
}

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

use crate::client::{ConnectError, Connection, ServerOptions};
use crate::fds::Fds;
use crate::frame::{self, Kind};
use crate::rpc::{Method, Request};
use crate::switchboard::{self as sb, rpc::BlockingClient};
use crate::transport::{self, RecvError};
use crate::{Labels, Status, server};

/// How long a call waits for its reply unless [`Switchboard::set_timeout`] says
/// otherwise. The switchboard bounds its own calls to registrants, so this only
/// fires when the switchboard itself is stuck.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A blocking handle to a switchboard. Not shared between threads: calls take
/// `&mut self` because each waits for its own reply on the one socket.
#[derive(Debug)]
pub struct Switchboard {
    caller: Caller,
}

/// One call at a time over a blocking channel: sends the call, then reads until its
/// reply. The generated `rpc::BlockingClient` of each service calls through it.
#[derive(Debug)]
pub struct Caller {
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
            Ok(fd) => Ok(Switchboard {
                caller: Caller { fd, next_id: 1 },
            }),
            Err(error) => Err(ConnectError {
                path: path.to_owned(),
                error,
            }),
        }
    }

    /// Wraps a handle received from elsewhere (for example a constrained handle a
    /// container runtime passed in). Fails unless it is a SOCK_SEQPACKET socket.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Switchboard> {
        transport::check_socket(fd.as_fd(), transport::SocketKind::Channel)?;
        transport::set_nonblocking(fd.as_fd(), false)?;
        let sb = Switchboard {
            caller: Caller { fd, next_id: 1 },
        };
        sb.set_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(sb)
    }

    /// Bounds how long each call may wait to send its request and for its reply
    /// (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        transport::set_timeouts(self.caller.fd.as_fd(), timeout)
    }

    /// Connects to the one target matching `out_labels`, as
    /// [`crate::client::Switchboard::client_connect`] does.
    pub fn client_connect(&mut self, out_labels: &Labels) -> Result<Connection, Status> {
        let request = sb::ClientConnectRequest {
            out_labels: out_labels.clone(),
        };
        let (reply, mut fds) = self.rpc().client_connect(&request, Vec::new())?;
        Ok(Connection {
            socket: fds.take_connection(reply.server, "server")?,
            labels: reply.connection_labels,
        })
    }

    /// Registers a server under `in_labels`, as
    /// [`crate::client::Switchboard::server_start`] does; connections arrive through
    /// [`Server::accept`]. The target disappears when the `Server` is dropped.
    pub fn server_start(&mut self, in_labels: &Labels) -> Result<Server, Status> {
        self.server_start_with(in_labels, &ServerOptions::default())
    }

    /// [`Switchboard::server_start`] with options, as
    /// [`crate::client::Switchboard::server_start_with`].
    pub fn server_start_with(
        &mut self,
        in_labels: &Labels,
        options: &ServerOptions,
    ) -> Result<Server, Status> {
        let request = sb::ServerStartRequest {
            in_labels: in_labels.clone(),
            backlog: options.backlog,
        };
        let (reply, mut fds) = self.rpc().server_start(&request, Vec::new())?;
        let fd = fds.take_channel(reply.server, "server")?;
        transport::set_nonblocking(fd.as_fd(), false)
            .map_err(|e| Status::internal(format!("Cannot use the registration: {e}")))?;
        Ok(Server { fd })
    }

    /// Typed calls of the switchboard service, for what this API does not wrap.
    pub fn rpc(&mut self) -> BlockingClient<'_> {
        BlockingClient(&mut self.caller)
    }
}

impl Caller {
    /// One unary call of `M`; replies to earlier, abandoned calls are skipped.
    pub fn call<M: Method>(
        &mut self,
        request: &M::Request,
        fds: Vec<OwnedFd>,
    ) -> Result<(M::Response, Fds), Status> {
        let id = self.next_id;
        self.next_id += 1;
        let borrowed: Vec<_> = fds.iter().map(|fd| fd.as_fd()).collect();
        transport::send_blocking(self.fd.as_fd(), &frame::call::<M>(id, request), &borrowed)
            .map_err(|e| Status::unavailable(format!("Cannot reach the switchboard: {e}")))?;
        drop(fds);
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
            match frame::decode(&datagram.bytes) {
                // A late reply to an earlier call that timed out, or a call on a handle,
                // which is not ours to answer: its descriptors close here.
                Ok(Kind::Reply(reply)) if reply.id == id => {
                    return frame::reply_result::<M>(reply, datagram.fds);
                }
                Ok(_) | Err(frame::FrameError::Empty) => continue,
                Err(e) => return Err(Status::internal(format!("Bad reply: {e}"))),
            }
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
            let call = match frame::decode(&datagram.bytes) {
                Ok(Kind::Call(call)) => call,
                Ok(_) | Err(frame::FrameError::Empty) => continue,
                Err(e) => return Err(Status::internal(format!("Bad call: {e}"))),
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
                            socket: fds.take_connection(message.client, "client")?,
                            labels: message.connection_labels,
                        })
                    })
            } else {
                Err(Status::unimplemented(format!(
                    "Unknown method {}",
                    request.method
                )))
            };
            let answer = match &connection {
                Ok(_) => Ok(Vec::new()),
                Err(status) => Err(status.clone()),
            };
            let reply = frame::encode(Kind::Reply(frame::reply(call.id, answer, false)));
            transport::send_blocking(self.fd.as_fd(), &reply, &[])
                .map_err(|e| Status::unavailable(format!("Cannot acknowledge: {e}")))?;
            if let Ok(connection) = connection {
                return Ok(connection);
            }
        }
    }
}

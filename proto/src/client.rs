//! The async client library: what applications (and the `flower` tools) use to talk
//! to a switchboard.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use flower_proto::{Labels, client::Switchboard};
//! let sb = Switchboard::connect("/run/flower/switchboard".as_ref()).await?;
//! let labels = Labels::from([("app".into(), "web".into())]);
//! let conn = sb.client_connect(&labels).await?;
//! println!("connected with labels {:?}", conn.labels);
//! # Ok(()) }
//! ```
//!
//! **Where to run a hot loop.** A server's connections are handed over by its
//! registration's reader task. An `accept()` loop written straight in `block_on` (a
//! `#[tokio::main]` body) is then woken from another task on every connection, which
//! costs a poll of the reactor (an extra `epoll_wait`) on the current-thread runtime
//! and a thread wake-up (two `futex` calls) on the multi-thread one. Run such loops
//! in a spawned task, `tokio::spawn(async move { while let Some(c) = server.accept().await
//! { … } })`, and neither happens. The same holds for a client that connects in a
//! loop on the multi-thread runtime. (BENCHMARKS.md, "Connect path, third pass".)

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fds::{Fds, OutFds};
use crate::rpc::{Answer, Peer, Replies, Service};
use crate::switchboard::{self as sb, Right};
use crate::transport::Channel;
use crate::{Labels, Status, egress, resolver, server};

/// Incoming connections or egress requests queued before the application takes them.
const QUEUE: usize = 64;

/// Could not reach the switchboard at all.
#[derive(Debug, thiserror::Error)]
// The OS error is part of the message and deliberately not a `#[source]`, so
// error-chain printers (`{:#}`) do not repeat it.
#[error("cannot connect to the switchboard at {}: {error}", path.display())]
pub struct ConnectError {
    pub path: PathBuf,
    pub error: io::Error,
}

/// Either way of failing to get a usable handle.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Status(#[from] Status),
}

/// A handle to a switchboard: a capability with some rights and fixed labels.
#[derive(Clone)]
pub struct Switchboard {
    peer: Peer,
}

/// How a server registers (see [`Switchboard::server_start_with`]).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Like a TCP listen backlog: clients are handed their end as soon as this
    /// server's Connect is queued, without waiting for it to be taken. A connection
    /// the server then never takes ends for its client as end of stream.
    pub backlog: bool,
}

/// An established connection: the stream socket and the labels of the match.
#[derive(Debug)]
pub struct Connection {
    pub socket: OwnedFd,
    pub labels: Labels,
}

impl Switchboard {
    /// Connects to the switchboard listening at `path` (a handle with all rights).
    /// When `FLOWER_SWITCHBOARD_FD` is set, uses that inherited handle instead
    /// ([`crate::inherited`]).
    pub async fn connect(path: &Path) -> Result<Switchboard, ConnectError> {
        if let Some(inherited) = crate::inherited::take() {
            return inherited
                .and_then(Switchboard::from_fd)
                .map_err(|error| ConnectError {
                    path: PathBuf::from(crate::inherited::ENV),
                    error,
                });
        }
        let channel = Channel::connect(path).await.map_err(|error| ConnectError {
            path: path.to_owned(),
            error,
        })?;
        Ok(Switchboard::from_channel(channel))
    }

    /// Uses a handle received as a descriptor (e.g. from `constrain`, or passed in by a
    /// container runtime). Must be called inside a tokio runtime.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Switchboard> {
        Ok(Switchboard::from_channel(Channel::new(fd)?))
    }

    fn from_channel(channel: Channel) -> Switchboard {
        // Calls read their own replies: no reader task to wake per call.
        Switchboard {
            peer: Peer::client(channel),
        }
    }

    /// Derives a handle with `rights` (a subset of this handle's) and more fixed labels.
    pub async fn constrain(
        &self,
        rights: &[Right],
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> Result<Switchboard, Status> {
        let request = sb::ConstrainRequest {
            rights: rights.iter().map(|r| *r as i32).collect(),
            in_labels: in_labels.clone(),
            out_labels: out_labels.clone(),
        };
        let (reply, mut fds) = self.rpc().constrain(&request, Vec::new()).await?;
        let fd = fds.take(reply.switchboard, "switchboard")?;
        Switchboard::from_fd(fd)
            .map_err(|e| Status::internal(format!("Constrained handle unusable: {e}")))
    }

    /// Connects to the one target matching `out_labels`.
    pub async fn client_connect(&self, out_labels: &Labels) -> Result<Connection, Status> {
        let request = sb::ClientConnectRequest {
            out_labels: out_labels.clone(),
        };
        let (reply, mut fds) = self.rpc().client_connect(&request, Vec::new()).await?;
        Ok(Connection {
            // Checked even though the switchboard checks it: a constrained handle may
            // come from anyone. Two getsockopt() calls per connect.
            socket: fds.take_connection(reply.server, "server")?,
            labels: reply.connection_labels,
        })
    }

    /// Hands an accepted socket to the one server matching `out_labels`; returns the
    /// connection labels.
    pub async fn ingress_connect(
        &self,
        client: OwnedFd,
        out_labels: &Labels,
    ) -> Result<Labels, Status> {
        let mut fds = OutFds::new();
        let request = sb::IngressConnectRequest {
            client: fds.push(client),
            out_labels: out_labels.clone(),
        };
        let (reply, _) = self.rpc().ingress_connect(&request, fds.into_vec()).await?;
        Ok(reply.connection_labels)
    }

    /// Registers a server under `in_labels`; connections arrive through the returned
    /// [`Server`]. The target disappears when the `Server` is dropped.
    pub async fn server_start(&self, in_labels: &Labels) -> Result<Server, Status> {
        self.server_start_with(in_labels, &ServerOptions::default())
            .await
    }

    /// [`Switchboard::server_start`] with options.
    pub async fn server_start_with(
        &self,
        in_labels: &Labels,
        options: &ServerOptions,
    ) -> Result<Server, Status> {
        let request = sb::ServerStartRequest {
            in_labels: in_labels.clone(),
            backlog: options.backlog,
        };
        let (reply, mut fds) = self.rpc().server_start(&request, Vec::new()).await?;
        let (tx, incoming) = mpsc::channel(QUEUE);
        let service = Arc::new(server::rpc::Serve(ServerService { tx }));
        let peer = registration(fds.take(reply.server, "server")?, service)?;
        Ok(Server { incoming, peer })
    }

    /// Registers an egress under `in_labels`; connect requests arrive through the
    /// returned [`Egress`]. The target disappears when the `Egress` is dropped.
    pub async fn egress_start(&self, in_labels: &Labels) -> Result<Egress, Status> {
        let request = sb::EgressStartRequest {
            in_labels: in_labels.clone(),
        };
        let (reply, mut fds) = self.rpc().egress_start(&request, Vec::new()).await?;
        pending_registration(fds.take(reply.egress, "egress")?, egress::rpc::Serve)
    }

    /// Registers a resolver for connects that carry every key in `resolve_keys` and
    /// do not contradict `in_labels`; `out_labels` are forced onto its answers. The
    /// labels fixed on this handle are its scope: it applies only to connects that
    /// carry all of them.
    /// Requests arrive through the returned [`Resolver`].
    pub async fn resolver_start(
        &self,
        resolve_keys: &[&str],
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> Result<Resolver, Status> {
        let request = sb::ResolverStartRequest {
            resolve_labels: resolve_keys.iter().map(|k| k.to_string()).collect(),
            in_labels: in_labels.clone(),
            out_labels: out_labels.clone(),
        };
        let (reply, mut fds) = self.rpc().resolver_start(&request, Vec::new()).await?;
        pending_registration(fds.take(reply.resolver, "resolver")?, resolver::rpc::Serve)
    }

    /// Streams the label sets of all targets matching `out_labels`. A refused call
    /// (e.g. missing right) fails here rather than on the first item.
    pub async fn list(&self, out_labels: &Labels) -> Result<TargetList, Status> {
        let request = sb::ListRequest {
            out_labels: out_labels.clone(),
        };
        let mut replies = self.rpc().list(&request).await?;
        let first = replies
            .next()
            .await
            .transpose()?
            .map(|(reply, _)| reply.labels);
        Ok(TargetList { first, replies })
    }

    /// Whether the channel to the switchboard is gone (it exited or revoked the handle).
    pub fn is_closed(&self) -> bool {
        self.peer.is_closed()
    }

    /// Connects to `path` and constrains the handle to `rights` with in = out = `labels`,
    /// as the tools do.
    pub async fn connect_as(
        path: &Path,
        rights: &[Right],
        labels: &Labels,
    ) -> Result<Switchboard, ClientError> {
        let root = Switchboard::connect(path).await?;
        Ok(root.constrain(rights, labels, labels).await?)
    }

    /// The underlying RPC peer.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Typed calls of the switchboard service, for what this API does not wrap.
    pub fn rpc(&self) -> sb::rpc::Client<'_> {
        sb::rpc::Client(&self.peer)
    }
}

fn registration(fd: OwnedFd, service: Arc<dyn Service>) -> Result<Peer, Status> {
    let channel = Channel::new(fd)
        .map_err(|e| Status::internal(format!("Registration channel unusable: {e}")))?;
    Ok(Peer::spawn(
        channel,
        Some(service),
        &CancellationToken::new(),
    ))
}

/// Serves a registration channel whose calls wait for the application's answer:
/// `serve` wraps the queue in the generated service adapter.
fn pending_registration<A: Send + 'static, S: Service>(
    fd: OwnedFd,
    serve: fn(Queue<A>) -> S,
) -> Result<Registration<A>, Status> {
    let (tx, requests) = mpsc::channel(QUEUE);
    let peer = registration(fd, Arc::new(serve(Queue { tx })))?;
    Ok(Registration { requests, peer })
}

/// The label sets streamed by [`Switchboard::list`].
pub struct TargetList {
    first: Option<Labels>,
    replies: Replies<sb::rpc::List>,
}

impl TargetList {
    pub async fn next(&mut self) -> Option<Result<Labels, Status>> {
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        Some(self.replies.next().await?.map(|(reply, _)| reply.labels))
    }
}

/// A registered server.
pub struct Server {
    incoming: mpsc::Receiver<Connection>,
    peer: Peer,
}

impl Server {
    /// The next client connection; `None` once the switchboard closed the registration
    /// and the connections it had handed over are taken. (The queue's sender lives in
    /// the registration's service, which goes when its reader ends: no waiter for the
    /// close is polled on every accept.)
    pub async fn accept(&mut self) -> Option<Connection> {
        self.incoming.recv().await
    }

    /// Resolves when the switchboard closed the registration (it exited or revoked it).
    pub async fn closed(&self) {
        self.peer.closed().await
    }
}

struct ServerService {
    tx: mpsc::Sender<Connection>,
}

impl server::rpc::Server for ServerService {
    async fn connect(
        &self,
        message: server::ConnectRequest,
        mut fds: Fds,
    ) -> Answer<server::ConnectResponse> {
        // Checked even though the switchboard checks it: the registration may
        // come from anyone. Two getsockopt() calls per connection.
        let socket = fds.take_connection(message.client, "client")?;
        let connection = Connection {
            socket,
            labels: message.connection_labels,
        };
        self.tx
            .send(connection)
            .await
            .map_err(|_| Status::unavailable("Server is no longer accepting"))?;
        Ok((server::ConnectResponse {}, OutFds::new()))
    }
}

/// A registration whose calls wait for the application's answer: an [`Egress`] or a
/// [`Resolver`].
pub struct Registration<A> {
    requests: mpsc::Receiver<Pending<A>>,
    peer: Peer,
}

/// A registered egress: answer each request with a connected socket.
pub type Egress = Registration<OwnedFd>;
/// One `Egress.Connect`; `labels` are the connection labels.
pub type EgressRequest = Pending<OwnedFd>;
/// A registered resolver: answer each request with weighted targets.
pub type Resolver = Registration<resolver::ResolveResponse>;
/// One `Resolver.Resolve`; `labels` are the labels to resolve.
pub type ResolveRequest = Pending<resolver::ResolveResponse>;

impl<A> Registration<A> {
    /// The next request; `None` once the switchboard closed the registration and the
    /// requests it had sent are taken (see [`Server::accept`]).
    pub async fn next(&mut self) -> Option<Pending<A>> {
        self.requests.recv().await
    }

    /// Resolves when the switchboard closed the registration.
    pub async fn closed(&self) {
        self.peer.closed().await
    }
}

/// A call from the switchboard: answer it with [`Pending::respond`] (dropping it
/// answers `UNAVAILABLE`).
pub struct Pending<A> {
    pub labels: Labels,
    reply: oneshot::Sender<Result<A, Status>>,
}

impl<A> Pending<A> {
    pub fn respond(self, result: Result<A, Status>) {
        let _ = self.reply.send(result);
    }
}

/// Queues each call of a registration for the application and waits for its answer.
struct Queue<A> {
    tx: mpsc::Sender<Pending<A>>,
}

impl<A> Queue<A> {
    async fn ask(&self, labels: Labels) -> Result<A, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { labels, reply })
            .await
            .map_err(|_| Status::unavailable("Registrant is no longer accepting"))?;
        rx.await
            .map_err(|_| Status::unavailable("Registrant dropped the request"))?
    }
}

impl egress::rpc::Egress for Queue<OwnedFd> {
    async fn connect(
        &self,
        message: egress::ConnectRequest,
        _: Fds,
    ) -> Answer<egress::ConnectResponse> {
        let socket = self.ask(message.connection_labels).await?;
        let mut fds = OutFds::new();
        let server = fds.push(socket);
        Ok((egress::ConnectResponse { server }, fds))
    }
}

impl resolver::rpc::Resolver for Queue<resolver::ResolveResponse> {
    async fn resolve(
        &self,
        message: resolver::ResolveRequest,
        _: Fds,
    ) -> Answer<resolver::ResolveResponse> {
        Ok((self.ask(message.resolve_labels).await?, OutFds::new()))
    }
}

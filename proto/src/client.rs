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

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::fds::OutFds;
use crate::rpc::{Method, Peer, Replies, Request, Response, Service, StreamSink};
use crate::switchboard::{self as sb, Right};
use crate::transport::Channel;
use crate::{Labels, Status, egress, server};

/// Incoming connections or egress requests queued before the application takes them.
const QUEUE: usize = 64;

/// Could not reach the switchboard at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the switchboard at {}: {source}", path.display())]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
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

/// An established connection: the stream socket and the labels of the match.
#[derive(Debug)]
pub struct Connection {
    pub socket: OwnedFd,
    pub labels: Labels,
}

impl Switchboard {
    /// Connects to the switchboard listening at `path` (a handle with all rights).
    pub async fn connect(path: &Path) -> Result<Switchboard, ConnectError> {
        let channel = Channel::connect(path)
            .await
            .map_err(|source| ConnectError {
                path: path.to_owned(),
                source,
            })?;
        Ok(Switchboard::from_channel(channel))
    }

    /// Uses a handle received as a descriptor (e.g. from `constrain`, or passed in by a
    /// container runtime). Must be called inside a tokio runtime.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Switchboard> {
        Ok(Switchboard::from_channel(Channel::new(fd)?))
    }

    fn from_channel(channel: Channel) -> Switchboard {
        Switchboard {
            peer: Peer::spawn(channel, None, &CancellationToken::new()),
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
        let (reply, mut fds) = self
            .peer
            .call::<sb::rpc::Constrain>(&request, Vec::new())
            .await?;
        let fd = fds.take(reply.switchboard, "switchboard")?;
        Switchboard::from_fd(fd)
            .map_err(|e| Status::internal(format!("Constrained handle unusable: {e}")))
    }

    /// Connects to the one target matching `out_labels`.
    pub async fn client_connect(&self, out_labels: &Labels) -> Result<Connection, Status> {
        let request = sb::ClientConnectRequest {
            out_labels: out_labels.clone(),
        };
        let (reply, mut fds) = self
            .peer
            .call::<sb::rpc::ClientConnect>(&request, Vec::new())
            .await?;
        Ok(Connection {
            socket: fds.take_socket(reply.server, "server")?,
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
        let (reply, _) = self
            .peer
            .call::<sb::rpc::IngressConnect>(&request, fds.into_vec())
            .await?;
        Ok(reply.connection_labels)
    }

    /// Registers a server under `in_labels`; connections arrive through the returned
    /// [`Server`]. The target disappears when the `Server` is dropped.
    pub async fn server_start(&self, in_labels: &Labels) -> Result<Server, Status> {
        let request = sb::ServerStartRequest {
            in_labels: in_labels.clone(),
        };
        let (reply, mut fds) = self
            .peer
            .call::<sb::rpc::ServerStart>(&request, Vec::new())
            .await?;
        let (tx, incoming) = mpsc::channel(QUEUE);
        let peer = registration(
            fds.take(reply.server, "server")?,
            Arc::new(ServerService { tx }),
        )?;
        Ok(Server { incoming, peer })
    }

    /// Registers an egress under `in_labels`; connect requests arrive through the
    /// returned [`Egress`]. The target disappears when the `Egress` is dropped.
    pub async fn egress_start(&self, in_labels: &Labels) -> Result<Egress, Status> {
        let request = sb::EgressStartRequest {
            in_labels: in_labels.clone(),
        };
        let (reply, mut fds) = self
            .peer
            .call::<sb::rpc::EgressStart>(&request, Vec::new())
            .await?;
        let (tx, requests) = mpsc::channel(QUEUE);
        let peer = registration(
            fds.take(reply.egress, "egress")?,
            Arc::new(EgressService { tx }),
        )?;
        Ok(Egress { requests, peer })
    }

    /// Streams the label sets of all targets matching `out_labels`. A refused call
    /// (e.g. missing right) fails here rather than on the first item.
    pub async fn list(&self, out_labels: &Labels) -> Result<TargetList, Status> {
        let request = sb::ListRequest {
            out_labels: out_labels.clone(),
        };
        let mut replies = self.peer.call_streaming::<sb::rpc::List>(&request).await?;
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

    /// The underlying RPC peer, for calls this API does not wrap.
    pub fn peer(&self) -> &Peer {
        &self.peer
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
    /// The next client connection; `None` once the switchboard closed the registration.
    pub async fn accept(&mut self) -> Option<Connection> {
        tokio::select! {
            c = self.incoming.recv() => c,
            () = self.peer.closed() => self.incoming.try_recv().ok(),
        }
    }

    /// Resolves when the switchboard closed the registration (it exited or revoked it).
    pub async fn closed(&self) {
        self.peer.closed().await
    }
}

struct ServerService {
    tx: mpsc::Sender<Connection>,
}

impl Service for ServerService {
    fn call(
        self: Arc<Self>,
        request: Request,
        _: StreamSink,
    ) -> BoxFuture<'static, Result<Response, Status>> {
        Box::pin(async move {
            expect_method::<server::rpc::Connect>(&request)?;
            let (message, mut fds) = request.decode::<server::rpc::Connect>()?;
            let socket = fds.take_socket(message.client, "client")?;
            let connection = Connection {
                socket,
                labels: message.connection_labels,
            };
            self.tx
                .send(connection)
                .await
                .map_err(|_| Status::unavailable("Server is no longer accepting"))?;
            Ok(Response::new(&server::ConnectResponse {}, Vec::new()))
        })
    }
}

/// A registered egress.
pub struct Egress {
    requests: mpsc::Receiver<EgressRequest>,
    peer: Peer,
}

impl Egress {
    /// The next connect request; `None` once the switchboard closed the registration.
    pub async fn next(&mut self) -> Option<EgressRequest> {
        tokio::select! {
            r = self.requests.recv() => r,
            () = self.peer.closed() => self.requests.try_recv().ok(),
        }
    }

    pub async fn closed(&self) {
        self.peer.closed().await
    }
}

/// One `Egress.Connect`: answer it with the connected socket or an error.
pub struct EgressRequest {
    pub labels: Labels,
    reply: oneshot::Sender<Result<OwnedFd, Status>>,
}

impl EgressRequest {
    pub fn respond(self, result: Result<OwnedFd, Status>) {
        let _ = self.reply.send(result);
    }
}

struct EgressService {
    tx: mpsc::Sender<EgressRequest>,
}

impl Service for EgressService {
    fn call(
        self: Arc<Self>,
        request: Request,
        _: StreamSink,
    ) -> BoxFuture<'static, Result<Response, Status>> {
        Box::pin(async move {
            expect_method::<egress::rpc::Connect>(&request)?;
            let (message, _) = request.decode::<egress::rpc::Connect>()?;
            let (reply, rx) = oneshot::channel();
            let request = EgressRequest {
                labels: message.connection_labels,
                reply,
            };
            self.tx
                .send(request)
                .await
                .map_err(|_| Status::unavailable("Egress is no longer accepting"))?;
            let socket = rx
                .await
                .map_err(|_| Status::unavailable("Egress dropped the request"))??;
            let mut fds = OutFds::new();
            let response = egress::ConnectResponse {
                server: fds.push(socket),
            };
            Ok(Response::new(&response, fds.into_vec()))
        })
    }
}

fn expect_method<M: Method>(request: &Request) -> Result<(), Status> {
    if request.method == M::PATH {
        Ok(())
    } else {
        Err(Status::unimplemented(format!(
            "Unknown method {}",
            request.method
        )))
    }
}

//! A switchboard handle: the service answering calls on one switchboard channel.
//!
//! A handle is a capability: `rights`, plus `in_labels` forced onto everything it
//! registers and `out_labels` forced onto everything it connects to or lists. It sits
//! in a *scope* (a cancellation token): handles derived by Constrain and targets
//! registered through a handle live in child scopes, so revoking a scope closes every
//! channel and removes every target descended from it, without walking anything.

use std::sync::Arc;

use flower_proto::fds::{Fds, OutFds};
use flower_proto::rpc::{Method, Peer, Request, Response, Service, StreamSink};
use flower_proto::switchboard::{self as sb, Right, rpc};
use flower_proto::transport::{Channel, stream_pair};
use flower_proto::{Code, Labels, Status, egress, server};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::directory::{Lookup, TargetId};
use crate::labels::{conflicting_keys, key_list, merge_fixed};
use crate::rights::Rights;
use crate::{Shared, TargetEntry, TargetKind};

pub(crate) struct Handle {
    pub shared: Arc<Shared>,
    pub rights: Rights,
    pub in_labels: Labels,
    pub out_labels: Labels,
    pub scope: CancellationToken,
}

impl Service for Handle {
    fn call(
        self: Arc<Self>,
        request: Request,
        stream: StreamSink,
    ) -> BoxFuture<'static, Result<Response, Status>> {
        Box::pin(async move {
            match request.method.as_str() {
                rpc::Constrain::PATH => self.constrain(request),
                rpc::ClientConnect::PATH => self.client_connect(request).await,
                rpc::IngressConnect::PATH => self.ingress_connect(request).await,
                rpc::ServerStart::PATH => self.register(request, TargetKind::Server),
                rpc::EgressStart::PATH => self.register(request, TargetKind::Egress),
                rpc::ResolverStart::PATH => {
                    self.rights.require_one(Right::ResolverStart)?;
                    Err(Status::unimplemented("Resolvers are not implemented yet"))
                }
                rpc::List::PATH => self.list(request, stream).await,
                other => Err(Status::unimplemented(format!("Unknown method {other}"))),
            }
        })
    }
}

impl Handle {
    fn constrain(&self, request: Request) -> Result<Response, Status> {
        let (req, _) = request.decode::<rpc::Constrain>()?;
        let rights = Rights::from_wire(&req.rights)?;
        self.rights.require(rights)?;
        let in_labels = merge_fixed(&self.in_labels, &req.in_labels, "In")?;
        let out_labels = merge_fixed(&self.out_labels, &req.out_labels, "Out")?;
        let (channel, theirs) = Channel::pair()
            .map_err(|e| Status::resource_exhausted(format!("Cannot create a handle: {e}")))?;
        let child = Handle {
            shared: self.shared.clone(),
            rights,
            in_labels,
            out_labels,
            scope: self.scope.child_token(),
        };
        child.serve(channel);
        let mut fds = OutFds::new();
        Ok(Response::new(
            &sb::ConstrainResponse {
                switchboard: fds.push(theirs),
            },
            fds.into_vec(),
        ))
    }

    /// Serves `channel` as this handle until it closes or the scope is revoked.
    pub fn serve(self, channel: Channel) {
        let scope = self.scope.clone();
        Peer::serve(channel, Arc::new(self), &scope);
    }

    fn register(&self, request: Request, kind: TargetKind) -> Result<Response, Status> {
        self.rights.require_one(match kind {
            TargetKind::Server => Right::ServerStart,
            TargetKind::Egress => Right::EgressStart,
        })?;
        let requested = match kind {
            TargetKind::Server => request.decode::<rpc::ServerStart>()?.0.in_labels,
            TargetKind::Egress => request.decode::<rpc::EgressStart>()?.0.in_labels,
        };
        let labels = merge_fixed(&self.in_labels, &requested, "In")?;
        let (channel, theirs) = Channel::pair().map_err(|e| {
            Status::resource_exhausted(format!("Cannot create a registration channel: {e}"))
        })?;
        // The registration lives in the handle's scope, not the handle channel's: a
        // server may close its handle and keep serving; revoking the scope removes it.
        let peer = Peer::spawn(channel, None, &self.scope);
        let id = self
            .shared
            .directory
            .lock()
            .unwrap()
            .insert(
                labels,
                TargetEntry {
                    kind,
                    peer: peer.clone(),
                },
            )
            .map_err(|_| {
                Status::failed_precondition("Another target with no conflicting labels exists")
            })?;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            peer.closed().await;
            shared.directory.lock().unwrap().remove(id);
            tracing::debug!(id, "target removed");
        });
        let mut fds = OutFds::new();
        let fd = fds.push(theirs);
        let response = match kind {
            TargetKind::Server => {
                Response::new(&sb::ServerStartResponse { server: fd }, fds.into_vec())
            }
            TargetKind::Egress => {
                Response::new(&sb::EgressStartResponse { egress: fd }, fds.into_vec())
            }
        };
        Ok(response)
    }

    /// Looks up the one target for `out` (request labels merged onto the handle's).
    fn resolve(&self, requested: &Labels) -> Result<(TargetEntry, Labels), Status> {
        let out = merge_fixed(&self.out_labels, requested, "Out")?;
        let mut directory = self.shared.directory.lock().unwrap();
        let id: TargetId = match directory.lookup(&out) {
            Lookup::NotFound => return Err(Status::not_found("No matching target found")),
            Lookup::Found(id) => id,
            Lookup::Ambiguous(a, b) => {
                let (a, b) = (directory.get(a).unwrap(), directory.get(b).unwrap());
                return Err(Status::failed_precondition(format!(
                    "Labels match multiple targets, which can be resolved by adding one of the labels {}",
                    key_list(&conflicting_keys(&a.labels, &b.labels))
                )));
            }
        };
        let target = directory.get(id).unwrap();
        let mut connection_labels = out;
        connection_labels.extend(target.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok((target.value.clone(), connection_labels))
    }

    async fn client_connect(&self, request: Request) -> Result<Response, Status> {
        self.rights.require_one(Right::ClientConnect)?;
        let (req, _) = request.decode::<rpc::ClientConnect>()?;
        let (target, labels) = self.resolve(&req.out_labels)?;
        let socket = match target.kind {
            TargetKind::Server => {
                let (ours, theirs) = stream_pair().map_err(|e| {
                    Status::resource_exhausted(format!("Cannot create a connection: {e}"))
                })?;
                self.server_connect(&target.peer, theirs, labels.clone())
                    .await?;
                ours
            }
            TargetKind::Egress => {
                let request = egress::ConnectRequest {
                    connection_labels: labels.clone(),
                };
                let (reply, mut fds) = self
                    .call_target::<egress::rpc::Connect>(&target.peer, &request, Vec::new())
                    .await?;
                take_target_socket(&mut fds, reply.server)?
            }
        };
        let mut fds = OutFds::new();
        let response = sb::ClientConnectResponse {
            server: fds.push(socket),
            connection_labels: labels,
        };
        Ok(Response::new(&response, fds.into_vec()))
    }

    async fn ingress_connect(&self, request: Request) -> Result<Response, Status> {
        self.rights.require_one(Right::IngressConnect)?;
        let (req, mut fds) = request.decode::<rpc::IngressConnect>()?;
        let client = fds.take_socket(req.client, "client")?;
        let (target, labels) = self.resolve(&req.out_labels)?;
        match target.kind {
            TargetKind::Server => {
                self.server_connect(&target.peer, client, labels.clone())
                    .await?
            }
            TargetKind::Egress => {
                return Err(Status::failed_precondition(
                    "Cannot connect an ingress with an egress",
                ));
            }
        }
        Ok(Response::new(
            &sb::IngressConnectResponse {
                connection_labels: labels,
            },
            Vec::new(),
        ))
    }

    async fn server_connect(
        &self,
        server: &Peer,
        client: std::os::fd::OwnedFd,
        labels: Labels,
    ) -> Result<(), Status> {
        let mut fds = OutFds::new();
        let request = server::ConnectRequest {
            client: fds.push(client),
            connection_labels: labels,
        };
        self.call_target::<server::rpc::Connect>(server, &request, fds.into_vec())
            .await
            .map(drop)
    }

    /// A call to a registrant, bounded by the configured timeout.
    async fn call_target<M: Method>(
        &self,
        target: &Peer,
        request: &M::Request,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(M::Response, Fds), Status> {
        let timeout = self.shared.config.call_timeout;
        match tokio::time::timeout(timeout, target.call::<M>(request, fds)).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "Target did not answer within {timeout:?}"
            ))),
            Ok(Err(status)) if status.code == Code::Unavailable && target.is_closed() => {
                Err(Status::unavailable("Target went away during the call"))
            }
            Ok(result) => result,
        }
    }

    async fn list(&self, request: Request, stream: StreamSink) -> Result<Response, Status> {
        self.rights.require_one(Right::List)?;
        let (req, _) = request.decode::<rpc::List>()?;
        let out = merge_fixed(&self.out_labels, &req.out_labels, "Out")?;
        let all: Vec<Labels> = {
            let mut directory = self.shared.directory.lock().unwrap();
            let ids = directory.matching(&out);
            ids.into_iter()
                .map(|id| directory.get(id).unwrap().labels.clone())
                .collect()
        };
        for labels in all {
            stream.send(&sb::ListResponse { labels }).await?;
        }
        Ok(Response::default())
    }
}

/// The socket an egress returned, checked to be a socket before a client gets it.
fn take_target_socket(
    fds: &mut Fds,
    field: Option<flower_proto::Fd>,
) -> Result<std::os::fd::OwnedFd, Status> {
    fds.take_socket(field, "server")
        .map_err(|e| Status::internal(format!("Egress replied badly: {e}")))
}

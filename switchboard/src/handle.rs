//! A switchboard handle: the service answering calls on one switchboard channel.
//!
//! A handle is a capability: `rights`, plus `in_labels` forced onto everything it
//! registers and `out_labels` forced onto everything it connects to or lists. It sits
//! in a *scope* (a cancellation token): handles derived by Constrain and targets
//! registered through a handle share its scope, so revoking a scope closes every
//! channel and removes every target descended from it, without walking anything.
//! (Only the embedder revokes scopes, one per handle it made, so derived handles need
//! no token of their own: sharing saves a tree node per handle.)

use std::os::fd::OwnedFd;
use std::sync::Arc;

use flower_proto::fds::{Fds, OutFds};
use flower_proto::rpc::{Answer, Method, Peer, Stream};
use flower_proto::switchboard::{self as sb, Right, rpc};
use flower_proto::transport::Channel;
use flower_proto::{Code, Labels, Status, egress, resolver, server};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::directory::{Lookup, TargetId};
use crate::labels::{
    FixedLabels, conflicting_keys, derive_fixed, key_list, merge, merge_fixed, validate,
};
use crate::quota::{Quota, Ticket};
use crate::resolvers::{MAX_TARGETS, Resolver, attempt_order};
use crate::rights::Rights;
use crate::scope::HandleCount;
use crate::{Registrant, State, TargetKind};

/// Target ids a List holds at a time.
const LIST_PAGE: usize = 64;

pub(crate) struct Handle {
    pub shared: Arc<State>,
    pub rights: Rights,
    pub in_labels: FixedLabels,
    pub out_labels: FixedLabels,
    pub scope: CancellationToken,
    /// What handles derived from this one and registrations made through it are
    /// charged to.
    pub quota: Arc<Quota>,
    /// This handle's own unit of `quota`.
    pub _ticket: Ticket,
    /// Set when the embedder counts this scope (a pod's): released on drop.
    pub counted: Option<HandleCount>,
}

/// The switchboard service on one handle's channel. Every method checks its right
/// first; the generated `rpc::Serve` has already decoded the request.
impl rpc::Switchboard for Handle {
    async fn constrain(&self, req: sb::ConstrainRequest, _: Fds) -> Answer<sb::ConstrainResponse> {
        let (rights, in_labels, out_labels) =
            constrained(self.rights, &self.in_labels, &self.out_labels, &req)?;
        self.quota.pace().await;
        let ticket = self.quota.acquire()?;
        let counted = self
            .counted
            .as_ref()
            .map(HandleCount::another)
            .transpose()?;
        let (channel, theirs) =
            Channel::pair().map_err(|e| exhausted("Cannot create a handle", &e))?;
        let child = Handle {
            shared: self.shared.clone(),
            rights,
            in_labels,
            out_labels,
            scope: self.scope.clone(),
            quota: self.quota.clone(),
            _ticket: ticket,
            counted,
        };
        child.serve(channel);
        let mut fds = OutFds::new();
        let switchboard = fds.push(theirs);
        Ok((sb::ConstrainResponse { switchboard }, fds))
    }

    async fn client_connect(
        &self,
        req: sb::ClientConnectRequest,
        _: Fds,
    ) -> Answer<sb::ClientConnectResponse> {
        self.rights.require_one(Right::ClientConnect)?;
        let deadline = self.connect_deadline();
        let candidates = self.candidates(&req.out_labels, deadline).await?;
        // Every attempt has its own socketpair, so any failure may move on.
        let out_of_time = |_: &Status| Instant::now() >= deadline;
        let result = first_success(candidates, out_of_time, |out, _| {
            self.client_connect_to(out, deadline)
        })
        .await;
        if let Err(status) = &result {
            tracing::debug!(labels = ?req.out_labels, "connect failed: {status}");
        }
        result
    }

    async fn ingress_connect(
        &self,
        req: sb::IngressConnectRequest,
        mut fds: Fds,
    ) -> Answer<sb::IngressConnectResponse> {
        self.rights.require_one(Right::IngressConnect)?;
        let client = fds.take_connection(req.client, "client")?;
        let deadline = self.connect_deadline();
        let candidates = self.candidates(&req.out_labels, deadline).await?;
        let mut client = Some(client);
        // A server that timed out may still take the duplicate it was sent; offering
        // the same TCP connection to a second server would let two servers share it.
        let delivered = |status: &Status| status.code == Code::DeadlineExceeded;
        let labels = first_success(candidates, delivered, |out, last| {
            // Every attempt but the last gets a duplicate, so a refusal leaves us the
            // socket to offer the next candidate.
            let socket = match last {
                true => Ok(client.take().expect("one last attempt")),
                false => client
                    .as_ref()
                    .expect("socket kept")
                    .try_clone()
                    .map_err(|e| exhausted("Cannot duplicate the client", &e)),
            };
            async move { self.ingress_connect_to(socket?, out, deadline).await }
        })
        .await?;
        let response = sb::IngressConnectResponse {
            connection_labels: labels,
        };
        Ok((response, OutFds::new()))
    }

    async fn server_start(
        &self,
        req: sb::ServerStartRequest,
        _: Fds,
    ) -> Answer<sb::ServerStartResponse> {
        self.rights.require_one(Right::ServerStart)?;
        self.quota.pace().await;
        let (server, fds) = self.register(req.in_labels, TargetKind::Server, req.backlog)?;
        Ok((sb::ServerStartResponse { server }, fds))
    }

    async fn egress_start(
        &self,
        req: sb::EgressStartRequest,
        _: Fds,
    ) -> Answer<sb::EgressStartResponse> {
        self.rights.require_one(Right::EgressStart)?;
        self.quota.pace().await;
        let (egress, fds) = self.register(req.in_labels, TargetKind::Egress, false)?;
        Ok((sb::EgressStartResponse { egress }, fds))
    }

    async fn resolver_start(
        &self,
        req: sb::ResolverStartRequest,
        _: Fds,
    ) -> Answer<sb::ResolverStartResponse> {
        self.rights.require_one(Right::ResolverStart)?;
        let mut keys = req.resolve_labels;
        if keys.is_empty() {
            return Err(Status::invalid_argument("Resolve labels must not be empty"));
        }
        if keys.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("Label keys must not be empty"));
        }
        keys.sort_unstable();
        keys.dedup();
        let in_labels = merge_fixed(&self.in_labels, &req.in_labels, "In")?;
        let out_labels = merge_fixed(&self.out_labels, &req.out_labels, "Out")?;
        self.quota.pace().await;
        let counted = self.quota.target()?;
        let (peer, theirs, ticket) = self.registration_channel()?;
        // The labels fixed on this handle are the resolver's scope: it only ever
        // applies to connects that carry them (docs/PROTOCOL.md, "Resolvers").
        let scope = self.in_labels.to_labels();
        let resolver = Arc::new(Resolver::new(peer.clone(), keys.into(), scope, out_labels));
        let id = self
            .shared
            .resolvers
            .lock()
            .unwrap()
            .insert(in_labels, resolver.clone())
            .map_err(|()| {
                Status::failed_precondition(
                    "Another resolver with the same resolve labels and no conflicting labels exists",
                )
            })?;
        let shared = self.shared.clone();
        // Not the resolver itself: it holds the peer this callback is stored in.
        let group = (resolver.keys.clone(), resolver.scope.clone());
        drop(resolver);
        peer.on_close(move || {
            shared.resolvers.lock().unwrap().remove(&group, id);
            drop(ticket);
            drop(counted);
            tracing::debug!(id, "resolver removed");
        });
        let mut fds = OutFds::new();
        let resolver = fds.push(theirs);
        Ok((sb::ResolverStartResponse { resolver }, fds))
    }

    async fn list(
        &self,
        req: sb::ListRequest,
        _: Fds,
        stream: Stream<sb::ListResponse>,
    ) -> Result<(), Status> {
        self.rights.require_one(Right::List)?;
        let out = merge_fixed(&self.out_labels, &req.out_labels, "Out")?;
        // A page of ids at a time, then one target's labels at a time: a call holds
        // at most LIST_PAGE ids and one target's labels, however many targets match,
        // and waits (with backpressure, cut off after the channel's send timeout) for
        // the reader to take each. Targets go out oldest first, those registered
        // before the List began (so it ends, however fast others register); one
        // removed meanwhile is skipped.
        let newest = self.shared.directory.lock().unwrap().newest();
        let mut after = 0;
        while after < newest {
            let mut page = self
                .shared
                .directory
                .lock()
                .unwrap()
                .matching_after(&out, after, LIST_PAGE);
            page.retain(|&id| id <= newest);
            let Some(&last) = page.last() else { break };
            for id in page {
                let Some(labels) = self
                    .shared
                    .directory
                    .lock()
                    .unwrap()
                    .get(id)
                    .map(|t| t.labels.clone())
                else {
                    continue;
                };
                stream.send(&sb::ListResponse { labels }).await?;
            }
            after = last;
        }
        Ok(())
    }
}

impl Handle {
    /// Serves `channel` as this handle until it closes or the scope is revoked.
    pub fn serve(self, channel: Channel) {
        let scope = self.scope.clone();
        let limits = self.shared.config.channel;
        let charge = self.quota.clone();
        let calls = self.quota.calls.clone();
        Peer::serve(
            channel,
            Arc::new(rpc::Serve(self)),
            &scope,
            limits,
            Some(charge),
            calls,
        );
    }

    /// Registers a target of `kind` under the handle's in-labels and `requested`;
    /// returns the registrant's end of its registration channel.
    fn register(
        &self,
        requested: Labels,
        kind: TargetKind,
        backlog: bool,
    ) -> Answer<Option<flower_proto::Fd>> {
        let labels = merge_fixed(&self.in_labels, &requested, "In")?;
        tracing::debug!(?kind, ?labels, "registering");
        // Everyone's List must be able to show it.
        if !fits_list_reply(&labels) {
            return Err(Status::invalid_argument(format!(
                "Labels of {} bytes do not fit a List reply ({} bytes at most, with the \
                 labels this handle adds)",
                labels_len(&labels),
                MAX_LIST_LABELS
            )));
        }
        let target_ticket = self.quota.target()?;
        let (peer, theirs, ticket) = self.registration_channel()?;
        let entry = Registrant {
            kind,
            peer: peer.clone(),
            backlog,
        };
        let id = self
            .shared
            .directory
            .lock()
            .unwrap()
            // A registrant that has just exited may still be in the directory (its
            // removal runs when its channel's reader sees the end): one whose peer
            // has hung up does not refuse a successor, so `flower cat -l` run again
            // at once under the same labels is not refused.
            .insert_over(labels, entry, |old| old.peer.peer_closed())
            .map_err(|_| {
                tracing::debug!("registration refused: another target does not contradict it");
                Status::failed_precondition("Another target with no conflicting labels exists")
            })?;
        tracing::debug!(id, "target registered");
        let shared = self.shared.clone();
        let counted = self.counted.as_ref().map(|c| c.target(id));
        peer.on_close(move || {
            shared.directory.lock().unwrap().remove(id);
            drop(counted);
            drop(ticket);
            drop(target_ticket);
            tracing::debug!(id, "target removed");
        });
        let mut fds = OutFds::new();
        let fd = fds.push(theirs);
        Ok((fd, fds))
    }

    /// A channel on which the switchboard will call a registrant, and the registrant's
    /// end. It lives in the handle's scope, not the handle channel's: a server may
    /// close its handle and keep serving; revoking the scope removes it. It is
    /// charged to this handle's quota until it closes (the ticket).
    fn registration_channel(&self) -> Result<(Peer, OwnedFd, Ticket), Status> {
        let ticket = self.quota.acquire()?;
        let (channel, theirs) =
            Channel::pair().map_err(|e| exhausted("Cannot create a registration channel", &e))?;
        let limits = self.shared.config.channel;
        Ok((
            Peer::spawn_with(channel, None, &self.scope, limits, Some(self.quota.clone())),
            theirs,
            ticket,
        ))
    }

    /// The label sets to try for a connect, in order: the request merged onto the
    /// handle's out-labels, or, when a resolver applies, its expansions of that.
    async fn candidates(
        &self,
        requested: &Labels,
        deadline: Instant,
    ) -> Result<Vec<Labels>, Status> {
        let out = merge_fixed(&self.out_labels, requested, "Out")?;
        let Some(resolver) = self.shared.resolvers.lock().unwrap().find(&out)? else {
            return Ok(vec![out]);
        };
        let request = resolver.project(&out);
        let targets = match resolver.cached(&request) {
            Some(targets) => targets,
            None => {
                let call = resolver::ResolveRequest {
                    resolve_labels: request.clone(),
                };
                let (reply, _) = self
                    .call_registrant::<resolver::rpc::Resolve>(
                        &resolver.peer,
                        &call,
                        Vec::new(),
                        "Resolver",
                        deadline,
                    )
                    .await?;
                // A resolver is trusted with names, not with memory or label rules:
                // keep a bounded number of well-formed targets.
                let targets: Arc<[resolver::Candidate]> = reply
                    .targets
                    .into_iter()
                    .filter(|t| validate(&t.out_labels).is_ok())
                    .take(MAX_TARGETS)
                    .collect();
                resolver.remember(request, targets.clone(), reply.max_cache_duration_seconds);
                targets
            }
        };
        // A candidate that contradicts the request (or the resolver's own out-labels)
        // is skipped: asking for `address_family=inet` filters out inet6 answers.
        let order = attempt_order(&targets, &mut fastrand::Rng::new());
        Ok(order
            .into_iter()
            .filter_map(|i| {
                let labels = merge(&out, &targets[i].out_labels).ok()?;
                merge(&labels, &resolver.out_labels).ok()
            })
            .collect())
    }

    /// Looks up the one target for `out`; returns it with the connection labels.
    fn lookup(&self, out: Labels) -> Result<(Registrant, Labels), Status> {
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

    async fn client_connect_to(
        &self,
        out: Labels,
        deadline: Instant,
    ) -> Answer<sb::ClientConnectResponse> {
        let (target, labels) = self.lookup(out)?;
        tracing::debug!(kind = ?target.kind, connection_labels = ?labels, "connecting");
        let socket = match target.kind {
            TargetKind::Server => {
                let (ours, theirs) = self
                    .shared
                    .pairs
                    .take()
                    .map_err(|e| exhausted("Cannot create a connection", &e))?;
                self.server_connect(
                    &target.peer,
                    theirs,
                    labels.clone(),
                    deadline,
                    target.backlog,
                )
                .await?;
                ours
            }
            TargetKind::Egress => {
                let request = egress::ConnectRequest {
                    connection_labels: labels.clone(),
                };
                let (reply, mut fds) = self
                    .call_registrant::<egress::rpc::Connect>(
                        &target.peer,
                        &request,
                        Vec::new(),
                        "Target",
                        deadline,
                    )
                    .await?;
                take_target_socket(&mut fds, reply.server)?
            }
        };
        let mut fds = OutFds::new();
        let response = sb::ClientConnectResponse {
            server: fds.push(socket),
            connection_labels: labels,
        };
        Ok((response, fds))
    }

    async fn ingress_connect_to(
        &self,
        client: OwnedFd,
        out: Labels,
        deadline: Instant,
    ) -> Result<Labels, Status> {
        let (target, labels) = self.lookup(out)?;
        tracing::debug!(kind = ?target.kind, connection_labels = ?labels, "connecting an ingress");
        match target.kind {
            TargetKind::Server => {
                // Always waits: a refused TCP connection is offered to the next candidate.
                self.server_connect(&target.peer, client, labels.clone(), deadline, false)
                    .await?;
                Ok(labels)
            }
            TargetKind::Egress => Err(Status::failed_precondition(
                "Cannot connect an ingress with an egress",
            )),
        }
    }

    /// Hands `client` to a server with `Server.Connect`. With `backlog`, only queues the
    /// call and does not wait for the reply: if the server then fails, the client sees
    /// end of stream on its end.
    async fn server_connect(
        &self,
        server: &Peer,
        client: OwnedFd,
        labels: Labels,
        deadline: Instant,
        backlog: bool,
    ) -> Result<(), Status> {
        let mut fds = OutFds::new();
        let request = server::ConnectRequest {
            client: fds.push(client),
            connection_labels: labels,
        };
        if backlog {
            return self
                .queue_registrant(server, &request, fds.into_vec(), deadline)
                .await;
        }
        self.call_registrant::<server::rpc::Connect>(
            server,
            &request,
            fds.into_vec(),
            "Target",
            deadline,
        )
        .await
        .map(drop)
    }

    /// When a connect that starts now must be done by.
    fn connect_deadline(&self) -> Instant {
        Instant::now() + self.shared.config.connect_deadline
    }

    /// Queues `Server.Connect` on a server's channel, bounded like a call, without
    /// waiting for its reply (which is discarded when it comes).
    async fn queue_registrant(
        &self,
        server: &Peer,
        request: &server::ConnectRequest,
        fds: Vec<OwnedFd>,
        deadline: Instant,
    ) -> Result<(), Status> {
        let config = &self.shared.config;
        let until = deadline.min(Instant::now() + config.call_timeout);
        let queued = server.send_only::<server::rpc::Connect>(request, fds);
        match tokio::time::timeout_at(until, queued).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "Target did not take the connection within {:?}",
                config.call_timeout.min(config.connect_deadline)
            ))),
            Ok(Err(_)) => Err(Status::unavailable("Target went away during the call")),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// A call to a registrant (`what` names it in errors), bounded by the call
    /// timeout and by the connect's overall `deadline`. One timer either way.
    async fn call_registrant<M: Method>(
        &self,
        target: &Peer,
        request: &M::Request,
        fds: Vec<OwnedFd>,
        what: &str,
        deadline: Instant,
    ) -> Result<(M::Response, Fds), Status> {
        let config = &self.shared.config;
        let own = Instant::now() + config.call_timeout;
        match tokio::time::timeout_at(own.min(deadline), target.call::<M>(request, fds)).await {
            Err(_) if deadline < own => Err(Status::deadline_exceeded(format!(
                "No target answered within the connect deadline of {:?}",
                config.connect_deadline
            ))),
            Err(_) => {
                tracing::debug!(
                    method = M::PATH,
                    "{what} did not answer within {:?}",
                    config.call_timeout
                );
                Err(Status::deadline_exceeded(format!(
                    "{what} did not answer within {:?}",
                    config.call_timeout
                )))
            }
            Ok(Err(status)) if status.code == Code::Unavailable && target.is_closed() => Err(
                Status::unavailable(format!("{what} went away during the call")),
            ),
            Ok(result) => result,
        }
    }
}

/// The rights and fixed labels of a handle constrained by `req` from one with
/// `rights`, `in_labels` and `out_labels` (docs/PROTOCOL.md §6, Constrain): a subset
/// of the rights, and the fixed labels extended, never changed. Checked in this
/// order: the rights' values, the subset, the in-labels, the out-labels.
fn constrained(
    rights: Rights,
    in_labels: &FixedLabels,
    out_labels: &FixedLabels,
    req: &sb::ConstrainRequest,
) -> Result<(Rights, FixedLabels, FixedLabels), Status> {
    let wanted = Rights::from_wire(&req.rights)?;
    rights.require(wanted)?;
    let new_in = derive_fixed(in_labels, &req.in_labels, "In")?;
    // The tools constrain with in = out: keep sharing one copy then.
    let new_out = if out_labels == in_labels && req.out_labels == req.in_labels {
        new_in.clone()
    } else {
        derive_fixed(out_labels, &req.out_labels, "Out")?
    };
    Ok((wanted, new_in, new_out))
}

/// Tries `attempt(candidate, is_last)` on each candidate in order: the first success
/// is the answer, else the last failure (`NOT_FOUND` when there was no candidate).
/// A failure for which `is_final` holds ends the search at once.
async fn first_success<T, Fut>(
    candidates: Vec<Labels>,
    is_final: impl Fn(&Status) -> bool,
    mut attempt: impl FnMut(Labels, bool) -> Fut,
) -> Result<T, Status>
where
    Fut: Future<Output = Result<T, Status>>,
{
    let last = candidates.len().saturating_sub(1);
    let mut failure = None;
    for (n, out) in candidates.into_iter().enumerate() {
        match attempt(out, n == last).await {
            Ok(answer) => return Ok(answer),
            Err(status) if is_final(&status) => return Err(status),
            Err(status) => {
                tracing::debug!("candidate failed: {status}");
                failure = Some(status);
            }
        }
    }
    Err(failure.unwrap_or_else(|| Status::not_found("No matching target found")))
}

/// `RESOURCE_EXHAUSTED` for a failed socketpair()/dup(), naming the limit if one hit.
fn exhausted(what: &str, e: &std::io::Error) -> Status {
    Status::resource_exhausted(format!("{what}: {}", crate::explain_io_error(e)))
}

/// The socket an egress returned, checked to be a connection before a client gets it.
fn take_target_socket(fds: &mut Fds, field: Option<flower_proto::Fd>) -> Result<OwnedFd, Status> {
    fds.take_connection(field, "server")
        .map_err(|e| Status::internal(format!("Egress replied badly: {e}")))
}

/// The most label bytes (as encoded in a `ListResponse`) a target may have: what fits
/// one List reply datagram with the frame around it.
const MAX_LIST_LABELS: usize = flower_proto::transport::MAX_DATAGRAM - 32;

fn labels_len(labels: &Labels) -> usize {
    use prost::Message;
    sb::ListResponse {
        labels: Labels::new(),
    }
    .encoded_len()
        + prost::encoding::btree_map::encoded_len(
            prost::encoding::string::encoded_len,
            prost::encoding::string::encoded_len,
            1,
            labels,
        )
}

/// Whether a target with `labels` can be listed: a frame is the labels plus at most
/// 32 bytes (call id, tags, lengths, the `more` flag).
fn fits_list_reply(labels: &Labels) -> bool {
    labels_len(labels) <= MAX_LIST_LABELS
}

#[cfg(test)]
mod tests {
    //! Constrain never widens (docs/PROTOCOL.md §6, Constrain), for random chains of
    //! requests encoded by hand: fields omitted entirely, empty packed lists,
    //! unpacked rights, map entries whose key or value is omitted, fields in any
    //! order.

    use super::*;
    use proptest::prelude::*;
    use prost::Message;
    use prost::encoding::{WireType, encode_key, encode_varint};

    const KEYS: [&str; 4] = ["a", "b", "c", "d"];
    const VALUES: [&str; 3] = ["1", "2", ""];

    /// How a request's `rights` field is written.
    #[derive(Debug, Clone)]
    enum RightsField {
        Absent,
        /// One length-delimited field; empty is a zero-length field.
        Packed(Vec<i32>),
        /// One varint field per value.
        Unpacked(Vec<i32>),
    }

    /// One map entry; an omitted key or value decodes as "".
    #[derive(Debug, Clone)]
    struct MapEntry {
        key: Option<&'static str>,
        value: Option<&'static str>,
    }

    #[derive(Debug, Clone)]
    struct RawRequest {
        rights: RightsField,
        /// `None`: the field is absent.
        in_labels: Option<Vec<MapEntry>>,
        out_labels: Option<Vec<MapEntry>>,
        /// Out-labels written exactly as the in-labels (the tools' in = out).
        same: bool,
        /// Which of the six field orders.
        order: usize,
    }

    fn right_value() -> impl Strategy<Value = i32> {
        prop_oneof![12 => 0..=5i32, 1 => 6..=9i32, 1 => Just(-1)]
    }

    fn map_entries() -> impl Strategy<Value = Option<Vec<MapEntry>>> {
        let entry = (
            prop_oneof![12 => prop::sample::select(&KEYS[..]).prop_map(Some), 1 => Just(None)],
            prop_oneof![12 => prop::sample::select(&VALUES[..]).prop_map(Some), 1 => Just(None)],
        )
            .prop_map(|(key, value)| MapEntry { key, value });
        prop::option::of(prop::collection::vec(entry, 0..4))
    }

    fn raw_request() -> impl Strategy<Value = RawRequest> {
        let rights = prop_oneof![
            Just(RightsField::Absent),
            prop::collection::vec(right_value(), 0..5).prop_map(RightsField::Packed),
            prop::collection::vec(right_value(), 0..5).prop_map(RightsField::Unpacked),
        ];
        (
            rights,
            map_entries(),
            map_entries(),
            prop::bool::weighted(0.3),
            0..6usize,
        )
            .prop_map(|(rights, in_labels, out_labels, same, order)| RawRequest {
                rights,
                in_labels,
                out_labels,
                same,
                order,
            })
    }

    fn encode_entries(tag: u32, entries: &Option<Vec<MapEntry>>, buf: &mut Vec<u8>) {
        for entry in entries.iter().flatten() {
            let mut inner = Vec::new();
            for (field, text) in [(1, entry.key), (2, entry.value)] {
                if let Some(text) = text {
                    encode_key(field, WireType::LengthDelimited, &mut inner);
                    encode_varint(text.len() as u64, &mut inner);
                    inner.extend_from_slice(text.as_bytes());
                }
            }
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(inner.len() as u64, buf);
            buf.extend(inner);
        }
    }

    fn encode(req: &RawRequest) -> Vec<u8> {
        let mut rights = Vec::new();
        // Negative enum values are sign-extended to ten bytes, as protobuf says.
        let varint = |v: i32, buf: &mut Vec<u8>| encode_varint(i64::from(v) as u64, buf);
        match &req.rights {
            RightsField::Absent => {}
            RightsField::Packed(values) => {
                let mut inner = Vec::new();
                values.iter().for_each(|v| varint(*v, &mut inner));
                encode_key(1, WireType::LengthDelimited, &mut rights);
                encode_varint(inner.len() as u64, &mut rights);
                rights.extend(inner);
            }
            RightsField::Unpacked(values) => {
                for v in values {
                    encode_key(1, WireType::Varint, &mut rights);
                    varint(*v, &mut rights);
                }
            }
        }
        let mut in_labels = Vec::new();
        encode_entries(2, &req.in_labels, &mut in_labels);
        let mut out_labels = Vec::new();
        let out = if req.same {
            &req.in_labels
        } else {
            &req.out_labels
        };
        encode_entries(3, out, &mut out_labels);
        let mut fields = [rights, in_labels, out_labels];
        match req.order {
            0 => {}
            1 => fields.swap(0, 1),
            2 => fields.swap(0, 2),
            3 => fields.swap(1, 2),
            4 => fields.rotate_left(1),
            _ => fields.rotate_right(1),
        }
        fields.concat()
    }

    /// A handle to start a chain from: any rights, any fixed labels (sometimes in =
    /// out, as the tools make them).
    fn parent() -> impl Strategy<Value = (Rights, FixedLabels, FixedLabels)> {
        let labels = || {
            prop::collection::btree_map(
                prop::sample::select(&KEYS[..]).prop_map(str::to_owned),
                prop::sample::select(&VALUES[..]).prop_map(str::to_owned),
                0..4,
            )
        };
        let rights = prop::sample::subsequence(Right::ALL.to_vec(), 0..=Right::ALL.len());
        (rights, labels(), labels(), any::<bool>()).prop_map(|(rights, i, o, same)| {
            let in_labels = FixedLabels::new(&i);
            let out_labels = match same {
                true => in_labels.clone(),
                false => FixedLabels::new(&o),
            };
            (Rights::of(&rights), in_labels, out_labels)
        })
    }

    fn quoted(keys: &[&String]) -> String {
        let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
        format!("[{}]", keys.join(","))
    }

    /// What docs/PROTOCOL.md §6 (Constrain) says `req` does to a handle: the child's
    /// rights and labels, or the error's code and text.
    fn model(
        (rights, in_labels, out_labels): &(Rights, Labels, Labels),
        req: &sb::ConstrainRequest,
    ) -> Result<(Vec<Right>, Labels, Labels), (Code, String)> {
        let mut wanted = Vec::new();
        for &v in &req.rights {
            match Right::ALL.iter().find(|r| **r as i32 == v) {
                Some(r) => wanted.push(*r),
                None => return Err((Code::InvalidArgument, format!("Unknown right {v}"))),
            }
        }
        let missing: Vec<String> = Right::ALL
            .iter()
            .filter(|r| wanted.contains(r) && !rights.contains(**r))
            .map(|r| r.as_str_name().to_owned())
            .collect();
        if !missing.is_empty() {
            let missing: Vec<&String> = missing.iter().collect();
            return Err((
                Code::PermissionDenied,
                format!("Rights {} are not present on this handle", quoted(&missing)),
            ));
        }
        let extend = |fixed: &Labels, request: &Labels, which: &str| {
            if request.contains_key("") {
                return Err((
                    Code::InvalidArgument,
                    "Label keys must not be empty".to_owned(),
                ));
            }
            let conflicts: Vec<&String> = fixed
                .iter()
                .filter(|(k, v)| request.get(*k).is_some_and(|w| w != *v))
                .map(|(k, _)| k)
                .collect();
            if !conflicts.is_empty() {
                return Err((
                    Code::PermissionDenied,
                    format!(
                        "{which}-labels {} are already defined with different values",
                        quoted(&conflicts)
                    ),
                ));
            }
            let mut merged = fixed.clone();
            merged.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
            Ok(merged)
        };
        let new_in = extend(in_labels, &req.in_labels, "In")?;
        let new_out = extend(out_labels, &req.out_labels, "Out")?;
        let rights = Right::ALL
            .into_iter()
            .filter(|r| wanted.contains(r))
            .collect();
        Ok((rights, new_in, new_out))
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn constrain_chains_never_widen(
            start in parent(),
            chain in prop::collection::vec(raw_request(), 1..8),
        ) {
            let (mut rights, mut in_labels, mut out_labels) = start;
            for raw in &chain {
                let bytes = encode(raw);
                let req = sb::ConstrainRequest::decode(&bytes[..])
                    .map_err(|e| TestCaseError::fail(format!("{raw:?} does not decode: {e}")))?;
                let before = (rights, in_labels.clone(), out_labels.clone());
                let expected = model(
                    &(rights, in_labels.to_labels(), out_labels.to_labels()),
                    &req,
                );
                let got = constrained(rights, &in_labels, &out_labels, &req);
                // The parent is never touched, refused or not.
                prop_assert_eq!(&before, &(rights, in_labels.clone(), out_labels.clone()));
                match got {
                    Err(status) => {
                        prop_assert_eq!(Err((status.code, status.message)), expected);
                    }
                    Ok((new_rights, new_in, new_out)) => {
                        // Never wider: a subset of the rights, every fixed label kept
                        // with its value.
                        prop_assert!(new_rights.to_vec().iter().all(|r| rights.contains(*r)));
                        for (parent, child) in [(&in_labels, &new_in), (&out_labels, &new_out)] {
                            let child = child.to_labels();
                            for (k, v) in parent.iter() {
                                prop_assert_eq!(child.get(k), Some(v), "fixed {} changed", k);
                            }
                        }
                        prop_assert_eq!(
                            Ok((new_rights.to_vec(), new_in.to_labels(), new_out.to_labels())),
                            expected
                        );
                        (rights, in_labels, out_labels) = (new_rights, new_in, new_out);
                    }
                }
            }
        }
    }

    #[test]
    fn omitted_and_empty_rights_mean_none() {
        let all = (Rights::ALL, FixedLabels::default(), FixedLabels::default());
        for bytes in [vec![], vec![0x0a, 0x00]] {
            let req = sb::ConstrainRequest::decode(&bytes[..]).unwrap();
            let (rights, _, _) = constrained(all.0, &all.1, &all.2, &req).unwrap();
            assert_eq!(rights, Rights::NONE);
        }
    }
}

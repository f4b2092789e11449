//! The Flower switchboard: a directory of labelled targets and the handles that use it.
//!
//! Embed it to hand out constrained handles (a container runtime gives each pod one
//! carrying the pod's identity), or run [`daemon::run`] to serve a socket path.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use flower_switchboard::{Config, Rights, Switchboard};
//! let switchboard = Switchboard::new(Config::default());
//! let pod = [("pod".to_string(), "web-1".to_string())].into_iter().collect();
//! let (fd, scope) = switchboard.new_handle(Rights::ALL, &pod, &pod)?;
//! // ... pass `fd` to the pod; when the pod goes away:
//! scope.revoke();
//! # drop(fd); Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod daemon;
pub mod directory;
mod handle;
pub mod labels;
mod pairs;
pub mod pod_api;
pub mod pods;
mod quota;
mod resolvers;
pub mod rights;
mod scope;
mod subsets;
pub mod systemd;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flower_proto::rpc::{Limits, Peer};
use flower_proto::transport::{Channel, Listener};
use flower_proto::{Labels, Status};
use tokio_util::sync::CancellationToken;

use directory::Directory;
use handle::Handle;
use labels::FixedLabels;
pub use quota::Rate;
use quota::{Quota, Ticket, UidQuotas};
pub use rights::Rights;

/// Tunables of a switchboard, most of them limits on what one peer may cost
/// (each is listed in docs/PROTOCOL.md §10 with its `flower switchboard` flag).
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a registrant may take to answer `Server.Connect`, `Egress.Connect` or
    /// `Resolver.Resolve`.
    pub call_timeout: Duration,
    /// How long one `ClientConnect` or `IngressConnect` may take in all, across
    /// resolver candidates and replicas.
    pub connect_deadline: Duration,
    /// Per channel: calls served at once (and so replies waiting to be sent), and how
    /// long a reply may wait for a peer that does not read before it is cut off.
    pub channel: Limits,
    /// Handles and registrations one connecting uid may hold through the socket path
    /// (counted with `SO_PEERCRED`; everything derived from its connections counts).
    pub max_handles_per_uid: usize,
    /// Handles and registrations derived from one handle an embedder made
    /// ([`Switchboard::new_handle`] or [`Switchboard::serve_handle`]). A counted
    /// scope (a pod) is bounded by its own handle count and
    /// `max_targets_per_endpoint` instead.
    pub max_handles_per_endpoint: usize,
    /// Targets and resolvers one connecting uid may have registered through the
    /// socket path at once (each is also a registration under `max_handles_per_uid`).
    pub max_targets_per_uid: usize,
    /// Targets and resolvers registered at once through one embedder-made handle
    /// and everything derived from it, or through every handle of one counted scope
    /// (a pod, its containers included).
    pub max_targets_per_endpoint: usize,
    /// Calls in flight across all the channels of one uid (or one embedder-made
    /// endpoint); past it the switchboard stops reading their channels until calls
    /// finish, so one uid's flood cannot crowd out everyone else's calls.
    pub max_calls_per_uid: usize,
    /// Descriptors kept free for accepting, for refusing clearly, and for the calls
    /// in flight; handles and registrations may use the rest of `RLIMIT_NOFILE`. At
    /// most a quarter of the limit is reserved.
    pub reserve_descriptors: usize,
    /// How fast one uid (or one embedder-made endpoint, or one pod) may make new
    /// handles and registrations through Constrain, ServerStart, EgressStart and
    /// ResolverStart. Past it those calls wait (each keeps its place among the calls
    /// in flight), so one owner's churn of short-lived handles cannot fill the
    /// switchboard's time. `None`: unbounded.
    pub new_handles: Option<Rate>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            call_timeout: Duration::from_secs(10),
            connect_deadline: Duration::from_secs(30),
            channel: Limits::default(),
            max_handles_per_uid: 16_384,
            max_handles_per_endpoint: 1_024,
            max_targets_per_uid: 16_384,
            max_targets_per_endpoint: 256,
            max_calls_per_uid: 1_024,
            reserve_descriptors: 256,
            new_handles: Some(Rate {
                per_second: 1_024.0,
                burst: 4_096,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetKind {
    Server,
    Egress,
}

/// What the directory stores per target: how to call its registrant.
#[derive(Clone)]
pub(crate) struct Registrant {
    pub kind: TargetKind,
    pub peer: Peer,
    /// A server that takes connections into a backlog: its clients are answered as
    /// soon as its Connect is queued (`ServerStartRequest.backlog`).
    pub backlog: bool,
}

pub(crate) struct State {
    /// One lock: every critical section is a few hash probes, never an await.
    pub directory: Mutex<Directory<Registrant>>,
    pub resolvers: Mutex<resolvers::Resolvers>,
    pub config: Config,
    /// Connection socketpairs made ahead of time, off the connect path.
    pub pairs: pairs::Pairs,
    /// Descriptors handles and registrations may hold: `RLIMIT_NOFILE` less the
    /// reserve.
    pub budget: Arc<Quota>,
    pub uid_quotas: UidQuotas,
    /// Connections being refused right now (each holds a descriptor briefly).
    pub refusing: Arc<Quota>,
}

/// Refusals answered at once; beyond that a refused connection is just closed.
const MAX_REFUSING: usize = 32;
/// How long a refused connection may take to send its first call.
const REFUSAL_PATIENCE: Duration = Duration::from_secs(1);

/// `e`, with what to do about it when it is a descriptor limit.
pub(crate) fn explain_io_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => {
            let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft.to_string())
                .unwrap_or_else(|_| "?".into());
            format!(
                "{e}: the switchboard has reached its descriptor limit (RLIMIT_NOFILE {limit}); \
                 raise the hard limit (e.g. LimitNOFILE= or ulimit -Hn) and restart it"
            )
        }
        Some(libc::ENFILE) => {
            format!("{e}: the system-wide descriptor limit (fs.file-max) is reached")
        }
        _ => e.to_string(),
    }
}

/// A running switchboard (cheap to clone).
#[derive(Clone)]
pub struct Switchboard {
    shared: Arc<State>,
    root: CancellationToken,
}

/// Everything derived from one handle: the handles constrained from it and the
/// targets registered through them. Dropping a `Scope` does not revoke it.
#[derive(Debug, Clone)]
pub struct Scope {
    token: CancellationToken,
    counts: Option<Arc<scope::ScopeCounts>>,
}

impl Scope {
    /// Closes every handle and registration channel in the scope; their targets vanish
    /// (a counted scope's own targets are removed from the directory before this
    /// returns; the channels close as their tasks run).
    pub fn revoke(&self) {
        self.token.cancel();
        if let Some(counts) = &self.counts {
            counts.remove_targets();
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.token.is_cancelled()
    }

    /// A counted scope inside this one: revoking this one revokes it too, and it is
    /// charged to this one's endpoint quota (a container's handles and targets count
    /// as its pod's). `None` for a scope that is not counted itself.
    pub fn counted_child(&self, max_handles: usize) -> Option<Scope> {
        let counts = self.counts.as_ref()?;
        Some(Scope {
            token: self.token.child_token(),
            counts: Some(scope::ScopeCounts::new(
                counts.shared(),
                max_handles,
                counts.quota.clone(),
            )),
        })
    }

    /// Open handles in a counted scope (0 for one that is not counted).
    pub fn handles(&self) -> usize {
        self.counts.as_ref().map_or(0, |c| c.handles())
    }

    /// Targets registered through a counted scope's handles.
    pub fn targets(&self) -> usize {
        self.counts.as_ref().map_or(0, |c| c.targets())
    }

    /// Resolves once a counted scope holds no handle and no target (at once for
    /// one that is not counted). After [`Scope::revoke`], this is when everything
    /// the scope held is gone.
    pub async fn emptied(&self) {
        if let Some(counts) = &self.counts {
            counts.empty().await
        }
    }

    /// Resolves when the scope is revoked.
    pub async fn revoked(&self) {
        self.token.cancelled().await
    }
}

impl Switchboard {
    /// A switchboard whose descriptor budget is the current `RLIMIT_NOFILE` less
    /// the reserve (set the limit first).
    pub fn new(config: Config) -> Switchboard {
        let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024)
            .min(usize::MAX as u64 / 2) as usize;
        let reserve = config.reserve_descriptors.min(nofile / 4);
        // The socketpair pool's descriptors are held from the start.
        let budget = Quota::new(
            nofile.saturating_sub(reserve + pairs::DESCRIPTORS),
            format!(
                "The switchboard's descriptors are used up: RLIMIT_NOFILE {nofile}, of which \
                 {reserve} are kept in reserve (--reserve-descriptors); raise the limit \
                 (--nofile, LimitNOFILE=) or close handles"
            ),
            None,
        );
        Switchboard {
            shared: Arc::new(State {
                directory: Mutex::new(Directory::new()),
                resolvers: Mutex::default(),
                config,
                pairs: pairs::Pairs::new(),
                budget,
                uid_quotas: UidQuotas::default(),
                refusing: Quota::new(MAX_REFUSING, String::new(), None),
            }),
            root: CancellationToken::new(),
        }
    }

    /// Serves `channel` as a handle with the given rights and fixed labels. Labels
    /// with an empty key are refused (`InvalidInput`), as they are on the wire.
    pub fn serve_handle(
        &self,
        channel: Channel,
        rights: Rights,
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> io::Result<Scope> {
        let scope = Scope {
            token: self.root.child_token(),
            counts: None,
        };
        self.serve_in(&scope, channel, rights, in_labels, out_labels)?;
        Ok(scope)
    }

    /// A new scope whose handles and targets are counted, holding at most
    /// `max_handles` handles at a time (those served into it and those constrained
    /// from them). Serve handles into it with [`Switchboard::serve_in`].
    pub fn counted_scope(&self, max_handles: usize) -> Scope {
        Scope {
            token: self.root.child_token(),
            // Its handles are bounded by the count, its registrations by the target
            // bound: the quota holds both, so it never binds first.
            counts: Some(scope::ScopeCounts::new(
                self.shared.clone(),
                max_handles,
                self.endpoint_quota(
                    max_handles.saturating_add(self.shared.config.max_targets_per_endpoint),
                ),
            )),
        }
    }

    /// The quota of one endpoint: a handle an embedder made, or a counted scope
    /// (one pod) with every handle served into it.
    fn endpoint_quota(&self, limit: usize) -> Arc<Quota> {
        let targets = self.shared.config.max_targets_per_endpoint;
        Quota::owner(
            limit,
            format!(
                "This endpoint holds {limit} handles and registrations, the most one may \
                 (--max-handles-per-endpoint)"
            ),
            Some(self.shared.budget.clone()),
            Some(self.shared.config.max_calls_per_uid),
            Some((
                targets,
                format!(
                    "This endpoint has registered {targets} targets and resolvers, the most \
                     one may (--max-targets-per-endpoint)"
                ),
            )),
            self.shared
                .config
                .new_handles
                .and_then(quota::Pace::new)
                .map(Arc::new),
        )
    }

    /// Serves `channel` as a handle inside `scope`, with the given rights and fixed
    /// labels. Fails with `InvalidInput` for labels with an empty key, and with
    /// `ResourceBusy` when a counted scope is full (the channel is closed then).
    pub fn serve_in(
        &self,
        scope: &Scope,
        channel: Channel,
        rights: Rights,
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> io::Result<()> {
        for labels in [in_labels, out_labels] {
            labels::validate(labels)
                .map_err(|status| io::Error::new(io::ErrorKind::InvalidInput, status.message))?;
        }
        // A counted scope (a pod) is one endpoint however many handles are served
        // into it; otherwise the handle is.
        let quota = match &scope.counts {
            Some(counts) => counts.quota.clone(),
            None => self.endpoint_quota(self.shared.config.max_handles_per_endpoint),
        };
        let ticket = quota
            .acquire()
            .map_err(|status| io::Error::other(status.message))?;
        self.serve_charged(scope, channel, rights, in_labels, out_labels, quota, ticket)
    }

    /// Serves `channel` as a handle in `scope` charged to `quota` (`ticket` is its
    /// own unit).
    #[allow(clippy::too_many_arguments)]
    fn serve_charged(
        &self,
        scope: &Scope,
        channel: Channel,
        rights: Rights,
        in_labels: &Labels,
        out_labels: &Labels,
        quota: Arc<Quota>,
        ticket: Ticket,
    ) -> io::Result<()> {
        let counted = match &scope.counts {
            Some(counts) => Some(
                counts
                    .handle()
                    .map_err(|s| io::Error::new(io::ErrorKind::ResourceBusy, s.message))?,
            ),
            None => None,
        };
        let fixed_in = FixedLabels::new(in_labels);
        Handle {
            shared: self.shared.clone(),
            rights,
            out_labels: match out_labels == in_labels {
                true => fixed_in.clone(),
                false => FixedLabels::new(out_labels),
            },
            in_labels: fixed_in,
            scope: scope.token.clone(),
            counted,
            quota,
            _ticket: ticket,
        }
        .serve(channel);
        Ok(())
    }

    /// Creates a handle and returns the descriptor to pass to its user.
    pub fn new_handle(
        &self,
        rights: Rights,
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> io::Result<(OwnedFd, Scope)> {
        let (channel, theirs) = Channel::pair()?;
        let scope = self.serve_handle(channel, rights, in_labels, out_labels)?;
        Ok((theirs, scope))
    }

    /// Number of registered targets.
    pub fn target_count(&self) -> usize {
        self.shared.directory.lock().unwrap().len()
    }

    /// Accepts connections on `listener`, each a handle with all rights and no labels,
    /// until `shutdown` resolves. Then every handle and registration is closed.
    pub async fn serve(&self, listener: Listener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let none = Labels::new();
        // Every call to a registrant arms a timeout. When that timer is the earliest
        // the runtime has, arming it wakes the reactor (an eventfd write: one syscall
        // per connect). A timer that is always due sooner prevents that, at the cost
        // of one wake-up a second.
        let mut keeper = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = keeper.tick() => {}
                accepted = listener.accept() => match accepted {
                    Ok(channel) => self.admit(channel, &none),
                    Err(e) => {
                        // EMFILE/ENFILE and friends: say so, and do not spin.
                        tracing::error!("accept failed: {}", explain_io_error(&e));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.root.cancel();
    }

    /// Serves a connection accepted on the socket path as a full handle, charged to
    /// the connecting uid; refuses it with a clear error when that uid, or the
    /// switchboard, holds all it may.
    fn admit(&self, channel: Channel, none: &Labels) {
        let shared = &self.shared;
        let charged = rustix::net::sockopt::socket_peercred(channel.as_fd())
            .map_err(|e| Status::internal(format!("Cannot tell who connected: {e}")))
            .and_then(|cred| {
                let uid = cred.uid.as_raw();
                let quota = shared.uid_quotas.get(
                    uid,
                    shared.config.max_handles_per_uid,
                    shared.config.max_calls_per_uid,
                    shared.config.max_targets_per_uid,
                    shared.config.new_handles,
                    &shared.budget,
                );
                let ticket = quota.acquire()?;
                Ok((quota, ticket))
            });
        match charged {
            Ok((quota, ticket)) => {
                let scope = Scope {
                    token: self.root.child_token(),
                    counts: None,
                };
                // A plain scope has no count to fill: this cannot fail.
                let _ = self.serve_charged(&scope, channel, Rights::ALL, none, none, quota, ticket);
            }
            Err(status) => {
                tracing::warn!("refusing a connection: {}", status.message);
                // Bounded: a flood of refused connections must not eat the reserve.
                if let Ok(slot) = shared.refusing.acquire() {
                    Peer::refuse(channel, status, REFUSAL_PATIENCE, slot);
                }
            }
        }
    }
}

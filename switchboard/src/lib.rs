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

pub mod daemon;
pub mod directory;
mod handle;
pub mod labels;
mod resolvers;
pub mod rights;
pub mod systemd;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flower_proto::Labels;
use flower_proto::rpc::Peer;
use flower_proto::transport::{Channel, Listener};
use tokio_util::sync::CancellationToken;

use directory::Directory;
use handle::Handle;
use labels::FixedLabels;
pub use rights::Rights;

/// Tunables of a switchboard.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a registrant may take to answer `Server.Connect`, `Egress.Connect` or
    /// `Resolver.Resolve`.
    pub call_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            call_timeout: Duration::from_secs(10),
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
}

pub(crate) struct State {
    /// One lock: every critical section is a few hash probes, never an await.
    pub directory: Mutex<Directory<Registrant>>,
    pub resolvers: Mutex<resolvers::Resolvers>,
    pub config: Config,
}

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
}

impl Scope {
    /// Closes every handle and registration channel in the scope; their targets vanish.
    pub fn revoke(&self) {
        self.token.cancel();
    }
}

impl Switchboard {
    pub fn new(config: Config) -> Switchboard {
        Switchboard {
            shared: Arc::new(State {
                directory: Mutex::new(Directory::new()),
                resolvers: Mutex::default(),
                config,
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
        for labels in [in_labels, out_labels] {
            labels::validate(labels)
                .map_err(|status| io::Error::new(io::ErrorKind::InvalidInput, status.message))?;
        }
        let token = self.root.child_token();
        let fixed_in = FixedLabels::new(in_labels);
        let handle = Handle {
            shared: self.shared.clone(),
            rights,
            out_labels: match out_labels == in_labels {
                true => fixed_in.clone(),
                false => FixedLabels::new(out_labels),
            },
            in_labels: fixed_in,
            scope: token.clone(),
        };
        handle.serve(channel);
        Ok(Scope { token })
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
                    Ok(channel) => {
                        // No labels: nothing to refuse.
                        let _ = self.serve_handle(channel, Rights::ALL, &none, &none);
                    }
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
}

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
pub mod rights;

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
pub use rights::Rights;

/// Tunables of a switchboard.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a registrant may take to answer `Server.Connect` / `Egress.Connect`.
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
pub(crate) struct TargetEntry {
    pub kind: TargetKind,
    pub peer: Peer,
}

pub(crate) struct Shared {
    /// One lock: every critical section is a few hash probes, never an await.
    pub directory: Mutex<Directory<TargetEntry>>,
    pub config: Config,
}

/// A running switchboard (cheap to clone).
#[derive(Clone)]
pub struct Switchboard {
    shared: Arc<Shared>,
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
            shared: Arc::new(Shared {
                directory: Mutex::new(Directory::new()),
                config,
            }),
            root: CancellationToken::new(),
        }
    }

    /// Serves `channel` as a handle with the given rights and fixed labels.
    pub fn serve_handle(
        &self,
        channel: Channel,
        rights: Rights,
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> Scope {
        let token = self.root.child_token();
        let handle = Handle {
            shared: self.shared.clone(),
            rights,
            in_labels: in_labels.clone(),
            out_labels: out_labels.clone(),
            scope: token.clone(),
        };
        handle.serve(channel);
        Scope { token }
    }

    /// Creates a handle and returns the descriptor to pass to its user.
    pub fn new_handle(
        &self,
        rights: Rights,
        in_labels: &Labels,
        out_labels: &Labels,
    ) -> io::Result<(OwnedFd, Scope)> {
        let (channel, theirs) = Channel::pair()?;
        Ok((
            theirs,
            self.serve_handle(channel, rights, in_labels, out_labels),
        ))
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
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(channel) => {
                        self.serve_handle(channel, Rights::ALL, &none, &none);
                    }
                    Err(e) => {
                        // EMFILE/ENFILE and friends: say so, and do not spin.
                        tracing::error!("accept failed: {e}{}", if e.raw_os_error() == Some(libc::EMFILE) {
                            " (descriptor limit reached: raise RLIMIT_NOFILE)"
                        } else { "" });
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        self.root.cancel();
    }
}

//! `flower ingress accept`: turn accepted sockets into switchboard connections.
//!
//! Each accepted connection is pushed with `IngressConnect` in its own task, labelled
//! with where it came from. A failed push closes that one connection; the listener is
//! never dropped. If the switchboard goes away, pushes wait (bounded) while the
//! handle is re-established with backoff. SIGTERM or SIGINT stop it, removing the
//! socket file of a Unix listener.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use flower_proto::Labels;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;
use flower_tools::labels::{
    ADDRESS_FAMILY, CLIENT_ADDRESS, CLIENT_PORT, INET, INET6, SERVER_ADDRESS, SERVER_PATH,
    SERVER_PORT, UNIX,
};
use flower_tools::ready::{self, Startup};
use flower_tools::{DEFAULT_WAIT, backoff, bounded};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Mutex;

mod acceptor;
use acceptor::Acceptor;

/// Where to accept: `IPv4:port`, `[IPv6]:port`, or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = String;
    /// An IP address and port is TCP; a word with a `/` or without a `:` is a Unix
    /// socket path (`rel.sock`, `./rel.sock`, `/run/x.sock`); anything else (a host
    /// name and port, a mistyped address) is refused rather than taken for a file.
    fn from_str(s: &str) -> Result<Address, String> {
        if let Ok(addr) = s.parse() {
            return Ok(Address::Tcp(addr));
        }
        if !s.is_empty() && (s.contains('/') || !s.contains(':')) {
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        Err(format!(
            "invalid address {s:?}: expected IPv4:port, [IPv6]:port or a Unix socket path \
             (host names are not resolved; write ./{s} for a file)"
        ))
    }
}

/// A handle that is re-established, with backoff, whenever the switchboard goes away.
pub struct Reconnecting {
    path: PathBuf,
    rights: Vec<Right>,
    labels: Labels,
    /// The bound on one connect attempt.
    attempt: Duration,
    current: Mutex<Option<Switchboard>>,
}

impl Reconnecting {
    pub fn new(path: &Path, rights: &[Right], labels: &Labels, attempt: Duration) -> Reconnecting {
        Reconnecting {
            path: path.to_owned(),
            rights: rights.to_vec(),
            labels: labels.clone(),
            attempt,
            current: Mutex::new(None),
        }
    }

    /// The current handle, reconnecting (with backoff, for at most `patience`) if needed.
    pub async fn get(&self, patience: Duration) -> Result<Switchboard> {
        let mut current = self.current.lock().await;
        if let Some(sb) = current.as_ref().filter(|sb| !sb.is_closed()) {
            return Ok(sb.clone());
        }
        let sb = backoff::retry("connecting to the switchboard", Some(patience), || {
            bounded(self.attempt, "connecting to the switchboard", async {
                Ok(Switchboard::connect_as(&self.path, &self.rights, &self.labels).await?)
            })
        })
        .await?;
        tracing::info!(path = %self.path.display(), "connected to the switchboard");
        *current = Some(sb.clone());
        Ok(sb)
    }
}

/// How long one connection waits for the switchboard to come back before it is
/// closed, unless `-w` says otherwise.
const PUSH_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Permission bits of a Unix socket (`None`: as the umask leaves them).
    pub mode: Option<u32>,
}

/// Accepts on `address` until SIGTERM or SIGINT, pushing every connection into the
/// switchboard at `path` with `labels` plus the address labels. A Unix socket file is
/// removed on the way out (and a stale one, whose listener died, replaced at start).
pub async fn accept(
    address: &Address,
    path: &Path,
    labels: &Labels,
    options: Options,
    startup: Startup,
) -> Result<()> {
    let Startup { wait, mut ready } = startup;
    let patience = wait.unwrap_or(PUSH_PATIENCE);
    let switchboard = Arc::new(Reconnecting::new(
        path,
        &[Right::IngressConnect],
        labels,
        wait.unwrap_or(DEFAULT_WAIT),
    ));
    // Fail early and clearly if the switchboard is not there at start-up.
    switchboard.get(Duration::ZERO).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stopped = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    match address {
        Address::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            let acceptor = Acceptor::new(listener.into())?;
            tracing::info!(address = %local, "ingress listening");
            ready::notify(&mut ready, &local.to_string());
            let serve = async {
                let mut keeper = timer_keeper();
                loop {
                    let accepted = tokio::select! {
                        _ = keeper.tick() => continue,
                        accepted = acceptor.accept() => accepted,
                    };
                    match accepted {
                        Ok((socket, Some(peer))) => push(
                            switchboard.clone(),
                            socket,
                            tcp_labels(&peer, &local),
                            patience,
                        ),
                        Ok((_, None)) => {
                            tracing::warn!("accepted a connection with no IP address")
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            };
            tokio::select! {
                () = serve => {}
                () = stopped => {}
            }
        }
        Address::Unix(socket_path) => {
            let (listener, identity) = bind_unix(socket_path, options.mode)?;
            let acceptor = Acceptor::new(listener.into())?;
            tracing::info!(path = %socket_path.display(), "ingress listening");
            ready::notify(&mut ready, &socket_path.display().to_string());
            let labels = Labels::from([
                (ADDRESS_FAMILY.into(), UNIX.into()),
                (SERVER_PATH.into(), socket_path.display().to_string()),
            ]);
            let serve = async {
                let mut keeper = timer_keeper();
                loop {
                    let accepted = tokio::select! {
                        _ = keeper.tick() => continue,
                        accepted = acceptor.accept() => accepted,
                    };
                    match accepted {
                        Ok((socket, _)) => {
                            push(switchboard.clone(), socket, labels.clone(), patience)
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            };
            tokio::select! {
                () = serve => {}
                () = stopped => {}
            }
            // Only if it is still ours, not a socket someone else bound since.
            if std::fs::symlink_metadata(socket_path).is_ok_and(|m| (m.dev(), m.ino()) == identity)
            {
                let _ = std::fs::remove_file(socket_path);
            }
        }
    }
    tracing::info!("ingress stopped");
    Ok(())
}

/// Binds a Unix stream socket at `path`, replacing a stale socket (one nothing
/// listens on any more) but never a live one or anything that is not a socket.
/// Returns the listener and the file's identity, to remove it later only if unchanged.
fn bind_unix(path: &Path, mode: Option<u32>) -> Result<(UnixListener, (u64, u64))> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        match std::os::unix::net::UnixStream::connect(path) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            }
            _ => anyhow::bail!("something is already listening at {}", path.display()),
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    }
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Every push arms a timeout. When that timer is the earliest the runtime has,
/// arming it wakes the reactor: an eventfd write and one more `epoll_wait` per
/// connection (strace). A timer that is always due sooner prevents that, at the
/// cost of one wake-up a second; the switchboard's accept loop does the same.
fn timer_keeper() -> tokio::time::Interval {
    tokio::time::interval(Duration::from_secs(1))
}

async fn accept_failed(e: std::io::Error) {
    // Out of descriptors and the like: say so and do not spin.
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// `address_family`, `client_address`, `client_port`, `server_address`, `server_port`.
pub fn tcp_labels(client: &SocketAddr, server: &SocketAddr) -> Labels {
    let family = if client.is_ipv4() { INET } else { INET6 };
    Labels::from([
        (ADDRESS_FAMILY.into(), family.into()),
        (CLIENT_ADDRESS.into(), client.ip().to_string()),
        (CLIENT_PORT.into(), client.port().to_string()),
        (SERVER_ADDRESS.into(), server.ip().to_string()),
        (SERVER_PORT.into(), server.port().to_string()),
    ])
}

fn push(switchboard: Arc<Reconnecting>, socket: OwnedFd, labels: Labels, patience: Duration) {
    tokio::spawn(async move {
        let result = bounded(patience, "pushing the connection", async {
            let handle = switchboard.get(patience).await?;
            Ok(handle.ingress_connect(socket, &labels).await?)
        })
        .await;
        // On failure the socket was consumed or dropped: the connection is closed.
        match result {
            Ok(connection_labels) => tracing::debug!(?connection_labels, "connection pushed"),
            Err(e) => tracing::warn!(?labels, "connection closed: {e:#}"),
        }
    });
}

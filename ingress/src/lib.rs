//! `flower ingress accept`: turn accepted sockets into switchboard connections.
//!
//! Each accepted connection is pushed with `IngressConnect` in its own task, labelled
//! with where it came from. A failed push closes that one connection; the listener is
//! never dropped. If the switchboard goes away, pushes wait (bounded) while the
//! handle is re-established with backoff.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use flower_proto::Labels;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;
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
    fn from_str(s: &str) -> Result<Address, String> {
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        s.parse().map(Address::Tcp).map_err(|_| {
            format!("invalid address {s:?}: expected IPv4:port, [IPv6]:port or a Unix socket path")
        })
    }
}

/// A handle that is re-established, with backoff, whenever the switchboard goes away.
pub struct Reconnecting {
    path: PathBuf,
    rights: Vec<Right>,
    labels: Labels,
    current: Mutex<Option<Switchboard>>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Reconnecting {
    pub fn new(path: &Path, rights: &[Right], labels: &Labels) -> Reconnecting {
        Reconnecting {
            path: path.to_owned(),
            rights: rights.to_vec(),
            labels: labels.clone(),
            current: Mutex::new(None),
        }
    }

    /// The current handle, reconnecting (with backoff, for at most `patience`) if needed.
    pub async fn get(&self, patience: Duration) -> Result<Switchboard> {
        let mut current = self.current.lock().await;
        if let Some(sb) = current.as_ref().filter(|sb| !sb.is_closed()) {
            return Ok(sb.clone());
        }
        let deadline = tokio::time::Instant::now() + patience;
        let mut delay = BACKOFF_MIN;
        loop {
            match Switchboard::connect_as(&self.path, &self.rights, &self.labels).await {
                Ok(sb) => {
                    tracing::info!(path = %self.path.display(), "connected to the switchboard");
                    *current = Some(sb.clone());
                    return Ok(sb);
                }
                Err(e) if tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!("switchboard unavailable, retrying in {delay:?}: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// How long one connection waits for the switchboard to come back before it is closed.
const PUSH_PATIENCE: Duration = Duration::from_secs(10);

/// Accepts on `address` forever, pushing every connection into the switchboard at
/// `path` with `labels` plus the address labels.
pub async fn accept(address: &Address, path: &Path, labels: &Labels) -> Result<()> {
    let switchboard = Arc::new(Reconnecting::new(path, &[Right::IngressConnect], labels));
    // Fail early and clearly if the switchboard is not there at start-up.
    switchboard.get(Duration::ZERO).await?;
    match address {
        Address::Tcp(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            let acceptor = Acceptor::new(listener.into())?;
            tracing::info!(address = %local, "ingress listening");
            loop {
                match acceptor.accept().await {
                    Ok((socket, Some(peer))) => {
                        push(switchboard.clone(), socket, tcp_labels(&peer, &local))
                    }
                    Ok((_, None)) => tracing::warn!("accepted a connection with no IP address"),
                    Err(e) => accept_failed(e).await,
                }
            }
        }
        Address::Unix(socket_path) => {
            let listener = std::os::unix::net::UnixListener::bind(socket_path)
                .with_context(|| format!("cannot listen on {}", socket_path.display()))?;
            let acceptor = Acceptor::new(listener.into())?;
            tracing::info!(path = %socket_path.display(), "ingress listening");
            let mut labels = Labels::new();
            labels.insert("address_family".into(), "unix".into());
            labels.insert("server_path".into(), socket_path.display().to_string());
            loop {
                match acceptor.accept().await {
                    Ok((socket, _)) => push(switchboard.clone(), socket, labels.clone()),
                    Err(e) => accept_failed(e).await,
                }
            }
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    // Out of descriptors and the like: say so and do not spin.
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// `address_family`, `client_address`, `client_port`, `server_address`, `server_port`.
pub fn tcp_labels(client: &SocketAddr, server: &SocketAddr) -> Labels {
    let family = if client.is_ipv4() { "inet" } else { "inet6" };
    Labels::from([
        ("address_family".into(), family.into()),
        ("client_address".into(), client.ip().to_string()),
        ("client_port".into(), client.port().to_string()),
        ("server_address".into(), server.ip().to_string()),
        ("server_port".into(), server.port().to_string()),
    ])
}

fn push(switchboard: Arc<Reconnecting>, socket: OwnedFd, labels: Labels) {
    tokio::spawn(async move {
        let result = async {
            let handle = switchboard.get(PUSH_PATIENCE).await?;
            anyhow::Ok(handle.ingress_connect(socket, &labels).await?)
        }
        .await;
        // On failure the socket was consumed or dropped: the connection is closed.
        match result {
            Ok(connection_labels) => tracing::debug!(?connection_labels, "forwarded"),
            Err(e) => tracing::warn!(?labels, "connection closed: {e:#}"),
        }
    });
}

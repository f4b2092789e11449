//! `flower egress connect`: make outbound connections on the switchboard's behalf.
//!
//! Registers an egress under LABELS and answers each `Egress.Connect` by connecting to
//! what the connection labels describe:
//!
//! | `address_family` | also needs | connects to |
//! |---|---|---|
//! | `inet` / `inet6` | `server_address` (numeric), `server_port` | TCP |
//! | `unix` | `server_path` under an allowed prefix | a Unix stream socket |
//!
//! Unix paths are refused unless the operator allowed their prefix: otherwise a label
//! could name the switchboard's own socket and turn into a full-rights handle.
//!
//! [`resolve`] is the DNS half: `flower egress resolve` turns host names into the
//! numeric labels above.

mod resolve;
pub use resolve::{ResolveOptions, resolve};

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;
use flower_proto::transport::blocking;
use flower_proto::{Labels, Status};

#[derive(Debug, Clone)]
pub struct Options {
    /// Directories under which `unix` connects are allowed (canonical paths).
    pub allowed_unix_prefixes: Vec<PathBuf>,
    pub connect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allowed_unix_prefixes: Vec::new(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Registers an egress and serves forever, re-registering whenever the switchboard
/// comes back.
pub async fn connect(path: &Path, labels: &Labels, options: Options) -> Result<()> {
    let mut options = options;
    for prefix in &mut options.allowed_unix_prefixes {
        *prefix = std::fs::canonicalize(&*prefix)
            .map_err(|e| anyhow::anyhow!("allowed Unix prefix {}: {e}", prefix.display()))?;
    }
    let options = Arc::new(options);
    keep_registered(
        path,
        Right::EgressStart,
        labels,
        |handle| async move { Ok(handle.egress_start(&Labels::new()).await?) },
        |mut egress| {
            let options = options.clone();
            async move {
                tracing::info!("egress registered");
                while let Some(request) = egress.next().await {
                    let options = options.clone();
                    tokio::spawn(async move {
                        let result = dial(&request.labels, &options).await;
                        if let Err(e) = &result {
                            tracing::info!(labels = ?request.labels, "connect failed: {e}");
                        }
                        request.respond(result);
                    });
                }
            }
        },
    )
    .await
}

/// Connects to `path` with a handle constrained to `right` and in = out = `labels`,
/// makes a registration with `register` and runs `serve` on it until the switchboard
/// closes it; then does it all again, with backoff, for as long as it takes. At
/// start-up a missing switchboard or a refused registration is an error instead.
pub(crate) async fn keep_registered<R, Reg, Serve>(
    path: &Path,
    right: Right,
    labels: &Labels,
    register: impl Fn(Switchboard) -> Reg,
    mut serve: impl FnMut(R) -> Serve,
) -> Result<()>
where
    Reg: Future<Output = Result<R>>,
    Serve: Future<Output = ()>,
{
    let mut first = true;
    let mut delay = BACKOFF_MIN;
    loop {
        let registered = match Switchboard::connect_as(path, &[right], labels).await {
            Ok(handle) => register(handle).await,
            Err(e) => Err(e.into()),
        };
        let registration = match registered {
            Ok(registration) => registration,
            Err(e) if first => return Err(e),
            Err(e) => {
                tracing::debug!("cannot register yet, retrying in {delay:?}: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        first = false;
        delay = BACKOFF_MIN;
        serve(registration).await;
        tracing::warn!(path = %path.display(), "switchboard closed the registration; re-registering");
    }
}

fn label<'a>(labels: &'a Labels, key: &str) -> Result<&'a str, Status> {
    labels
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| Status::invalid_argument(format!("Missing label {key}")))
}

/// Connects as the labels say.
pub async fn dial(labels: &Labels, options: &Options) -> Result<OwnedFd, Status> {
    let family = label(labels, "address_family")?;
    let timeout = options.connect_timeout;
    match family {
        "inet" | "inet6" => {
            let address = label(labels, "server_address")?;
            let ip: IpAddr = address.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "Label server_address {address:?} is not a numeric IP address"
                ))
            })?;
            if ip.is_ipv4() != (family == "inet") {
                return Err(Status::invalid_argument(format!(
                    "Label server_address {address:?} does not match address_family {family:?}"
                )));
            }
            let port = label(labels, "server_port")?;
            let port: u16 = port.parse().map_err(|_| {
                Status::invalid_argument(format!("Label server_port {port:?} is not a port number"))
            })?;
            let target = SocketAddr::new(ip, port);
            let stream =
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
                    Err(_) => {
                        return Err(Status::unavailable(format!(
                            "Connecting to {target} timed out after {timeout:?}"
                        )));
                    }
                    Ok(Err(e)) => {
                        return Err(Status::unavailable(format!(
                            "Cannot connect to {target}: {e}"
                        )));
                    }
                    Ok(Ok(stream)) => stream,
                };
            stream
                .into_std()
                .and_then(|s| blocking(s.into()))
                .map_err(|e| Status::internal(format!("Cannot hand over the connection: {e}")))
        }
        "unix" => {
            let path = Path::new(label(labels, "server_path")?);
            // Resolve symlinks and `..` first, then check and connect to what was checked.
            let real = tokio::fs::canonicalize(path).await.map_err(|e| {
                Status::unavailable(format!("Cannot connect to {}: {e}", path.display()))
            })?;
            if !options
                .allowed_unix_prefixes
                .iter()
                .any(|prefix| real.starts_with(prefix))
            {
                return Err(Status::permission_denied(format!(
                    "Unix path {} is not under a prefix this egress allows",
                    path.display()
                )));
            }
            let stream =
                match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&real)).await {
                    Err(_) => {
                        return Err(Status::unavailable(format!(
                            "Connecting to {} timed out",
                            path.display()
                        )));
                    }
                    Ok(Err(e)) => {
                        return Err(Status::unavailable(format!(
                            "Cannot connect to {}: {e}",
                            path.display()
                        )));
                    }
                    Ok(Ok(stream)) => stream,
                };
            stream
                .into_std()
                .and_then(|s| blocking(s.into()))
                .map_err(|e| Status::internal(format!("Cannot hand over the connection: {e}")))
        }
        other => Err(Status::invalid_argument(format!(
            "Label address_family {other:?} is not one of \"inet\", \"inet6\", \"unix\""
        ))),
    }
}

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
use flower_tools::labels::{
    ADDRESS_FAMILY, INET, INET6, SERVER_ADDRESS, SERVER_PATH, SERVER_PORT, UNIX, required,
};
use flower_tools::ready::{self, Startup};
use flower_tools::{backoff, bounded};

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

/// Registers an egress and serves forever, re-registering whenever the switchboard
/// comes back.
pub async fn connect(
    path: &Path,
    labels: &Labels,
    options: Options,
    startup: Startup,
) -> Result<()> {
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
        startup,
        |handle| async move { Ok(handle.egress_start(&Labels::new()).await?) },
        |mut egress| {
            let options = options.clone();
            async move {
                tracing::info!("egress registered");
                while let Some(request) = egress.next().await {
                    let options = options.clone();
                    tokio::spawn(async move {
                        let result = dial(&request.labels, &options).await;
                        match &result {
                            Ok(_) => tracing::debug!(labels = ?request.labels, "connected"),
                            Err(e) => {
                                tracing::info!(labels = ?request.labels, "connect failed: {e}")
                            }
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
/// Every attempt is bounded by the start-up wait; readiness is told once.
pub(crate) async fn keep_registered<R, Reg, Serve>(
    path: &Path,
    right: Right,
    labels: &Labels,
    startup: Startup,
    register: impl Fn(Switchboard) -> Reg,
    mut serve: impl FnMut(R) -> Serve,
) -> Result<()>
where
    Reg: Future<Output = Result<R>>,
    Serve: Future<Output = ()>,
{
    let wait = startup.wait();
    let mut ready = startup.ready;
    let attempt = || {
        bounded(wait, "registering with the switchboard", async {
            register(Switchboard::connect_as(path, &[right], labels).await?).await
        })
    };
    let mut registration = attempt().await?;
    ready::notify(&mut ready, &serde_json::to_string(labels)?);
    loop {
        serve(registration).await;
        tracing::warn!(path = %path.display(), "switchboard closed the registration; re-registering");
        registration = backoff::retry("registering with the switchboard", None, attempt).await?;
    }
}

/// Connects as the labels say.
pub async fn dial(labels: &Labels, options: &Options) -> Result<OwnedFd, Status> {
    let family = required(labels, ADDRESS_FAMILY)?;
    let timeout = options.connect_timeout;
    match family {
        INET | INET6 => {
            let address = required(labels, SERVER_ADDRESS)?;
            let ip: IpAddr = address.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "Label server_address {address:?} is not a numeric IP address"
                ))
            })?;
            if ip.is_ipv4() != (family == INET) {
                return Err(Status::invalid_argument(format!(
                    "Label server_address {address:?} does not match address_family {family:?}"
                )));
            }
            let port = required(labels, SERVER_PORT)?;
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
        UNIX => {
            let path = Path::new(required(labels, SERVER_PATH)?);
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

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

#![forbid(unsafe_code)]

mod policy;
mod resolve;
pub use policy::{Cidr, Policy};
pub use resolve::{ResolveOptions, resolve};

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
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
use rustix::fs::{Mode, OFlags, ResolveFlags};

#[derive(Debug, Clone)]
pub struct Options {
    /// Directories under which `unix` connects are allowed.
    pub allowed_unix_prefixes: Vec<PathBuf>,
    pub connect_timeout: Duration,
    /// Which TCP destinations are allowed ([`Policy`]: node-local ones are refused
    /// unless allowed).
    pub policy: Policy,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allowed_unix_prefixes: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            policy: Policy::default(),
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
    let dialer = Arc::new(Dialer::new(options)?);
    keep_registered(
        path,
        Right::EgressStart,
        labels,
        labels,
        startup,
        |handle| async move { Ok(handle.egress_start(&Labels::new()).await?) },
        |mut egress| {
            let dialer = dialer.clone();
            async move {
                tracing::info!("egress registered");
                while let Some(request) = egress.next().await {
                    let dialer = dialer.clone();
                    tokio::spawn(async move {
                        let result = dialer.dial(&request.labels).await;
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

/// An allowed Unix prefix, held open: paths are resolved beneath this descriptor, so
/// renaming or replacing the directory (or anything above it) later changes nothing.
#[derive(Debug)]
struct Prefix {
    /// As the operator wrote it, and canonical: a path may use either form.
    given: PathBuf,
    canonical: PathBuf,
    dir: OwnedFd,
}

/// Makes the connections [`Options`] allow.
#[derive(Debug)]
pub struct Dialer {
    connect_timeout: Duration,
    policy: Policy,
    prefixes: Arc<[Prefix]>,
}

impl Dialer {
    /// Opens every allowed Unix prefix (each must be an existing directory).
    pub fn new(options: Options) -> Result<Dialer> {
        let prefixes = options
            .allowed_unix_prefixes
            .into_iter()
            .map(|given| {
                let context = |e: &dyn std::fmt::Display| {
                    anyhow::anyhow!("allowed Unix prefix {}: {e}", given.display())
                };
                let canonical = std::fs::canonicalize(&given).map_err(|e| context(&e))?;
                let dir = rustix::fs::open(
                    &canonical,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| context(&e))?;
                Ok(Prefix {
                    given,
                    canonical,
                    dir,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dialer {
            connect_timeout: options.connect_timeout,
            policy: options.policy,
            prefixes: prefixes.into(),
        })
    }

    /// Connects as the labels say.
    pub async fn dial(&self, labels: &Labels) -> Result<OwnedFd, Status> {
        let family = required(labels, ADDRESS_FAMILY)?;
        match family {
            INET | INET6 => self.dial_tcp(labels, family).await,
            UNIX => {
                self.dial_unix(Path::new(required(labels, SERVER_PATH)?))
                    .await
            }
            other => Err(Status::invalid_argument(format!(
                "Label address_family {other:?} is not one of \"inet\", \"inet6\", \"unix\""
            ))),
        }
    }

    async fn dial_tcp(&self, labels: &Labels, family: &str) -> Result<OwnedFd, Status> {
        let timeout = self.connect_timeout;
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
        if !self.policy.permits(ip) {
            return Err(Status::permission_denied(format!(
                "Address {ip} is not one this egress may connect to (--allow/--deny; \
                 node-local addresses need --allow)"
            )));
        }
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

    /// Resolves `path` once, beneath the descriptor of an allowed prefix, and
    /// connects to exactly the file found. Checking a path and then connecting by
    /// path again would let anyone who can write under the prefix swap a directory
    /// for a symlink in between.
    async fn dial_unix(&self, path: &Path) -> Result<OwnedFd, Status> {
        let prefixes = self.prefixes.clone();
        let owned = path.to_owned();
        let file = tokio::task::spawn_blocking(move || open_beneath(&prefixes, &owned))
            .await
            .map_err(|e| Status::internal(format!("Path lookup failed: {e}")))??;
        // The one file resolved above, through its descriptor's magic link.
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let timeout = self.connect_timeout;
        let stream =
            match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&by_fd)).await {
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
        drop(file);
        stream
            .into_std()
            .and_then(|s| blocking(s.into()))
            .map_err(|e| Status::internal(format!("Cannot hand over the connection: {e}")))
    }
}

/// An `O_PATH` descriptor of `path`, found with `openat2(RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS)` from the prefix it names: symlinks are followed only
/// while they stay beneath the prefix, `..` cannot climb out of it, and `/proc`
/// magic links are refused.
fn open_beneath(prefixes: &[Prefix], path: &Path) -> Result<OwnedFd, Status> {
    let refused = || {
        Status::permission_denied(format!(
            "Unix path {} is not under a prefix this egress allows",
            path.display()
        ))
    };
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "Unix path {} is not absolute",
            path.display()
        )));
    }
    let (prefix, rest) = prefixes
        .iter()
        .find_map(|p| {
            [&p.given, &p.canonical]
                .into_iter()
                .find_map(|base| path.strip_prefix(base).ok())
                .map(|rest| (p, rest))
        })
        .ok_or_else(refused)?;
    if rest.as_os_str().is_empty() {
        return Err(Status::invalid_argument(format!(
            "Unix path {} is the allowed directory itself, not a socket in it",
            path.display()
        )));
    }
    rustix::fs::openat2(
        &prefix.dir,
        rest,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        // Escaping the prefix: through `..`, an absolute symlink or one that points
        // outside.
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => refused(),
        e => Status::unavailable(format!("Cannot connect to {}: {e}", path.display())),
    })
}

/// Connects to `path` with a handle constrained to `right` and in = out = `fixed`,
/// makes a registration with `register` and runs `serve` on it until the switchboard
/// closes it; then does it all again, with backoff, for as long as it takes. At
/// start-up a missing switchboard or a refused registration is an error instead.
/// Every attempt is bounded by the start-up wait; readiness is told once, with
/// `labels`.
pub(crate) async fn keep_registered<R, Reg, Serve>(
    path: &Path,
    right: Right,
    fixed: &Labels,
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
            register(Switchboard::connect_as(path, &[right], fixed).await?).await
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

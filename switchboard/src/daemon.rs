//! `flower switchboard`: serve a switchboard on a socket path.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flower_proto::transport::Listener;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::socket::SockType;
use nix::sys::stat::{Mode, umask};
use tokio::signal::unix::{SignalKind, signal};

use crate::{Config, Switchboard, systemd};

#[derive(Debug)]
pub struct Options {
    pub path: PathBuf,
    /// Permission bits of the socket file; connecting needs write permission.
    pub mode: u32,
    /// Group owning the socket file.
    pub group: Option<String>,
    /// Descriptor limit to run with; `None`: as high as allowed.
    pub nofile: Option<u64>,
    pub config: Config,
    /// The listening socket a service manager passed, from
    /// [`systemd::activated_listener`]. Claim it first thing in `main`, before a
    /// runtime or anything else opens descriptors: if the manager's variables are
    /// wrong, descriptor 3 could otherwise be something else of ours.
    pub activated: Option<OwnedFd>,
    /// Serve the pod API too.
    pub pods: Option<PodsOptions>,
}

/// Where the pod API listens and where the pods' endpoints live (docs/PROTOCOL.md §11).
#[derive(Debug, Clone)]
pub struct PodsOptions {
    /// The gRPC socket, created 0600: its mode is the API's only protection.
    pub socket: PathBuf,
    /// `PODS_DIR`.
    pub dir: PathBuf,
    /// Handles each pod or container endpoint may hold at a time.
    pub max_handles: usize,
}

/// Runs until SIGTERM or SIGINT, then removes the socket file (unless it came from
/// socket activation). Tells a service manager when it is ready and when it stops.
pub async fn run(options: Options) -> io::Result<()> {
    match options.nofile {
        None => raise_nofile_limit(),
        Some(limit) => set_nofile_limit(limit)?,
    }
    // Handlers first: once the socket accepts (or READY=1 is sent), SIGTERM must
    // mean a clean stop.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let path = &options.path;
    // With socket activation the service manager owns the socket file.
    let (listener, identity) = match options.activated {
        Some(fd) => {
            tracing::info!("switchboard listening on the socket passed by the service manager");
            (Listener::from_fd(fd)?, None)
        }
        None => {
            let listener = bind(path, options.mode, options.group.as_deref())?;
            let identity = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))?;
            tracing::info!(path = %path.display(), "switchboard listening");
            (listener, Some(identity))
        }
    };
    let switchboard = Switchboard::new(options.config);
    let stop = tokio_util::sync::CancellationToken::new();
    let pods = match &options.pods {
        Some(pods) => Some(start_pods(&switchboard, pods, stop.clone())?),
        None => None,
    };
    systemd::notify("READY=1");

    let shutdown = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    switchboard.serve(listener, shutdown).await;
    systemd::notify("STOPPING=1");
    stop.cancel();
    if let Some((task, socket, identity)) = pods {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        remove_if_ours(&socket, identity);
    }

    // Remove the socket only if we made it and it is still ours (not replaced by
    // another daemon).
    if let Some(identity) = identity {
        remove_if_ours(path, identity);
    }
    tracing::info!("switchboard stopped");
    Ok(())
}

fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == identity) {
        let _ = std::fs::remove_file(path);
    }
}

/// Binds the pod API socket first (so a second daemon on the same socket stops
/// before touching the pods), restores the registry, and serves the API.
fn start_pods(
    switchboard: &Switchboard,
    options: &PodsOptions,
    stop: tokio_util::sync::CancellationToken,
) -> io::Result<(tokio::task::JoinHandle<()>, PathBuf, (u64, u64))> {
    let listener = bind_stream(&options.socket, 0o600)?;
    let identity = std::fs::symlink_metadata(&options.socket).map(|m| (m.dev(), m.ino()))?;
    let pods = crate::pods::Pods::open(
        switchboard.clone(),
        crate::pods::Options {
            dir: options.dir.clone(),
            max_handles: options.max_handles,
        },
    )?;
    tracing::info!(
        socket = %options.socket.display(),
        dir = %options.dir.display(),
        "pod API listening"
    );
    let task = tokio::spawn(async move {
        if let Err(e) = crate::pod_api::serve(pods, listener, stop.cancelled_owned()).await {
            tracing::error!("pod API stopped: {e}");
        }
    });
    Ok((task, options.socket.clone(), identity))
}

/// Creates the listening socket: replaces a stale socket file, refuses to steal a live
/// one or to replace anything that is not a socket.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> io::Result<Listener> {
    bind_with(path, mode, group, SockType::SeqPacket, Listener::bind)
}

/// Like [`bind`], for a SOCK_STREAM socket (the pod API's).
pub fn bind_stream(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    bind_with(path, mode, None, SockType::Stream, |p| {
        tokio::net::UnixListener::bind(p)
    })
}

fn bind_with<L>(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    kind: SockType,
    bind: impl FnOnce(&Path) -> io::Result<L>,
) -> io::Result<L> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    // Before anything exists on disk: an unknown group must not leave a socket behind.
    let gid = group.map(group_id).transpose()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| context("cannot create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match probe(path, kind) {
                Ok(()) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("a switchboard is already listening at {}", path.display()),
                    ));
                }
                Err(nix::errno::Errno::ECONNREFUSED) => {}
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "cannot tell whether {} is in use ({e}); remove it if it is stale",
                            path.display()
                        ),
                    ));
                }
            }
            tracing::info!(path = %path.display(), "removing stale socket");
            std::fs::remove_file(path).map_err(|e| context("cannot remove stale socket", e))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context("cannot inspect", e)),
    }
    // A tight umask while binding so the socket never exists with wider permissions.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = bind(path);
    umask(old);
    let listener = bound.map_err(|e| context("cannot listen on", e))?;
    // Group first, mode second: widening the mode while the socket still has the
    // daemon's own group would let that group's members in for a moment.
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| context("cannot change the group of", e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| context("cannot set the mode of", e))?;
    Ok(listener)
}

/// A group name, or a number.
fn group_id(group: &str) -> io::Result<nix::unistd::Gid> {
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        _ => group
            .parse::<u32>()
            .map(nix::unistd::Gid::from_raw)
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, format!("unknown group {group}"))),
    }
}

/// Tries to connect to `path`. Only a refused connect proves the socket stale.
fn probe(path: &Path, kind: SockType) -> nix::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    // Non-blocking: a live daemon whose backlog is full answers EAGAIN instead of
    // making this start-up wait for it.
    let fd = socket(
        AddressFamily::Unix,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Err(nix::errno::Errno::EAGAIN) => Ok(()),
        other => other,
    }
}

/// Sets the descriptor limit (soft and hard) to `limit`, for operators who cap the
/// daemon (and for tests of running out).
fn set_nofile_limit(limit: u64) -> std::io::Result<()> {
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .map_err(|e| std::io::Error::other(format!("cannot set RLIMIT_NOFILE to {limit}: {e}")))?;
    tracing::info!(limit, "RLIMIT_NOFILE");
    Ok(())
}

/// Raises the descriptor limit as far as allowed: every handle and every target is a
/// descriptor. The soft limit goes to the hard one; with the privilege to (root with
/// CAP_SYS_RESOURCE), the hard limit first goes to the kernel's `fs.nr_open`.
pub fn raise_nofile_limit() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return tracing::warn!("cannot read RLIMIT_NOFILE: {e}"),
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(ceiling) = nr_open.filter(|&n| n > hard)
        && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok()
    {
        return tracing::info!(
            from = soft,
            to = ceiling,
            "raised RLIMIT_NOFILE to fs.nr_open"
        );
    }
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised RLIMIT_NOFILE"),
            Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"),
        }
    } else {
        tracing::info!(limit = soft, "RLIMIT_NOFILE");
    }
}

//! `flower switchboard`: serve a switchboard on a socket path.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flower_proto::transport::Listener;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::stat::{Mode, umask};
use tokio::signal::unix::{SignalKind, signal};

use crate::{Config, Switchboard};

#[derive(Debug, Clone)]
pub struct Options {
    pub path: PathBuf,
    /// Permission bits of the socket file; connecting needs write permission.
    pub mode: u32,
    /// Group owning the socket file.
    pub group: Option<String>,
    pub config: Config,
}

/// Runs until SIGTERM or SIGINT, then removes the socket file.
pub async fn run(options: Options) -> io::Result<()> {
    raise_nofile_limit();
    let path = &options.path;
    let listener = bind(path, options.mode, options.group.as_deref())?;
    let identity = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))?;
    tracing::info!(path = %path.display(), "switchboard listening");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    Switchboard::new(options.config)
        .serve(listener, shutdown)
        .await;

    // Remove the socket only if it is still ours (not replaced by another daemon).
    if std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == identity) {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("switchboard stopped");
    Ok(())
}

/// Creates the listening socket: replaces a stale socket file, refuses to steal a live
/// one or to replace anything that is not a socket.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> io::Result<Listener> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| context("cannot create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match probe(path) {
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
    let bound = Listener::bind(path);
    umask(old);
    let listener = bound.map_err(|e| context("cannot listen on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| context("cannot set the mode of", e))?;
    if let Some(group) = group {
        let gid = match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => g.gid,
            _ => match group.parse::<u32>() {
                Ok(gid) => nix::unistd::Gid::from_raw(gid),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("unknown group {group}"),
                    ));
                }
            },
        };
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| context("cannot change the group of", e.into()))?;
    }
    Ok(listener)
}

/// Tries to connect to `path`. Only a refused connect proves the socket stale.
fn probe(path: &Path) -> nix::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    // Blocking is fine here: this runs once, before serving.
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)
}

/// Raises the soft descriptor limit to the hard limit: every handle is a descriptor.
pub fn raise_nofile_limit() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised RLIMIT_NOFILE"),
            Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"),
        },
        Ok((soft, _)) => tracing::debug!(limit = soft, "RLIMIT_NOFILE"),
        Err(e) => tracing::warn!("cannot read RLIMIT_NOFILE: {e}"),
    }
}

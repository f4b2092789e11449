//! The two service-manager conventions a node daemon is expected to honour, without
//! linking libsystemd: readiness notification (`NOTIFY_SOCKET`, for `Type=notify`)
//! and socket activation (`LISTEN_PID` / `LISTEN_FDS`, from a `.socket` unit with
//! `ListenSequentialPacket=`).

use std::io;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use nix::sys::socket::{SockType, getsockopt, sockopt};

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Tells the service manager `state` (e.g. `READY=1`), if it asked to be told.
/// Failures are logged, never fatal: the daemon works without a manager.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| {
        let bytes = target.as_encoded_bytes();
        // A leading '@' names a socket in the abstract namespace.
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&target)?,
        };
        // Never block the runtime on a manager that is not reading.
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        socket.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!("cannot notify the service manager at {target:?}: {e}");
    }
}

/// The listening socket the service manager passed, if it passed one to this process.
pub fn activated_listener() -> io::Result<Option<OwnedFd>> {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    if !ours {
        return Ok(None);
    }
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    match count {
        0 => return Ok(None),
        1 => {}
        n => {
            return Err(io::Error::other(format!(
                "the service manager passed {n} sockets; the switchboard takes exactly one"
            )));
        }
    }
    // A wrong LISTEN_FDS must not make us own (and later close) a descriptor that
    // is not open, or is not ours to use: the shared claim checks both.
    let fd = flower_proto::transport::claim_inherited(LISTEN_FDS_START).map_err(|e| {
        io::Error::other(format!(
            "LISTEN_FDS=1 but {e} (use ListenSequentialPacket=)"
        ))
    })?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let seqpacket = getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::SeqPacket);
    if !(listening && seqpacket) {
        return Err(io::Error::other(
            "the socket from the service manager is not a listening SOCK_SEQPACKET socket \
             (use ListenSequentialPacket=)",
        ));
    }
    Ok(Some(fd))
}

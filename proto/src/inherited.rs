//! The handle a parent passed down: `FLOWER_SWITCHBOARD_FD` names an inherited
//! descriptor (set by `flower run`, or by any runtime that passes a handle). When it
//! is set, [`crate::client::Switchboard::connect`] and
//! [`crate::blocking::Switchboard::connect`] use that descriptor instead of a path,
//! so a child needs no path and cannot step outside its handle's rights.
//!
//! A descriptor can be owned once: the first connect in a process takes it, a later
//! one fails with a clear error (use `constrain` or clones of the first handle).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// The environment variable holding the descriptor number.
pub const ENV: &str = "FLOWER_SWITCHBOARD_FD";

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Whether `FLOWER_SWITCHBOARD_FD` is set (to anything non-empty).
pub fn is_set() -> bool {
    std::env::var_os(ENV).is_some_and(|v| !v.is_empty())
}

/// The inherited handle, if `FLOWER_SWITCHBOARD_FD` is set: checked to be an open
/// AF_UNIX SOCK_SEQPACKET socket and marked close-on-exec.
pub fn take() -> Option<io::Result<OwnedFd>> {
    let value = std::env::var_os(ENV).filter(|v| !v.is_empty())?;
    let claim = || {
        let raw = value
            .to_str()
            .and_then(|v| v.parse::<i32>().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{ENV}={value:?} is not a descriptor number"),
                )
            })?;
        if TAKEN.swap(true, Ordering::AcqRel) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("the handle in {ENV}={raw} is already in use in this process"),
            ));
        }
        // Callers name the variable (see `ConnectError`).
        crate::transport::claim_inherited(raw)
    };
    Some(claim())
}

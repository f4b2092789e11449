//! Tying `Fd { slot }` message fields to the descriptors of a datagram.
//!
//! Rule (docs/PROTOCOL.md §3): every descriptor received is owned by exactly one `Fd` field,
//! or closed. [`Fds::claim`] enforces it when a message is decoded: the slots named by
//! the message must be exactly `0..n` for the `n` descriptors that arrived, each once.
//! Anything else closes every descriptor and fails with `INVALID_ARGUMENT`.

use std::os::fd::{AsFd, OwnedFd};

use crate::transport::{SocketKind, check_socket};

use crate::{Fd, Status};

/// Implemented (by the build script) for every protocol message: the message's `Fd`
/// fields in declaration order.
pub trait FdFields {
    const FD_FIELDS: &'static [&'static str];
    fn fd_slots(&self) -> impl Iterator<Item = Option<u32>>;
}

/// The descriptors of one received message, indexed by slot.
#[derive(Debug, Default)]
pub struct Fds {
    slots: Vec<Option<OwnedFd>>,
}

impl Fds {
    /// Checks that `message` references each of `fds` exactly once.
    pub fn claim<M: FdFields>(message: &M, fds: Vec<OwnedFd>) -> Result<Fds, Status> {
        let n = fds.len();
        let mut seen = vec![false; n];
        let mut referenced = 0;
        for slot in message.fd_slots().flatten() {
            match seen.get_mut(slot as usize) {
                Some(s) if !*s => {
                    *s = true;
                    referenced += 1;
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "Descriptor slot {slot} does not match the {n} descriptors received"
                    )));
                }
            }
        }
        if referenced != n {
            return Err(Status::invalid_argument(format!(
                "Received {n} descriptors but the message references {referenced}"
            )));
        }
        Ok(Fds {
            slots: fds.into_iter().map(Some).collect(),
        })
    }

    /// Takes the descriptor a field points at; `name` is used in the error when absent.
    pub fn take(&mut self, field: Option<Fd>, name: &str) -> Result<OwnedFd, Status> {
        field
            .and_then(|fd| self.slots.get_mut(fd.slot as usize)?.take())
            .ok_or_else(|| Status::invalid_argument(format!("Missing descriptor field {name}")))
    }

    /// Like [`Fds::take`], and also checks that the descriptor is a socket of `kind`
    /// ([`check_socket`]): a handed-on `O_PATH`, directory or device descriptor
    /// would be a capability nobody granted.
    pub fn take_socket(
        &mut self,
        field: Option<Fd>,
        name: &str,
        kind: SocketKind,
    ) -> Result<OwnedFd, Status> {
        let fd = self.take(field, name)?;
        check_socket(fd.as_fd(), kind).map_err(|_| {
            Status::invalid_argument(format!(
                "Descriptor field {name} is not {}",
                kind.description()
            ))
        })?;
        Ok(fd)
    }

    /// [`Fds::take_socket`] for a connection (`SOCK_STREAM`).
    pub fn take_connection(&mut self, field: Option<Fd>, name: &str) -> Result<OwnedFd, Status> {
        self.take_socket(field, name, SocketKind::Connection)
    }

    /// [`Fds::take_socket`] for a channel (`AF_UNIX` `SOCK_SEQPACKET`).
    pub fn take_channel(&mut self, field: Option<Fd>, name: &str) -> Result<OwnedFd, Status> {
        self.take_socket(field, name, SocketKind::Channel)
    }
}

/// Collects descriptors to send and hands out their slots, in order.
#[derive(Debug, Default)]
pub struct OutFds {
    fds: Vec<OwnedFd>,
}

impl OutFds {
    pub fn new() -> OutFds {
        OutFds::default()
    }

    /// Adds a descriptor; returns the `Fd` field value that refers to it.
    pub fn push(&mut self, fd: OwnedFd) -> Option<Fd> {
        self.fds.push(fd);
        Some(Fd {
            slot: (self.fds.len() - 1) as u32,
        })
    }

    pub fn into_vec(self) -> Vec<OwnedFd> {
        self.fds
    }
}

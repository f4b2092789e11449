//! Accepting connections that are handed on, not used here.
//!
//! tokio's listeners register every accepted socket with the reactor and leave it
//! non-blocking; the ingress would then deregister it and clear `O_NONBLOCK` again
//! before passing it on: four syscalls per connection for nothing. `accept4` with
//! only `SOCK_CLOEXEC` (socket2's `accept` on Linux) gives a blocking socket (Linux
//! does not inherit `O_NONBLOCK` from the listener) that was never registered.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A listening socket (TCP or Unix) registered for readiness only.
pub struct Acceptor {
    fd: AsyncFd<OwnedFd>,
}

impl Acceptor {
    /// Takes a bound, listening socket.
    pub fn new(listener: OwnedFd) -> io::Result<Acceptor> {
        SockRef::from(&listener).set_nonblocking(true)?;
        let fd = flower_proto::transport::register(listener, Interest::READABLE)?;
        Ok(Acceptor { fd })
    }

    /// The next connection, blocking and close-on-exec, with the peer's address when
    /// it is an IP socket.
    pub async fn accept(&self) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
        self.fd
            .async_io(Interest::READABLE, |listener| {
                let (socket, address) = SockRef::from(listener).accept()?;
                Ok((OwnedFd::from(socket), address.as_socket()))
            })
            .await
    }
}

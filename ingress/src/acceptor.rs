//! Accepting connections that are handed on, not used here.
//!
//! tokio's listeners register every accepted socket with the reactor and leave it
//! non-blocking; the ingress would then deregister it and clear `O_NONBLOCK` again
//! before passing it on: four syscalls per connection for nothing. `accept4` with
//! only `SOCK_CLOEXEC` gives a blocking socket (Linux does not inherit `O_NONBLOCK`
//! from the listener) that was never registered.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use flower_proto::transport::set_nonblocking;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A listening socket (TCP or Unix) registered for readiness only.
pub struct Acceptor {
    fd: AsyncFd<OwnedFd>,
}

impl Acceptor {
    /// Takes a bound, listening socket.
    pub fn new(listener: OwnedFd) -> io::Result<Acceptor> {
        set_nonblocking(listener.as_fd(), true)?;
        // SAFETY: the OwnedFd is ours alone and stays open while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?;
        Ok(Acceptor { fd })
    }

    /// The next connection, blocking and close-on-exec, with the peer's address when
    /// it is an IP socket.
    pub async fn accept(&self) -> io::Result<(OwnedFd, Option<SocketAddr>)> {
        self.fd
            .async_io(Interest::READABLE, |listener| {
                // SAFETY: sockaddr_storage is plain data, large enough for any address.
                let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
                let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                // SAFETY: the pointers are valid for the call and `len` is their size.
                let raw = unsafe {
                    libc::accept4(
                        listener.as_raw_fd(),
                        (&mut storage as *mut libc::sockaddr_storage).cast(),
                        &mut len,
                        libc::SOCK_CLOEXEC,
                    )
                };
                if raw < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                let socket = unsafe { OwnedFd::from_raw_fd(raw) };
                Ok((socket, ip_address(&storage)))
            })
            .await
    }
}

fn ip_address(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into())
        }
        _ => None,
    }
}

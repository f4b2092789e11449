//! SOCK_SEQPACKET channels that carry descriptors (DESIGN §5).
//!
//! One datagram is one frame plus at most [`MAX_FDS`] descriptors in a single
//! SCM_RIGHTS control message. Receiving is where the care goes:
//!
//! * the control buffer has room for `SCM_MAX_FD` (253) descriptors, the most the
//!   kernel attaches to one message, so SCM_RIGHTS is never truncated by us; should
//!   `MSG_CTRUNC` still be reported, the datagram is refused;
//! * descriptors arrive close-on-exec (`MSG_CMSG_CLOEXEC`) and are wrapped in
//!   `OwnedFd` before anything else is looked at, so every error path closes them;
//! * the data buffer is one byte larger than [`MAX_DATAGRAM`], so an oversize datagram
//!   is detected (`MSG_TRUNC`) instead of silently cut;
//! * the 64 KiB buffer is per thread, not per channel: an idle channel costs only its
//!   socket and its registration with the reactor.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Largest datagram accepted or sent, in bytes.
pub const MAX_DATAGRAM: usize = 65_536;
/// Most descriptors accepted or sent with one datagram.
pub const MAX_FDS: usize = 4;

/// Kernel limit on descriptors in one SCM_RIGHTS message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
const CMSG_BUF_LEN: usize = 64 + SCM_MAX_FD * std::mem::size_of::<libc::c_int>();

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why a received datagram was refused. The descriptors it carried are already closed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("datagram larger than {MAX_DATAGRAM} bytes")]
    Oversize,
    #[error("datagram carries {0} descriptors; at most {MAX_FDS} are allowed")]
    TooManyFds(usize),
    #[error("control data was truncated")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A connected SOCK_SEQPACKET Unix socket registered with the tokio reactor.
#[derive(Debug)]
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
}

impl Channel {
    /// Wraps a connected socket; fails unless it is a Unix SOCK_SEQPACKET socket.
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        let ty = socket::getsockopt(&fd, socket::sockopt::SockType)?;
        if ty != SockType::SeqPacket {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptor is not a SOCK_SEQPACKET socket",
            ));
        }
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Channel { fd: register(fd)? })
    }

    /// A connected pair: a channel for this process and the raw other end to hand out.
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (a, b) = seqpacket_pair()?;
        Ok((Channel::new(a)?, b))
    }

    /// Connects to a listening path.
    pub async fn connect(path: &Path) -> io::Result<Channel> {
        let addr = UnixAddr::new(path)?;
        // Connecting a Unix socket only blocks while the listener's backlog is full;
        // do it off the runtime so that case cannot stall other tasks.
        let fd = tokio::task::spawn_blocking(move || -> io::Result<OwnedFd> {
            let fd = socket::socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            socket::connect(fd.as_raw_fd(), &addr)?;
            Ok(fd)
        })
        .await
        .map_err(io::Error::other)??;
        Channel::new(fd)
    }

    /// Sends one datagram. Atomic: the whole frame and all descriptors, or nothing.
    pub async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if bytes.len() > MAX_DATAGRAM || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram over the limits",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                let iov = [IoSlice::new(bytes)];
                let rights = [ControlMessage::ScmRights(&raw)];
                let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
                socket::sendmsg::<()>(
                    fd.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                    None,
                )
                .map(drop)
                .map_err(io::Error::from)
            })
            .await
    }

    /// Receives one datagram; `Ok(None)` at end of stream.
    ///
    /// A zero-length datagram is indistinguishable from end of stream on SEQPACKET
    /// and is treated as such.
    pub async fn recv(&self) -> Result<Option<Datagram>, RecvError> {
        self.fd
            .async_io(Interest::READABLE, |fd| recv_now(fd.as_raw_fd()))
            .await?
    }

    /// Shuts both directions down so the peer sees end of stream at once, even while
    /// other tasks still hold this channel.
    pub fn shutdown(&self) {
        let _ = socket::shutdown(self.fd.get_ref().as_raw_fd(), socket::Shutdown::Both);
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns its descriptor exclusively; it stays open and unchanged
    // until the `AsyncFd` holding it is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A close-on-exec SOCK_SEQPACKET socketpair.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// A close-on-exec SOCK_STREAM socketpair: the connection handed to applications.
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

thread_local! {
    static RECV_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM + 1]);
}

/// One non-blocking `recvmsg`. The outer error is for the reactor (`WouldBlock`).
fn recv_now(fd: RawFd) -> io::Result<Result<Option<Datagram>, RecvError>> {
    RECV_BUF.with_borrow_mut(|buf| {
        // u64 words keep the control buffer aligned for `cmsghdr`.
        let mut control = [0u64; CMSG_BUF_LEN.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; every pointer set below outlives the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;

        // SAFETY: `msg` describes valid, writable buffers of the stated lengths.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let fds = take_descriptors(&msg);
        let n = n as usize;
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Ok(Err(RecvError::Truncated));
        }
        if msg.msg_flags & libc::MSG_TRUNC != 0 || n > MAX_DATAGRAM {
            return Ok(Err(RecvError::Oversize));
        }
        if fds.len() > MAX_FDS {
            return Ok(Err(RecvError::TooManyFds(fds.len())));
        }
        if n == 0 {
            return Ok(Ok(None));
        }
        Ok(Ok(Some(Datagram {
            bytes: buf[..n].to_vec(),
            fds,
        })))
    })
}

/// Wraps every descriptor of every SCM_RIGHTS message in `OwnedFd`.
fn take_descriptors(msg: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel just filled, with the libc macros
    // that bound every header by `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let hdr = &*cmsg;
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let payload = hdr.cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    fds
}

/// A listening SOCK_SEQPACKET Unix socket.
#[derive(Debug)]
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Binds and listens on `path` (which must not exist).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        socket::listen(&fd, Backlog::MAXCONN)?;
        Listener::from_fd(fd)
    }

    /// Wraps an already listening socket (e.g. from systemd socket activation).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Listener { fd: register(fd)? })
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Channel> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |fd| {
                let raw = socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                )?;
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            })
            .await?;
        Ok(Channel { fd: register(fd)? })
    }
}

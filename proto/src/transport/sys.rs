//! Every raw socket call of the transport, and all of its `unsafe`: datagram send and
//! receive with descriptors, control messages, socketpair and listener constructors,
//! the one socket-type check, and registering a descriptor with the reactor. The
//! async [`super::Channel`] and [`super::Listener`] are built on these; the blocking
//! client uses them directly.
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
//! * the 64 KiB buffers are per thread, not per channel: an idle channel costs only
//!   its socket and its registration with the reactor;
//! * one `recvmmsg` asks for two datagrams: when only one comes back the socket is
//!   known to be empty, so the reactor's readiness is cleared at once instead of
//!   finding out with one more `recvmsg` that fails with `EAGAIN` (a syscall saved
//!   per message on every request/reply channel).

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
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

/// What one receive yields: a datagram, end of stream (`None`), or a refusal.
pub type Received = Result<Option<Datagram>, RecvError>;

/// What a descriptor received from a peer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A connection handed to an application: `SOCK_STREAM` of `AF_UNIX`, `AF_INET`
    /// or `AF_INET6`.
    Connection,
    /// A switchboard channel: `AF_UNIX` `SOCK_SEQPACKET`.
    Channel,
}

impl SocketKind {
    /// What a descriptor of this kind is, for error messages.
    pub fn description(self) -> &'static str {
        match self {
            SocketKind::Connection => "a SOCK_STREAM socket of AF_UNIX, AF_INET or AF_INET6",
            SocketKind::Channel => "an AF_UNIX SOCK_SEQPACKET socket",
        }
    }
}

/// Checks that `fd` is a socket of `kind`, with `getsockopt(SO_TYPE)` and
/// `getsockopt(SO_DOMAIN)` (two syscalls). `fstat` is not enough: an `O_PATH`
/// descriptor of a socket *file* reports a socket mode, and whoever holds one can
/// connect through `/proc/self/fd/N` to whatever listens there; `getsockopt` on it
/// fails with `ENOTSOCK`, as it does for any other non-socket.
pub fn check_socket(fd: BorrowedFd<'_>, kind: SocketKind) -> io::Result<()> {
    let refuse = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor is not {}", kind.description()),
        )
    };
    use rustix::net::{AddressFamily as Af, SocketType, sockopt};
    let ty = sockopt::socket_type(fd).map_err(|_| refuse())?;
    let domain = sockopt::socket_domain(fd).map_err(|_| refuse())?;
    let ok = match kind {
        SocketKind::Connection => {
            ty == SocketType::STREAM && [Af::UNIX, Af::INET, Af::INET6].contains(&domain)
        }
        SocketKind::Channel => ty == SocketType::SEQPACKET && domain == Af::UNIX,
    };
    if ok { Ok(()) } else { Err(refuse()) }
}

/// Sets or clears `O_NONBLOCK` with one `ioctl(FIONBIO)` rather than `fcntl` get +
/// set: a syscall less per socket.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let mut on = libc::c_int::from(on);
    // SAFETY: FIONBIO reads one c_int from the pointer, which is valid for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut on) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fd` in blocking mode, as applications expect of a connection they are handed
/// (tokio leaves the sockets it made non-blocking; socketpairs start out blocking).
pub fn blocking(fd: OwnedFd) -> io::Result<OwnedFd> {
    set_nonblocking(fd.as_fd(), false)?;
    Ok(fd)
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

/// Takes ownership of descriptor `raw`, which this process inherited (for example
/// the handle `flower run` announces in `FLOWER_SWITCHBOARD_FD`), after checking that
/// it is open and an AF_UNIX SOCK_SEQPACKET socket; marks it close-on-exec.
///
/// The caller must make sure nothing else in the process owns `raw` (call it once per
/// inherited number).
pub fn claim_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is not valid"),
        ));
    }
    nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| io::Error::other(format!("descriptor {raw} is not open: {e}")))?;
    // SAFETY: the descriptor is open (checked above) and, by this function's
    // contract, owned by nothing else in the process.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if check_socket(fd.as_fd(), SocketKind::Channel).is_err() {
        // Not ours to close: leave the descriptor as it was found.
        std::mem::forget(fd);
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {raw} is not an AF_UNIX SOCK_SEQPACKET socket"),
        ));
    }
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

/// A receive's buffers: data, one byte over the limit, and control, in u64 words so
/// that they are aligned for `cmsghdr`. Per thread and reused: the kernel writes what
/// it returns and nothing else is read, so nothing is cleared per call.
struct RecvBufs {
    data: [Vec<u8>; 2],
    control: Box<[[u64; CMSG_BUF_LEN.div_ceil(8)]; 2]>,
}

thread_local! {
    static RECV_BUFS: RefCell<RecvBufs> = RefCell::new(RecvBufs {
        data: [vec![0; MAX_DATAGRAM + 1], vec![0; MAX_DATAGRAM + 1]],
        control: Box::new([[0u64; CMSG_BUF_LEN.div_ceil(8)]; 2]),
    });
}

/// One non-blocking `recvmmsg` for up to two datagrams. The outer error is for the
/// reactor (`WouldBlock`); a `None` second means the socket had nothing more.
pub(super) fn recv_now(fd: RawFd) -> io::Result<(Received, Option<Received>)> {
    recv_up_to(fd, 2, libc::MSG_DONTWAIT)
}

/// A blocking SOCK_SEQPACKET socket connected to a listening `path`. With a
/// `timeout`, it is set as the socket's send and receive timeouts before connecting,
/// so the connect (which waits only while the listener's backlog is full), every
/// send and every receive are bounded by it.
pub fn connect_blocking(path: &Path, timeout: Option<Duration>) -> io::Result<OwnedFd> {
    let fd = new_seqpacket()?;
    if timeout.is_some() {
        set_timeouts(fd.as_fd(), timeout)?;
    }
    connect_with_retry(&fd, &UnixAddr::new(path)?)?;
    Ok(fd)
}

/// Bounds blocking sends and receives on `fd` (`None`: wait forever).
pub fn set_timeouts(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    let tv = match timeout {
        // Round up: a zero timeval would mean "forever".
        Some(t) => nix::sys::time::TimeVal::new(
            t.as_secs().min(i32::MAX as u64) as _,
            t.subsec_micros()
                .max(u32::from(t < Duration::from_micros(1))) as _,
        ),
        None => nix::sys::time::TimeVal::new(0, 0),
    };
    socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &tv)?;
    socket::setsockopt(&fd, socket::sockopt::SendTimeout, &tv)?;
    Ok(())
}

fn new_seqpacket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// `connect`, resumed after a signal (a Unix connect that was interrupted has
/// already queued or failed; retrying reports `EISCONN` if it went through).
fn connect_with_retry(fd: &OwnedFd, addr: &UnixAddr) -> io::Result<()> {
    loop {
        match socket::connect(fd.as_raw_fd(), addr) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EISCONN) => return Ok(()),
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Receives one datagram on a blocking socket, with the same checks as
/// [`Channel::recv`]. `SO_RCVTIMEO` on the socket bounds the wait (`WouldBlock`).
pub fn recv_blocking(fd: BorrowedFd<'_>) -> io::Result<Received> {
    loop {
        // With a timeout set the kernel never restarts the call after a signal.
        match recv_up_to(fd.as_raw_fd(), 1, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(|(first, _)| first),
        }
    }
}

/// Sends one datagram on a blocking socket, as [`Channel::send`] does.
pub fn send_blocking(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let (raw, n) = raw_fds(fds)?;
    send_msg(fd.as_raw_fd(), bytes, &raw[..n], libc::MSG_NOSIGNAL)
}

/// The raw numbers of at most [`MAX_FDS`] descriptors, on the stack.
pub(super) fn raw_fds<F: AsFd>(fds: &[F]) -> io::Result<([RawFd; MAX_FDS], usize)> {
    let mut raw = [-1; MAX_FDS];
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "datagram over the limits",
        ));
    }
    for (slot, fd) in raw.iter_mut().zip(fds) {
        *slot = fd.as_fd().as_raw_fd();
    }
    Ok((raw, fds.len()))
}

/// One `recvmmsg` for up to `count` (1 or 2) datagrams.
pub(super) fn recv_up_to(
    fd: RawFd,
    count: usize,
    flags: libc::c_int,
) -> io::Result<(Received, Option<Received>)> {
    RECV_BUFS.with_borrow_mut(
        |RecvBufs {
             data: bufs,
             control,
         }| {
            let mut iovs = [0, 1].map(|i| libc::iovec {
                iov_base: bufs[i].as_mut_ptr().cast(),
                iov_len: bufs[i].len(),
            });
            // SAFETY: mmsghdr is plain data; every pointer set below outlives the call.
            let mut msgs: [libc::mmsghdr; 2] = unsafe { std::mem::zeroed() };
            for (i, m) in msgs.iter_mut().enumerate() {
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_control = control[i].as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = std::mem::size_of_val(&control[i]) as _;
            }
            let flags = libc::MSG_CMSG_CLOEXEC | flags;
            let count = count.clamp(1, 2) as libc::c_uint;
            // SAFETY: `msgs` describes valid, writable buffers of the stated lengths.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    count,
                    flags as _,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let first = finish(&msgs[0], &bufs[0]);
            let second = (n >= 2).then(|| finish(&msgs[1], &bufs[1]));
            Ok((first, second))
        },
    )
}

/// Checks one received message and takes ownership of what it carried.
fn finish(m: &libc::mmsghdr, buf: &[u8]) -> Received {
    let fds = take_descriptors(&m.msg_hdr);
    let n = m.msg_len as usize;
    if m.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(RecvError::Truncated);
    }
    if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || n > MAX_DATAGRAM {
        return Err(RecvError::Oversize);
    }
    if fds.len() > MAX_FDS {
        return Err(RecvError::TooManyFds(fds.len()));
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(Datagram {
        bytes: buf[..n].to_vec(),
        fds,
    }))
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

/// Registers `fd` with the tokio reactor for `interest`. Sound for any `OwnedFd`: it
/// owns its descriptor, which stays open until the returned `AsyncFd` drops it.
pub fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `OwnedFd` owns its descriptor exclusively; it stays open and unchanged
    // until the `AsyncFd` holding it is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

/// One non-blocking `sendmsg` of a datagram and its descriptors (`WouldBlock` when the
/// peer's queue is full). Atomic: the whole frame and all descriptors, or nothing.
/// The control message is built on the stack (at most [`MAX_FDS`] descriptors), so a
/// send allocates nothing.
pub(super) fn send_now(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    send_msg(fd, bytes, fds, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
}

fn send_msg(fd: RawFd, bytes: &[u8], fds: &[RawFd], flags: libc::c_int) -> io::Result<()> {
    check_limits(bytes, fds.len())?;
    // Room for one SCM_RIGHTS header and MAX_FDS descriptors, aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    const _: () = assert!(64 >= 16 + MAX_FDS * 4, "control buffer too small");
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let len = std::mem::size_of_val(fds) as libc::c_uint;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE/CMSG_LEN only compute sizes.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len) } as _;
        // SAFETY: the control buffer holds CMSG_SPACE(len) bytes (asserted above), so
        // the first header and its data fit in it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: `msg` describes valid buffers of the stated lengths.
        if unsafe { libc::sendmsg(fd, &msg, flags) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `Err(InvalidInput)` for a datagram over the protocol's limits.
pub(super) fn check_limits(bytes: &[u8], fds: usize) -> io::Result<()> {
    if bytes.len() > MAX_DATAGRAM || fds > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "datagram over the limits",
        ));
    }
    Ok(())
}

/// A non-blocking, close-on-exec SOCK_SEQPACKET socket listening on `path`.
pub(super) fn bind_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(fd)
}

/// One non-blocking `accept4` on a listening socket: the connection, close-on-exec
/// and non-blocking.
pub(super) fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = socket::accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

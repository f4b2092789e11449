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
//! * the 64 KiB buffers are per thread, not per channel: an idle channel costs only
//!   its socket and its registration with the reactor;
//! * one `recvmmsg` asks for two datagrams: when only one comes back the socket is
//!   known to be empty, so the reactor's readiness is cleared at once instead of
//!   finding out with one more `recvmsg` that fails with `EAGAIN` (a syscall saved
//!   per message on every request/reply channel).

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

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

/// What one receive yields: a datagram, end of stream (`None`), or a refusal.
pub type Received = Result<Option<Datagram>, RecvError>;

/// A connected SOCK_SEQPACKET Unix socket registered with the tokio reactor.
#[derive(Debug)]
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// The second datagram of a two-datagram `recvmmsg`, returned by the next `recv`.
    spare: Mutex<Option<Box<Received>>>,
}

impl Channel {
    /// Wraps a connected socket; fails unless it is a Unix SOCK_SEQPACKET socket
    /// ([`check_socket`] with [`SocketKind::Channel`]).
    pub fn new(fd: OwnedFd) -> io::Result<Channel> {
        check_socket(fd.as_fd(), SocketKind::Channel)?;
        set_nonblocking(fd.as_fd(), true)?;
        Channel::registered(fd)
    }

    fn registered(fd: OwnedFd) -> io::Result<Channel> {
        Ok(Channel {
            fd: register(fd)?,
            spare: Mutex::new(None),
        })
    }

    /// A connected pair: a channel for this process and the raw other end to hand out.
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (a, b) = seqpacket_pair()?;
        // Made here: nothing to check.
        set_nonblocking(a.as_fd(), true)?;
        Ok((Channel::registered(a)?, b))
    }

    /// Connects to a listening path.
    pub async fn connect(path: &Path) -> io::Result<Channel> {
        // Connecting a Unix socket only blocks while the listener's backlog is full;
        // do it off the runtime so that case cannot stall other tasks.
        let path = path.to_owned();
        let fd = tokio::task::spawn_blocking(move || connect_blocking(&path, None))
            .await
            .map_err(io::Error::other)??;
        Channel::new(fd)
    }

    /// Sends one datagram. Atomic: the whole frame and all descriptors, or nothing.
    /// Waits for as long as the peer's queue stays full.
    pub async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_inner(bytes, fds, None, false).await
    }

    /// One non-blocking attempt: `WouldBlock` when the peer's queue is full.
    pub fn try_send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if bytes.len() > MAX_DATAGRAM || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram over the limits",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
        socket::sendmsg::<()>(
            self.fd.get_ref().as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map(drop)
        .map_err(io::Error::from)
    }

    /// After a [`Channel::try_send`] that would block: waits for room (at most
    /// `patience`, then `TimedOut`) and sends.
    pub async fn send_after_full(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        patience: Option<Duration>,
    ) -> io::Result<()> {
        self.send_inner(bytes, fds, patience, true).await
    }

    /// `wait_only`: the caller already found the queue full. With `patience`, gives
    /// up with `TimedOut` when the queue stays full that long (a peer that does not
    /// read); no timer is armed unless the queue is full.
    async fn send_inner(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        patience: Option<Duration>,
        wait_only: bool,
    ) -> io::Result<()> {
        if bytes.len() > MAX_DATAGRAM || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "datagram over the limits",
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let send_on = |fd: RawFd| {
            let iov = [IoSlice::new(bytes)];
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
            socket::sendmsg::<()>(
                fd,
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map(drop)
            .map_err(io::Error::from)
        };
        if !wait_only {
            match send_on(self.fd.get_ref().as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
        }
        // The peer's queue is full (rare). The channel is registered for reading
        // only — otherwise every read by the peer would wake this process with a
        // writable event nobody waits for — and a descriptor registered for writing
        // per waiting channel would let peers that stop reading double our
        // descriptors. So retry on a timer instead: 1 ms, doubling to 16 ms.
        let deadline = patience.map(|p| tokio::time::Instant::now() + p);
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(deadline) = deadline
                && tokio::time::Instant::now() >= deadline
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer has not read for {:?}",
                        patience.unwrap_or_default()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(16));
            match send_on(self.fd.get_ref().as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
        }
    }

    /// Receives one datagram; `Ok(None)` at end of stream.
    ///
    /// A zero-length datagram is indistinguishable from end of stream on SEQPACKET
    /// and is treated as such.
    /// Only one task may receive on a channel (datagrams are returned in order to
    /// whoever asks next).
    pub async fn recv(&self) -> Received {
        if let Some(spare) = self.spare.lock().unwrap().take() {
            return *spare;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            match recv_now(self.fd.get_ref().as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e.into()),
                Ok((first, second)) => {
                    match second {
                        // Emptied: safe to clear, as readiness that arrived after the
                        // wait began has a newer tick and is not cleared.
                        None => guard.clear_ready(),
                        Some(second) => *self.spare.lock().unwrap() = Some(Box::new(second)),
                    }
                    return first;
                }
            }
        }
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

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // Readable only: see `Channel::send` for how writing waits.
    // SAFETY: `OwnedFd` owns its descriptor exclusively; it stays open and unchanged
    // until the `AsyncFd` holding it is dropped.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }?)
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

thread_local! {
    static RECV_BUFS: RefCell<[Vec<u8>; 2]> =
        RefCell::new([vec![0; MAX_DATAGRAM + 1], vec![0; MAX_DATAGRAM + 1]]);
}

/// One non-blocking `recvmmsg` for up to two datagrams. The outer error is for the
/// reactor (`WouldBlock`); a `None` second means the socket had nothing more.
fn recv_now(fd: RawFd) -> io::Result<(Received, Option<Received>)> {
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
    if bytes.len() > MAX_DATAGRAM || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "datagram over the limits",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(
            fd.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            done => return done.map(drop).map_err(io::Error::from),
        }
    }
}

/// One `recvmmsg` for up to `count` (1 or 2) datagrams.
fn recv_up_to(
    fd: RawFd,
    count: usize,
    flags: libc::c_int,
) -> io::Result<(Received, Option<Received>)> {
    RECV_BUFS.with_borrow_mut(|bufs| {
        // u64 words keep the control buffers aligned for `cmsghdr`.
        let mut control = [[0u64; CMSG_BUF_LEN.div_ceil(8)]; 2];
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
    })
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
        set_nonblocking(fd.as_fd(), true)?;
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
        Channel::registered(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PATIENCE: Duration = Duration::from_secs(10);

    /// A sender facing a full queue waits and then completes; nothing is lost,
    /// duplicated or reordered, whether datagrams are received one or two at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queues_wait_for_room_and_order_is_kept() {
        let (a, b) = seqpacket_pair().unwrap();
        let (a, b) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let count = 2_000u32;
        let sender = tokio::spawn(async move {
            for i in 0..count {
                let mut bytes = vec![0u8; 8192];
                bytes[..4].copy_from_slice(&i.to_le_bytes());
                a.send(&bytes, &[]).await.unwrap();
            }
            a
        });
        // Let the queue fill (2 000 × 8 KiB is far beyond a socket buffer).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !sender.is_finished(),
            "the sender should be waiting for room"
        );
        for i in 0..count {
            let datagram = tokio::time::timeout(PATIENCE, b.recv())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(datagram.bytes[..4], i.to_le_bytes());
        }
        let a = tokio::time::timeout(PATIENCE, sender)
            .await
            .unwrap()
            .unwrap();
        drop(a);
        assert!(
            b.recv().await.unwrap().is_none(),
            "end of stream after the last"
        );
    }

    /// Only real sockets of the right type and family pass; an `O_PATH` descriptor
    /// of a socket file (which `fstat` calls a socket) does not.
    #[test]
    fn socket_checks_use_type_and_family() {
        let dir = tempfile_dir();
        let path = dir.join("listening");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let o_path = OwnedFd::from(
            std::os::unix::fs::OpenOptionsExt::custom_flags(
                std::fs::OpenOptions::new().read(true),
                libc::O_PATH,
            )
            .open(&path)
            .unwrap(),
        );
        let file = OwnedFd::from(std::fs::File::open("/").unwrap());
        let (seq, _) = seqpacket_pair().unwrap();
        let (stream, _) = stream_pair().unwrap();
        let udp = OwnedFd::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let tcp = OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let conn = SocketKind::Connection;
        let chan = SocketKind::Channel;
        for (fd, kind, ok) in [
            (&o_path, conn, false),
            (&o_path, chan, false),
            (&file, conn, false),
            (&seq, conn, false),
            (&seq, chan, true),
            (&stream, conn, true),
            (&stream, chan, false),
            (&udp, conn, false),
            (&tcp, conn, true),
        ] {
            assert_eq!(
                check_socket(fd.as_fd(), kind).is_ok(),
                ok,
                "{fd:?} {kind:?}"
            );
        }
        assert!(Channel::new(o_path).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("flower-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Two datagrams that arrive together, each with a descriptor: both are delivered,
    /// in order, with their own descriptors.
    #[tokio::test]
    async fn datagrams_received_together_keep_their_descriptors() {
        let (a, b) = Channel::pair().unwrap();
        let b = Channel::new(b).unwrap();
        let (x, _) = stream_pair().unwrap();
        let (y, _) = stream_pair().unwrap();
        a.send(b"one", &[x.as_fd()]).await.unwrap();
        a.send(b"two", &[y.as_fd(), x.as_fd()]).await.unwrap();
        let first = b.recv().await.unwrap().unwrap();
        let second = b.recv().await.unwrap().unwrap();
        assert_eq!((first.bytes.as_slice(), first.fds.len()), (&b"one"[..], 1));
        assert_eq!(
            (second.bytes.as_slice(), second.fds.len()),
            (&b"two"[..], 2)
        );
    }
}

//! SOCK_SEQPACKET channels that carry descriptors (docs/PROTOCOL.md §1), for async code.
//!
//! [`Channel`] and [`Listener`] wait with the tokio reactor; every raw socket call
//! (and all the transport's `unsafe`) is in [`sys`], which also serves the blocking
//! client. The receive-side limits are described there.

mod sys;

pub use sys::{
    Datagram, MAX_DATAGRAM, MAX_FDS, Received, RecvError, SocketKind, blocking, check_socket,
    claim_inherited, connect_blocking, recv_blocking, register, send_blocking, seqpacket_pair,
    set_nonblocking, set_timeouts, stream_pair,
};

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket;
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};

/// A connected SOCK_SEQPACKET Unix socket registered with the tokio reactor.
#[derive(Debug)]
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// The second datagram of a two-datagram `recvmmsg`, returned by the next `recv`.
    spare: Mutex<Option<Box<Received>>>,
    /// [`Channel::hung_up`] cleared the readable readiness while datagrams may still
    /// be queued: [`Channel::recv`] tries the socket before waiting, until it is empty.
    look_first: AtomicBool,
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
            // Readable only: see `Channel::send_inner` for how writing waits.
            fd: sys::register(fd, Interest::READABLE)?,
            spare: Mutex::new(None),
            look_first: AtomicBool::new(false),
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

    /// One non-blocking attempt: `WouldBlock` when the peer's queue is full. The
    /// descriptors may be of any kind (`OwnedFd`, `BorrowedFd`, …): no list of
    /// borrows is built.
    pub fn try_send<F: AsFd>(&self, bytes: &[u8], fds: &[F]) -> io::Result<()> {
        let (raw, n) = sys::raw_fds(fds)?;
        sys::send_now(self.fd.get_ref().as_raw_fd(), bytes, &raw[..n])
    }

    /// After a [`Channel::try_send`] that would block: waits for room (at most
    /// `patience`, then `TimedOut`) and sends.
    pub async fn send_after_full<F: AsFd>(
        &self,
        bytes: &[u8],
        fds: &[F],
        patience: Option<Duration>,
    ) -> io::Result<()> {
        self.send_inner(bytes, fds, patience, true).await
    }

    /// `wait_only`: the caller already found the queue full. With `patience`, gives
    /// up with `TimedOut` when the queue stays full that long (a peer that does not
    /// read); no timer is armed unless the queue is full.
    async fn send_inner<F: AsFd>(
        &self,
        bytes: &[u8],
        fds: &[F],
        patience: Option<Duration>,
        wait_only: bool,
    ) -> io::Result<()> {
        sys::check_limits(bytes, fds.len())?;
        let (raw, n) = sys::raw_fds(fds)?;
        let send_on = |fd: RawFd| sys::send_now(fd, bytes, &raw[..n]);
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
        // After `hung_up` cleared the readiness the socket is tried once before waiting.
        let mut look = self.look_first.load(Ordering::Acquire);
        loop {
            let mut guard = match look {
                true => None,
                false => Some(self.fd.readable().await?),
            };
            match sys::recv_now(self.fd.get_ref().as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match &mut guard {
                    Some(guard) => guard.clear_ready(),
                    None => {
                        look = false;
                        self.look_first.store(false, Ordering::Release);
                    }
                },
                Err(e) => return Err(e.into()),
                Ok((first, second)) => {
                    match second {
                        // Emptied: safe to clear, as readiness that arrived after the
                        // wait began has a newer tick and is not cleared.
                        None => {
                            if let Some(guard) = &mut guard {
                                guard.clear_ready();
                            }
                        }
                        Some(second) => *self.spare.lock().unwrap() = Some(Box::new(second)),
                    }
                    return first;
                }
            }
        }
    }

    /// Resolves once the other end has hung up, whatever is still queued: for a task
    /// that holds off reading (its calls in flight are full) and must still notice a
    /// caller that has gone. No system call: it waits for the reactor's hang-up
    /// event. Meanwhile arriving datagrams clear the readable readiness, and the next
    /// [`Channel::recv`] looks at the socket before it waits.
    pub async fn hung_up(&self) {
        loop {
            let Ok(mut guard) = self.fd.ready(Interest::READABLE).await else {
                return;
            };
            // Closed readiness is never cleared, so once seen it stays.
            if guard.ready().is_read_closed() {
                return;
            }
            self.look_first.store(true, Ordering::Release);
            guard.clear_ready_matching(Ready::READABLE);
        }
    }

    /// Receives one datagram if one is waiting, without waiting (`None`: nothing yet).
    /// Readiness is left as it is: a later [`Channel::recv`] finds the queue empty
    /// and waits properly.
    pub fn try_recv(&self) -> Option<Received> {
        if let Some(spare) = self.spare.lock().unwrap().take() {
            return Some(*spare);
        }
        match sys::recv_up_to(self.fd.get_ref().as_raw_fd(), 1, libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(e.into())),
            Ok((first, _)) => Some(first),
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

    /// Whether the other end has closed, whatever is still queued to read (a
    /// zero-timeout `poll` for a hang-up).
    pub fn peer_closed(&self) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let fd = self.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::RDHUP)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&now)).is_ok()
            && fds[0]
                .revents()
                .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR)
    }
}

/// A listening SOCK_SEQPACKET Unix socket.
#[derive(Debug)]
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    /// Binds and listens on `path` (which must not exist).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        Listener::from_fd(sys::bind_seqpacket(path)?)
    }

    /// Wraps an already listening socket (e.g. from systemd socket activation).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        set_nonblocking(fd.as_fd(), true)?;
        Ok(Listener {
            fd: sys::register(fd, Interest::READABLE)?,
        })
    }

    /// Accepts one connection.
    pub async fn accept(&self) -> io::Result<Channel> {
        let fd = self
            .fd
            .async_io(Interest::READABLE, |fd| sys::accept_nonblocking(fd.as_fd()))
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

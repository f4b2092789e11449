//! The floor: the least a broker can do to hand out a connection the way the
//! switchboard does, with no protocol at all.
//!
//! Same messages as a `ClientConnect`: the client sends a 1-byte request on a
//! SOCK_SEQPACKET socket; the broker makes a `socketpair(AF_UNIX, SOCK_STREAM)`,
//! sends one end to the server with SCM_RIGHTS, waits for the server's 1-byte ack, then
//! sends the other end to the client with SCM_RIGHTS.
//!
//! Broker design (kept minimal, and fair to concurrent clients): one blocking thread
//! per client connection, as the kernel schedules them; a mutex only around "send to
//! the server + queue the pending reply", so requests reach the server in FIFO order;
//! one thread reads the server's acks and answers the oldest pending request. Like the
//! switchboard, several requests can be in flight to the server at once.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};

use crate::procs::PATIENCE;

/// A request sent to the server: who asked, and the end to give them on the ack.
type Pending = (Arc<OwnedFd>, OwnedFd);

/// The server connects here; clients connect to the broker's main path.
pub fn server_path(path: &Path) -> PathBuf {
    path.with_extension("server")
}

/// `flower-bench floor-broker PATH`: serve forever.
pub fn broker_main(path: &Path) -> Result<()> {
    let server_listener = listen(&server_path(path))?;
    let client_listener = listen(path)?;
    println!("ready");
    let server = Arc::new(accept(&server_listener)?);
    drop(server_listener);
    let pending: Arc<Mutex<VecDeque<Pending>>> = Arc::default();

    // Acks come back in request order (the server is one sequential loop).
    let (acks, queue) = (server.clone(), pending.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(socket::recv(acks.as_raw_fd(), &mut buf, MsgFlags::empty()), Ok(n) if n > 0)
        {
            let Some((client, end)) = queue.lock().unwrap().pop_front() else {
                continue;
            };
            // A client that went away meanwhile just loses its connection.
            let _ = send_fd(&client, end.as_raw_fd());
        }
        // The server is gone: nothing more can be served.
        std::process::exit(0);
    });

    loop {
        let client = Arc::new(accept(&client_listener)?);
        let (server, pending) = (server.clone(), pending.clone());
        std::thread::spawn(move || {
            let mut request = [0u8; 1];
            while matches!(socket::recv(client.as_raw_fd(), &mut request, MsgFlags::empty()), Ok(n) if n > 0)
            {
                let Ok((to_server, to_client)) = socket::socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                ) else {
                    break;
                };
                let mut queue = pending.lock().unwrap();
                if send_fd(&server, to_server.as_raw_fd()).is_err() {
                    break;
                }
                queue.push_back((client.clone(), to_client));
            }
        });
    }
}

/// `flower-bench floor-server PATH`: take each descriptor, close it, ack.
pub fn server_main(path: &Path) -> Result<()> {
    let broker = connect(&server_path(path))?;
    println!("ready");
    loop {
        let fd = recv_fd(&broker).context("broker went away")?;
        drop(fd);
        socket::send(broker.as_raw_fd(), &[0], MsgFlags::MSG_NOSIGNAL)?;
    }
}

/// A client's connection to the broker. Receives time out, so a client never hangs.
pub fn client(path: &Path) -> Result<OwnedFd> {
    let fd = connect(path)?;
    socket::setsockopt(
        &fd,
        socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(PATIENCE.as_secs() as i64, 0),
    )?;
    Ok(fd)
}

/// One floor connect: request, receive the descriptor, close it.
pub fn connect_once(broker: &OwnedFd) -> Result<()> {
    socket::send(broker.as_raw_fd(), &[1], MsgFlags::MSG_NOSIGNAL)?;
    drop(recv_fd(broker)?);
    Ok(())
}

/// A fresh close-on-exec SOCK_SEQPACKET Unix socket.
pub fn seqpacket_socket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn listen(path: &Path) -> Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)
        .with_context(|| format!("cannot bind {}", path.display()))?;
    socket::listen(&fd, Backlog::new(1024)?)?;
    Ok(fd)
}

fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a fresh descriptor that we now own.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn connect(path: &Path) -> Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    Ok(fd)
}

/// Sends a 1-byte datagram carrying `fd`.
fn send_fd(to: &OwnedFd, fd: RawFd) -> nix::Result<usize> {
    let fds = [fd];
    socket::sendmsg::<()>(
        to.as_raw_fd(),
        &[IoSlice::new(&[0])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

/// Receives a datagram that must carry exactly one descriptor.
fn recv_fd(from: &OwnedFd) -> Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = socket::recvmsg::<()>(
        from.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        bail!("peer closed the connection");
    }
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c
            && let [fd] = fds[..]
        {
            // SAFETY: the kernel just installed this descriptor for us.
            return Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
        }
    }
    bail!("datagram carried no descriptor")
}

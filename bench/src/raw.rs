//! Blocking peers that speak the switchboard's wire protocol directly: one thread,
//! `sendmsg`/`recvmsg`, no runtime, no epoll. They are shaped like the floor's client
//! and server, so a switchboard measured with them differs from the floor only in the
//! broker. Measured with the library's (tokio) peers instead, the figure also carries
//! the client and server library's own cost; `connect` reports both.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use flower_proto::frame::Kind as FrameKind;
use flower_proto::rpc::Method;
use flower_proto::switchboard::{self as sb};
use flower_proto::{Call, Frame, Labels, Reply, server};
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, UnixAddr};
use prost::Message;

use crate::floor::seqpacket_socket;
use crate::procs::PATIENCE;

/// A blocking SOCK_SEQPACKET connection to the switchboard; receives time out.
pub struct RawChannel {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl RawChannel {
    pub fn connect(path: &Path) -> Result<RawChannel> {
        let fd = seqpacket_socket()?;
        socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        RawChannel::new(fd)
    }

    fn new(fd: OwnedFd) -> Result<RawChannel> {
        socket::setsockopt(
            &fd,
            socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(PATIENCE.as_secs() as i64, 0),
        )?;
        Ok(RawChannel {
            fd,
            buf: vec![0; flower_proto::transport::MAX_DATAGRAM],
        })
    }

    /// Sends a prebuilt frame, with no descriptors.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &[IoSlice::new(frame)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(())
    }

    /// Receives one frame and the descriptors it carries.
    pub fn recv(&mut self) -> Result<(Frame, Vec<OwnedFd>)> {
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let msg = socket::recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for us.
                fds.extend(raw.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            bail!("the switchboard closed the channel");
        }
        Ok((Frame::decode(&self.buf[..n])?, fds))
    }
}

/// The encoded `Call` frame of method `M` with `request`.
fn call_frame<M: Method>(id: u64, request: &M::Request) -> Vec<u8> {
    Frame {
        kind: Some(FrameKind::Call(Call {
            id,
            method: M::PATH.into(),
            message: request.encode_to_vec(),
        })),
    }
    .encode_to_vec()
}

/// The reply to the one outstanding call: its message and descriptors, or its error.
fn expect_reply(channel: &mut RawChannel) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    match channel.recv()? {
        (
            Frame {
                kind: Some(FrameKind::Reply(reply)),
            },
            fds,
        ) if reply.code == 0 => Ok((reply.message, fds)),
        (
            Frame {
                kind: Some(FrameKind::Reply(reply)),
            },
            _,
        ) => bail!("{}", reply.error),
        _ => bail!("expected a reply"),
    }
}

/// A client that repeats one `ClientConnect`, each connect one call and one reply.
pub struct RawClient {
    channel: RawChannel,
    frame: Vec<u8>,
}

impl RawClient {
    pub fn new(path: &Path, labels: &Labels) -> Result<RawClient> {
        let request = sb::ClientConnectRequest {
            out_labels: labels.clone(),
        };
        Ok(RawClient {
            channel: RawChannel::connect(path)?,
            // One call outstanding at a time, so one id serves every call.
            frame: call_frame::<sb::rpc::ClientConnect>(1, &request),
        })
    }

    /// One connect: the switchboard's end of the connection arrives and is closed.
    pub fn connect_once(&mut self) -> Result<()> {
        self.channel.send(&self.frame)?;
        let (_, fds) = expect_reply(&mut self.channel)?;
        if fds.len() != 1 {
            bail!("ClientConnect reply carried {} descriptors", fds.len());
        }
        Ok(())
    }
}

/// `flower-bench raw-server`: registers under `labels`, then closes every connection
/// it is handed and acknowledges it, forever.
pub fn server_main(path: &Path, labels: &Labels) -> Result<()> {
    let mut handle = RawChannel::connect(path)?;
    let request = sb::ServerStartRequest {
        in_labels: labels.clone(),
    };
    handle.send(&call_frame::<sb::rpc::ServerStart>(1, &request))?;
    let (_, mut fds) = expect_reply(&mut handle)?;
    let Some(registration) = fds.pop() else {
        bail!("ServerStart reply carried no descriptor");
    };
    // The registration channel waits indefinitely: connects come when they come.
    let mut registration = RawChannel {
        fd: registration,
        buf: vec![0; flower_proto::transport::MAX_DATAGRAM],
    };
    println!("ready");
    loop {
        let (frame, fds) = registration.recv().context("registration closed")?;
        let Some(FrameKind::Call(call)) = frame.kind else {
            bail!("expected a call");
        };
        if call.method != server::rpc::Connect::PATH {
            bail!("unexpected call {}", call.method);
        }
        drop(fds);
        let ack = Frame {
            kind: Some(FrameKind::Reply(Reply {
                id: call.id,
                ..Reply::default()
            })),
        };
        registration.send(&ack.encode_to_vec())?;
    }
}

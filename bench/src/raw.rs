//! Blocking peers, shaped like the floor's client and server: one thread,
//! `sendmsg`/`recvmsg`, no runtime, no epoll. Measured with them, the switchboard
//! differs from the floor only in the broker. Measured with the async library's
//! peers, the figure also carries their event loops' cost; `connect` reports both.
//!
//! The client is the library's own [`flower_proto::blocking`] client. The server
//! speaks the wire protocol by hand, since the library serves only asynchronously.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use flower_proto::blocking::Switchboard;
use flower_proto::frame::Kind as FrameKind;
use flower_proto::rpc::Method;
use flower_proto::switchboard as sb;
use flower_proto::transport::{recv_blocking, send_blocking, set_nonblocking};
use flower_proto::{Call, Frame, Labels, Reply, server};
use prost::Message;

/// A client that repeats one `ClientConnect` through the blocking client.
pub struct RawClient {
    switchboard: Switchboard,
    labels: Labels,
}

impl RawClient {
    pub fn new(path: &Path, labels: &Labels) -> Result<RawClient> {
        let switchboard = Switchboard::connect(path)?;
        switchboard.set_timeout(Some(crate::procs::PATIENCE))?;
        Ok(RawClient {
            switchboard,
            labels: labels.clone(),
        })
    }

    /// One connect: the connection arrives and is closed at once.
    pub fn connect_once(&mut self) -> Result<()> {
        drop(self.switchboard.client_connect(&self.labels)?);
        Ok(())
    }
}

/// One frame and its descriptors from a blocking socket.
fn recv(fd: &OwnedFd) -> Result<(Frame, Vec<OwnedFd>)> {
    match recv_blocking(fd.as_fd())?? {
        Some(d) => Ok((Frame::decode(&d.bytes[..])?, d.fds)),
        None => bail!("the switchboard closed the channel"),
    }
}

fn send(fd: &OwnedFd, frame: &Frame) -> Result<()> {
    Ok(send_blocking(fd.as_fd(), &frame.encode_to_vec(), &[])?)
}

/// `flower-bench raw-server`: registers under `labels`, then closes every connection
/// it is handed and acknowledges it, forever.
pub fn server_main(path: &Path, labels: &Labels) -> Result<()> {
    let handle = flower_proto::transport::connect_blocking(path, Some(crate::procs::PATIENCE))?;
    let start = Call {
        id: 1,
        method: sb::rpc::ServerStart::PATH.into(),
        message: sb::ServerStartRequest {
            in_labels: labels.clone(),
        }
        .encode_to_vec(),
    };
    send(
        &handle,
        &Frame {
            kind: Some(FrameKind::Call(start)),
        },
    )?;
    let registration = match recv(&handle)? {
        (
            Frame {
                kind: Some(FrameKind::Reply(r)),
            },
            mut fds,
        ) if r.code == 0 && fds.len() == 1 => fds.pop().expect("one descriptor"),
        (
            Frame {
                kind: Some(FrameKind::Reply(r)),
            },
            _,
        ) => bail!("ServerStart failed: {}", r.error),
        _ => bail!("expected the ServerStart reply"),
    };
    set_nonblocking(registration.as_fd(), false)?;
    println!("ready");
    loop {
        let (frame, fds) = recv(&registration).context("registration closed")?;
        let Some(FrameKind::Call(call)) = frame.kind else {
            bail!("expected a call");
        };
        if call.method != server::rpc::Connect::PATH {
            bail!("unexpected call {}", call.method);
        }
        drop(fds);
        let ack = Reply {
            id: call.id,
            ..Reply::default()
        };
        send(
            &registration,
            &Frame {
                kind: Some(FrameKind::Reply(ack)),
            },
        )?;
    }
}

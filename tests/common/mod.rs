//! Shared harness for the black-box tests: a real `flower switchboard` process on a
//! temp path, descriptor counting through /proc, and raw protocol helpers.
#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flower_proto::client::Switchboard;
use flower_proto::frame::Kind;
use flower_proto::transport::Channel;
use flower_proto::{Call, Frame, Labels, Reply};
use prost::Message;

pub const FLOWER: &str = env!("CARGO_BIN_EXE_flower");
/// Upper bound for anything a test waits for.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The error of a call that must fail (for results whose success type has no Debug).
pub fn refusal<T>(result: Result<T, flower_proto::Status>) -> flower_proto::Status {
    result.err().expect("the call should have been refused")
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A switchboard daemon on a private temp path; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        raise_nofile_limit();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchboard");
        let child = Command::new(FLOWER)
            .arg("switchboard")
            .arg(&path)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start flower switchboard");
        let daemon = Daemon { child, path, dir };
        wait_until("switchboard socket to accept", || connectable(&daemon.path));
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn connect(&self) -> Switchboard {
        Switchboard::connect(&self.path)
            .await
            .expect("connect to switchboard")
    }

    pub fn fd_count(&self) -> usize {
        fd_count(self.pid())
    }

    /// The daemon's descriptor count once `sb` is surely accepted (a call went through).
    pub async fn baseline(&self, sb: &Switchboard) -> usize {
        list(sb, &Labels::new()).await;
        self.fd_count()
    }

    /// Waits until the daemon's descriptor count is back to at most `baseline`.
    pub async fn settle_fds(&self, baseline: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let now = self.fd_count();
            if now <= baseline {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon holds {now} descriptors, expected at most {baseline}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_child(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process {} did not exit",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub async fn wait_until_async<F: Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn connectable(path: &Path) -> bool {
    use nix::sys::socket::{UnixAddr, connect};
    use std::os::fd::AsRawFd;
    let fd = seqpacket();
    UnixAddr::new(path).is_ok_and(|addr| connect(fd.as_raw_fd(), &addr).is_ok())
}

/// A new, unconnected SOCK_SEQPACKET socket (close-on-exec).
pub fn seqpacket() -> OwnedFd {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap()
}

/// Sends SIGTERM to `child` and returns its exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_child(child)
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What each open descriptor of `pid` points at, for failure messages.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        Some(format!(
            "{}->{}",
            e.file_name().to_string_lossy(),
            std::fs::read_link(e.path()).ok()?.display()
        ))
    })
    .collect()
}

/// Many handles need many descriptors in the test process too.
pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The names of targets currently listed (as JSON-ish label maps).
pub async fn list(sb: &Switchboard, filter: &Labels) -> Vec<Labels> {
    let mut stream = sb.list(filter).await.expect("list");
    let mut all = Vec::new();
    while let Some(item) = stream.next().await {
        all.push(item.expect("list item"));
    }
    all
}

/// Sends "ping" from `a` to `b` and "pong" back: both directions of a connection work.
pub fn exchange(
    a: &mut (impl std::io::Read + std::io::Write),
    b: &mut (impl std::io::Read + std::io::Write),
) {
    a.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    b.write_all(b"pong").unwrap();
    a.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

// ---- raw protocol, for malformed input ----

pub fn call_frame(id: u64, method: &str, message: Vec<u8>) -> Vec<u8> {
    Frame {
        kind: Some(Kind::Call(Call {
            id,
            method: method.into(),
            message,
        })),
    }
    .encode_to_vec()
}

pub async fn raw_connect(path: &Path) -> Channel {
    Channel::connect(path).await.expect("raw connect")
}

pub async fn send_raw(channel: &Channel, bytes: &[u8], fds: &[OwnedFd]) {
    use std::os::fd::AsFd;
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    channel.send(bytes, &borrowed).await.expect("raw send");
}

/// Next reply on a raw channel, or `None` if the channel was closed.
pub async fn recv_reply(channel: &Channel) -> Option<(Reply, Vec<OwnedFd>)> {
    let datagram = tokio::time::timeout(PATIENCE, channel.recv())
        .await
        .expect("reply in time")
        .ok()??;
    match Frame::decode(&datagram.bytes[..])
        .expect("daemon sends valid frames")
        .kind
    {
        Some(Kind::Reply(reply)) => Some((reply, datagram.fds)),
        other => panic!("expected a reply, got {other:?}"),
    }
}

/// A path to send descriptors over a raw SEQPACKET socket with more descriptors than
/// the transport itself allows.
pub fn send_raw_unchecked(channel: &Channel, bytes: &[u8], fds: &[std::os::fd::RawFd]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::AsRawFd;
    let iov = [std::io::IoSlice::new(bytes)];
    sendmsg::<()>(
        channel.as_fd().as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
}

//! The blocking client (`flower_proto::blocking`) against the real daemon, and
//! against a fake switchboard that answers late, wrongly or not at all.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use flower_proto::blocking::Switchboard;
use flower_proto::frame::Kind;
use flower_proto::{Code, Frame, Reply, Status};
use nix::sys::socket::{self, Backlog, MsgFlags, UnixAddr};
use prost::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_by_labels_and_reports_refusals() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut server = root
        .server_start(&labels(&[("app", "web"), ("pod", "web-1")]))
        .await
        .unwrap();
    let path = daemon.path.clone();
    let client = std::thread::spawn(move || {
        let mut sb = Switchboard::connect(&path).unwrap();
        let conn = sb.client_connect(&labels(&[("app", "web")])).unwrap();
        let missing = refusal(sb.client_connect(&labels(&[("app", "mail")])));
        // The handle keeps working after a refusal.
        let again = sb.client_connect(&labels(&[("pod", "web-1")])).unwrap();
        (conn, missing, again)
    });
    let first = tokio::time::timeout(PATIENCE, server.accept())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(PATIENCE, server.accept())
        .await
        .unwrap()
        .unwrap();
    let (conn, missing, again) = client.join().unwrap();

    assert_eq!(conn.labels, labels(&[("app", "web"), ("pod", "web-1")]));
    assert_eq!(missing.code, Code::NotFound);
    assert_eq!(missing.message, "No matching target found");
    exchange(
        &mut UnixStream::from(conn.socket),
        &mut UnixStream::from(first.socket),
    );
    exchange(
        &mut UnixStream::from(again.socket),
        &mut UnixStream::from(second.socket),
    );
}

#[test]
fn a_missing_switchboard_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Switchboard::connect(&dir.path().join("nobody-home")).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot connect to the switchboard at"),
        "{text}"
    );
    assert!(text.contains("nobody-home"), "{text}");
}

/// A listening socket standing in for the switchboard; the test drives its side.
fn fake_switchboard() -> (tempfile::TempDir, std::path::PathBuf, std::os::fd::OwnedFd) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake");
    let listener = socket::socket(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    socket::listen(&listener, Backlog::new(4).unwrap()).unwrap();
    (dir, path, listener)
}

fn accept(listener: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    let fd = socket::accept(listener.as_raw_fd()).unwrap();
    // SAFETY: accept returned a fresh descriptor we now own.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// Reads one call and returns its id.
fn read_call(peer: &std::os::fd::OwnedFd) -> u64 {
    let mut buf = vec![0; 65_536];
    let n = socket::recv(peer.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
    match Frame::decode(&buf[..n]).unwrap().kind {
        Some(Kind::Call(call)) => call.id,
        other => panic!("expected a call, got {other:?}"),
    }
}

fn send_reply(peer: &std::os::fd::OwnedFd, reply: Reply) {
    let frame = Frame {
        kind: Some(Kind::Reply(reply)),
    };
    socket::send(peer.as_raw_fd(), &frame.encode_to_vec(), MsgFlags::empty()).unwrap();
}

fn refusal_of(id: u64, status: Status) -> Reply {
    Reply {
        id,
        code: status.code as i32,
        error: status.message,
        ..Reply::default()
    }
}

#[test]
fn a_silent_switchboard_times_out_and_late_replies_are_skipped() {
    let (_dir, path, listener) = fake_switchboard();
    let mut sb = Switchboard::connect(&path).unwrap();
    let peer = accept(&listener);
    sb.set_timeout(Some(Duration::from_millis(200))).unwrap();

    let started = Instant::now();
    let err = refusal(sb.client_connect(&labels(&[("app", "web")])));
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    assert!(started.elapsed() < PATIENCE);
    let late = read_call(&peer);

    // The late answer to the first call arrives before the answer to the second:
    // the client must skip it and return the second.
    sb.set_timeout(Some(PATIENCE)).unwrap();
    let worker = std::thread::spawn(move || refusal(sb.client_connect(&labels(&[("a", "b")]))));
    let second = read_call(&peer);
    assert_ne!(late, second);
    send_reply(&peer, refusal_of(late, Status::internal("stale")));
    send_reply(
        &peer,
        refusal_of(second, Status::not_found("second answer")),
    );
    let err = worker.join().unwrap();
    assert_eq!(
        (err.code, err.message.as_str()),
        (Code::NotFound, "second answer")
    );
}

#[test]
fn a_switchboard_dying_mid_call_is_unavailable() {
    let (_dir, path, listener) = fake_switchboard();
    let mut sb = Switchboard::connect(&path).unwrap();
    let peer = accept(&listener);
    let worker = std::thread::spawn(move || refusal(sb.client_connect(&labels(&[("a", "b")]))));
    read_call(&peer);
    drop(peer);
    let err = worker.join().unwrap();
    assert_eq!(err.code, Code::Unavailable, "{err}");
}

#[test]
fn a_reply_with_stray_descriptors_is_refused_and_they_are_closed() {
    let (_dir, path, listener) = fake_switchboard();
    let mut sb = Switchboard::connect(&path).unwrap();
    let peer = accept(&listener);
    let worker = std::thread::spawn(move || refusal(sb.client_connect(&labels(&[("a", "b")]))));
    let id = read_call(&peer);
    // An OK reply that names no descriptor but carries one.
    let (stray, kept) = UnixStream::pair().unwrap();
    let frame = Frame {
        kind: Some(Kind::Reply(Reply {
            id,
            ..Reply::default()
        })),
    };
    let fds = [stray.as_raw_fd()];
    socket::sendmsg::<()>(
        peer.as_raw_fd(),
        &[std::io::IoSlice::new(&frame.encode_to_vec())],
        &[socket::ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(stray);
    let err = worker.join().unwrap();
    assert_eq!(err.code, Code::Internal, "{err}");
    // The client closed the stray descriptor: its peer sees end of file.
    kept.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut &kept, &mut buf).unwrap(), 0);
}

#[test]
fn a_sub_microsecond_timeout_is_not_forever() {
    let (_dir, path, listener) = fake_switchboard();
    let mut sb = Switchboard::connect(&path).unwrap();
    let _peer = accept(&listener);
    sb.set_timeout(Some(Duration::from_nanos(1))).unwrap();
    let worker = std::thread::spawn(move || refusal(sb.client_connect(&labels(&[("a", "b")]))));
    let deadline = Instant::now() + PATIENCE;
    while !worker.is_finished() {
        assert!(Instant::now() < deadline, "a 1 ns timeout waited forever");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(worker.join().unwrap().code, Code::DeadlineExceeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_server_accepts_and_its_target_goes_with_it() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let path = daemon.path.clone();
    let (ready, registered) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let mut sb = Switchboard::connect(&path).unwrap();
        let mut server = sb.server_start(&labels(&[("app", "web")])).unwrap();
        ready.send(()).unwrap();
        server.accept().unwrap()
    });
    registered.recv_timeout(PATIENCE).unwrap();
    let conn = root
        .client_connect(&labels(&[("app", "web")]))
        .await
        .unwrap();
    let incoming = server.join().unwrap();
    assert_eq!(incoming.labels, labels(&[("app", "web")]));
    exchange(
        &mut UnixStream::from(conn.socket),
        &mut UnixStream::from(incoming.socket),
    );
    // The thread dropped its Server (and handle): the registration is gone.
    wait_until_async("the target to go", || async {
        list(&root, &flower_proto::Labels::new()).await.is_empty()
    })
    .await;
}

//! Load the reference implementation could not take: many connects, concurrent
//! clients on one server, thousands of open handles.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::*;
use flower_proto::Labels;
use flower_proto::client::Server;
use flower_proto::switchboard::Right;

/// Serves `server` forever: each connection gets its first byte echoed back.
fn echo(mut server: Server) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(conn) = server.accept().await {
            tokio::task::spawn_blocking(move || {
                let mut s = UnixStream::from(conn.socket);
                s.set_read_timeout(Some(PATIENCE)).unwrap();
                let mut byte = [0];
                if s.read_exact(&mut byte).is_ok() {
                    let _ = s.write_all(&byte);
                }
            });
        }
    })
}

fn round_trip(socket: std::os::fd::OwnedFd, byte: u8) {
    let mut s = UnixStream::from(socket);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(&[byte]).unwrap();
    let mut back = [0];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back[0], byte);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connects_leave_no_descriptors_behind() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let server = root
        .server_start(&labels(&[("app", "echo")]))
        .await
        .unwrap();
    let _echo = echo(server);
    let client = root
        .constrain(
            &[Right::ClientConnect],
            &Labels::new(),
            &labels(&[("app", "echo")]),
        )
        .await
        .unwrap();
    round_trip(
        client.client_connect(&Labels::new()).await.unwrap().socket,
        0,
    );
    let baseline = daemon.baseline(&root).await;
    for i in 0..2000u32 {
        let conn = client.client_connect(&Labels::new()).await.unwrap();
        if i % 100 == 0 {
            round_trip(conn.socket, i as u8);
        }
    }
    daemon.settle_fds(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_connect_to_one_server_at_once() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let server = root
        .server_start(&labels(&[("app", "busy")]))
        .await
        .unwrap();
    let _echo = echo(server);
    let baseline = daemon.baseline(&root).await;
    let clients: Vec<_> = (0..8u8)
        .map(|c| {
            let path = daemon.path.clone();
            tokio::spawn(async move {
                // Each client its own process-like handle, with 25 connects in flight.
                let sb = flower_proto::client::Switchboard::connect(&path)
                    .await
                    .unwrap();
                let busy = labels(&[("app", "busy")]);
                let conns =
                    futures::future::join_all((0..25).map(|_| sb.client_connect(&busy))).await;
                let sockets: Vec<_> = conns.into_iter().map(|c| c.unwrap().socket).collect();
                tokio::task::spawn_blocking(move || {
                    for (i, s) in sockets.into_iter().enumerate() {
                        round_trip(s, c.wrapping_mul(32).wrapping_add(i as u8));
                    }
                })
                .await
                .unwrap();
            })
        })
        .collect();
    for client in clients {
        client.await.expect("all 200 connects succeed");
    }
    daemon.settle_fds(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_handles_open_at_once_are_all_served() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let _target = root.server_start(&labels(&[("app", "x")])).await.unwrap();
    let baseline = daemon.baseline(&root).await;
    let mut handles = Vec::new();
    for i in 0..2000 {
        // Half straight from the socket path, half derived with Constrain.
        let handle = if i % 2 == 0 {
            daemon.connect().await
        } else {
            root.constrain(&[Right::List], &Labels::new(), &Labels::new())
                .await
                .unwrap()
        };
        handles.push(handle);
    }
    assert!(daemon.fd_count() >= baseline + 2000);
    let everything = Labels::new();
    let counts = futures::future::join_all(handles.iter().map(|h| list(h, &everything))).await;
    assert!(counts.iter().all(|c| c.len() == 1));
    drop(handles);
    daemon.settle_fds(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hitting_the_descriptor_limit_is_a_clear_error_and_recoverable() {
    let daemon = Daemon::start_with(&["--nofile", "64"]);
    let root = daemon.connect().await;
    let mut handles = Vec::new();
    let err = loop {
        match root
            .constrain(&[Right::List], &Labels::new(), &Labels::new())
            .await
        {
            Ok(handle) => handles.push(handle),
            Err(err) => break err,
        }
        assert!(handles.len() < 64, "the limit of 64 was never hit");
    };
    assert_eq!(err.code, flower_proto::Code::ResourceExhausted);
    // For a uid without CAP_SYS_RESOURCE the kernel also bounds the descriptors the
    // uid has in flight by the sender's RLIMIT_NOFILE (ETOOMANYREFS), and that can
    // come first: the reply then says so instead of hanging (docs/PROTOCOL.md §4).
    let budget = err
        .message
        .starts_with("The switchboard's descriptors are used up: RLIMIT_NOFILE 64");
    let in_flight = !nix::unistd::geteuid().is_root()
        && err.message.starts_with("Reply could not be sent")
        && err.message.contains("Too many references");
    assert!(budget || in_flight, "{err}");
    // Closing handles frees descriptors; the switchboard goes on.
    drop(handles);
    wait_until_async("descriptors to be freed", || async {
        root.constrain(&[Right::List], &Labels::new(), &Labels::new())
            .await
            .is_ok()
    })
    .await;
}

//! Servers registered with `backlog` (docs/PROTOCOL.md, "Backlog servers"): a client
//! is handed its end as soon as the server's Connect is queued, and sees end of stream
//! when the server never takes the connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use common::*;
use flower_proto::client::ServerOptions;
use flower_proto::switchboard as sb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_server_serves_like_any_other() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;
    let options = ServerOptions { backlog: true };
    let mut server = root
        .server_start_with(&labels(&[("app", "web")]), &options)
        .await
        .unwrap();
    for round in 0..50u8 {
        let conn = root
            .client_connect(&labels(&[("app", "web")]))
            .await
            .unwrap();
        assert_eq!(conn.labels, labels(&[("app", "web")]));
        let accepted = tokio::time::timeout(PATIENCE, server.accept())
            .await
            .unwrap()
            .unwrap();
        let (mut client, mut served) = (
            UnixStream::from(conn.socket),
            UnixStream::from(accepted.socket),
        );
        client.write_all(&[round]).unwrap();
        let mut byte = [0];
        served.read_exact(&mut byte).unwrap();
        assert_eq!(byte, [round]);
    }
    drop(server);
    daemon.settle_fds(baseline).await;
}

/// The server's channel is never read: the client is answered anyway, and once the
/// server goes, the queued connection goes with it and the client reads end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_never_takes_ends_in_end_of_stream() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;
    let request = sb::ServerStartRequest {
        in_labels: labels(&[("app", "stuck")]),
        backlog: true,
    };
    let (reply, mut fds) = root.rpc().server_start(&request, Vec::new()).await.unwrap();
    // The registration channel, held raw and never read.
    let registration = fds.take(reply.server, "server").unwrap();

    let started = std::time::Instant::now();
    let conn = tokio::time::timeout(PATIENCE, root.client_connect(&labels(&[("app", "stuck")])))
        .await
        .expect("a backlog server's client is answered without the server")
        .unwrap();
    assert!(started.elapsed() < PATIENCE);
    drop(registration);
    let mut client = UnixStream::from(conn.socket);
    client.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "end of stream");
    daemon.settle_fds(baseline).await;
}

/// Without `backlog` the client still waits for the server (the default is unchanged):
/// a server that never reads times the client out instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_backlog_the_client_waits_for_the_server() {
    let daemon = Daemon::start_with(&["--call-timeout", "1"]);
    let root = daemon.connect().await;
    let request = sb::ServerStartRequest {
        in_labels: labels(&[("app", "slow")]),
        backlog: false,
    };
    let (reply, mut fds) = root.rpc().server_start(&request, Vec::new()).await.unwrap();
    let _registration = fds.take(reply.server, "server").unwrap();
    let status = refusal(root.client_connect(&labels(&[("app", "slow")])).await);
    assert_eq!(
        status.code,
        flower_proto::Code::DeadlineExceeded,
        "{status}"
    );
}

//! The client library's handle has no reader task: each call reads its own reply,
//! handing other callers' replies on. Pipelined calls from many tasks, on both
//! runtime flavours, must each get their own answer, and a hang-up must be seen.

mod common;

use std::time::Duration;

use common::*;
use flower_proto::Code;

async fn many_callers_share_one_handle() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut server = root.server_start(&labels(&[("app", "web")])).await.unwrap();
    let accepting = tokio::spawn(async move {
        let mut n = 0;
        while let Some(conn) = server.accept().await {
            drop(conn);
            n += 1;
            if n == 200 {
                break;
            }
        }
        n
    });
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..400 {
        let sb = root.clone();
        calls.spawn(async move {
            // Every other call is refused, so replies of both kinds interleave.
            let app = if i % 2 == 0 { "web" } else { "nothing" };
            let result = sb.client_connect(&labels(&[("app", app)])).await;
            (i, result.map(|c| c.labels).map_err(|s| s.code))
        });
    }
    while let Some(joined) = tokio::time::timeout(PATIENCE, calls.join_next())
        .await
        .expect("calls answered")
    {
        let (i, result) = joined.unwrap();
        match i % 2 {
            0 => assert_eq!(result, Ok(labels(&[("app", "web")]))),
            _ => assert_eq!(result, Err(Code::NotFound)),
        }
    }
    assert_eq!(accepting.await.unwrap(), 200);
}

#[tokio::test(flavor = "current_thread")]
async fn many_callers_share_one_handle_on_one_thread() {
    many_callers_share_one_handle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_callers_share_one_handle_on_many_threads() {
    many_callers_share_one_handle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_sees_the_switchboard_go() {
    let mut daemon = Daemon::start();
    let root = daemon.connect().await;
    root.list(&labels(&[])).await.unwrap();
    assert!(!root.is_closed());
    daemon.terminate();
    wait_until_async("the handle to see the hang-up", || async {
        root.is_closed()
    })
    .await;
    let status = refusal(root.client_connect(&labels(&[("app", "web")])).await);
    assert_eq!(status.code, Code::Unavailable, "{status}");
    // A call on a closed handle fails at once, it does not wait.
    tokio::time::timeout(Duration::from_secs(1), root.list(&labels(&[])))
        .await
        .expect("no wait")
        .err()
        .expect("refused");
}

//! Malformed input: every case gets an error reply or a closed channel, the daemon
//! keeps serving other handles, and its descriptor count returns to where it was.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use common::*;
use flower_proto::client::Switchboard;
use flower_proto::switchboard as sb;
use flower_proto::{Code, Fd, Labels};
use prost::Message;

const CLIENT_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/ClientConnect";
const INGRESS_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/IngressConnect";
const CONSTRAIN: &str = "/flower.protocol.switchboard.Switchboard/Constrain";

/// Runs `abuse` on a fresh raw channel, then checks that a bystander handle still
/// works and the daemon's descriptors are back to the baseline.
async fn survives<F: Future<Output = ()>>(
    daemon: &Daemon,
    bystander: &Switchboard,
    abuse: impl FnOnce(flower_proto::transport::Channel) -> F,
) {
    let baseline = daemon.baseline(bystander).await;
    abuse(raw_connect(&daemon.path).await).await;
    let err = bystander
        .client_connect(&labels(&[("app", "nothing")]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound, "bystander still served");
    daemon.settle_fds(baseline).await;
}

fn sockets(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| OwnedFd::from(UnixStream::pair().unwrap().0))
        .collect()
}

async fn assert_closed(channel: &flower_proto::transport::Channel) {
    assert!(
        recv_reply(channel).await.is_none(),
        "daemon should close the channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_close_only_that_channel() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    for garbage in [
        &b"\xff\xff\xff\xff not protobuf"[..],
        b"\x0a\x05\x08",
        b"\x1a\x00",
    ] {
        survives(&daemon, &bystander, |ch| async move {
            send_raw(&ch, garbage, &[]).await;
            assert_closed(&ch).await;
        })
        .await;
    }
    // Garbage carrying descriptors: they are closed too.
    survives(&daemon, &bystander, |ch| async move {
        send_raw(&ch, b"\xffjunk", &sockets(2)).await;
        assert_closed(&ch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_descriptors_close_the_channel() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    survives(&daemon, &bystander, |ch| async move {
        let fds = sockets(5);
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let frame = call_frame(
            1,
            CLIENT_CONNECT,
            sb::ClientConnectRequest::default().encode_to_vec(),
        );
        send_raw_unchecked(&ch, &frame, &raw);
        drop(fds);
        assert_closed(&ch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_datagrams_close_the_channel() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    survives(&daemon, &bystander, |ch| async move {
        let big = call_frame(1, CLIENT_CONNECT, vec![0; 70_000]);
        send_raw_unchecked(
            &ch,
            &big,
            &sockets(1).iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>(),
        );
        assert_closed(&ch).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_slot_mismatches_get_invalid_argument() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    let cases: Vec<(Option<Fd>, usize)> = vec![
        (Some(Fd { slot: 3 }), 1), // slot beyond what arrived
        (Some(Fd { slot: 0 }), 2), // one descriptor left unclaimed
        (None, 1),                 // descriptor with no field
        (Some(Fd { slot: 0 }), 0), // field with no descriptor
    ];
    for (client, n) in cases {
        survives(&daemon, &bystander, |ch| async move {
            let request = sb::IngressConnectRequest {
                client,
                out_labels: labels(&[("app", "x")]),
            };
            send_raw(
                &ch,
                &call_frame(5, INGRESS_CONNECT, request.encode_to_vec()),
                &sockets(n),
            )
            .await;
            let (reply, fds) = recv_reply(&ch).await.expect("error reply");
            assert_eq!(
                (reply.id, Code::from_i32(reply.code)),
                (5, Code::InvalidArgument),
                "{}",
                reply.error
            );
            assert!(fds.is_empty());
            // The channel keeps working.
            send_raw(
                &ch,
                &call_frame(
                    6,
                    CONSTRAIN,
                    sb::ConstrainRequest::default().encode_to_vec(),
                ),
                &[],
            )
            .await;
            let (reply, fds) = recv_reply(&ch).await.expect("constrain reply");
            assert_eq!((reply.id, reply.code, fds.len()), (6, 0, 1));
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_bad_messages_get_error_replies() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    survives(&daemon, &bystander, |ch| async move {
        send_raw(
            &ch,
            &call_frame(
                1,
                "/flower.protocol.switchboard.Switchboard/Teleport",
                vec![],
            ),
            &sockets(1),
        )
        .await;
        let (reply, _) = recv_reply(&ch).await.unwrap();
        assert_eq!(
            (reply.id, Code::from_i32(reply.code)),
            (1, Code::Unimplemented)
        );
        assert!(reply.error.contains("Teleport"), "{}", reply.error);

        send_raw(
            &ch,
            &call_frame(2, CLIENT_CONNECT, b"\xff\xff\xff".to_vec()),
            &[],
        )
        .await;
        let (reply, _) = recv_reply(&ch).await.unwrap();
        assert_eq!(
            (reply.id, Code::from_i32(reply.code)),
            (2, Code::InvalidArgument)
        );

        let bad_right = sb::ConstrainRequest {
            rights: vec![42],
            ..Default::default()
        };
        send_raw(
            &ch,
            &call_frame(3, CONSTRAIN, bad_right.encode_to_vec()),
            &[],
        )
        .await;
        let (reply, _) = recv_reply(&ch).await.unwrap();
        assert_eq!(
            (Code::from_i32(reply.code), reply.error.as_str()),
            (Code::InvalidArgument, "Unknown right 42")
        );

        // Still a working channel.
        send_raw(
            &ch,
            &call_frame(
                4,
                CLIENT_CONNECT,
                sb::ClientConnectRequest::default().encode_to_vec(),
            ),
            &[],
        )
        .await;
        let (reply, _) = recv_reply(&ch).await.unwrap();
        assert_eq!((reply.id, Code::from_i32(reply.code)), (4, Code::NotFound));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_socket_descriptors_are_refused() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    survives(&daemon, &bystander, |ch| async move {
        let dir = OwnedFd::from(std::fs::File::open("/").unwrap());
        let request = sb::IngressConnectRequest {
            client: Some(Fd { slot: 0 }),
            out_labels: Labels::new(),
        };
        send_raw(
            &ch,
            &call_frame(1, INGRESS_CONNECT, request.encode_to_vec()),
            &[dir],
        )
        .await;
        let (reply, _) = recv_reply(&ch).await.unwrap();
        assert_eq!(Code::from_i32(reply.code), Code::InvalidArgument);
        assert_eq!(
            reply.error,
            "Descriptor field client is not a SOCK_STREAM socket of AF_UNIX, AF_INET or AF_INET6"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_to_nothing_and_early_hangups_are_harmless() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    // A reply frame nobody asked for, with a descriptor.
    survives(&daemon, &bystander, |ch| async move {
        let reply = flower_proto::Frame {
            kind: Some(flower_proto::frame::Kind::Reply(flower_proto::Reply {
                id: 99,
                ..Default::default()
            })),
        };
        send_raw(&ch, &reply.encode_to_vec(), &sockets(1)).await;
    })
    .await;
    // A caller that hangs up before its reply arrives.
    let _server = bystander
        .server_start(&labels(&[("app", "slow")]))
        .await
        .unwrap();
    survives(&daemon, &bystander, |ch| async move {
        let request = sb::ClientConnectRequest {
            out_labels: labels(&[("app", "slow")]),
        };
        send_raw(
            &ch,
            &call_frame(1, CLIENT_CONNECT, request.encode_to_vec()),
            &[],
        )
        .await;
        drop(ch);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_labels_work_up_to_the_datagram_limit() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let big = "v".repeat(30_000);
    let mut server = root
        .server_start(&labels(&[("app", "big"), ("blob", &big)]))
        .await
        .unwrap();
    let want = labels(&[("app", "big"), ("note", &"n".repeat(20_000))]);
    let (conn, incoming) = tokio::join!(root.client_connect(&want), server.accept());
    let conn = conn.unwrap();
    assert_eq!(conn.labels["blob"].len(), 30_000);
    assert_eq!(incoming.unwrap().labels["note"].len(), 20_000);

    // A request over the limit is refused before it is sent, with a message that says so.
    let err = root
        .client_connect(&labels(&[("app", &"x".repeat(70_000))]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    assert!(
        err.message
            .contains("exceeds the 65536-byte datagram limit"),
        "{}",
        err.message
    );

    // Requests that fit but whose reply would not (connection labels = request ∪ target).
    let err = root
        .client_connect(&labels(&[("app", "big"), ("note", &"n".repeat(40_000))]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    assert!(err.message.contains("datagram limit"), "{}", err.message);
    // And the handle is still fine.
    assert_eq!(
        root.client_connect(&labels(&[("app", "none")]))
            .await
            .unwrap_err()
            .code,
        Code::NotFound
    );
}

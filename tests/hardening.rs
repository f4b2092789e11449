//! The capability boundary against a hostile local process: each test is an attack
//! that once worked. After each, a bystander handle still works and the daemon's
//! descriptor count is back to its baseline.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::*;
use flower_proto::client::Switchboard;
use flower_proto::switchboard as sb;
use flower_proto::switchboard::Right;
use flower_proto::{Code, Fd, Labels};
use prost::Message;

const INGRESS_CONNECT: &str = "/flower.protocol.switchboard.Switchboard/IngressConnect";
const CONSTRAIN: &str = "/flower.protocol.switchboard.Switchboard/Constrain";
const LIST: &str = "/flower.protocol.switchboard.Switchboard/List";

/// An `O_PATH` descriptor of `path`: `fstat` calls it a socket when `path` is one.
fn o_path(path: &std::path::Path) -> OwnedFd {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .unwrap();
    OwnedFd::from(file)
}

/// A bystander's call still goes through.
async fn bystander_works(bystander: &Switchboard) {
    let err = tokio::time::timeout(
        PATIENCE,
        bystander.client_connect(&labels(&[("app", "nothing")])),
    )
    .await
    .expect("bystander answered in time")
    .unwrap_err();
    assert_eq!(err.code, Code::NotFound, "bystander still served");
}

/// IngressConnect with an `O_PATH` descriptor of the switchboard's own socket file:
/// a server that got it could connect through `/proc/self/fd/N` to a full handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_o_path_descriptor_is_not_a_connection() {
    let daemon = Daemon::start();
    let bystander = daemon.connect().await;
    let mut server = bystander
        .server_start(&labels(&[("app", "victim")]))
        .await
        .unwrap();
    let baseline = daemon.baseline(&bystander).await;

    let ch = raw_connect(&daemon.path).await;
    let request = sb::IngressConnectRequest {
        client: Some(Fd { slot: 0 }),
        out_labels: labels(&[("app", "victim")]),
    };
    send_raw(
        &ch,
        &call_frame(1, INGRESS_CONNECT, request.encode_to_vec()),
        &[o_path(&daemon.path)],
    )
    .await;
    let (reply, _) = recv_reply(&ch).await.unwrap();
    assert_eq!(Code::from_i32(reply.code), Code::InvalidArgument);
    assert_eq!(
        reply.error,
        "Descriptor field client is not a SOCK_STREAM socket of AF_UNIX, AF_INET or AF_INET6"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.accept())
            .await
            .is_err(),
        "the server must not be offered the descriptor"
    );
    // A SEQPACKET socket is a socket, but not a connection either.
    let (seqpacket, _other) = flower_proto::transport::seqpacket_pair().unwrap();
    send_raw(
        &ch,
        &call_frame(2, INGRESS_CONNECT, request.encode_to_vec()),
        &[seqpacket],
    )
    .await;
    let (reply, _) = recv_reply(&ch).await.unwrap();
    assert_eq!(Code::from_i32(reply.code), Code::InvalidArgument);
    drop(ch);
    bystander_works(&bystander).await;
    daemon.settle_fds(baseline).await;
}

/// An egress that answers with an `O_PATH` descriptor of the switchboard's socket:
/// the client must get an error, not the descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_cannot_hand_out_an_o_path_descriptor() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;
    let hostile = root
        .constrain(
            &[Right::EgressStart],
            &labels(&[("kind", "egress")]),
            &Labels::new(),
        )
        .await
        .unwrap();
    let mut egress = hostile.egress_start(&Labels::new()).await.unwrap();
    let path = daemon.path.clone();
    let answering = tokio::spawn(async move {
        while let Some(request) = egress.next().await {
            request.respond(Ok(o_path(&path)));
        }
    });
    let err = tokio::time::timeout(
        PATIENCE,
        root.client_connect(&labels(&[("kind", "egress")])),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.code, Code::Internal, "{err}");
    assert!(err.message.contains("Egress replied badly"), "{err}");
    answering.abort();
    drop(hostile);
    bystander_works(&root).await;
    daemon.settle_fds(baseline).await;
}

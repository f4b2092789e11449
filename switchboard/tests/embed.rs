//! Embedding the switchboard, as a container runtime does: a handle per pod carrying
//! the pod's identity, revoked when the pod goes away.

use std::time::Duration;

use flower_proto::client::Switchboard as Client;
use flower_proto::switchboard::Right;
use flower_proto::{Code, Labels};
use flower_switchboard::{Config, Rights, Switchboard};

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn a_pod_handle_carries_its_identity_and_dies_with_its_scope() {
    let switchboard = Switchboard::new(Config::default());
    let pod = labels(&[("pod", "web-1")]);
    let (fd, scope) = switchboard.new_handle(Rights::ALL, &pod, &pod).unwrap();
    let handle = Client::from_fd(fd).unwrap();

    // Registrations carry the pod label whatever the pod asks for...
    let mut server = handle
        .server_start(&labels(&[("app", "web")]))
        .await
        .unwrap();
    assert_eq!(switchboard.target_count(), 1);
    let err = handle
        .server_start(&labels(&[("pod", "db-1")]))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code, Code::PermissionDenied);

    // ...and so do handles it derives, which live in the same scope.
    let derived = handle
        .constrain(&[Right::ClientConnect], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let conn = derived
        .client_connect(&labels(&[("app", "web")]))
        .await
        .unwrap();
    assert_eq!(conn.labels["pod"], "web-1");
    assert!(server.accept().await.is_some());

    // The pod goes away: everything it had is closed and its target removed.
    scope.revoke();
    tokio::time::timeout(Duration::from_secs(10), server.closed())
        .await
        .expect("registration closed on revoke");
    for _ in 0..500 {
        if switchboard.target_count() == 0 && handle.is_closed() && derived.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(switchboard.target_count(), 0);
    assert!(handle.is_closed() && derived.is_closed());
}

#[tokio::test]
async fn empty_label_keys_are_refused() {
    let switchboard = Switchboard::new(Config::default());
    let bad = labels(&[("", "x")]);
    let err = switchboard
        .new_handle(Rights::ALL, &bad, &Labels::new())
        .err()
        .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(err.to_string(), "Label keys must not be empty");
}

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
    // Handed over (the switchboard has the server's OK) but not yet accepted.
    let queued = derived
        .client_connect(&labels(&[("app", "web")]))
        .await
        .unwrap();

    // The pod goes away: everything it had is closed and its target removed.
    scope.revoke();
    tokio::time::timeout(Duration::from_secs(10), server.closed())
        .await
        .expect("registration closed on revoke");
    // What the server had taken before the close is still accepted; then accept ends.
    let last = tokio::time::timeout(Duration::from_secs(10), server.accept())
        .await
        .expect("queued connection returned")
        .expect("queued connection kept");
    assert_eq!(last.labels, queued.labels);
    let end = tokio::time::timeout(Duration::from_secs(10), server.accept()).await;
    assert!(end.expect("accept ends after the close").is_none());
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

/// Bounded targets per scope (docs/PROTOCOL.md §10): one pod's handles, however derived, may
/// have at most `max_targets_per_endpoint` targets and resolvers at once; one that
/// goes away makes room; another pod is not affected.
#[tokio::test]
async fn a_pod_has_a_bounded_number_of_targets() {
    let switchboard = Switchboard::new(Config {
        max_targets_per_endpoint: 3,
        ..Config::default()
    });
    let (fd, _scope) = switchboard
        .new_handle(Rights::ALL, &labels(&[("pod", "a")]), &Labels::new())
        .unwrap();
    let pod = Client::from_fd(fd).unwrap();
    let derived = pod
        .constrain(
            &[Right::ServerStart, Right::ResolverStart],
            &Labels::new(),
            &Labels::new(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for i in 0..2 {
        held.push(
            pod.server_start(&labels(&[("app", &i.to_string())]))
                .await
                .unwrap(),
        );
    }
    let resolver = derived
        .resolver_start(&["server_hostname"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let err = derived
        .server_start(&labels(&[("app", "3")]))
        .await
        .err()
        .expect("a fourth registration is refused");
    assert_eq!(err.code, Code::ResourceExhausted, "{err}");
    assert!(err.message.contains("--max-targets-per-endpoint"), "{err}");

    // Another pod has its own bound.
    let (fd, _other) = switchboard
        .new_handle(Rights::ALL, &labels(&[("pod", "b")]), &Labels::new())
        .unwrap();
    let other = Client::from_fd(fd).unwrap();
    let _theirs = other.server_start(&labels(&[("app", "0")])).await.unwrap();

    // Room again once one goes: the count follows the registration's life.
    drop(resolver);
    let mut again = None;
    for _ in 0..500 {
        match pod.server_start(&labels(&[("app", "3")])).await {
            Ok(server) => {
                again = Some(server);
                break;
            }
            Err(e) => assert_eq!(e.code, Code::ResourceExhausted, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(again.is_some(), "a freed slot is reused");
    assert_eq!(switchboard.target_count(), 4);
}

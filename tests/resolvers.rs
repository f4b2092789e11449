//! Resolvers: when the switchboard consults one, how it orders and falls back over the
//! candidates, caching, and errors. The rules are in docs/PROTOCOL.md, "Resolvers".

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use flower_proto::client::{Resolver, Server, Switchboard};
use flower_proto::resolver::{Candidate, ResolveResponse};
use flower_proto::switchboard::Right;
use flower_proto::{Code, Labels, Status};

/// Answers every `Resolve` with `answer(labels)`; returns the number of calls so far.
fn serve(
    mut resolver: Resolver,
    answer: impl Fn(&Labels) -> Result<ResolveResponse, Status> + Send + 'static,
) -> Arc<AtomicUsize> {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        while let Some(request) = resolver.next().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let result = answer(&request.labels);
            request.respond(result);
        }
    });
    calls
}

fn assert_status(err: &Status, code: Code, text: &str) {
    assert_eq!((err.code, err.message.as_str()), (code, text));
}

fn candidates(list: &[(&[(&str, &str)], u32)], cache_seconds: u32) -> ResolveResponse {
    ResolveResponse {
        targets: list
            .iter()
            .map(|(out, weight)| Candidate {
                out_labels: labels(out),
                weight: *weight,
            })
            .collect(),
        max_cache_duration_seconds: cache_seconds,
    }
}

/// Accepts connections on `server` forever, so connects to it succeed.
fn accept_all(mut server: Server) {
    tokio::spawn(async move { while server.accept().await.is_some() {} });
}

async fn pod(root: &Switchboard, name: &str) {
    accept_all(
        root.server_start(&labels(&[("app", "web"), ("pod", name)]))
            .await
            .unwrap(),
    );
}

/// A resolver for the `service` key whose answers are `app=web` pods, answering with
/// `answer`; returns its call counter.
async fn service_resolver(
    root: &Switchboard,
    answer: impl Fn(&Labels) -> Result<ResolveResponse, Status> + Send + 'static,
) -> Arc<AtomicUsize> {
    let resolver = root
        .resolver_start(&["service"], &Labels::new(), &labels(&[("app", "web")]))
        .await
        .unwrap();
    serve(resolver, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_candidates_fall_back_in_order() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    pod(&root, "b").await;
    pod(&root, "c").await;
    // "a" is not registered: the first candidate fails, the second connects.
    let calls = service_resolver(&root, |request| {
        assert_eq!(
            request,
            &labels(&[("service", "shop")]),
            "only resolve keys"
        );
        Ok(candidates(
            &[
                (&[("pod", "a")], 1),
                (&[("pod", "b")], 0),
                (&[("pod", "c")], 0),
            ],
            0,
        ))
    })
    .await;

    let conn = root
        .client_connect(&labels(&[("service", "shop"), ("tier", "1")]))
        .await
        .unwrap();
    assert_eq!(
        conn.labels,
        labels(&[
            ("app", "web"),
            ("pod", "b"),
            ("service", "shop"),
            ("tier", "1")
        ])
    );
    // A candidate contradicting the request is skipped, not an error.
    let conn = root
        .client_connect(&labels(&[("service", "shop"), ("pod", "c")]))
        .await
        .unwrap();
    assert_eq!(conn.labels["pod"], "c");
    // Without every resolve key the resolver is not consulted.
    let err = root
        .client_connect(&labels(&[("app", "web")]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "max_cache 0 asks every time"
    );

    // All candidates failing gives the last failure.
    let err = root
        .client_connect(&labels(&[("service", "shop"), ("pod", "a")]))
        .await
        .unwrap_err();
    assert_status(&err, Code::NotFound, "No matching target found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_spread_connects() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    pod(&root, "light").await;
    pod(&root, "heavy").await;
    let resolver = root
        .resolver_start(&["service"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let calls = serve(resolver, |_| {
        Ok(candidates(
            &[
                (&[("app", "web"), ("pod", "light")], 1),
                (&[("app", "web"), ("pod", "heavy")], 3),
            ],
            60,
        ))
    });
    let mut heavy = 0;
    for _ in 0..400 {
        let conn = root
            .client_connect(&labels(&[("service", "shop")]))
            .await
            .unwrap();
        heavy += usize::from(conn.labels["pod"] == "heavy");
    }
    // Expect 300 of 400; six standard deviations (~52) either way.
    assert!((250..=350).contains(&heavy), "heavy got {heavy} of 400");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the answer was cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn which_resolver_applies() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    pod(&root, "x").await;
    let answer = |_: &Labels| Ok(candidates(&[(&[("app", "web"), ("pod", "x")], 1)], 0));
    let inside = serve(
        root.resolver_start(&["name"], &labels(&[("zone", "in")]), &Labels::new())
            .await
            .unwrap(),
        answer,
    );
    // Same keys, contradicting in-labels: both may register.
    let outside_resolver = root
        .resolver_start(&["name"], &labels(&[("zone", "out")]), &Labels::new())
        .await
        .unwrap();
    // Same keys, nothing to tell them apart: refused.
    let err = refusal(
        root.resolver_start(&["name"], &Labels::new(), &Labels::new())
            .await,
    );
    assert_status(
        &err,
        Code::FailedPrecondition,
        "Another resolver with the same resolve labels and no conflicting labels exists",
    );
    // Both apply when the connect says nothing about the zone.
    let err = root
        .client_connect(&labels(&[("name", "n")]))
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        r#"Labels match multiple resolvers, which can be resolved by adding one of the labels ["zone"]"#,
    );
    let conn = root
        .client_connect(&labels(&[("name", "n"), ("zone", "in")]))
        .await
        .unwrap();
    assert_eq!(conn.labels["pod"], "x");
    assert_eq!(inside.load(Ordering::SeqCst), 1);

    // Once a resolver's registration closes, it no longer applies.
    drop(outside_resolver);
    wait_until_async("resolver removal", || async {
        root.client_connect(&labels(&[("name", "n")])).await.is_ok()
    })
    .await;

    // Resolvers with different key sets that both apply are ambiguous too.
    let _other = root
        .resolver_start(&["kind"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let err = root
        .client_connect(&labels(&[("name", "n"), ("kind", "k")]))
        .await
        .unwrap_err();
    assert_eq!(
        err.message,
        r#"Labels match multiple resolvers, with keys ["kind"] and ["name"]"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_errors_reach_the_client() {
    let daemon = Daemon::start_with(&["--call-timeout", "0.5"]);
    let root = daemon.connect().await;

    let limited = root
        .constrain(&[Right::ClientConnect], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let err = refusal(
        limited
            .resolver_start(&["name"], &Labels::new(), &Labels::new())
            .await,
    );
    assert_status(
        &err,
        Code::PermissionDenied,
        r#"Rights ["RESOLVER_START"] are not present on this handle"#,
    );
    let err = refusal(
        root.resolver_start(&[], &Labels::new(), &Labels::new())
            .await,
    );
    assert_status(
        &err,
        Code::InvalidArgument,
        "Resolve labels must not be empty",
    );

    // A resolver's own error is passed through.
    let failing = serve(
        root.resolver_start(&["bad"], &Labels::new(), &Labels::new())
            .await
            .unwrap(),
        |_| Err(Status::not_found("Cannot resolve nowhere")),
    );
    let err = root
        .client_connect(&labels(&[("bad", "1")]))
        .await
        .unwrap_err();
    assert_status(&err, Code::NotFound, "Cannot resolve nowhere");
    assert_eq!(failing.load(Ordering::SeqCst), 1);
    drop(limited);
    let baseline = daemon.baseline(&root).await;

    // A resolver that never answers times out; one that is gone is UNAVAILABLE.
    let mut silent = root
        .resolver_start(&["slow"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let slow = labels(&[("slow", "1")]);
    let connect = root.client_connect(&slow);
    let (result, request) = tokio::join!(connect, silent.next());
    let err = result.unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    assert!(err.message.starts_with("Resolver did not answer"), "{err}");
    drop(request);

    let slow = labels(&[("slow", "2")]);
    let connect = root.client_connect(&slow);
    let dying = async {
        let request = silent.next().await;
        drop(silent);
        drop(request);
    };
    let (result, ()) = tokio::join!(connect, dying);
    let err = result.unwrap_err();
    assert!(err.code == Code::Unavailable, "{err}");

    daemon.settle_fds(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_connects_fall_back_too() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut server = root
        .server_start(&labels(&[("app", "web"), ("pod", "b")]))
        .await
        .unwrap();
    service_resolver(&root, |_| {
        Ok(candidates(&[(&[("pod", "a")], 1), (&[("pod", "b")], 0)], 0))
    })
    .await;
    let baseline = daemon.baseline(&root).await;
    for _ in 0..50 {
        let (mut outside, inside) = std::os::unix::net::UnixStream::pair().unwrap();
        outside.set_read_timeout(Some(PATIENCE)).unwrap();
        let connection_labels = root
            .ingress_connect(inside.into(), &labels(&[("service", "shop")]))
            .await
            .unwrap();
        assert_eq!(connection_labels["pod"], "b");
        let incoming = server.accept().await.unwrap();
        let mut incoming = std::os::unix::net::UnixStream::from(incoming.socket);
        incoming.set_read_timeout(Some(PATIENCE)).unwrap();
        exchange(&mut outside, &mut incoming);
    }
    // The duplicates made for the failed first candidate were all closed.
    daemon.settle_fds(baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_socket_is_never_offered_to_a_second_server_after_a_timeout() {
    use flower_proto::rpc::Method;
    use prost::Message;
    let daemon = Daemon::start_with(&["--call-timeout", "0.3"]);
    let root = daemon.connect().await;
    // pod=a registers by hand and never answers its Server.Connect calls.
    let silent = raw_connect(&daemon.path).await;
    let request = flower_proto::switchboard::ServerStartRequest {
        in_labels: labels(&[("app", "web"), ("pod", "a")]),
        ..Default::default()
    };
    let start = flower_proto::switchboard::rpc::ServerStart::PATH;
    send_raw(&silent, &call_frame(1, start, request.encode_to_vec()), &[]).await;
    let (reply, _registration) = recv_reply(&silent).await.unwrap();
    assert_eq!(reply.code, 0, "{}", reply.error);
    let mut b = root
        .server_start(&labels(&[("app", "web"), ("pod", "b")]))
        .await
        .unwrap();
    service_resolver(&root, |_| {
        Ok(candidates(&[(&[("pod", "a")], 0), (&[("pod", "b")], 0)], 0))
    })
    .await;

    let (_outside, inside) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = refusal(
        root.ingress_connect(inside.into(), &labels(&[("service", "shop")]))
            .await,
    );
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    // pod=a may still take the socket it was sent: pod=b must not get it as well.
    let offered = tokio::time::timeout(std::time::Duration::from_millis(500), b.accept()).await;
    assert!(
        offered.is_err(),
        "the same connection went to a second server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resolver_targets_are_dropped() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    pod(&root, "a").await;
    pod(&root, "b").await;
    // The first target has an empty label key, which no label set may carry.
    let malformed = [
        (&[("", "x"), ("pod", "a")][..], 0),
        (&[("pod", "b")][..], 0),
    ];
    service_resolver(&root, move |_| Ok(candidates(&malformed, 0))).await;
    let conn = root
        .client_connect(&labels(&[("service", "shop")]))
        .await
        .unwrap();
    assert_eq!(conn.labels["pod"], "b");
    assert!(!conn.labels.contains_key(""));
}

/// Registers a resolver for `name` through `handle`, answering `pod=<pod>`.
async fn name_resolver(handle: &Switchboard, pod: &'static str) {
    let resolver = handle
        .resolver_start(&["name"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    serve(resolver, move |_| {
        Ok(candidates(&[(&[("pod", pod)], 1)], 0))
    });
}

/// A handle with RESOLVER_START only and `fixed` in-labels.
async fn scoped(root: &Switchboard, fixed: &[(&str, &str)]) -> Switchboard {
    root.constrain(&[Right::ResolverStart], &labels(fixed), &Labels::new())
        .await
        .unwrap()
}

/// The pod a connect by `name=n` plus `extra` reaches.
async fn pod_for(root: &Switchboard, extra: &[(&str, &str)]) -> Result<String, Status> {
    let mut l = labels(extra);
    l.insert("name".into(), "n".into());
    Ok(root.client_connect(&l).await?.labels["pod"].clone())
}

/// A resolver's scope is its registering handle's fixed in-labels: it applies only to
/// connects that carry them, and of several that apply the most specific wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_specific_scope_wins() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    for pod in ["any", "a", "ax", "y"] {
        accept_all(root.server_start(&labels(&[("pod", pod)])).await.unwrap());
    }
    let a = scoped(&root, &[("tenant", "a")]).await;
    let ax = scoped(&root, &[("tenant", "a"), ("team", "x")]).await;
    let y = scoped(&root, &[("team", "y")]).await;
    name_resolver(&root, "any").await;
    name_resolver(&a, "a").await;
    name_resolver(&ax, "ax").await;
    name_resolver(&y, "y").await;

    assert_eq!(pod_for(&root, &[]).await.unwrap(), "any");
    assert_eq!(pod_for(&root, &[("team", "x")]).await.unwrap(), "any");
    assert_eq!(pod_for(&root, &[("tenant", "a")]).await.unwrap(), "a");
    let both = [("tenant", "a"), ("team", "x")];
    assert_eq!(pod_for(&root, &both).await.unwrap(), "ax");
    let other = [("tenant", "b"), ("team", "y")];
    assert_eq!(pod_for(&root, &other).await.unwrap(), "y");
    // Two apply and neither scope contains the other: ambiguous.
    let err = pod_for(&root, &[("tenant", "a"), ("team", "y")])
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        r#"Labels match multiple resolvers, scoped by the labels ["team"] and ["tenant"]"#,
    );
    // The same scope and keys, nothing to tell them apart: refused.
    let err = refusal(
        a.resolver_start(&["name"], &Labels::new(), &Labels::new())
            .await,
    );
    assert_status(
        &err,
        Code::FailedPrecondition,
        "Another resolver with the same resolve labels and no conflicting labels exists",
    );
    // The same scope, other keys: both apply, ambiguous as before.
    let _kind = a
        .resolver_start(&["kind"], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let err = pod_for(&root, &[("tenant", "a"), ("kind", "k")])
        .await
        .unwrap_err();
    assert_status(
        &err,
        Code::FailedPrecondition,
        r#"Labels match multiple resolvers, with keys ["kind"] and ["name"]"#,
    );
}

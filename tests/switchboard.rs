//! Semantics of the switchboard over real sockets against the real daemon binary:
//! rights, constraints, matching, registration lifetime, pipelining, streaming.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Instant;

use common::*;
use flower_proto::switchboard::{self as sb, Right};
use flower_proto::transport::Channel;
use flower_proto::{Code, Labels, Reply};
use prost::Message;

/// Every right, from the switchboard's own definition.
fn all_rights() -> Vec<Right> {
    flower_switchboard::Rights::ALL.to_vec()
}

fn stream(fd: std::os::fd::OwnedFd) -> UnixStream {
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrain_cannot_widen_rights() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let narrow = root
        .constrain(
            &[Right::ClientConnect, Right::List],
            &Labels::new(),
            &Labels::new(),
        )
        .await
        .unwrap();
    let err = refusal(
        narrow
            .constrain(
                &[Right::IngressConnect, Right::List, Right::EgressStart],
                &Labels::new(),
                &Labels::new(),
            )
            .await,
    );
    assert_eq!(err.code, Code::PermissionDenied);
    assert_eq!(
        err.message,
        r#"Rights ["EGRESS_START","INGRESS_CONNECT"] are not present on this handle"#
    );

    // An empty rights list means no rights at all.
    let none = root
        .constrain(&[], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let err = none.client_connect(&Labels::new()).await.unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied);
    assert_eq!(
        err.message,
        r#"Rights ["CLIENT_CONNECT"] are not present on this handle"#
    );
    let err = refusal(none.server_start(&labels(&[("a", "b")])).await);
    assert_eq!(
        err.message,
        r#"Rights ["SERVER_START"] are not present on this handle"#
    );
    let err = refusal(none.list(&Labels::new()).await);
    assert_eq!(
        err.message,
        r#"Rights ["LIST"] are not present on this handle"#
    );

    // A narrowed handle can narrow further, never back.
    let list_only = narrow
        .constrain(&[Right::List], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    assert!(
        list_only
            .constrain(&[Right::ClientConnect], &Labels::new(), &Labels::new())
            .await
            .is_err()
    );
    assert!(list(&list_only, &Labels::new()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrain_cannot_override_labels() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let pod = root
        .constrain(
            &all_rights(),
            &labels(&[("toast", "a")]),
            &labels(&[("dog", "x")]),
        )
        .await
        .unwrap();

    let err = refusal(
        pod.constrain(&all_rights(), &labels(&[("toast", "b")]), &Labels::new())
            .await,
    );
    assert_eq!(err.code, Code::PermissionDenied);
    assert_eq!(
        err.message,
        r#"In-labels ["toast"] are already defined with different values"#
    );
    let err = refusal(
        pod.constrain(&all_rights(), &Labels::new(), &labels(&[("dog", "y")]))
            .await,
    );
    assert_eq!(
        err.message,
        r#"Out-labels ["dog"] are already defined with different values"#
    );

    // The same holds for the calls that take labels.
    let err = refusal(pod.server_start(&labels(&[("toast", "b")])).await);
    assert_eq!(
        err.message,
        r#"In-labels ["toast"] are already defined with different values"#
    );
    let err = pod
        .client_connect(&labels(&[("dog", "y")]))
        .await
        .unwrap_err();
    assert_eq!(
        err.message,
        r#"Out-labels ["dog"] are already defined with different values"#
    );
    let err = refusal(pod.list(&labels(&[("dog", "y")])).await);
    assert_eq!(
        err.message,
        r#"Out-labels ["dog"] are already defined with different values"#
    );

    // Repeating a fixed label with the same value is fine; empty keys are not.
    assert!(
        pod.constrain(&all_rights(), &labels(&[("toast", "a")]), &Labels::new())
            .await
            .is_ok()
    );
    let err = refusal(
        pod.constrain(&all_rights(), &labels(&[("", "a")]), &Labels::new())
            .await,
    );
    assert_eq!(err.code, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_labels_reach_the_server_and_bytes_flow() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let pod = root
        .constrain(
            &[Right::ServerStart],
            &labels(&[("pod", "web-1")]),
            &Labels::new(),
        )
        .await
        .unwrap();
    let mut server = pod.server_start(&labels(&[("app", "web")])).await.unwrap();

    let client = root
        .constrain(
            &[Right::ClientConnect],
            &labels(&[("who", "me")]),
            &labels(&[("via", "test")]),
        )
        .await
        .unwrap();
    let web = labels(&[("app", "web")]);
    let (conn, incoming) = tokio::join!(client.client_connect(&web), server.accept());
    let conn = conn.unwrap();
    let incoming = incoming.unwrap();
    let expected = labels(&[("app", "web"), ("pod", "web-1"), ("via", "test")]);
    assert_eq!(conn.labels, expected);
    assert_eq!(incoming.labels, expected);
    exchange(&mut stream(conn.socket), &mut stream(incoming.socket));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_errors_name_the_problem() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let _a = root
        .server_start(&labels(&[("app", "web"), ("host", "a")]))
        .await
        .unwrap();
    let _b = root
        .server_start(&labels(&[("app", "web"), ("host", "b")]))
        .await
        .unwrap();

    let err = root
        .client_connect(&labels(&[("app", "web")]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert_eq!(
        err.message,
        r#"Labels match multiple targets, which can be resolved by adding one of the labels ["host"]"#
    );

    let err = root
        .client_connect(&labels(&[("app", "db")]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::NotFound);
    assert_eq!(err.message, "No matching target found");

    for overlapping in [
        labels(&[("app", "web")]),
        labels(&[("app", "web"), ("host", "a")]),
        labels(&[("zone", "z")]),
    ] {
        let err = refusal(root.server_start(&overlapping).await);
        assert_eq!(err.code, Code::FailedPrecondition);
        assert_eq!(
            err.message,
            "Another target with no conflicting labels exists"
        );
    }
    assert!(
        root.server_start(&labels(&[("app", "web"), ("host", "c")]))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_vanishes_when_its_registrant_exits() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let filter = labels(&[("app", "gone")]);

    // A real process registers, then is killed.
    let mut registrant = std::process::Command::new(FLOWER)
        .args(["cat", "-l"])
        .arg(&daemon.path)
        .arg("app=gone")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until_async("registration", || async {
        list(&root, &filter).await.len() == 1
    })
    .await;
    registrant.kill().unwrap();
    registrant.wait().unwrap();
    wait_until_async("target removal", || async {
        list(&root, &filter).await.is_empty()
    })
    .await;
    assert_eq!(
        root.client_connect(&filter).await.unwrap_err().code,
        Code::NotFound
    );

    // In process: dropping the registration removes it too, and frees the labels.
    let server = root.server_start(&filter).await.unwrap();
    drop(server);
    wait_until_async("target removal", || async {
        list(&root, &filter).await.is_empty()
    })
    .await;
    assert!(root.server_start(&filter).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_handle_keeps_its_registration() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let handle = root
        .constrain(&[Right::ServerStart], &Labels::new(), &Labels::new())
        .await
        .unwrap();
    let mut server = handle
        .server_start(&labels(&[("app", "kept")]))
        .await
        .unwrap();
    drop(handle);
    let kept = labels(&[("app", "kept")]);
    let (conn, incoming) = tokio::join!(root.client_connect(&kept), server.accept());
    exchange(
        &mut stream(conn.unwrap().socket),
        &mut stream(incoming.unwrap().socket),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_every_matching_target() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut servers = Vec::new();
    for i in 0..5 {
        let tier = if i < 2 { "front" } else { "back" };
        servers.push(
            root.server_start(&labels(&[("tier", tier), ("n", &i.to_string())]))
                .await
                .unwrap(),
        );
    }
    assert_eq!(list(&root, &Labels::new()).await.len(), 5);
    let back = list(&root, &labels(&[("tier", "back")])).await;
    assert_eq!(back.len(), 3);
    assert!(back.iter().all(|l| l["tier"] == "back"));
    // A label the targets lack does not exclude them.
    assert_eq!(list(&root, &labels(&[("color", "red")])).await.len(), 5);
    // Fixed out-labels of the handle apply too.
    let front = root
        .constrain(
            &[Right::List],
            &Labels::new(),
            &labels(&[("tier", "front")]),
        )
        .await
        .unwrap();
    assert_eq!(list(&front, &Labels::new()).await.len(), 2);
}

/// List walks the directory a page at a time: every match across several pages, in
/// registration order, and only those registered before it began — so a List ends
/// even while someone registers faster than it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_every_target_and_ends() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut servers = Vec::new();
    for i in 0..150 {
        let parity = if i % 2 == 0 { "even" } else { "odd" };
        servers.push(
            root.server_start(&labels(&[("n", &format!("{i:03}")), ("parity", parity)]))
                .await
                .unwrap(),
        );
    }
    let all = list(&root, &Labels::new()).await;
    let names: Vec<&str> = all.iter().map(|l| l["n"].as_str()).collect();
    let expect: Vec<String> = (0..150).map(|i| format!("{i:03}")).collect();
    assert_eq!(names, expect, "oldest first, none twice, none missing");
    let odd = list(&root, &labels(&[("parity", "odd")])).await;
    assert_eq!(odd.len(), 75);
    assert!(odd.windows(2).all(|w| w[0]["n"] < w[1]["n"]));

    // A List that runs while another handle keeps registering still ends.
    let registrar = daemon.connect().await;
    let adding = tokio::spawn(async move {
        let mut held = Vec::new();
        for i in 0..300 {
            held.push(
                registrar
                    .server_start(&labels(&[("n", &format!("late-{i}"))]))
                    .await
                    .unwrap(),
            );
        }
        held
    });
    let during = tokio::time::timeout(PATIENCE, list(&root, &Labels::new()))
        .await
        .expect("a List during registrations ends");
    assert!(during.len() >= 150, "{}", during.len());
    let _late = adding.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_are_answered_by_id() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let _server = root.server_start(&labels(&[("app", "p")])).await.unwrap();

    // Raw: three calls written back to back before reading anything.
    let channel = raw_connect(&daemon.path).await;
    let connect_missing = sb::ClientConnectRequest {
        out_labels: labels(&[("app", "none")]),
    }
    .encode_to_vec();
    let list_all = sb::ListRequest::default().encode_to_vec();
    let constrain = sb::ConstrainRequest::default().encode_to_vec();
    send_raw(
        &channel,
        &call_frame(
            7,
            "/flower.protocol.switchboard.Switchboard/ClientConnect",
            connect_missing,
        ),
        &[],
    )
    .await;
    send_raw(
        &channel,
        &call_frame(8, "/flower.protocol.switchboard.Switchboard/List", list_all),
        &[],
    )
    .await;
    send_raw(
        &channel,
        &call_frame(
            9,
            "/flower.protocol.switchboard.Switchboard/Constrain",
            constrain,
        ),
        &[],
    )
    .await;
    let mut seen: Vec<(u64, i32, bool, usize)> = Vec::new();
    while seen.iter().filter(|(_, _, more, _)| !more).count() < 3 {
        let (Reply { id, code, more, .. }, fds) = recv_reply(&channel).await.expect("reply");
        seen.push((id, code, more, fds.len()));
    }
    assert!(seen.contains(&(7, Code::NotFound as i32, false, 0)));
    assert!(seen.contains(&(8, 0, true, 0)), "one List item: {seen:?}");
    assert!(seen.contains(&(8, 0, false, 0)));
    assert!(seen.contains(&(9, 0, false, 1)));

    // Through the library: many concurrent calls on one handle.
    let none = labels(&[("app", "none")]);
    let calls = (0..50).map(|_| root.client_connect(&none));
    let results = futures::future::join_all(calls).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().code == Code::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_targets_hand_back_their_socket() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut egress = root
        .egress_start(&labels(&[("kind", "egress")]))
        .await
        .unwrap();
    let responder = tokio::spawn(async move {
        let request = egress.next().await.unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        request.respond(Ok(theirs.into()));
        ((), ours, egress)
    });
    let conn = root
        .client_connect(&labels(&[("kind", "egress"), ("server_port", "80")]))
        .await
        .unwrap();
    let (_, mut far_end, mut egress) = responder.await.unwrap();
    assert_eq!(
        conn.labels,
        labels(&[("kind", "egress"), ("server_port", "80")])
    );
    exchange(&mut stream(conn.socket), &mut far_end);

    // An egress error reaches the client unchanged.
    let responder = tokio::spawn(async move {
        let request = egress.next().await.unwrap();
        request.respond(Err(flower_proto::Status::unavailable(
            "Connection refused (os error 111)",
        )));
        egress
    });
    let err = root
        .client_connect(&labels(&[("kind", "egress")]))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code, err.message.as_str()),
        (Code::Unavailable, "Connection refused (os error 111)")
    );
    let _egress = responder.await.unwrap();

    // An ingress cannot be connected with an egress.
    let (a, _b) = UnixStream::pair().unwrap();
    let err = root
        .ingress_connect(a.into(), &labels(&[("kind", "egress")]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert_eq!(err.message, "Cannot connect an ingress with an egress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_connect_passes_the_socket_to_the_server() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let mut server = root.server_start(&labels(&[("app", "in")])).await.unwrap();
    let ingress = root
        .constrain(
            &[Right::IngressConnect],
            &Labels::new(),
            &labels(&[("client_port", "4242")]),
        )
        .await
        .unwrap();
    let (outside, pushed) = UnixStream::pair().unwrap();
    let target = labels(&[("app", "in")]);
    let (result, incoming) = tokio::join!(
        ingress.ingress_connect(pushed.into(), &target),
        server.accept()
    );
    let expected = labels(&[("app", "in"), ("client_port", "4242")]);
    assert_eq!(result.unwrap(), expected);
    let incoming = incoming.unwrap();
    assert_eq!(incoming.labels, expected);
    let mut outside = outside;
    outside.set_read_timeout(Some(PATIENCE)).unwrap();
    exchange(&mut outside, &mut stream(incoming.socket));
}

/// Registers a server through the raw protocol and returns its registration channel,
/// which the test then answers (or not) by hand.
async fn raw_server(root: &flower_proto::client::Switchboard, name: &str) -> Channel {
    let request = sb::ServerStartRequest {
        in_labels: labels(&[("app", name)]),
        ..Default::default()
    };
    let (reply, mut fds) = root
        .peer()
        .call::<sb::rpc::ServerStart>(&request, Vec::new())
        .await
        .unwrap();
    Channel::new(fds.take(reply.server, "server").unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out() {
    let daemon = Daemon::start_with(&["--call-timeout", "0.3"]);
    let root = daemon.connect().await;
    let _registration = raw_server(&root, "silent").await;
    let started = Instant::now();
    let err = root
        .client_connect(&labels(&[("app", "silent")]))
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded);
    assert!(err.message.contains("did not answer"), "{}", err.message);
    assert!(started.elapsed() < PATIENCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_call_gives_unavailable() {
    let daemon = Daemon::start();
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;
    let registration = raw_server(&root, "dying").await;
    let dies = async move {
        // Receive the Connect call (with the client's end), then die without replying.
        let datagram = registration.recv().await.unwrap().unwrap();
        assert_eq!(datagram.fds.len(), 1);
        drop(registration);
    };
    let dying = labels(&[("app", "dying")]);
    let (result, ()) = tokio::join!(root.client_connect(&dying), dies);
    let err = result.unwrap_err();
    assert_eq!(err.code, Code::Unavailable);
    assert_eq!(err.message, "Target went away during the call");
    daemon.settle_fds(baseline).await;
    assert_eq!(
        root.client_connect(&labels(&[("app", "dying")]))
            .await
            .unwrap_err()
            .code,
        Code::NotFound
    );
}

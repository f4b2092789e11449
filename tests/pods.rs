//! Pods through the real daemon and its gRPC pod API: identity endpoints, what a
//! pod cannot do, revocation, containers, limits, validation and restarts.

mod common;
mod pod_harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Daemon, PATIENCE, exchange, labels, list, refusal, wait_until_async};
use flower_pod_api as api;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;
use flower_proto::{Code, Labels};
use pod_harness::{client, pod_request, pods, register};

async fn connect(endpoint: &str) -> Switchboard {
    Switchboard::connect(Path::new(endpoint))
        .await
        .expect("connect to the pod endpoint")
}

fn identity(side: &str, namespace: &str, name: &str, uid: &str) -> Labels {
    let mut l = Labels::new();
    for (key, value) in [
        ("namespace", namespace),
        ("pod_name", name),
        ("pod_uid", uid),
        ("pod_attempt", "0"),
    ] {
        l.insert(format!("{side}_kubernetes_{key}"), value.into());
    }
    l
}

#[tokio::test]
async fn two_pods_identity_confinement_and_revocation() {
    let daemon = pod_harness::start(&[]);
    let mut api = client(&daemon).await;
    let root = daemon.connect().await;
    let baseline = daemon.baseline(&root).await;

    let mut a_request = pod_request("pod-a", "shop", "server");
    a_request.labels = labels(&[("app", "web")]);
    let a = register(&mut api, a_request.clone()).await;
    let b = register(&mut api, pod_request("pod-b", "shop", "client")).await;

    // docs/PROTOCOL.md §11: the listed labels exactly, default rights, the endpoint layout.
    let mut a_in = identity("server", "shop", "server", "pod-a");
    a_in.insert("app".into(), "web".into());
    assert_eq!(a.in_labels, a_in);
    assert_eq!(a.out_labels, identity("client", "shop", "server", "pod-a"));
    let defaults = [Right::ClientConnect, Right::ServerStart, Right::List].map(|r| r as i32);
    assert_eq!(a.rights, defaults);
    let pods_dir = pod_harness::pods_dir(daemon.dir.path());
    assert_eq!(
        Path::new(&a.endpoint),
        pods_dir.join("pod-a/switchboard").as_path()
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(Path::new(&a.endpoint)), 0o666);
    assert_eq!(mode(&pods_dir.join("pod-a")), 0o755);
    assert_eq!(
        mode(&pod_harness::pods_socket(daemon.dir.path())),
        0o600,
        "only the socket's mode protects the pod API"
    );

    // A serves; B connects.
    let a_sb = connect(&a.endpoint).await;
    let mut server = a_sb
        .server_start(&labels(&[("service", "shop")]))
        .await
        .expect("A registers");
    let b_sb = connect(&b.endpoint).await;
    let accept = tokio::spawn(async move {
        let conn = server.accept().await.expect("a connection");
        (server, conn)
    });
    let conn = b_sb
        .client_connect(&labels(&[("service", "shop")]))
        .await
        .expect("B connects to A");
    let (server, served) = tokio::time::timeout(PATIENCE, accept)
        .await
        .unwrap()
        .unwrap();
    // The server sees who called and under which identity it serves.
    for (key, value) in identity("client", "shop", "client", "pod-b")
        .into_iter()
        .chain(a_in.clone())
    {
        assert_eq!(served.labels.get(&key), Some(&value), "label {key}");
    }
    assert_eq!(served.labels, conn.labels);

    // B cannot register as A, spoof its client labels, or use rights it lacks.
    let as_a = labels(&[("server_kubernetes_pod_uid", "pod-a")]);
    let status = refusal(b_sb.server_start(&as_a).await.map(drop));
    assert_eq!(status.code, Code::PermissionDenied);
    assert!(status.message.contains("In-labels"), "{status}");
    let spoof = labels(&[("service", "shop"), ("client_kubernetes_pod_uid", "pod-a")]);
    let status = refusal(b_sb.client_connect(&spoof).await);
    assert_eq!(status.code, Code::PermissionDenied);
    assert!(status.message.contains("Out-labels"), "{status}");
    let status = refusal(b_sb.egress_start(&labels(&[])).await.map(drop));
    assert_eq!(status.code, Code::PermissionDenied);
    let status = refusal(
        b_sb.constrain(&[Right::IngressConnect], &labels(&[]), &labels(&[]))
            .await
            .map(drop),
    );
    assert!(status.message.contains("INGRESS_CONNECT"), "{status}");

    // The pod API counts what the pods hold.
    let listed = pods(&mut api).await;
    let a_now = listed.iter().find(|p| p.uid == "pod-a").unwrap();
    assert_eq!((a_now.handles, a_now.targets), (1, 1));

    // Revoke A.
    let mut a_peer = std::os::unix::net::UnixStream::from(served.socket);
    let mut b_peer = std::os::unix::net::UnixStream::from(conn.socket);
    api.unregister_pod(api::UnregisterPodRequest {
        uid: "pod-a".into(),
    })
    .await
    .expect("UnregisterPod");
    // At once: A's target is gone, its endpoint path too.
    let status = refusal(b_sb.client_connect(&labels(&[("service", "shop")])).await);
    assert_eq!(status.code, Code::NotFound, "{status}");
    assert!(!Path::new(&a.endpoint).exists());
    assert!(!pods_dir.join("pod-a").exists());
    // A's handle is closed although A still holds its descriptor.
    let status = refusal(a_sb.list(&labels(&[])).await.map(drop));
    assert_eq!(status.code, Code::Unavailable, "{status}");
    assert!(a_sb.is_closed());
    // The connection handed out before stays up.
    exchange(&mut a_peer, &mut b_peer);
    // B is unaffected.
    assert!(list(&b_sb, &labels(&[])).await.is_empty());
    let _b_server = b_sb
        .server_start(&labels(&[("service", "b")]))
        .await
        .expect("B still serves");
    assert_eq!(list(&root, &labels(&[("service", "b")])).await.len(), 1);
    let listed = pods(&mut api).await;
    assert_eq!(
        listed.iter().map(|p| p.uid.as_str()).collect::<Vec<_>>(),
        ["pod-b"]
    );
    // Unknown uid now.
    let err = api
        .unregister_pod(api::UnregisterPodRequest {
            uid: "pod-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Nothing leaks: once B's handles and A's registration object are gone, the
    // daemon is back to its baseline (plus B's listening endpoint).
    drop((server, _b_server, b_sb, a_sb, a_peer, b_peer));
    api.unregister_pod(api::UnregisterPodRequest {
        uid: "pod-b".into(),
    })
    .await
    .unwrap();
    daemon.settle_fds(baseline).await;
}

#[tokio::test]
async fn registration_is_validated_and_idempotent() {
    let daemon = pod_harness::start(&[]);
    let mut api = client(&daemon).await;
    let request = pod_request("u-1", "ns", "web");
    let first = register(&mut api, request.clone()).await;
    // A resync re-registers the same thing: same endpoint, no error.
    let again = register(&mut api, request.clone()).await;
    assert_eq!(first.endpoint, again.endpoint);
    // ...and puts back a socket someone removed, or replaced with something else.
    let socket = Path::new(&first.endpoint);
    let inode =
        |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap());
    let held = Switchboard::connect(socket).await.unwrap();
    for replace in [false, true] {
        let before = inode(socket);
        std::fs::remove_file(socket).unwrap();
        if replace {
            std::fs::write(socket, b"not a socket").unwrap();
        }
        let resynced = register(&mut api, request.clone()).await;
        assert_eq!(resynced.endpoint, first.endpoint);
        assert_ne!(inode(socket), before, "a new socket was placed");
        let fresh = Switchboard::connect(socket).await.unwrap();
        assert_eq!(list(&fresh, &Labels::new()).await.len(), 0);
    }
    // The handle taken before is the pod's still.
    assert_eq!(list(&held, &Labels::new()).await.len(), 0);
    drop(held);
    let mut other = request.clone();
    other.name = "db".into();
    let err = api.register_pod(other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");

    type Breakage = Box<dyn Fn(&mut api::RegisterPodRequest)>;
    let cases: Vec<(&str, Breakage)> = vec![
        ("uid", Box::new(|r| r.uid.clear())),
        ("uid", Box::new(|r| r.uid = "a/b".into())),
        ("uid", Box::new(|r| r.uid = "..".into())),
        ("uid", Box::new(|r| r.uid = "x".repeat(129))),
        ("namespace", Box::new(|r| r.namespace.clear())),
        ("name", Box::new(|r| r.name.clear())),
        (
            "labels",
            Box::new(|r| {
                r.labels
                    .insert("server_kubernetes_pod_uid".into(), "x".into());
            }),
        ),
        (
            "labels",
            Box::new(|r| {
                r.labels.insert("client_kubernetes_foo".into(), "x".into());
            }),
        ),
        (
            "labels",
            Box::new(|r| {
                r.labels.insert(String::new(), "x".into());
            }),
        ),
        ("rights", Box::new(|r| r.rights = vec![42])),
    ];
    for (field, break_it) in cases {
        let mut bad = pod_request("u-2", "ns", "web");
        break_it(&mut bad);
        let err = api.register_pod(bad.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(
            err.message().starts_with(field),
            "error for {field} should name it: {}",
            err.message()
        );
    }
    let err = api
        .unregister_pod(api::UnregisterPodRequest { uid: "../x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(pods(&mut api).await.len(), 1);

    // Infrastructure rights only when asked for.
    let mut infra = pod_request("ingress", "ns", "ingress");
    infra.rights = vec![Right::IngressConnect as i32];
    let pod = register(&mut api, infra).await;
    assert_eq!(pod.rights, [Right::IngressConnect as i32]);
    let sb = connect(&pod.endpoint).await;
    let status = refusal(sb.list(&labels(&[])).await.map(drop));
    assert_eq!(status.code, Code::PermissionDenied);

    // The standard health service answers.
    let channel = flower_pod_api::channel(&pod_harness::pods_socket(daemon.dir.path()))
        .await
        .unwrap();
    use flower_pod_api::health::pb;
    let mut health = pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status,
        pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn containers_get_their_own_identity_and_go_with_the_pod() {
    let daemon = pod_harness::start(&[]);
    let mut api = client(&daemon).await;
    let root = daemon.connect().await;
    register(&mut api, pod_request("p1", "ns", "web")).await;
    let container = api
        .register_container(api::RegisterContainerRequest {
            pod_uid: "p1".into(),
            name: "nginx".into(),
            attempt: 2,
        })
        .await
        .expect("RegisterContainer")
        .into_inner();
    let pods_dir = pod_harness::pods_dir(daemon.dir.path());
    assert_eq!(
        Path::new(&container.endpoint),
        pods_dir.join("p1@nginx/switchboard").as_path()
    );
    assert_eq!(
        container.in_labels["server_kubernetes_container_name"],
        "nginx"
    );
    assert_eq!(
        container.out_labels["client_kubernetes_container_attempt"],
        "2"
    );
    assert_eq!(container.in_labels["server_kubernetes_pod_uid"], "p1");
    // Idempotent for the same attempt; another attempt is another identity.
    let mut same = api::RegisterContainerRequest {
        pod_uid: "p1".into(),
        name: "nginx".into(),
        attempt: 2,
    };
    api.register_container(same.clone()).await.unwrap();
    same.attempt = 3;
    let err = api.register_container(same).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let err = api
        .register_container(api::RegisterContainerRequest {
            pod_uid: "nope".into(),
            name: "x".into(),
            attempt: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = api
        .register_container(api::RegisterContainerRequest {
            pod_uid: "p1".into(),
            name: "a@b".into(),
            attempt: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("name"), "{}", err.message());

    let sb = connect(&container.endpoint).await;
    let _server = sb
        .server_start(&labels(&[("svc", "c")]))
        .await
        .expect("the container registers");
    let found = list(&root, &labels(&[("svc", "c")])).await;
    assert_eq!(found[0]["server_kubernetes_container_name"], "nginx");
    let pod = &pods(&mut api).await[0];
    assert_eq!(
        (pod.handles, pod.targets),
        (1, 1),
        "pod counts include containers"
    );
    assert_eq!(pod.containers.len(), 1);

    // The pod goes: its container's endpoint and registrations go too.
    api.unregister_pod(api::UnregisterPodRequest { uid: "p1".into() })
        .await
        .unwrap();
    assert!(list(&root, &labels(&[("svc", "c")])).await.is_empty());
    assert!(!pods_dir.join("p1@nginx").exists());
    assert!(sb.is_closed() || sb.list(&labels(&[])).await.is_err());
}

#[tokio::test]
async fn unregistering_a_container_leaves_the_pod() {
    let daemon = pod_harness::start(&[]);
    let mut api = client(&daemon).await;
    let pod = register(&mut api, pod_request("p2", "ns", "web")).await;
    let container = api
        .register_container(api::RegisterContainerRequest {
            pod_uid: "p2".into(),
            name: "side".into(),
            attempt: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let c_sb = connect(&container.endpoint).await;
    let p_sb = connect(&pod.endpoint).await;
    api.unregister_container(api::UnregisterContainerRequest {
        pod_uid: "p2".into(),
        name: "side".into(),
    })
    .await
    .unwrap();
    assert!(!Path::new(&container.endpoint).exists());
    assert!(c_sb.list(&labels(&[])).await.is_err());
    assert!(
        list(&p_sb, &labels(&[])).await.is_empty(),
        "the pod's handle still works"
    );
    let err = api
        .unregister_container(api::UnregisterContainerRequest {
            pod_uid: "p2".into(),
            name: "side".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn handles_per_pod_endpoint_are_bounded() {
    let daemon = pod_harness::start(&["--pod-max-handles", "3"]);
    let mut api = client(&daemon).await;
    let pod = register(&mut api, pod_request("busy", "ns", "web")).await;
    let first = connect(&pod.endpoint).await;
    let second = first
        .constrain(&[Right::List], &labels(&[]), &labels(&[]))
        .await
        .expect("a second handle");
    let third = connect(&pod.endpoint).await;
    list(&third, &labels(&[])).await;
    // A fourth, constrained or accepted, is refused.
    let status = refusal(
        first
            .constrain(&[Right::List], &labels(&[]), &labels(&[]))
            .await
            .map(drop),
    );
    assert_eq!(status.code, Code::ResourceExhausted, "{status}");
    let fourth = connect(&pod.endpoint).await;
    assert!(fourth.list(&labels(&[])).await.is_err(), "closed at once");
    assert_eq!(pods(&mut api).await[0].handles, 3);
    // Room again once one closes.
    drop(second);
    wait_until_async("a handle to close", || {
        let mut api = api.clone();
        async move { pods(&mut api).await[0].handles == 2 }
    })
    .await;
    let fifth = connect(&pod.endpoint).await;
    assert!(list(&fifth, &labels(&[])).await.is_empty());
    drop((first, third, fourth));
}

#[test]
fn registrations_survive_a_restart() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut daemon = pod_harness::start(&[]);
    let pods_dir = pod_harness::pods_dir(daemon.dir.path());
    let (pod, container) = runtime.block_on(async {
        let mut api = client(&daemon).await;
        let mut request = pod_request("keep", "ns", "web");
        request.labels = labels(&[("app", "web")]);
        let pod = register(&mut api, request).await;
        let container = api
            .register_container(api::RegisterContainerRequest {
                pod_uid: "keep".into(),
                name: "main".into(),
                attempt: 1,
            })
            .await
            .unwrap()
            .into_inner();
        (pod, container)
    });
    // A hostile pod swaps its socket for a symlink to a file outside, and plants
    // files of its own: the restart must replace the socket and touch nothing else.
    let outside = daemon.dir.path().join("outside");
    std::fs::write(&outside, "precious").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(&pod.endpoint).unwrap();
    std::os::unix::fs::symlink(&outside, &pod.endpoint).unwrap();
    std::fs::write(pods_dir.join("keep/planted"), "pod data").unwrap();

    assert!(daemon.terminate().success());
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    drop(daemon);
    let daemon: Daemon = pod_harness::start_in(dir, &[]);

    runtime.block_on(async {
        let mut api = client(&daemon).await;
        let listed = pods(&mut api).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].in_labels, pod.in_labels);
        assert_eq!(listed[0].endpoint, pod.endpoint);
        assert_eq!(listed[0].containers[0].endpoint, container.endpoint);
        // Each endpoint accepts again at the same path, with the same identity.
        for endpoint in [&pod.endpoint, &container.endpoint] {
            let meta = std::fs::symlink_metadata(endpoint).unwrap();
            assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
            let sb = connect(endpoint).await;
            let _server = sb.server_start(&labels(&[("x", endpoint)])).await.unwrap();
            let root = daemon.connect().await;
            let found = list(&root, &labels(&[("x", endpoint)])).await;
            assert_eq!(found[0]["server_kubernetes_pod_uid"], "keep");
            assert_eq!(found[0]["app"], "web");
        }
        // Re-registering after the restart is the idempotent resync.
        let mut request = pod_request("keep", "ns", "web");
        request.labels = labels(&[("app", "web")]);
        assert_eq!(register(&mut api, request).await.endpoint, pod.endpoint);
    });
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious");
    let mode = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the file behind the symlink was not touched");
    assert_eq!(
        std::fs::read_to_string(pods_dir.join("keep/planted")).unwrap(),
        "pod data"
    );
    // Registrations are kept outside every pod's directory.
    assert!(!pods_dir.join("keep").join("@pods.json").exists());
    assert!(pods_dir.join("@pods.json").exists());
}

#[test]
fn flower_pod_cli_prints_json() {
    let daemon = pod_harness::start(&[]);
    let socket = pod_harness::pods_socket(daemon.dir.path());
    let flower = |args: &[&str]| {
        std::process::Command::new(common::FLOWER)
            .args(args)
            .arg("--pods-socket")
            .arg(&socket)
            .output()
            .unwrap()
    };
    let out = flower(&[
        "pod",
        "add",
        "--namespace",
        "ns",
        "--name",
        "web",
        "--uid",
        "cli-1",
        "--rights",
        "SERVER_START,LIST",
        r#"{"app":"web"}"#,
    ]);
    assert!(out.status.success(), "{out:?}");
    let pod: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pod["uid"], "cli-1");
    assert_eq!(pod["rights"], serde_json::json!(["SERVER_START", "LIST"]));
    assert_eq!(pod["in_labels"]["app"], "web");
    assert_eq!(pod["in_labels"]["server_kubernetes_pod_attempt"], "0");
    assert_eq!(pod["out_labels"]["client_kubernetes_pod_name"], "web");
    assert_eq!(pod["handles"], 0);

    let out = flower(&["pod", "ls"]);
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 1);
    let listed: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(listed["endpoint"], pod["endpoint"]);

    let out = flower(&[
        "pod",
        "add",
        "--namespace",
        "ns",
        "--name",
        "web",
        "--uid",
        "bad/uid",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("flower: uid"), "{err}");
    assert_eq!(err.lines().count(), 1);

    let out = flower(&[
        "pod",
        "add",
        "--namespace",
        "ns",
        "--name",
        "x",
        "--uid",
        "u",
        "--rights",
        "FLY",
    ]);
    assert_eq!(out.status.code(), Some(2), "usage error");

    // A container of the pod: its own endpoint, with the container's name added.
    let out = flower(&["pod", "add-container", "cli-1", "app", "--attempt", "2"]);
    assert!(out.status.success(), "{out:?}");
    let container: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(container["pod_uid"], "cli-1");
    assert_eq!(container["attempt"], 2);
    assert_eq!(container["in_labels"]["app"], "web");
    let endpoint = container["endpoint"].as_str().unwrap();
    assert!(endpoint.ends_with("cli-1@app/switchboard"), "{endpoint}");
    assert!(std::path::Path::new(endpoint).exists());
    let out = flower(&["pod", "ls"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["containers"][0]["name"], "app");
    let out = flower(&["pod", "add-container", "nobody-here", "app"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    assert!(
        flower(&["pod", "remove-container", "cli-1", "app"])
            .status
            .success()
    );
    assert!(!std::path::Path::new(endpoint).exists());
    let out = flower(&["pod", "ls"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["containers"], serde_json::json!([]));

    assert!(flower(&["pod", "remove", "cli-1"]).status.success());
    let out = flower(&["pod", "remove", "cli-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(flower(&["pod", "ls"]).stdout.is_empty());

    // No pod API there: one clear line.
    let out = std::process::Command::new(common::FLOWER)
        .args(["pod", "ls", "--pods-socket", "/nonexistent/pods.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "flower: cannot connect to the pod API at /nonexistent/pods.sock: \
         No such file or directory (os error 2)"
    );
}

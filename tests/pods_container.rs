//! A real container: `runc` runs a busybox rootfs built here, with the `flower`
//! binary and the libraries it needs bind-mounted read-only and the pod's endpoint
//! directory mounted at /run/flower. The container serves through the switchboard;
//! the host connects by labels and sees the pod's identity; unregistering the pod
//! revokes what the still-running container holds.
//!
//! Needs root, `runc` and a static busybox (`scripts/test` installs both).

mod common;
mod pod_harness;
mod runc_harness;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{labels, list, wait_until_async};
use flower_pod_api as api;
use pod_harness::{client, pod_request, register};
use runc_harness::{Bundle, CONTAINER_PATIENCE, Container};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_serves_with_its_pod_identity() {
    let daemon = pod_harness::start(&[]);
    let mut pods = client(&daemon).await;
    let mut request = pod_request("runc-pod", "demo", "box");
    request.labels = labels(&[("app", "box")]);
    let pod = register(&mut pods, request).await;
    let endpoint_dir = Path::new(&pod.endpoint).parent().unwrap().to_owned();

    // First serve one connection, then register again and wait: the second
    // registration is revoked under the running container.
    let script = "echo hello-from-container | flower cat -l svc=box; \
                  flower cat -l svc=again </dev/null; echo \"second exited $?\"";
    let mut container = run_container(&endpoint_dir, script, "pod");

    // The host sees the container's target under the pod's identity.
    let root = daemon.connect().await;
    let found = wait_for_target(&root, &labels(&[("svc", "box")]), &mut container).await;
    assert_eq!(found[0]["server_kubernetes_pod_uid"], "runc-pod");
    assert_eq!(found[0]["server_kubernetes_namespace"], "demo");
    assert_eq!(found[0]["app"], "box");

    // Connect by labels; the connection labels carry the pod's identity.
    let conn = root
        .client_connect(&labels(&[("svc", "box")]))
        .await
        .expect("connect to the container");
    assert_eq!(conn.labels["server_kubernetes_pod_name"], "box");
    assert_eq!(conn.labels["server_kubernetes_pod_attempt"], "0");
    let mut stream = UnixStream::from(conn.socket);
    stream.set_read_timeout(Some(CONTAINER_PATIENCE)).unwrap();
    let mut greeting = [0u8; 21];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"hello-from-container\n");
    stream.write_all(b"hi from the host\n").unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();

    // The second registration appears; revoking the pod removes it at once, while
    // the container still runs and holds its descriptors.
    wait_until_async("the second registration", || {
        let root = root.clone();
        async move { !list(&root, &labels(&[("svc", "again")])).await.is_empty() }
    })
    .await;
    let listed = pods
        .list_pods(api::ListPodsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.pods[0].targets, 1);
    pods.unregister_pod(api::UnregisterPodRequest {
        uid: "runc-pod".into(),
    })
    .await
    .unwrap();
    assert!(list(&root, &labels(&[("svc", "again")])).await.is_empty());
    assert!(!Path::new(&pod.endpoint).exists());

    // The container's server saw its registration closed and exited with an error.
    let (status, out) = container.finish().await;
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("hi from the host"), "{out}");
    assert!(out.contains("second exited 1"), "{out}");
}

/// Starts `script` in a new container with the pod's endpoint directory at
/// /run/flower (deleted when the result is dropped).
fn run_container(endpoint_dir: &Path, script: &str, tag: &str) -> Container {
    let mut bundle = Bundle::new(script);
    bundle.mount(json!({
        "destination": "/run/flower",
        "type": "bind",
        "source": endpoint_dir,
        "options": ["rbind", "rw"],
    }));
    bundle.env("FLOWER_SWITCHBOARD", "/run/flower/switchboard");
    bundle.run(tag)
}

/// Waits until a target matching `filter` is listed, while the container runs.
async fn wait_for_target(
    root: &flower_proto::client::Switchboard,
    filter: &flower_proto::Labels,
    container: &mut Container,
) -> Vec<flower_proto::Labels> {
    let deadline = Instant::now() + CONTAINER_PATIENCE;
    loop {
        let found = list(root, filter).await;
        if !found.is_empty() {
            return found;
        }
        if let Some(status) = container.runc.try_wait().unwrap() {
            let err = container.stderr();
            panic!("the container exited ({status}) before registering: {err}");
        }
        assert!(Instant::now() < deadline, "the container never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads what the server in the container sends on a new connection to `filter`.
async fn greeting(
    root: &flower_proto::client::Switchboard,
    filter: &flower_proto::Labels,
) -> (String, flower_proto::Labels) {
    let conn = root
        .client_connect(filter)
        .await
        .expect("connect to the container");
    let mut stream = UnixStream::from(conn.socket);
    stream.set_read_timeout(Some(CONTAINER_PATIENCE)).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    (text, conn.labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_keeps_working_across_a_switchboard_restart() {
    let mut daemon = pod_harness::start(&[]);
    let mut pods = client(&daemon).await;
    let pod = register(&mut pods, pod_request("restart-pod", "demo", "loop")).await;
    let endpoint_dir = Path::new(&pod.endpoint).parent().unwrap().to_owned();
    // A server that re-registers whenever it loses the switchboard, as a real
    // service in a pod would.
    let script = "while :; do echo hello | flower cat -l svc=loop; sleep 0.1; done";
    let mut container = run_container(&endpoint_dir, script, "restart");
    let filter = labels(&[("svc", "loop")]);
    let root = daemon.connect().await;
    wait_for_target(&root, &filter, &mut container).await;
    let (text, _) = greeting(&root, &filter).await;
    assert_eq!(text, "hello\n");
    drop((root, pods));

    // Restart the switchboard with the same pods directory.
    assert!(daemon.terminate().success());
    let state = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    drop(daemon);
    let daemon = pod_harness::start_in(state, &[]);

    // The container, which only sees the directory, reaches the new socket.
    let root = daemon.connect().await;
    let found = wait_for_target(&root, &filter, &mut container).await;
    assert_eq!(found[0]["server_kubernetes_pod_uid"], "restart-pod");
    let (text, labels) = greeting(&root, &filter).await;
    assert_eq!(text, "hello\n");
    assert_eq!(labels["server_kubernetes_pod_name"], "loop");
    drop(container);
}

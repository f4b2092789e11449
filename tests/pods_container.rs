//! A real container: `runc` runs a busybox rootfs built here, with the `flower`
//! binary and the libraries it needs bind-mounted read-only and the pod's endpoint
//! directory mounted at /run/flower. The container serves through the switchboard;
//! the host connects by labels and sees the pod's identity; unregistering the pod
//! revokes what the still-running container holds.
//!
//! Needs root, `runc` and a static busybox (`scripts/test` installs both).

mod common;
mod pod_harness;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{FLOWER, labels, list, wait_until_async};
use flower_pod_api as api;
use pod_harness::{client, pod_request, register};
use serde_json::{Value, json};

/// Containers start slower than processes.
const CONTAINER_PATIENCE: Duration = Duration::from_secs(30);

/// The container, deleted however the test ends.
struct Container {
    id: String,
    runc: Child,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
        let _ = self.runc.kill();
        let _ = self.runc.wait();
    }
}

fn find_busybox() -> PathBuf {
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("busybox is not installed (scripts/test installs busybox-static)");
}

/// The absolute paths of the shared libraries `ldd` lists for `binary`.
fn libraries(binary: &str) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A read-only bind mount of `source` at the same path in the container, with an
/// empty file in the rootfs to mount over.
fn bind_file(rootfs: &Path, source: &Path, destination: &Path) -> Value {
    let target = rootfs.join(destination.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, b"").unwrap();
    json!({
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["bind", "ro"],
    })
}

/// A bundle for `runc` running `script` with the pod's endpoint directory at
/// /run/flower.
fn bundle(dir: &Path, endpoint_dir: &Path, script: &str) {
    let rootfs = dir.join("rootfs");
    for sub in ["bin", "proc", "dev", "sys", "tmp", "run/flower"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy(find_busybox(), rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(dir)
        .status()
        .expect("runc (scripts/test installs it)");
    assert!(status.success(), "runc spec failed");
    let path = dir.join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut mounts = config["mounts"].as_array().unwrap().clone();
    mounts.push(bind_file(
        &rootfs,
        Path::new(FLOWER),
        Path::new("/bin/flower"),
    ));
    for library in libraries(FLOWER) {
        mounts.push(bind_file(&rootfs, &library, &library));
    }
    mounts.push(json!({
        "destination": "/run/flower",
        "type": "bind",
        "source": endpoint_dir,
        "options": ["rbind", "rw"],
    }));
    config["mounts"] = Value::Array(mounts);
    config["root"] = json!({ "path": "rootfs", "readonly": true });
    config["process"]["terminal"] = json!(false);
    config["process"]["args"] = json!(["/bin/sh", "-c", script]);
    config["process"]["env"] = json!([
        "PATH=/bin",
        "FLOWER_SWITCHBOARD=/run/flower/switchboard",
        "RUST_LOG=warn",
    ]);
    config["hostname"] = json!("pod");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_serves_with_its_pod_identity() {
    let daemon = pod_harness::start(&[]);
    let mut pods = client(&daemon).await;
    let mut request = pod_request("runc-pod", "demo", "box");
    request.labels = labels(&[("app", "box")]);
    let pod = register(&mut pods, request).await;
    let endpoint_dir = Path::new(&pod.endpoint).parent().unwrap().to_owned();

    let dir = tempfile::tempdir().unwrap();
    // First serve one connection, then register again and wait: the second
    // registration is revoked under the running container.
    let script = "echo hello-from-container | flower cat -l svc=box; \
                  flower cat -l svc=again </dev/null; echo \"second exited $?\"";
    let mut container = run_container(dir.path(), &endpoint_dir, script);

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
    let deadline = Instant::now() + CONTAINER_PATIENCE;
    let status = loop {
        if let Some(status) = container.runc.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the container did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut out = String::new();
    container
        .runc
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("hi from the host"), "{out}");
    assert!(out.contains("second exited 1"), "{out}");
}

/// Starts `script` in a new container (deleted when the result is dropped).
fn run_container(bundle_dir: &Path, endpoint_dir: &Path, script: &str) -> Container {
    bundle(bundle_dir, endpoint_dir, script);
    let id = format!("flower-test-{}-{}", std::process::id(), fastrand_suffix());
    let runc = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(bundle_dir)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runc run");
    Container { id, runc }
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
            let mut err = String::new();
            let _ = container
                .runc
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err);
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
    let dir = tempfile::tempdir().unwrap();
    // A server that re-registers whenever it loses the switchboard, as a real
    // service in a pod would.
    let script = "while :; do echo hello | flower cat -l svc=loop; sleep 0.1; done";
    let mut container = run_container(dir.path(), &endpoint_dir, script);
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

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        .into()
}

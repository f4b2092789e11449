//! The real `flower nri` process against a stand-in for containerd: the runtime side
//! of NRI (`flower_nri::runtime`, built from the same upstream `api.proto`) speaking
//! the multiplexed ttrpc protocol over a real Unix socket. The test drives a pod's
//! life — registration, Configure, Synchronize, RunPodSandbox, CreateContainer,
//! StopPodSandbox, RemovePodSandbox — and applies the returned container adjustment
//! to a real `runc` container, as containerd would, which then serves through its
//! endpoint with the pod's identity.

mod common;
mod pod_harness;
mod runc_harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, FLOWER, PATIENCE, labels, list, wait_child, wait_until_async};
use flower_nri::api;
use flower_nri::runtime::{self, Runtime};
use pod_harness::{client, pods};

/// `flower nri` on `socket`, for the pod API of `daemon`; its log lines are kept.
struct Nri {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Nri {
    fn start(socket: &Path, pods_socket: &Path, extra: &[&str]) -> Nri {
        let mut child = Command::new(FLOWER)
            .arg("nri")
            .arg("--socket")
            .arg(socket)
            .arg("--pods-socket")
            .arg(pods_socket)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start flower nri");
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stderr.take().unwrap());
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                eprintln!("flower nri: {line}");
                keep.lock().unwrap().push(line);
            }
        });
        Nri { child, log }
    }

    fn lines_with(&self, text: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .cloned()
            .collect()
    }
}

impl Drop for Nri {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nri_socket(daemon: &Daemon) -> PathBuf {
    daemon.dir.path().join("nri.sock")
}

/// A runtime listening on the daemon's temp dir and the plugin registered with it.
async fn runtime_and_plugin(daemon: &Daemon, extra: &[&str]) -> (Runtime, Nri, runtime::Plugin) {
    let runtime = Runtime::bind(&nri_socket(daemon)).unwrap();
    let nri = Nri::start(
        &nri_socket(daemon),
        &pod_harness::pods_socket(daemon.dir.path()),
        extra,
    );
    let plugin = accept(&runtime).await;
    (runtime, nri, plugin)
}

async fn accept(runtime: &Runtime) -> runtime::Plugin {
    tokio::time::timeout(PATIENCE, runtime.accept())
        .await
        .expect("the plugin registers in time")
        .expect("the plugin registers")
}

fn pod(uid: &str, name: &str) -> api::PodSandbox {
    let mut pod = api::PodSandbox {
        id: format!("sandbox-{uid}"),
        name: name.into(),
        uid: uid.into(),
        namespace: "shop".into(),
        ..Default::default()
    };
    pod.labels.insert("app".into(), "web".into());
    pod.labels
        .insert("io.kubernetes.pod.name".into(), name.into());
    pod.annotations
        .insert("flower/endpoint".into(), "true".into());
    pod
}

fn container(name: &str) -> api::Container {
    api::Container {
        id: format!("ctr-{name}"),
        name: name.into(),
        args: vec!["/bin/sh".into()],
        ..Default::default()
    }
}

/// A container whose config has the NRI adjustment applied, as the runtime applies
/// it: mounts are added, environment variables set (replacing one of the same name).
/// Anything else in the adjustment fails the test — Flower's plugin asks for nothing
/// else.
fn container_with(
    script: &str,
    adjust: &api::ContainerAdjustment,
    tag: &str,
) -> runc_harness::Container {
    let nothing_else = api::ContainerAdjustment {
        mounts: vec![],
        env: vec![],
        ..adjust.clone()
    };
    assert_eq!(
        nothing_else,
        api::ContainerAdjustment::default(),
        "unexpected adjustment"
    );
    let mut bundle = runc_harness::Bundle::new(script);
    for m in &adjust.mounts {
        bundle.mount(serde_json::json!({
            "destination": m.destination, "type": m.r#type, "source": m.source, "options": m.options,
        }));
    }
    for kv in &adjust.env {
        bundle.env(&kv.key, &kv.value);
    }
    bundle.run(tag)
}

/// Connects like any host process, with `flower cat`, and returns (stdout, labels).
fn flower_cat(
    daemon: &Daemon,
    target: &str,
    input: &str,
) -> (String, serde_json::Map<String, serde_json::Value>) {
    let mut cat = Command::new(FLOWER)
        .arg("cat")
        .arg(&daemon.path)
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let status = wait_child(&mut cat);
    let (mut out, mut err) = (String::new(), String::new());
    cat.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    cat.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "flower cat: {err}");
    let labels = err
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("connection labels on stderr");
    (out, labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_container_gets_its_endpoint_and_serves_with_the_pods_identity() {
    let daemon = pod_harness::start(&[]);
    let (_runtime, _nri, plugin) = runtime_and_plugin(&daemon, &[]).await;
    assert_eq!(
        (plugin.name.as_str(), plugin.index.as_str()),
        ("flower", "50")
    );
    assert_eq!(
        plugin.events, 0b1111,
        "RunPodSandbox, StopPodSandbox, RemovePodSandbox, CreateContainer"
    );
    plugin.synchronize(vec![], vec![]).await.unwrap();

    let uid = "5f0c6a52-8d1e-4c39-9a43-1f3c0d2e7b61";
    let web = pod(uid, "web-1");
    plugin.run_pod_sandbox(&web).await.unwrap();
    let mut pod_api = client(&daemon).await;
    let registered = pods(&mut pod_api).await;
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].uid, uid);
    assert_eq!(
        registered[0].in_labels.get("app").map(String::as_str),
        Some("web")
    );
    assert!(
        !registered[0]
            .in_labels
            .contains_key("io.kubernetes.pod.name"),
        "only --pod-labels"
    );

    // CreateContainer: the endpoint directory, read-only at /run/flower, and the env.
    let reply = plugin
        .create_container(&web, &container("server"))
        .await
        .unwrap();
    let adjust = reply.adjust.expect("an adjustment");
    let endpoint_dir = Path::new(&registered[0].endpoint).parent().unwrap();
    assert_eq!(adjust.mounts.len(), 1);
    assert_eq!(adjust.mounts[0].destination, "/run/flower");
    assert_eq!(Path::new(&adjust.mounts[0].source), endpoint_dir);
    assert!(adjust.mounts[0].options.iter().any(|o| o == "ro"));
    assert_eq!(
        adjust
            .env
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect::<Vec<_>>(),
        [("FLOWER_SWITCHBOARD", "/run/flower/switchboard")]
    );

    // The container serves through its endpoint; the host reaches it by labels and
    // sees the pod's identity, which the container could not have chosen.
    let script = "echo hello from the pod | flower cat -l role=demo; touch /run/flower/x 2>/dev/null || echo read-only";
    let mut ctr = container_with(script, &adjust, "nri-serve");
    let root = daemon.connect().await;
    wait_until_async("the container's server", || async {
        list(&root, &labels(&[("role", "demo")])).await.len() == 1
    })
    .await;
    let (out, seen) = flower_cat(&daemon, "role=demo", "hi from the host\n");
    assert_eq!(out, "hello from the pod\n");
    for (key, value) in [
        ("server_kubernetes_namespace", "shop"),
        ("server_kubernetes_pod_name", "web-1"),
        ("server_kubernetes_pod_uid", uid),
        ("server_kubernetes_pod_attempt", "0"),
        ("app", "web"),
        ("role", "demo"),
    ] {
        assert_eq!(
            seen.get(key).and_then(|v| v.as_str()),
            Some(value),
            "{key} in {seen:?}"
        );
    }
    let (status, out) = ctr.finish().await;
    assert!(status.success(), "{status}: {out}");
    assert_eq!(out, "hi from the host\nread-only\n");

    plugin.stop_pod_sandbox(&web).await.unwrap();
    plugin.remove_pod_sandbox(&web).await.unwrap();
    assert!(pods(&mut pod_api).await.is_empty());
    assert!(!endpoint_dir.exists(), "endpoint directory removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pods_target_is_gone_at_once() {
    let daemon = pod_harness::start(&[]);
    let (_runtime, _nri, plugin) = runtime_and_plugin(&daemon, &[]).await;
    plugin.synchronize(vec![], vec![]).await.unwrap();
    let web = pod("9b2d4e6f-1a3c-4b5d-8e7f-0a1b2c3d4e5f", "web-2");
    plugin.run_pod_sandbox(&web).await.unwrap();
    let adjust = plugin
        .create_container(&web, &container("server"))
        .await
        .unwrap()
        .adjust
        .unwrap();
    let _ctr = container_with("flower cat -l role=gone; sleep 60", &adjust, "nri-gone");
    let root = daemon.connect().await;
    let target = labels(&[("role", "gone")]);
    wait_until_async("the container's server", || async {
        list(&root, &target).await.len() == 1
    })
    .await;

    // The container still runs and holds its descriptors; the target is gone as
    // soon as StopPodSandbox is answered, with no waiting.
    plugin.stop_pod_sandbox(&web).await.unwrap();
    assert!(
        list(&root, &target).await.is_empty(),
        "target still listed after StopPodSandbox"
    );
    assert!(pods(&mut client(&daemon).await).await.is_empty());
    plugin.remove_pod_sandbox(&web).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_plugin_reconciles_on_synchronize() {
    let daemon = pod_harness::start(&[]);
    let (runtime, nri, plugin) = runtime_and_plugin(&daemon, &[]).await;
    plugin.synchronize(vec![], vec![]).await.unwrap();
    let (a, b, c) = (pod("aaaa", "a"), pod("bbbb", "b"), pod("cccc", "c"));
    let plain = {
        let mut p = pod("dddd", "d");
        p.annotations.clear();
        p
    };
    for p in [&a, &b, &plain] {
        plugin.run_pod_sandbox(p).await.unwrap();
    }
    let uids = |pods: Vec<flower_pod_api::Pod>| pods.into_iter().map(|p| p.uid).collect::<Vec<_>>();
    let mut pod_api = client(&daemon).await;
    assert_eq!(uids(pods(&mut pod_api).await), ["aaaa", "bbbb"]);

    // The plugin stops (SIGTERM: it exits 0, leaving the pods registered); while it is
    // down, b goes and c comes (the runtime carries on without it).
    let mut nri = nri;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nri.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_child(&mut nri.child).success());
    assert_eq!(uids(pods(&mut pod_api).await), ["aaaa", "bbbb"]);
    drop(nri);
    drop(plugin);
    let nri = Nri::start(
        &nri_socket(&daemon),
        &pod_harness::pods_socket(daemon.dir.path()),
        &[],
    );
    let plugin = accept(&runtime).await;
    let fds_before = common::fd_count(nri.child.id());
    plugin
        .synchronize(vec![a.clone(), c.clone(), plain.clone()], vec![])
        .await
        .unwrap();
    assert_eq!(
        uids(pods(&mut pod_api).await),
        ["aaaa", "cccc"],
        "no stale pod, no missing one"
    );
    let adjust = plugin
        .create_container(&c, &container("x"))
        .await
        .unwrap()
        .adjust
        .unwrap();
    assert!(
        adjust.mounts[0].source.ends_with("/cccc"),
        "{:?}",
        adjust.mounts[0]
    );
    assert_eq!(
        nri.lines_with("synchronized with 3 pods: 2 registered, 1 stale ones removed")
            .len(),
        1
    );

    // Many pod lives later the plugin holds no more descriptors than before.
    for i in 0..20 {
        let p = pod(&format!("loop-{i}"), &format!("loop-{i}"));
        plugin.run_pod_sandbox(&p).await.unwrap();
        plugin
            .create_container(&p, &container("x"))
            .await
            .unwrap()
            .adjust
            .unwrap();
        plugin.stop_pod_sandbox(&p).await.unwrap();
        plugin.remove_pod_sandbox(&p).await.unwrap();
    }
    assert!(
        common::fd_count(nri.child.id()) <= fds_before + 2,
        "descriptors leak"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchboard_that_is_down_gets_a_timely_answer_and_a_clear_log_line() {
    let mut daemon = pod_harness::start(&[]);
    let (_runtime, nri, plugin) = runtime_and_plugin(&daemon, &[]).await;
    plugin.synchronize(vec![], vec![]).await.unwrap();
    assert!(daemon.terminate().success());

    let late = pod("eeee", "late");
    for step in ["RunPodSandbox", "CreateContainer"] {
        let started = Instant::now();
        let reply = match step {
            "RunPodSandbox" => plugin.run_pod_sandbox(&late).await.map(|()| None),
            _ => plugin
                .create_container(&late, &container("x"))
                .await
                .map(|r| r.adjust),
        };
        let took = started.elapsed();
        eprintln!("{step} with the switchboard down: answered in {took:?}");
        assert_eq!(reply, Ok(None), "{step}: fails open, no adjustment");
        assert!(took < runtime::REQUEST_TIMEOUT, "{step} took {took:?}");
    }
    let socket = pod_harness::pods_socket(daemon.dir.path())
        .display()
        .to_string();
    let run_lines = nri.lines_with("pod shop/late not registered: pod API at");
    assert_eq!(
        run_lines.len(),
        1,
        "one line for RunPodSandbox: {run_lines:?}"
    );
    assert!(run_lines[0].contains(&socket), "{}", run_lines[0]);
    assert_eq!(
        nri.lines_with("container x of pod shop/late created without /run/flower")
            .len(),
        1
    );

    // The switchboard comes back: the pod is registered in the background, and a
    // container created now gets its endpoint.
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    drop(daemon);
    let daemon = pod_harness::start_in(dir, &[]);
    let mut pod_api = client(&daemon).await;
    let deadline = Instant::now() + PATIENCE;
    while pods(&mut pod_api).await.is_empty() {
        assert!(Instant::now() < deadline, "the pod was never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let adjust = plugin
        .create_container(&late, &container("y"))
        .await
        .unwrap()
        .adjust;
    assert!(adjust.is_some());
    assert_eq!(nri.lines_with("is back: 1 pods registered").len(), 1);
}

/// A stand-in runtime in another language: `tests/nri_runtime_peer.py` implements
/// the multiplexer and ttrpc framing on its own from the upstream definitions, with
/// messages from the vendored `api.proto` compiled by grpcio-tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_written_in_python_drives_the_plugin() {
    let daemon = pod_harness::start(&[]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tempfile::tempdir().unwrap();
    let protoc = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("nri/proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .args([
            "nri/api.proto",
            "ttrpc/request.proto",
            "google/rpc/status.proto",
        ])
        .output()
        .expect("python3 with grpcio-tools (scripts/test installs it)");
    assert!(
        protoc.status.success(),
        "{}",
        String::from_utf8_lossy(&protoc.stderr)
    );

    let socket = daemon.dir.path().join("py-nri.sock");
    let mut peer = Command::new("python3")
        .arg(repo.join("tests/nri_runtime_peer.py"))
        .arg(stubs.path())
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_until("the Python runtime's socket", || socket.exists());
    let _nri = Nri::start(&socket, &pod_harness::pods_socket(daemon.dir.path()), &[]);
    let mut commands = peer.stdin.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = BufReader::new(peer.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let reply = |what: &str| -> serde_json::Value {
        let line = lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no reply to {what}"));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["code"], 0, "{what}: {value}");
        eprintln!(
            "{what}: answered in {:.1} ms",
            value["seconds"].as_f64().unwrap() * 1e3
        );
        assert!(
            value["seconds"].as_f64().unwrap() < 2.0,
            "{what} answered within the timeout: {value}"
        );
        value
    };
    let configured = reply("Configure");
    let mut send = move |command: &str| -> serde_json::Value {
        writeln!(commands, "{command}").unwrap();
        reply(command)
    };

    assert_eq!(
        (configured["name"].as_str(), configured["index"].as_str()),
        (Some("flower"), Some("50"))
    );
    assert_eq!(configured["reply"]["events"], 15);
    let mut pod_api = client(&daemon).await;
    send("sync");
    let registered = pods(&mut pod_api).await;
    assert_eq!(
        registered.len(),
        1,
        "Synchronize registered the running pod"
    );
    send("run");
    let created = send("create");
    let mount = &created["reply"]["adjust"]["mounts"][0];
    assert_eq!(mount["destination"], "/run/flower");
    let endpoint_dir = Path::new(&registered[0].endpoint).parent().unwrap();
    assert_eq!(Path::new(mount["source"].as_str().unwrap()), endpoint_dir);
    assert_eq!(
        created["reply"]["adjust"]["env"],
        serde_json::json!([{"key": "FLOWER_SWITCHBOARD", "value": "/run/flower/switchboard"}])
    );
    send("stop");
    assert!(pods(&mut pod_api).await.is_empty());
    send("remove");
    drop(send); // closes the peer's stdin: it closes the connection and exits
    let status = wait_child(&mut peer);
    assert!(status.success());
}

/// A pod API that accepts and never answers costs each request the plugin's budget
/// (half the runtime's 2 s timeout), never the whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_api_that_hangs_costs_at_most_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let pods_socket = dir.path().join("pods.sock");
    let listener = std::os::unix::net::UnixListener::bind(&pods_socket).unwrap();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let socket = dir.path().join("nri.sock");
    let runtime = Runtime::bind(&socket).unwrap();
    let nri = Nri::start(&socket, &pods_socket, &[]);
    let plugin = accept(&runtime).await;
    plugin.synchronize(vec![], vec![]).await.unwrap();
    let started = Instant::now();
    plugin.run_pod_sandbox(&pod("ffff", "stuck")).await.unwrap();
    let took = started.elapsed();
    eprintln!("RunPodSandbox with a hanging pod API: answered in {took:?}");
    assert!(
        // The budget is 1 s; the runtime's own timeout, 2 s, is the contract.
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    // The log is read by another thread: give it a moment under load.
    wait_until_async("the plugin's log line", || async {
        !nri.lines_with("pod shop/stuck not registered").is_empty()
    })
    .await;
    let lines = nri.lines_with("pod shop/stuck not registered");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("failed (timed out)"), "{}", lines[0]);
}

//! The plugin's behaviour against the runtime side of NRI over a real Unix socket,
//! with an in-memory pod API (the real switchboard is in the workspace's
//! `tests/nri.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flower_nri::api::{self, Event};
use flower_nri::plugin::{Options, Plugin};
use flower_nri::pods::PodApi;
use flower_nri::runtime::{self, Runtime};
use flower_pod_api::{Pod, RegisterPodRequest};
use futures::future::BoxFuture;

const PATIENCE: Duration = Duration::from_secs(10);
const UP: u8 = 0;
const DOWN: u8 = 1;
const HANGING: u8 = 2;

/// Pods by uid, and whether the API answers.
#[derive(Default)]
struct FakePods {
    pods: Mutex<BTreeMap<String, Pod>>,
    mode: AtomicU8,
}

impl FakePods {
    fn uids(&self) -> Vec<String> {
        self.pods.lock().unwrap().keys().cloned().collect()
    }

    async fn gate(&self) -> Result<(), tonic::Status> {
        match self.mode.load(Ordering::SeqCst) {
            DOWN => Err(tonic::Status::unavailable("connection refused")),
            HANGING => futures::future::pending().await,
            _ => Ok(()),
        }
    }
}

impl PodApi for FakePods {
    fn register(&self, r: RegisterPodRequest) -> BoxFuture<'_, Result<Pod, tonic::Status>> {
        Box::pin(async move {
            self.gate().await?;
            let mut in_labels = r.labels.clone();
            in_labels.insert("server_kubernetes_pod_name".into(), r.name.clone());
            let pod = Pod {
                endpoint: format!("/run/flower/pods/{}/switchboard", r.uid),
                uid: r.uid.clone(),
                in_labels,
                ..Default::default()
            };
            self.pods.lock().unwrap().insert(r.uid, pod.clone());
            Ok(pod)
        })
    }

    fn unregister(&self, uid: String) -> BoxFuture<'_, Result<(), tonic::Status>> {
        Box::pin(async move {
            self.gate().await?;
            match self.pods.lock().unwrap().remove(&uid) {
                Some(_) => Ok(()),
                None => Err(tonic::Status::not_found(uid)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Pod>, tonic::Status>> {
        Box::pin(async move {
            self.gate().await?;
            Ok(self.pods.lock().unwrap().values().cloned().collect())
        })
    }

    fn location(&self) -> String {
        "memory".into()
    }
}

fn pod(uid: &str, enabled: Option<&str>) -> api::PodSandbox {
    let mut pod = api::PodSandbox {
        id: format!("sandbox-{uid}"),
        name: format!("pod-{uid}"),
        uid: uid.into(),
        namespace: "default".into(),
        ..Default::default()
    };
    pod.labels.insert("app".into(), "web".into());
    pod.labels.insert("tier".into(), "front".into());
    if let Some(v) = enabled {
        pod.annotations.insert("flower/endpoint".into(), v.into());
    }
    pod
}

fn container(name: &str) -> api::Container {
    api::Container {
        id: format!("c-{name}"),
        name: name.into(),
        ..Default::default()
    }
}

struct Setup {
    runtime: Runtime,
    pods: Arc<FakePods>,
    _plugin: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn setup(options: Options) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nri.sock");
    let runtime = Runtime::bind(&path).unwrap();
    let pods = Arc::new(FakePods::default());
    let plugin = Plugin::new(options, pods.clone());
    let task = tokio::spawn(async move {
        plugin.run(&path).await;
    });
    Setup {
        runtime,
        pods,
        _plugin: task,
        _dir: dir,
    }
}

async fn accept(runtime: &Runtime) -> runtime::Plugin {
    tokio::time::timeout(PATIENCE, runtime.accept())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn registers_subscribes_and_follows_a_pods_life() {
    let s = setup(Options::default());
    let plugin = accept(&s.runtime).await;
    assert_eq!(
        (plugin.name.as_str(), plugin.index.as_str()),
        ("flower", "50")
    );
    // RunPodSandbox, StopPodSandbox, RemovePodSandbox, CreateContainer: bits 0..=3.
    assert_eq!(plugin.events, 0b1111);
    assert!(!plugin.subscribed(Event::StartContainer));
    plugin.synchronize(vec![], vec![]).await.unwrap();

    let web = pod("u1", Some("true"));
    plugin.run_pod_sandbox(&web).await.unwrap();
    assert_eq!(s.pods.uids(), ["u1"]);
    let registered = s.pods.pods.lock().unwrap()["u1"].clone();
    assert_eq!(
        registered.in_labels.get("app").map(String::as_str),
        Some("web")
    );
    assert!(
        !registered.in_labels.contains_key("tier"),
        "only --pod-labels by default"
    );

    let reply = plugin
        .create_container(&web, &container("app"))
        .await
        .unwrap();
    let adjust = reply.adjust.expect("an adjustment");
    assert_eq!(adjust.mounts.len(), 1);
    let mount = &adjust.mounts[0];
    assert_eq!(mount.destination, "/run/flower");
    assert_eq!(mount.source, "/run/flower/pods/u1");
    assert_eq!(mount.r#type, "bind");
    assert!(mount.options.contains(&"ro".to_string()));
    let env: Vec<_> = adjust
        .env
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_str()))
        .collect();
    assert_eq!(env, [("FLOWER_SWITCHBOARD", "/run/flower/switchboard")]);

    // A pod without the annotation takes no part; nor one that opts out.
    for other in [pod("u2", None), pod("u3", Some("false"))] {
        plugin.run_pod_sandbox(&other).await.unwrap();
        let reply = plugin
            .create_container(&other, &container("x"))
            .await
            .unwrap();
        assert!(reply.adjust.is_none());
    }
    assert_eq!(s.pods.uids(), ["u1"]);

    plugin.stop_pod_sandbox(&web).await.unwrap();
    assert!(s.pods.uids().is_empty(), "unregistered at StopPodSandbox");
    plugin.remove_pod_sandbox(&web).await.unwrap();
}

#[tokio::test]
async fn all_pods_and_label_annotation() {
    let s = setup(Options {
        all_pods: true,
        ..Options::default()
    });
    let plugin = accept(&s.runtime).await;
    plugin.synchronize(vec![], vec![]).await.unwrap();
    let mut labelled = pod("u1", None);
    labelled.annotations.insert(
        "flower/labels".into(),
        "tier, server_kubernetes_pod_name".into(),
    );
    plugin.run_pod_sandbox(&labelled).await.unwrap();
    plugin
        .run_pod_sandbox(&pod("u2", Some("false")))
        .await
        .unwrap();
    assert_eq!(s.pods.uids(), ["u1"]);
    let registered = s.pods.pods.lock().unwrap()["u1"].clone();
    assert_eq!(
        registered.in_labels.get("tier").map(String::as_str),
        Some("front")
    );
    assert!(!registered.in_labels.contains_key("app"));
    // The identity key named in the annotation is not passed on as an extra label.
    assert_eq!(registered.in_labels["server_kubernetes_pod_name"], "pod-u1");
}

#[tokio::test]
async fn synchronize_reconciles_after_a_plugin_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nri.sock");
    let runtime = Runtime::bind(&path).unwrap();
    let pods = Arc::new(FakePods::default());

    let first = tokio::spawn(Plugin::new(Options::default(), pods.clone()).run_owned(path.clone()));
    let plugin = accept(&runtime).await;
    plugin.synchronize(vec![], vec![]).await.unwrap();
    for uid in ["a", "b"] {
        plugin
            .run_pod_sandbox(&pod(uid, Some("true")))
            .await
            .unwrap();
    }
    assert_eq!(pods.uids(), ["a", "b"]);

    // The plugin dies; meanwhile pod b goes and pod c comes.
    first.abort();
    let _ = first.await;
    drop(plugin);
    let second =
        tokio::spawn(Plugin::new(Options::default(), pods.clone()).run_owned(path.clone()));
    let plugin = accept(&runtime).await;
    let listed = vec![
        pod("a", Some("true")),
        pod("c", Some("true")),
        pod("d", None),
    ];
    plugin.synchronize(listed, vec![]).await.unwrap();
    assert_eq!(pods.uids(), ["a", "c"], "no stale pod, no missing one");
    // The new plugin knows the endpoints it did not register itself.
    let reply = plugin
        .create_container(&pod("a", Some("true")), &container("x"))
        .await
        .unwrap();
    assert_eq!(reply.adjust.unwrap().mounts[0].source, "/run/flower/pods/a");
    second.abort();
}

#[tokio::test]
async fn a_synchronize_split_over_messages_is_answered_as_upstream_expects() {
    let s = setup(Options::default());
    let plugin = accept(&s.runtime).await;
    let first = api::SynchronizeRequest {
        pods: vec![pod("a", Some("true"))],
        containers: vec![],
        more: true,
    };
    let reply: api::SynchronizeResponse = plugin.call("Synchronize", &first).await.unwrap();
    assert!(reply.more && reply.update.is_empty());
    assert!(
        s.pods.uids().is_empty(),
        "nothing done before the last part"
    );
    plugin
        .synchronize(vec![pod("b", Some("true"))], vec![])
        .await
        .unwrap();
    assert_eq!(s.pods.uids(), ["a", "b"]);
}

#[tokio::test]
async fn a_pod_api_that_is_down_or_hangs_fails_open_in_time() {
    let s = setup(Options::default());
    let plugin = accept(&s.runtime).await;
    for mode in [DOWN, HANGING] {
        s.pods.mode.store(mode, Ordering::SeqCst);
        let web = pod(&format!("u{mode}"), Some("true"));
        let started = Instant::now();
        plugin.synchronize(vec![web.clone()], vec![]).await.unwrap();
        plugin.run_pod_sandbox(&web).await.unwrap();
        let reply = plugin
            .create_container(&web, &container("app"))
            .await
            .unwrap();
        assert!(
            reply.adjust.is_none(),
            "no mount of an endpoint that does not exist"
        );
        plugin.stop_pod_sandbox(&web).await.unwrap();
        let took = started.elapsed();
        // Four requests, each within half of the 2 s request timeout and so well
        // within the timeout itself.
        assert!(
            took < Duration::from_millis(4 * 1100),
            "mode {mode}: {took:?}"
        );
    }

    // Back up: the background retry brings the switchboard to the wanted set.
    let web = pod("late", Some("true"));
    plugin.run_pod_sandbox(&web).await.unwrap();
    assert!(s.pods.uids().is_empty());
    s.pods.mode.store(UP, Ordering::SeqCst);
    let deadline = Instant::now() + PATIENCE;
    while s.pods.uids() != ["late"] {
        assert!(
            Instant::now() < deadline,
            "never retried: {:?}",
            s.pods.uids()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = plugin
        .create_container(&web, &container("app"))
        .await
        .unwrap();
    assert!(reply.adjust.is_some());
}

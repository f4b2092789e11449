//! The Kubernetes manifests in `deploy/kubernetes/`, checked offline: every document
//! parses and has the fields the API server requires; every container drops every
//! capability and cannot gain privileges; volumes and mounts agree; the runtime
//! configuration snippets name the socket the plugin dials. Then the node
//! DaemonSet's two containers are run here exactly as written (their host paths
//! moved into a temp dir) with no capabilities at all, against the stand-in NRI
//! runtime: the privileges spelled out are enough.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{FLOWER, PATIENCE};
use serde_yaml::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(DIR).join(file)).unwrap();
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            docs.last_mut().unwrap().push_str(&format!("{line}\n"));
        }
    }
    docs.iter()
        .map(|doc| serde_yaml::from_str::<Value>(doc).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn str_of<'a>(v: &'a Value, path: &str) -> &'a str {
    let mut at = v;
    for key in path.split('.') {
        at = &at[key];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v:?}"))
}

fn daemonsets() -> Vec<(String, Value)> {
    let mut found = Vec::new();
    for file in ["flower-node.yaml", "flower-edge.yaml"] {
        for doc in documents(file) {
            assert!(!str_of(&doc, "apiVersion").is_empty());
            assert!(!str_of(&doc, "metadata.name").is_empty());
            if str_of(&doc, "kind") == "DaemonSet" {
                assert_eq!(str_of(&doc, "apiVersion"), "apps/v1");
                assert_eq!(str_of(&doc, "metadata.namespace"), "flower-system");
                found.push((file.to_owned(), doc));
            }
        }
    }
    assert_eq!(found.len(), 2);
    found
}

fn containers(ds: &Value) -> &Vec<Value> {
    ds["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_daemonset_is_well_formed_and_least_privileged() {
    for (file, ds) in daemonsets() {
        let spec = &ds["spec"];
        let template = &spec["template"];
        let selector = spec["selector"]["matchLabels"].as_mapping().unwrap();
        let labels = template["metadata"]["labels"].as_mapping().unwrap();
        for (k, v) in selector {
            assert_eq!(
                labels.get(k),
                Some(v),
                "{file}: the selector matches the pod template"
            );
        }
        let pod = &template["spec"];
        assert_eq!(
            pod["automountServiceAccountToken"],
            Value::Bool(false),
            "{file}"
        );
        assert_eq!(
            str_of(pod, "securityContext.seccompProfile.type"),
            "RuntimeDefault",
            "{file}"
        );
        assert_ne!(pod["hostPID"], Value::Bool(true), "{file}");
        assert_ne!(pod["hostIPC"], Value::Bool(true), "{file}");
        let volumes: BTreeMap<String, &Value> = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| (str_of(v, "name").to_owned(), v))
            .collect();
        for volume in volumes.values() {
            assert!(
                str_of(volume, "hostPath.path").starts_with('/'),
                "{file}: {volume:?}"
            );
            assert!(
                !str_of(volume, "hostPath.type").is_empty(),
                "{file}: hostPath type spelled out"
            );
        }
        let mut used = BTreeSet::new();
        for c in containers(&ds) {
            let name = str_of(c, "name");
            assert!(str_of(c, "image").starts_with("flower:"), "{file}/{name}");
            assert!(!args(c).is_empty(), "{file}/{name}");
            let sc = &c["securityContext"];
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_yaml::from_str::<Value>("[ALL]").unwrap(),
                "{file}/{name}"
            );
            assert!(
                sc["capabilities"]["add"].is_null(),
                "{file}/{name} adds no capability"
            );
            assert_eq!(
                sc["allowPrivilegeEscalation"],
                Value::Bool(false),
                "{file}/{name}"
            );
            assert_eq!(
                sc["readOnlyRootFilesystem"],
                Value::Bool(true),
                "{file}/{name}"
            );
            assert_ne!(sc["privileged"], Value::Bool(true), "{file}/{name}");
            for mount in c["volumeMounts"].as_sequence().unwrap() {
                let volume = str_of(mount, "name");
                let declared = volumes
                    .get(volume)
                    .unwrap_or_else(|| panic!("{file}/{name}: no volume {volume}"));
                // Host paths appear at the same path inside: the paths the
                // switchboard reports are the ones the runtime mounts from.
                assert_eq!(
                    str_of(mount, "mountPath"),
                    str_of(declared, "hostPath.path"),
                    "{file}/{name}"
                );
                used.insert(volume.to_owned());
            }
        }
        assert_eq!(
            used,
            volumes.keys().cloned().collect(),
            "{file}: every volume is used"
        );
    }
}

fn node_container(name: &str) -> Value {
    let (_, ds) = daemonsets()
        .into_iter()
        .find(|(f, _)| f == "flower-node.yaml")
        .unwrap();
    containers(&ds)
        .iter()
        .find(|c| str_of(c, "name") == name)
        .unwrap()
        .clone()
}

/// The value of `--flag=VALUE` in `args`.
fn flag(args: &[String], flag: &str) -> String {
    let prefix = format!("{flag}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
        .to_owned()
}

#[test]
fn runtime_snippets_enable_nri_on_the_plugins_socket() {
    let socket = flag(&args(&node_container("nri")), "--socket");
    let containerd = std::fs::read_to_string(Path::new(DIR).join("containerd-nri.toml")).unwrap();
    assert!(containerd.contains("[plugins.\"io.containerd.nri.v1.nri\"]"));
    for line in [
        "disable = false",
        "disable_connections = false",
        &format!("socket_path = \"{socket}\""),
    ] {
        assert!(
            containerd.lines().any(|l| l.trim() == line),
            "containerd-nri.toml lacks {line}"
        );
    }
    let crio = std::fs::read_to_string(Path::new(DIR).join("crio-nri.conf")).unwrap();
    assert!(crio.lines().any(|l| l.trim() == "[crio.nri]"));
    for line in [
        "enable_nri = true",
        "nri_disable_connections = false",
        &format!("nri_listen = \"{socket}\""),
    ] {
        assert!(
            crio.lines().any(|l| l.trim() == line),
            "crio-nri.conf lacks {line}"
        );
    }
}

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a container's args as its manifest says, host paths moved under `root`, as
/// uid 0 with every capability dropped and no way to gain one.
fn run_unprivileged(container: &Value, root: &Path) -> Proc {
    let moved: Vec<String> = args(container)
        .into_iter()
        .map(|a| {
            ["/run/flower", "/var/run/nri"].iter().fold(a, |a, host| {
                a.replace(host, &format!("{}{host}", root.display()))
            })
        })
        .collect();
    let child = Command::new("setpriv")
        .args([
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(FLOWER)
        .args(&moved)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("run setpriv (util-linux)");
    Proc(child)
}

fn effective_capabilities(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_daemonset_works_as_written_with_no_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for host in ["run/flower", "var/run/nri"] {
        std::fs::create_dir_all(root.join(host)).unwrap();
    }
    let nri_args = args(&node_container("nri"));
    let moved = |p: String| -> PathBuf { root.join(p.trim_start_matches('/')) };
    let runtime = flower_nri::runtime::Runtime::bind(&moved(flag(&nri_args, "--socket"))).unwrap();
    let switchboard = run_unprivileged(&node_container("switchboard"), root);
    let pods_socket = moved(flag(&nri_args, "--pods-socket"));
    common::wait_until("the pod API", || {
        std::os::unix::net::UnixStream::connect(&pods_socket).is_ok()
    });
    let nri = run_unprivileged(&node_container("nri"), root);
    let plugin = tokio::time::timeout(PATIENCE, runtime.accept())
        .await
        .unwrap()
        .unwrap();
    for p in [&switchboard, &nri] {
        assert_eq!(effective_capabilities(p.0.id()), "0000000000000000");
    }

    plugin.synchronize(vec![], vec![]).await.unwrap();
    let mut pod = flower_nri::api::PodSandbox {
        uid: "3c1d7e2a-0b9f-4f5e-a6d4-2e8b1c7f9a03".into(),
        name: "web".into(),
        namespace: "default".into(),
        ..Default::default()
    };
    pod.annotations
        .insert("flower/endpoint".into(), "true".into());
    plugin.run_pod_sandbox(&pod).await.unwrap();
    let container = flower_nri::api::Container {
        name: "app".into(),
        ..Default::default()
    };
    let adjust = plugin
        .create_container(&pod, &container)
        .await
        .unwrap()
        .adjust
        .expect("an endpoint");
    let endpoint = Path::new(&adjust.mounts[0].source).join("switchboard");
    assert!(
        endpoint.starts_with(root.join("run/flower")),
        "{endpoint:?}"
    );
    let sb = flower_proto::client::Switchboard::connect(&endpoint)
        .await
        .expect("the pod's endpoint accepts");
    let _server = sb
        .server_start(&common::labels(&[("role", "x")]))
        .await
        .unwrap();
}

//! A switchboard daemon serving the pod API, for the pod, run and container tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flower_pod_api as api;
use flower_pod_api::pods_client::PodsClient;
use tonic::transport::Channel;

use crate::common::{Daemon, FLOWER, labels, raise_nofile_limit, wait_until};

pub type Client = PodsClient<Channel>;

/// `flower switchboard PATH --pods-socket .. --pods-dir ..` in `dir` (a restart
/// passes the same `dir`), with `extra` flags.
pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Daemon {
    raise_nofile_limit();
    let path = dir.path().join("switchboard");
    let child = Command::new(FLOWER)
        .arg("switchboard")
        .arg(&path)
        .arg("--pods-socket")
        .arg(pods_socket(dir.path()))
        .arg("--pods-dir")
        .arg(pods_dir(dir.path()))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start flower switchboard");
    let daemon = Daemon { child, path, dir };
    let socket = pods_socket(daemon.dir.path());
    wait_until("pod API socket", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    daemon
}

pub fn start(extra: &[&str]) -> Daemon {
    start_in(tempfile::tempdir().unwrap(), extra)
}

pub fn pods_socket(dir: &Path) -> PathBuf {
    dir.join("pods.sock")
}

pub fn pods_dir(dir: &Path) -> PathBuf {
    dir.join("pods")
}

pub async fn client(daemon: &Daemon) -> Client {
    flower_pod_api::connect(&pods_socket(daemon.dir.path()))
        .await
        .expect("connect to the pod API")
}

pub fn pod_request(uid: &str, namespace: &str, name: &str) -> api::RegisterPodRequest {
    api::RegisterPodRequest {
        uid: uid.into(),
        namespace: namespace.into(),
        name: name.into(),
        attempt: 0,
        labels: labels(&[]),
        rights: Vec::new(),
    }
}

pub async fn register(client: &mut Client, request: api::RegisterPodRequest) -> api::Pod {
    client
        .register_pod(request)
        .await
        .expect("RegisterPod")
        .into_inner()
}

pub async fn pods(client: &mut Client) -> Vec<api::Pod> {
    client
        .list_pods(api::ListPodsRequest {})
        .await
        .expect("ListPods")
        .into_inner()
        .pods
}

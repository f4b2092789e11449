//! The pod API from another language: a Python grpcio client whose stubs are
//! generated at test time from the repository's pods.proto.

mod common;
mod pod_harness;

use std::path::Path;
use std::process::Command;

use common::{labels, list};
use flower_proto::client::Switchboard;

#[tokio::test]
async fn python_runtime_registers_a_pod() {
    let daemon = pod_harness::start(&[]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tempfile::tempdir().unwrap();
    let protoc = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("proto/proto"))
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .args([
            "flower/protocol/pods.proto",
            "flower/protocol/switchboard.proto",
            "flower/protocol/descriptor.proto",
        ])
        .output()
        .expect("python3 with grpcio-tools (scripts/test installs it)");
    assert!(
        protoc.status.success(),
        "stub generation failed: {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let out = Command::new("python3")
        .arg(repo.join("tests/pod_api_client.py"))
        .arg(stubs.path())
        .arg(pod_harness::pods_socket(daemon.dir.path()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The endpoint Python was given works, with the identity it asked for.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let endpoint = stdout.lines().last().unwrap();
    let sb = Switchboard::connect(Path::new(endpoint)).await.unwrap();
    let _server = sb.server_start(&labels(&[("svc", "py")])).await.unwrap();
    let root = daemon.connect().await;
    let found = list(&root, &labels(&[("svc", "py")])).await;
    assert_eq!(found[0]["server_kubernetes_pod_attempt"], "3");
    assert_eq!(found[0]["app"], "py");
}

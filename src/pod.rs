//! `flower pod add|remove|ls|add-container|remove-container`: a thin client of the pod
//! API (docs/PROTOCOL.md §11), printing one JSON object per pod or container, and the
//! pod-related defaults of `flower switchboard`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use flower_pod_api as api;
use flower_proto::switchboard::Right;
use serde_json::{Value, json};

use crate::args::{UsageError, parse_labels};

#[derive(Subcommand)]
pub enum PodCommand {
    /// Register a pod: create its endpoint PODS_DIR/UID/switchboard and print it.
    ///
    /// Prints the pod as one JSON line. Everything the pod registers carries
    /// server_kubernetes_{namespace,pod_name,pod_uid,pod_attempt} and LABELS;
    /// everything it connects to or lists carries the client_kubernetes_ ones.
    /// Registering the same uid with the same identity again is harmless.
    ///
    /// Example: flower pod add --namespace default --name web-0 --uid 1234 app=web
    Add {
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        name: String,
        /// The pod's uid: 1 to 128 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        uid: String,
        /// The pod's attempt (sandbox restart count).
        #[arg(long, default_value_t = 0)]
        attempt: u32,
        /// Rights, comma-separated (default: CLIENT_CONNECT,SERVER_START,LIST).
        #[arg(long, value_name = "R,..", value_parser = parse_rights)]
        rights: Option<RightList>,
        /// The pod API socket.
        #[arg(long, value_name = "PATH")]
        pods_socket: Option<PathBuf>,
        /// Extra labels forced onto the pod's registrations.
        #[arg(value_name = "LABELS")]
        labels: Vec<String>,
    },
    /// Unregister a pod: revoke every handle and target it holds, remove its endpoint.
    ///
    /// Connections already handed out are plain sockets and stay up.
    Remove {
        uid: String,
        /// The pod API socket.
        #[arg(long, value_name = "PATH")]
        pods_socket: Option<PathBuf>,
    },
    /// List the registered pods, one JSON line each.
    Ls {
        /// The pod API socket.
        #[arg(long, value_name = "PATH")]
        pods_socket: Option<PathBuf>,
    },
    /// Give one container of a registered pod an endpoint of its own and print it.
    ///
    /// The endpoint (PODS_DIR/POD_UID@NAME/switchboard) carries the pod's identity
    /// plus server_kubernetes_container_name (client_ for connects) and lives until
    /// the container or its pod is removed. The same name and attempt again is
    /// harmless. Prints the container as one JSON line.
    ///
    /// Example: flower pod add-container 1234 app
    AddContainer {
        /// The pod's uid (see `flower pod ls`).
        pod_uid: String,
        /// The container's name: 1 to 128 of A-Z a-z 0-9 . _ -
        name: String,
        /// The container's attempt (restart count).
        #[arg(long, default_value_t = 0)]
        attempt: u32,
        /// The pod API socket.
        #[arg(long, value_name = "PATH")]
        pods_socket: Option<PathBuf>,
    },
    /// Remove one container's endpoint: revoke every handle and target it handed
    /// out. The pod's own endpoint stays.
    RemoveContainer {
        pod_uid: String,
        name: String,
        /// The pod API socket.
        #[arg(long, value_name = "PATH")]
        pods_socket: Option<PathBuf>,
    },
}

/// A `--rights` value: right names, comma-separated.
#[derive(Debug, Clone)]
pub struct RightList(pub Vec<Right>);

/// Right names, comma-separated (`SERVER_START,CLIENT_CONNECT`); empty is none.
pub fn parse_rights(s: &str) -> Result<RightList, String> {
    s.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            Right::from_str_name(&name.to_ascii_uppercase()).ok_or_else(|| {
                format!(
                    "unknown right {name:?} (rights: CLIENT_CONNECT, EGRESS_START, \
                     INGRESS_CONNECT, RESOLVER_START, SERVER_START, LIST)"
                )
            })
        })
        .collect::<Result<_, _>>()
        .map(RightList)
}

/// `/run/flower/NAME` for root, else `$XDG_RUNTIME_DIR/flower/NAME`.
fn runtime_path(name: &str, what: &str, flag: &str) -> Result<PathBuf, UsageError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(Path::new("/run/flower").join(name));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir).join("flower").join(name)),
        None => Err(UsageError(format!(
            "no {what}: give {flag}, or set XDG_RUNTIME_DIR"
        ))),
    }
}

/// The pod API socket: `/run/flower/pods.sock` for root, else under `$XDG_RUNTIME_DIR`.
pub fn default_pods_socket() -> Result<PathBuf, UsageError> {
    runtime_path("pods.sock", "pod API socket", "--pods-socket")
}

/// The pods directory: `/run/flower/pods` for root, else under `$XDG_RUNTIME_DIR`.
pub fn default_pods_dir() -> Result<PathBuf, UsageError> {
    runtime_path("pods", "pods directory", "--pods-dir")
}

pub async fn run(command: PodCommand) -> Result<()> {
    let socket = match &command {
        PodCommand::Add { pods_socket, .. }
        | PodCommand::Remove { pods_socket, .. }
        | PodCommand::Ls { pods_socket }
        | PodCommand::AddContainer { pods_socket, .. }
        | PodCommand::RemoveContainer { pods_socket, .. } => pods_socket.clone(),
    };
    let socket = match socket {
        Some(s) => s,
        None => default_pods_socket()?,
    };
    // Usage errors before connecting.
    let add = match &command {
        PodCommand::Add {
            namespace,
            name,
            uid,
            attempt,
            rights,
            labels,
            ..
        } => Some(api::RegisterPodRequest {
            uid: uid.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            attempt: *attempt,
            labels: parse_labels(labels)?,
            rights: rights
                .iter()
                .flat_map(|r| &r.0)
                .map(|r| *r as i32)
                .collect(),
        }),
        _ => None,
    };
    let mut client = flower_pod_api::connect(&socket).await.map_err(|e| {
        // The innermost cause (the OS error) is the useful part; tonic repeats it.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        anyhow::anyhow!(
            "cannot connect to the pod API at {}: {cause}",
            socket.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    match command {
        PodCommand::Add { .. } => {
            let request = add.expect("built above");
            let pod = client.register_pod(request).await.map_err(status)?;
            writeln!(out, "{}", pod_json(&pod.into_inner()))?;
        }
        PodCommand::Remove { uid, .. } => {
            client
                .unregister_pod(api::UnregisterPodRequest { uid })
                .await
                .map_err(status)?;
        }
        PodCommand::Ls { .. } => {
            let pods = client
                .list_pods(api::ListPodsRequest {})
                .await
                .map_err(status)?;
            for pod in pods.into_inner().pods {
                writeln!(out, "{}", pod_json(&pod))?;
            }
        }
        PodCommand::AddContainer {
            pod_uid,
            name,
            attempt,
            ..
        } => {
            let container = client
                .register_container(api::RegisterContainerRequest {
                    pod_uid,
                    name,
                    attempt,
                })
                .await
                .map_err(status)?;
            writeln!(out, "{}", container_json(&container.into_inner()))?;
        }
        PodCommand::RemoveContainer { pod_uid, name, .. } => {
            client
                .unregister_container(api::UnregisterContainerRequest { pod_uid, name })
                .await
                .map_err(status)?;
        }
    }
    Ok(())
}

/// A gRPC error as one line: its message (the code when there is none).
fn status(s: tonic::Status) -> anyhow::Error {
    match s.message() {
        "" => anyhow::anyhow!("pod API: {:?}", s.code()),
        m => anyhow::anyhow!("{m}"),
    }
}

fn right_names(rights: &[i32]) -> Vec<&'static str> {
    rights
        .iter()
        .filter_map(|r| Right::try_from(*r).ok())
        .map(|r| r.as_str_name())
        .collect()
}

/// A pod as JSON: proto field names, rights as names, labels as objects.
pub fn pod_json(pod: &api::Pod) -> Value {
    json!({
        "uid": pod.uid,
        "endpoint": pod.endpoint,
        "in_labels": pod.in_labels,
        "out_labels": pod.out_labels,
        "rights": right_names(&pod.rights),
        "handles": pod.handles,
        "targets": pod.targets,
        "containers": pod.containers.iter().map(container_json).collect::<Vec<_>>(),
    })
}

/// A container as JSON, like [`pod_json`].
pub fn container_json(c: &api::Container) -> Value {
    json!({
        "pod_uid": c.pod_uid,
        "name": c.name,
        "attempt": c.attempt,
        "endpoint": c.endpoint,
        "in_labels": c.in_labels,
        "out_labels": c.out_labels,
        "rights": right_names(&c.rights),
        "handles": c.handles,
        "targets": c.targets,
    })
}

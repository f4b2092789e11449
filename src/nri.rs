//! `flower nri`: the NRI plugin's command line (the plugin is `flower_nri`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;

use crate::args::UsageError;

/// Give every Kubernetes pod its switchboard endpoint, as an NRI plugin.
///
/// Connects to the container runtime's NRI socket (containerd >= 1.7, CRI-O >= 1.26
/// with NRI enabled) and, for each enabled pod, registers it with the switchboard's
/// pod API at RunPodSandbox, bind-mounts the pod's endpoint directory read-only at
/// /run/flower in each of its containers with
/// FLOWER_SWITCHBOARD=/run/flower/switchboard, and unregisters it at
/// StopPodSandbox/RemovePodSandbox. Synchronize (on every connect) registers every
/// running pod and unregisters pods that are gone.
///
/// A pod is enabled by the annotation flower/endpoint: "true" (or, with --all-pods,
/// unless it says "false"). The annotation flower/labels: "app,tier" names the pod
/// labels forced on what the pod registers (default: --pod-labels).
///
/// Fails open: answers the runtime in time even when the pod API is down (pods
/// created meanwhile get no /run/flower), logs one line per affected pod, and
/// retries registration in the background. Reconnects when the runtime restarts.
#[derive(clap::Args)]
pub struct NriArgs {
    /// The runtime's NRI socket.
    #[arg(long, value_name = "PATH", default_value = "/var/run/nri/nri.sock")]
    socket: PathBuf,
    /// The switchboard's pod API socket. Default: /run/flower/pods.sock for root,
    /// else $XDG_RUNTIME_DIR/flower/pods.sock.
    #[arg(long, value_name = "PATH")]
    pods_socket: Option<PathBuf>,
    /// Give every pod an endpoint unless its flower/endpoint annotation is "false".
    #[arg(long)]
    all_pods: bool,
    /// Pod labels (comma-separated keys) forced on what a pod registers, for pods
    /// without a flower/labels annotation. Empty for none.
    #[arg(
        long,
        value_name = "KEYS",
        default_value = "app",
        value_delimiter = ','
    )]
    pod_labels: Vec<String>,
    /// Name the plugin registers with.
    #[arg(long, default_value = "flower")]
    name: String,
    /// Index the plugin registers with (two digits; plugins run in index order).
    #[arg(long, default_value = "50")]
    index: String,
    /// Seconds one pod API call may take (at most half the runtime's request timeout).
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = crate::args::parse_seconds)]
    pod_api_timeout: std::time::Duration,
}

pub async fn run(args: NriArgs) -> Result<()> {
    let index_ok = args.index.len() == 2 && args.index.bytes().all(|b| b.is_ascii_digit());
    if !index_ok {
        return Err(UsageError(format!("--index {:?} is not two digits", args.index)).into());
    }
    let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_.+".contains(c);
    if args.name.is_empty() || !args.name.chars().all(name_ok) {
        return Err(UsageError(format!("--name {:?} is not [a-zA-Z0-9_.+-]+", args.name)).into());
    }
    let pods_socket = match args.pods_socket {
        Some(path) => path,
        None => crate::pod::default_pods_socket()?,
    };
    let pod_api_timeout = args.pod_api_timeout;
    let options = flower_nri::plugin::Options {
        name: args.name,
        index: args.index,
        all_pods: args.all_pods,
        pod_labels: args
            .pod_labels
            .into_iter()
            .filter(|k| !k.is_empty())
            .collect(),
        pod_api_timeout,
    };
    let pods = Arc::new(flower_nri::pods::GrpcPods::new(&pods_socket));
    tracing::info!(
        socket = %args.socket.display(),
        pods_socket = %pods_socket.display(),
        "NRI plugin starting"
    );
    let plugin = flower_nri::plugin::Plugin::new(options, pods);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        never = plugin.run(&args.socket) => never,
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Pods stay registered: the switchboard keeps them, and the next plugin to
    // connect reconciles them on Synchronize.
    tracing::info!("NRI plugin stopping");
    Ok(())
}

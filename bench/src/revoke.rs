//! Revocation: how long UnregisterPod takes to make everything a pod held go away,
//! and what it costs the daemon, with many handles open in the pod.
//!
//! The daemon serves the pod API; this process plays the pod (it opens N handles on
//! the pod's endpoint and registers one server through one of them) and, on the
//! main path, an observer that keeps connecting to that server. Per round it
//! measures, from just before the UnregisterPod call:
//!
//! * **target gone**: the observer's first `NOT_FOUND`;
//! * **RPC returned**: UnregisterPod answered (it answers once the pod's scope has
//!   drained: no handle open, no target left);
//! * **handles closed**: the last of the pod's N channels saw end of stream;
//! * **daemon CPU**: the daemon's CPU time over the round (all threads,
//!   `/proc/PID/task/*/schedstat`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flower_pod_api as api;
use flower_proto::client::Switchboard;
use flower_proto::{Code, Labels};

use crate::procs::{Ctx, raise_nofile};
use crate::stats::{Table, now_ns, us};

pub struct RevokeOpts {
    /// Handles open in the pod per measurement.
    pub handles: Vec<usize>,
    pub rounds: usize,
}

/// CPU time of every thread of `pid`, in ns.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| {
            let text = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

struct Round {
    gone_ns: u64,
    rpc_ns: u64,
    closed_ns: u64,
    cpu_ns: u64,
}

pub fn revoke_bench(ctx: &Ctx, opts: &RevokeOpts) -> Result<()> {
    let most = opts.handles.iter().copied().max().unwrap_or(0);
    raise_nofile(2 * most as u64 + 1024);
    let pods_socket = ctx.path("pods.sock");
    let pods_dir = ctx.path("pods");
    let limit = (most + 16).to_string();
    let (daemon, path) = ctx.switchboard_with(
        &[
            "--pods-socket",
            pods_socket.to_str().context("path")?,
            "--pods-dir",
            pods_dir.to_str().context("path")?,
            "--pod-max-handles",
            &limit,
        ],
        false,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut table = Table::new(&[
        "handles",
        "target gone p50 µs",
        "RPC returned p50 µs",
        "handles closed p50 µs",
        "max (closed) µs",
        "daemon CPU p50 µs",
        "CPU per handle µs",
    ]);
    rt.block_on(async {
        let mut pods = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match api::connect(&pods_socket).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .await
        .context("the pod API did not come up")?;
        for &n in &opts.handles {
            let mut rounds = Vec::new();
            for _ in 0..opts.rounds {
                rounds.push(round(&mut pods, &path, daemon.pid(), n).await?);
            }
            let p50 = |f: fn(&Round) -> u64| {
                let mut v: Vec<u64> = rounds.iter().map(f).collect();
                v.sort_unstable();
                v[v.len() / 2] as f64 / 1e3
            };
            let max_closed = rounds.iter().map(|r| r.closed_ns).max().unwrap_or(0) as f64 / 1e3;
            table.row(&[
                n.to_string(),
                us(p50(|r| r.gone_ns)),
                us(p50(|r| r.rpc_ns)),
                us(p50(|r| r.closed_ns)),
                us(max_closed),
                us(p50(|r| r.cpu_ns)),
                format!("{:.2}", p50(|r| r.cpu_ns) / n as f64),
            ]);
        }
        anyhow::Ok(())
    })?;
    table.print(&format!(
        "Revocation: UnregisterPod with N handles open in the pod (median of {} rounds)",
        opts.rounds
    ));
    drop(daemon);
    Ok(())
}

async fn round(
    pods: &mut api::pods_client::PodsClient<tonic::transport::Channel>,
    observer: &Path,
    daemon: u32,
    handles: usize,
) -> Result<Round> {
    let pod = pods
        .register_pod(api::RegisterPodRequest {
            uid: "bench-pod".into(),
            namespace: "bench".into(),
            name: "pod".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let endpoint = Path::new(&pod.endpoint);
    let mut held = Vec::with_capacity(handles);
    for _ in 0..handles {
        held.push(Switchboard::connect(endpoint).await?);
    }
    let target: Labels = [("bench".to_owned(), "revoke".to_owned())].into();
    let mut server = held[0].server_start(&target).await?;
    // Takes (and drops) what the observer connects, until the registration closes.
    let drain = tokio::spawn(async move { while server.accept().await.is_some() {} });
    // Every handle accepted and counted before the clock starts.
    loop {
        let listed = pods.list_pods(api::ListPodsRequest {}).await?.into_inner();
        if listed
            .pods
            .first()
            .is_some_and(|p| p.handles as usize == handles)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // The observer runs on a thread of its own, so that the pod's side of the
    // revocation (1 000s of channels seeing end of stream here) does not delay it.
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let observer_path = observer.to_owned();
    let probe = target.clone();
    let gone = tokio::task::spawn_blocking(move || observe(&observer_path, &probe, ready));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cpu_before = cpu_ns(daemon);
    let start = now_ns();
    let _ = go.send(());
    let mut pods2 = pods.clone();
    let unregister = tokio::spawn(async move {
        pods2
            .unregister_pod(api::UnregisterPodRequest {
                uid: "bench-pod".into(),
            })
            .await
            .map(|_| now_ns())
    });
    let closed = tokio::spawn(async move {
        futures::future::join_all(held.iter().map(|h| h.peer().closed())).await;
        now_ns()
    });
    let gone_at = gone.await.context("observer")??;
    let rpc_at = unregister.await??;
    let closed_at = tokio::time::timeout(Duration::from_secs(20), closed)
        .await
        .context("the pod's handles did not close")??;
    let cpu = cpu_ns(daemon) - cpu_before;
    tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .context("the registration did not close")??;
    Ok(Round {
        gone_ns: gone_at - start,
        rpc_ns: rpc_at - start,
        closed_ns: closed_at - start,
        cpu_ns: cpu,
    })
}

/// Connects to `target` on the main path, in a loop from the moment `go` fires,
/// until the switchboard answers `NOT_FOUND`; returns that moment.
fn observe(path: &Path, target: &Labels, go: tokio::sync::oneshot::Receiver<()>) -> Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let observer = Switchboard::connect(path).await?;
        observer.client_connect(target).await.map(drop)?;
        go.await?;
        let deadline = now_ns() + 20_000_000_000;
        loop {
            match observer.client_connect(target).await {
                Ok(_) => {}
                Err(s) if s.code == Code::NotFound => return Ok(now_ns()),
                // Revoked while this connect was in flight: not gone from the directory yet.
                Err(s) if s.code == Code::Unavailable => {}
                Err(s) => bail!("observer: {s}"),
            }
            if now_ns() > deadline {
                bail!("the target did not go away");
            }
        }
    })
}

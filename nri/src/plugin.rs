//! What Flower does on each NRI event.
//!
//! * **Configure** — subscribes to RunPodSandbox, StopPodSandbox, RemovePodSandbox and
//!   CreateContainer only (subscribing to an event a runtime lacks fails the
//!   registration), and takes the runtime's request timeout.
//! * **Synchronize** — the runtime's list of pods becomes the wanted set: every
//!   enabled pod is registered (`RegisterPod` is idempotent), every pod the
//!   switchboard has that is not wanted is unregistered.
//! * **RunPodSandbox** — registers the pod: its namespace, name and uid, attempt 0
//!   (NRI does not carry the CRI sandbox attempt), and the pod labels chosen by the
//!   `flower/labels` annotation or `--pod-labels`.
//! * **CreateContainer** — bind-mounts the pod's endpoint directory read-only at
//!   `/run/flower` and sets `FLOWER_SWITCHBOARD=/run/flower/switchboard`.
//! * **StopPodSandbox / RemovePodSandbox** — unregisters the pod: its endpoint and
//!   everything it registered are gone at once.
//!
//! A pod takes part when its `flower/endpoint` annotation is `"true"`, or, with
//! `--all-pods`, unless it is `"false"`.
//!
//! **Failing open.** Every answer is given within the runtime's request timeout
//! (half of it is the budget for the pod API). When the pod API fails or is down the
//! plugin still answers OK, logs one line saying what the pod misses, and keeps
//! trying in the background: the wanted set is reconciled every
//! [`RETRY_INTERVAL`] until it succeeds. A container created meanwhile runs without
//! `/run/flower` (mounts are fixed at creation); containers created after the
//! switchboard is back get it.
//!
//! The plugin takes the switchboard's pod registry to be its own: a pod the
//! runtime does not list is unregistered at reconciliation.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flower_pod_api::RegisterPodRequest;
use futures::StreamExt;
use futures::future::BoxFuture;
use prost::Message as _;
use tokio::net::UnixStream;

use crate::api::{self, Event, PodSandbox};
use crate::mux::{Mux, PLUGIN_CONN, RUNTIME_CONN};
use crate::pods::{PodApi, describe};
use crate::ttrpc::{self, Status, code};

/// Annotation that enables (`"true"`) or disables (`"false"`) a pod's endpoint.
pub const ANNOTATION_ENDPOINT: &str = "flower/endpoint";
/// Annotation naming, comma-separated, the pod labels to force on what it registers.
pub const ANNOTATION_LABELS: &str = "flower/labels";
/// Where the endpoint directory appears in each container.
pub const MOUNT_POINT: &str = "/run/flower";
/// The environment variable every Flower tool reads, and its value in a container.
pub const ENV_NAME: &str = "FLOWER_SWITCHBOARD";
pub const ENV_VALUE: &str = "/run/flower/switchboard";
/// The runtime's request timeout when Configure does not say (NRI's default).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the plugin gives the runtime to answer RegisterPlugin (NRI's default).
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a failed reconciliation is retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);
/// Pod API calls made at once while reconciling.
const PARALLEL_CALLS: usize = 8;

/// How the plugin is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name and index the plugin registers with (plugins run in index order).
    pub name: String,
    pub index: String,
    /// Give every pod an endpoint unless it opts out.
    pub all_pods: bool,
    /// Keys of the pod labels forced on what a pod registers, unless the pod's
    /// `flower/labels` annotation names others.
    pub pod_labels: Vec<String>,
    /// Upper bound for one pod API call (further bounded by half the runtime's
    /// request timeout).
    pub pod_api_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            name: "flower".into(),
            index: "50".into(),
            all_pods: false,
            pod_labels: vec!["app".into()],
            pod_api_timeout: Duration::from_secs(1),
        }
    }
}

/// The event mask Configure answers.
pub fn subscribed_events() -> i32 {
    [
        Event::RunPodSandbox,
        Event::StopPodSandbox,
        Event::RemovePodSandbox,
        Event::CreateContainer,
    ]
    .into_iter()
    .map(api::event_bit)
    .fold(0, |mask, bit| mask | bit)
}

/// The plugin: its options, the pod API, and its view of the runtime's pods.
pub struct Plugin {
    options: Options,
    pods: Arc<dyn PodApi>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Enabled pods the runtime has, by uid: what the switchboard should hold.
    wanted: BTreeMap<String, RegisterPodRequest>,
    /// Endpoint directories of registered pods, by uid.
    endpoints: HashMap<String, PathBuf>,
    /// Pods of a Synchronize split over several messages, until the last one.
    sync_pods: Vec<PodSandbox>,
    request_timeout: Option<Duration>,
    /// The switchboard may differ from `wanted`: reconcile in the background.
    dirty: bool,
    /// The last background attempt failed (log recovery once).
    failing: bool,
}

impl Plugin {
    pub fn new(options: Options, pods: Arc<dyn PodApi>) -> Arc<Plugin> {
        Arc::new(Plugin {
            options,
            pods,
            state: Mutex::new(State::default()),
        })
    }

    /// Budget for pod API work inside one runtime request.
    fn budget(&self) -> Duration {
        let timeout = self
            .state
            .lock()
            .unwrap()
            .request_timeout
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        self.options.pod_api_timeout.min(timeout / 2)
    }

    /// The RegisterPod request for `pod`, or `None` when it takes no part.
    pub fn registration(&self, pod: &PodSandbox) -> Option<RegisterPodRequest> {
        let enabled = match pod.annotations.get(ANNOTATION_ENDPOINT).map(|v| v.trim()) {
            Some(v) if v.eq_ignore_ascii_case("true") => true,
            Some(v) if v.eq_ignore_ascii_case("false") => false,
            _ => self.options.all_pods,
        };
        if !enabled {
            return None;
        }
        let keys: Vec<&str> = match pod.annotations.get(ANNOTATION_LABELS) {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect(),
            None => self.options.pod_labels.iter().map(String::as_str).collect(),
        };
        let labels = keys
            .into_iter()
            // Identity comes only from the identity fields; the switchboard refuses these.
            .filter(|k| {
                !k.starts_with("server_kubernetes_") && !k.starts_with("client_kubernetes_")
            })
            .filter_map(|k| pod.labels.get(k).map(|v| (k.to_owned(), v.clone())))
            .collect();
        let uid = if pod.uid.is_empty() {
            &pod.id
        } else {
            &pod.uid
        };
        Some(RegisterPodRequest {
            uid: uid.clone(),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            attempt: 0,
            labels,
            rights: vec![],
        })
    }

    async fn register(&self, request: RegisterPodRequest) -> Result<PathBuf, String> {
        let uid = request.uid.clone();
        let pod = self
            .pods
            .register(request)
            .await
            .map_err(|e| describe(&e))?;
        let dir = Path::new(&pod.endpoint)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| format!("endpoint {:?} has no directory", pod.endpoint))?
            .to_owned();
        self.state
            .lock()
            .unwrap()
            .endpoints
            .insert(uid, dir.clone());
        Ok(dir)
    }

    async fn unregister(&self, uid: String) -> Result<(), String> {
        self.state.lock().unwrap().endpoints.remove(&uid);
        match self.pods.unregister(uid).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(describe(&e)),
        }
    }

    /// Makes the switchboard hold exactly the wanted pods.
    async fn reconcile(&self) -> Result<(usize, usize), String> {
        let wanted = self.state.lock().unwrap().wanted.clone();
        let present = self.pods.list().await.map_err(|e| describe(&e))?;
        let stale: Vec<String> = present
            .into_iter()
            .map(|p| p.uid)
            .filter(|uid| !wanted.contains_key(uid))
            .collect();
        let (registered, removed) = (wanted.len(), stale.len());
        let mut calls: Vec<BoxFuture<'_, Result<(), String>>> = Vec::new();
        for request in wanted.into_values() {
            calls.push(Box::pin(async move {
                let uid = request.uid.clone();
                self.register(request)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("registering {uid}: {e}"))
            }));
        }
        for uid in stale {
            calls.push(Box::pin(async move {
                // A RunPodSandbox may have come in since the snapshot: never remove a
                // pod that is wanted now, and if one became wanted while it was being
                // removed, the next background pass registers it again.
                let wanted_now = |uid: &str| self.state.lock().unwrap().wanted.contains_key(uid);
                if wanted_now(&uid) {
                    return Ok(());
                }
                let what = format!("unregistering {uid}");
                let result = self.unregister(uid.clone()).await;
                if wanted_now(&uid) {
                    self.mark_dirty();
                }
                result.map_err(|e| format!("{what}: {e}"))
            }));
        }
        let mut results = futures::stream::iter(calls).buffer_unordered(PARALLEL_CALLS);
        let mut errors = Vec::new();
        while let Some(result) = results.next().await {
            if let Err(e) = result {
                errors.push(e);
            }
        }
        match errors.first() {
            None => Ok((registered, removed)),
            Some(first) => Err(format!("{first} (and {} more failures)", errors.len() - 1)),
        }
    }

    fn mark_dirty(&self) {
        self.state.lock().unwrap().dirty = true;
    }

    /// Retries reconciliation while the switchboard differs from the wanted set.
    pub async fn retry_in_background(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RETRY_INTERVAL).await;
            if !std::mem::take(&mut self.state.lock().unwrap().dirty) {
                continue;
            }
            let result = tokio::time::timeout(RETRY_INTERVAL * 5, self.reconcile()).await;
            let result = result.unwrap_or_else(|_| Err("timed out".into()));
            let mut state = self.state.lock().unwrap();
            match result {
                Ok((registered, removed)) => {
                    // Only a failure makes the switchboard differ: this is a recovery.
                    tracing::info!(
                        "pod API at {} is back: {registered} pods registered, {removed} stale ones removed",
                        self.pods.location()
                    );
                    state.failing = false;
                }
                Err(e) => {
                    if !state.failing {
                        tracing::warn!(
                            "pod API at {} still failing ({e}); retrying every {RETRY_INTERVAL:?}",
                            self.pods.location()
                        );
                    }
                    state.failing = true;
                    state.dirty = true;
                }
            }
        }
    }

    fn configure(&self, request: api::ConfigureRequest) -> api::ConfigureResponse {
        tracing::info!(
            runtime = %request.runtime_name,
            version = %request.runtime_version,
            request_timeout_ms = request.request_timeout,
            "configured by the runtime"
        );
        let timeout = u64::try_from(request.request_timeout)
            .ok()
            .filter(|ms| *ms > 0);
        let mut state = self.state.lock().unwrap();
        state.request_timeout = timeout.map(Duration::from_millis);
        state.sync_pods.clear();
        api::ConfigureResponse {
            events: subscribed_events(),
        }
    }

    async fn synchronize(&self, request: api::SynchronizeRequest) -> api::SynchronizeResponse {
        let pods = {
            let mut state = self.state.lock().unwrap();
            state.sync_pods.extend(request.pods);
            if request.more {
                // Upstream's rule: answer `more` back, with no updates, until the last part.
                return api::SynchronizeResponse {
                    update: vec![],
                    more: true,
                };
            }
            let pods = std::mem::take(&mut state.sync_pods);
            state.wanted = pods
                .iter()
                .filter_map(|p| self.registration(p))
                .map(|r| (r.uid.clone(), r))
                .collect();
            let State {
                wanted, endpoints, ..
            } = &mut *state;
            endpoints.retain(|uid, _| wanted.contains_key(uid));
            pods.len()
        };
        match tokio::time::timeout(self.budget(), self.reconcile()).await {
            Ok(Ok((registered, removed))) => tracing::info!(
                "synchronized with {pods} pods: {registered} registered, {removed} stale ones removed"
            ),
            outcome => {
                let e = outcome
                    .unwrap_or_else(|_| Err("timed out".into()))
                    .unwrap_err();
                tracing::warn!(
                    "synchronize: pod API at {} failed ({e}); pods stay unregistered until it answers, retrying in the background",
                    self.pods.location()
                );
                self.mark_dirty();
            }
        }
        api::SynchronizeResponse {
            update: vec![],
            more: false,
        }
    }

    async fn run_pod_sandbox(&self, pod: PodSandbox) {
        let Some(request) = self.registration(&pod) else {
            return;
        };
        self.state
            .lock()
            .unwrap()
            .wanted
            .insert(request.uid.clone(), request.clone());
        let (ns, name) = (pod.namespace, pod.name);
        match tokio::time::timeout(self.budget(), self.register(request)).await {
            Ok(Ok(dir)) => tracing::info!("pod {ns}/{name} registered, endpoint {}", dir.display()),
            outcome => {
                let e = outcome
                    .unwrap_or_else(|_| Err("timed out".into()))
                    .unwrap_err();
                tracing::warn!(
                    "pod {ns}/{name} not registered: pod API at {} failed ({e}); its containers get no {MOUNT_POINT} until it answers",
                    self.pods.location()
                );
                self.mark_dirty();
            }
        }
    }

    async fn create_container(
        &self,
        request: api::CreateContainerRequest,
    ) -> api::CreateContainerResponse {
        let mut response = api::CreateContainerResponse::default();
        let (Some(pod), Some(container)) = (request.pod, request.container) else {
            return response;
        };
        let Some(registration) = self.registration(&pod) else {
            return response;
        };
        let what = format!(
            "container {} of pod {}/{}",
            container.name, pod.namespace, pod.name
        );
        if container
            .mounts
            .iter()
            .any(|m| Path::new(&m.destination) == Path::new(MOUNT_POINT))
        {
            tracing::warn!("{what} already mounts something at {MOUNT_POINT}: left as it is");
            return response;
        }
        let known = self
            .state
            .lock()
            .unwrap()
            .endpoints
            .get(&registration.uid)
            .cloned();
        let dir = match known {
            Some(dir) => dir,
            // Not registered yet (the pod API was down at RunPodSandbox): try once more.
            None => match tokio::time::timeout(self.budget(), self.register(registration)).await {
                Ok(Ok(dir)) => dir,
                outcome => {
                    let e = outcome
                        .unwrap_or_else(|_| Err("timed out".into()))
                        .unwrap_err();
                    tracing::warn!(
                        "{what} created without {MOUNT_POINT}: pod API at {} failed ({e})",
                        self.pods.location()
                    );
                    self.mark_dirty();
                    return response;
                }
            },
        };
        response.adjust = Some(adjustment(&dir));
        tracing::info!("{what} gets {} at {MOUNT_POINT}", dir.display());
        response
    }

    async fn pod_gone(&self, pod: PodSandbox, event: &str) {
        let uid = if pod.uid.is_empty() {
            pod.id.clone()
        } else {
            pod.uid.clone()
        };
        if self.state.lock().unwrap().wanted.remove(&uid).is_none() {
            return;
        }
        let (ns, name) = (&pod.namespace, &pod.name);
        match tokio::time::timeout(self.budget(), self.unregister(uid)).await {
            Ok(Ok(())) => tracing::info!("{event}: pod {ns}/{name} unregistered"),
            outcome => {
                let e = outcome
                    .unwrap_or_else(|_| Err("timed out".into()))
                    .unwrap_err();
                tracing::warn!(
                    "{event}: pod {ns}/{name} not unregistered yet: pod API at {} failed ({e}); retrying in the background",
                    self.pods.location()
                );
                self.mark_dirty();
            }
        }
    }

    /// Dispatches one call of the NRI `Plugin` service.
    async fn dispatch(
        self: Arc<Self>,
        method: String,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        fn decode<M: prost::Message + Default>(payload: &[u8]) -> Result<M, Status> {
            M::decode(payload)
                .map_err(|e| Status::new(code::INVALID_ARGUMENT, format!("bad request: {e}")))
        }
        Ok(match method.as_str() {
            "Configure" => self.configure(decode(&payload)?).encode_to_vec(),
            "Synchronize" => self.synchronize(decode(&payload)?).await.encode_to_vec(),
            "RunPodSandbox" => {
                let request: api::RunPodSandboxRequest = decode(&payload)?;
                if let Some(pod) = request.pod {
                    self.run_pod_sandbox(pod).await;
                }
                api::RunPodSandboxResponse {}.encode_to_vec()
            }
            "CreateContainer" => self
                .create_container(decode(&payload)?)
                .await
                .encode_to_vec(),
            "StopPodSandbox" => {
                let request: api::StopPodSandboxRequest = decode(&payload)?;
                if let Some(pod) = request.pod {
                    self.pod_gone(pod, "StopPodSandbox").await;
                }
                api::StopPodSandboxResponse {}.encode_to_vec()
            }
            "RemovePodSandbox" => {
                let request: api::RemovePodSandboxRequest = decode(&payload)?;
                if let Some(pod) = request.pod {
                    self.pod_gone(pod, "RemovePodSandbox").await;
                }
                api::RemovePodSandboxResponse {}.encode_to_vec()
            }
            "Shutdown" => {
                tracing::info!("the runtime is shutting down");
                api::Empty {}.encode_to_vec()
            }
            other => {
                return Err(Status::new(code::UNIMPLEMENTED, format!("method {other}")));
            }
        })
    }
}

/// The adjustment giving a container its pod's endpoint directory `dir`.
pub fn adjustment(dir: &Path) -> api::ContainerAdjustment {
    api::ContainerAdjustment {
        mounts: vec![api::Mount {
            destination: MOUNT_POINT.into(),
            r#type: "bind".into(),
            source: dir.display().to_string(),
            options: ["bind", "ro", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        }],
        env: vec![api::KeyValue {
            key: ENV_NAME.into(),
            value: ENV_VALUE.into(),
        }],
        ..Default::default()
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct PluginService(Arc<Plugin>);

impl ttrpc::Service for PluginService {
    fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, Status>> {
        if service != api::PLUGIN_SERVICE {
            let e = Status::new(code::UNIMPLEMENTED, format!("service {service}"));
            return Box::pin(async move { Err(e) });
        }
        Box::pin(self.0.clone().dispatch(method.to_owned(), payload))
    }
}

/// Why a connection to the runtime ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("cannot connect to the NRI socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the runtime refused the registration: {0}")]
    Register(Status),
}

impl Plugin {
    /// Registers on an open NRI socket and serves the runtime's calls until the
    /// runtime closes it.
    pub async fn serve(self: &Arc<Self>, socket: UnixStream) -> Result<(), ConnectionError> {
        let (_mux, [plugin, runtime]) = Mux::new(socket, [PLUGIN_CONN, RUNTIME_CONN]);
        let server = tokio::spawn(ttrpc::serve(plugin, Arc::new(PluginService(self.clone()))));
        let runtime = ttrpc::Client::new(runtime);
        let request = api::RegisterPluginRequest {
            plugin_name: self.options.name.clone(),
            plugin_idx: self.options.index.clone(),
            nri_version: String::new(),
        };
        let registered: Result<api::Empty, Status> = runtime
            .call(
                api::RUNTIME_SERVICE,
                "RegisterPlugin",
                &request,
                REGISTRATION_TIMEOUT,
            )
            .await;
        if let Err(e) = registered {
            server.abort();
            return Err(ConnectionError::Register(e));
        }
        tracing::info!(name = %self.options.name, index = %self.options.index, "registered with the runtime");
        let _ = server.await;
        Ok(())
    }

    /// [`Plugin::run`] for a task that owns its path.
    pub async fn run_owned(self: Arc<Self>, path: PathBuf) {
        self.run(&path).await
    }

    /// Connects to the runtime's NRI socket at `path`, serves it, and connects again
    /// (every second) whenever the runtime goes away — it restarts, the plugin stays.
    pub async fn run(self: Arc<Self>, path: &Path) -> ! {
        let _retry = AbortOnDrop(tokio::spawn(self.clone().retry_in_background()));
        let mut logged_down = false;
        loop {
            match UnixStream::connect(path).await {
                Ok(socket) => {
                    logged_down = false;
                    match self.serve(socket).await {
                        Ok(()) => {
                            tracing::warn!("the runtime closed the NRI connection; reconnecting")
                        }
                        Err(e) => tracing::warn!("{e}; reconnecting"),
                    }
                }
                Err(source) if !logged_down => {
                    let e = ConnectionError::Connect {
                        path: path.to_owned(),
                        source,
                    };
                    tracing::warn!("{e}; retrying every second");
                    logged_down = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

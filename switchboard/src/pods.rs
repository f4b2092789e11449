//! Pods: a switchboard endpoint per pod (and, if asked, per container) that carries
//! the pod's identity, revoked at once when the pod goes (docs/PROTOCOL.md §11).
//!
//! [`Pods`] is the registry a container runtime embeds (the daemon serves it over
//! gRPC, see [`crate::pod_api`]). Each registered pod gets a directory
//! `PODS_DIR/<uid>/` holding the listening SEQPACKET socket `switchboard` (0666 in a
//! 0755 directory: the runtime's bind mount of the directory is the access control).
//! Every connection accepted there is a handle with the pod's rights and identity
//! labels, inside one counted [`Scope`]: unregistering revokes it, which closes every
//! handle accepted there or constrained from them and removes every target they
//! registered, even while the pod's processes still hold their descriptors.
//!
//! A container endpoint lives in the sibling directory `PODS_DIR/<uid>@<name>/`
//! (never inside the pod's directory, which every container of the pod sees). Names
//! starting with `@` in `PODS_DIR` are the registry's own: `@pods.json` (the
//! registrations, so they survive a restart) and `@bind-*` (sockets being created).
//! No uid contains `@`, so none of these can collide with a pod's directory.
//!
//! Nothing inside a pod's directory is trusted: a pod may be able to write there. The
//! registry only ever replaces the socket entry (by `rename`, which follows no
//! symlink) and removes the directory (std's `remove_dir_all`, which follows none).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flower_proto::Labels;
use flower_proto::switchboard::Right;
use flower_proto::transport::Listener;
use serde_json::{Value, json};

use crate::{Rights, Scope, Switchboard};

/// The socket's name inside an endpoint directory.
pub const ENDPOINT_NAME: &str = "switchboard";
/// Handles one endpoint may hold at a time unless [`Options::max_handles`] says
/// otherwise (docs/PROTOCOL.md §10).
pub const DEFAULT_MAX_HANDLES: usize = 1024;
/// The registrations, in `PODS_DIR`.
const STATE_FILE: &str = "@pods.json";
/// Longest uid and container name (they name directories).
const MAX_NAME: usize = 128;
/// Longest namespace and pod name (Kubernetes allows 253).
const MAX_IDENTITY: usize = 253;
/// Bounds on a pod's extra labels: they travel in every registration and connect.
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY: usize = 128;
const MAX_LABEL_VALUE: usize = 256;
/// How long unregistering waits for a revoked scope to drain.
const REVOKE_PATIENCE: Duration = Duration::from_secs(10);

/// The rights a pod gets when its registration names none: `CLIENT_CONNECT`,
/// `SERVER_START`, `LIST`. The others are infrastructure rights, given only when
/// asked for.
pub fn default_pod_rights() -> Rights {
    Rights::of(&[Right::ClientConnect, Right::ServerStart, Right::List])
}

/// A pod as the runtime describes it (RegisterPod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub attempt: u32,
    /// Extra labels forced onto everything the pod registers.
    pub labels: Labels,
    pub rights: Rights,
}

/// A container of a registered pod (RegisterContainer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
}

/// What the registry knows about one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointInfo {
    /// The socket path.
    pub endpoint: PathBuf,
    pub in_labels: Labels,
    pub out_labels: Labels,
    pub rights: Rights,
    /// Open handles in the endpoint's scope.
    pub handles: usize,
    /// Targets registered through them.
    pub targets: usize,
}

#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub pod_uid: String,
    pub spec: ContainerSpec,
    pub endpoint: EndpointInfo,
}

#[derive(Debug, Clone)]
pub struct PodInfo {
    pub spec: PodSpec,
    /// The pod's own endpoint; its counts include its containers'.
    pub endpoint: EndpointInfo,
    pub containers: Vec<ContainerInfo>,
}

/// Why a registry call failed; each maps onto one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Io(String),
}

fn invalid(message: impl Into<String>) -> PodError {
    PodError::InvalidArgument(message.into())
}

/// Tunables of the registry.
#[derive(Debug, Clone)]
pub struct Options {
    /// `PODS_DIR`.
    pub dir: PathBuf,
    /// Handles each endpoint may hold at a time.
    pub max_handles: usize,
}

/// The pod registry (cheap to clone).
#[derive(Clone)]
pub struct Pods {
    inner: Arc<Inner>,
}

struct Inner {
    switchboard: Switchboard,
    options: Options,
    /// Held across the file-system work of a change (it is a few syscalls on a
    /// tmpfs), so that changes and the state file stay in one order.
    pods: Mutex<BTreeMap<String, Pod>>,
}

struct Pod {
    spec: PodSpec,
    endpoint: Endpoint,
    containers: BTreeMap<String, Container>,
}

struct Container {
    spec: ContainerSpec,
    endpoint: Endpoint,
}

/// A listening endpoint and the scope of everything accepted there.
struct Endpoint {
    dir: PathBuf,
    /// The name of `dir` under PODS_DIR.
    dir_name: String,
    /// The socket file placed there (device and inode), to tell whether it is
    /// still the one this endpoint listens on.
    socket: (u64, u64),
    /// Stops the accept loop of the current listening socket (not the scope).
    accepting: tokio_util::sync::CancellationToken,
    scope: Scope,
    rights: Rights,
    in_labels: Labels,
    out_labels: Labels,
}

/// What unregistering leaves to wait for: the revoked scopes draining.
pub struct Revoked {
    scopes: Vec<Scope>,
}

impl Revoked {
    /// Resolves once every handle of the revoked endpoints is closed and every
    /// target they registered is gone (bounded: a stuck task cannot hold a caller).
    pub async fn gone(self) {
        let all = futures::future::join_all(self.scopes.iter().map(Scope::emptied));
        if tokio::time::timeout(REVOKE_PATIENCE, all).await.is_err() {
            tracing::warn!("a revoked pod scope did not drain within {REVOKE_PATIENCE:?}");
        }
    }
}

impl Pods {
    /// Opens the registry in `options.dir` (created 0755 if missing) and re-creates
    /// the endpoint of every pod and container registered there before, at the same
    /// paths. Must be called inside a tokio runtime. A registration that cannot be
    /// restored is logged and dropped (the runtime's next resync registers it again).
    pub fn open(switchboard: Switchboard, mut options: Options) -> io::Result<Pods> {
        // Endpoint paths are handed to runtimes: make them absolute.
        options.dir = std::path::absolute(&options.dir)?;
        let dir = &options.dir;
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| context(e, "cannot create the pods directory", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        let pods = Pods {
            inner: Arc::new(Inner {
                switchboard,
                options,
                pods: Mutex::default(),
            }),
        };
        let stored = pods.load()?;
        let mut registry = pods.inner.pods.lock().unwrap();
        for (spec, containers) in stored {
            let uid = spec.uid.clone();
            let mut pod = match pods.open_pod(spec) {
                Ok(pod) => pod,
                Err(e) => {
                    tracing::error!(uid, "cannot restore the pod's endpoint, dropping it: {e}");
                    continue;
                }
            };
            for container in containers {
                let name = container.name.clone();
                match pods.open_container(&pod, container) {
                    Ok(c) => drop(pod.containers.insert(name, c)),
                    Err(e) => tracing::error!(
                        uid,
                        container = name,
                        "cannot restore the container's endpoint, dropping it: {e}"
                    ),
                }
            }
            tracing::info!(uid, "pod endpoint restored");
            registry.insert(uid, pod);
        }
        pods.store(&registry)?;
        drop(registry);
        Ok(pods)
    }

    /// The pods directory.
    pub fn dir(&self) -> &Path {
        &self.inner.options.dir
    }

    /// Registers a pod, or confirms a registration with exactly the same spec.
    /// Validates the spec first ([`validate_pod`]).
    pub fn register(&self, spec: PodSpec) -> Result<PodInfo, PodError> {
        validate_pod(&spec)?;
        let mut registry = self.inner.pods.lock().unwrap();
        if let Some(pod) = registry.get_mut(&spec.uid) {
            return match differences(&pod.spec, &spec) {
                None => {
                    // A confirmation (a runtime's resync) also puts back a socket
                    // that was removed or replaced meanwhile.
                    self.refresh(&mut pod.endpoint).map_err(io_error)?;
                    Ok(info(pod))
                }
                Some(what) => Err(PodError::AlreadyExists(format!(
                    "Pod uid {} is already registered with another identity ({what} differ)",
                    spec.uid
                ))),
            };
        }
        let uid = spec.uid.clone();
        let pod = self.open_pod(spec).map_err(io_error)?;
        registry.insert(uid.clone(), pod);
        if let Err(e) = self.store(&registry) {
            let pod = registry.remove(&uid).expect("just inserted");
            drop(self.close_pod(pod));
            return Err(io_error(e));
        }
        tracing::info!(uid, "pod registered");
        Ok(info(&registry[&uid]))
    }

    /// Revokes the pod (and its containers) and removes its endpoints. Everything
    /// is closed when this returns, except tasks still winding down; await
    /// [`Revoked::gone`] to know the last handle and target are gone.
    pub fn unregister(&self, uid: &str) -> Result<Revoked, PodError> {
        let mut registry = self.inner.pods.lock().unwrap();
        let pod = registry
            .remove(uid)
            .ok_or_else(|| PodError::NotFound(format!("No pod with uid {uid:?}")))?;
        let revoked = self.close_pod(pod);
        self.store(&registry).map_err(io_error)?;
        tracing::info!(uid, "pod unregistered");
        Ok(revoked)
    }

    /// Every registered pod, by uid.
    pub fn list(&self) -> Vec<PodInfo> {
        self.inner.pods.lock().unwrap().values().map(info).collect()
    }

    /// Gives a container of a registered pod its own endpoint, or confirms it.
    pub fn register_container(
        &self,
        pod_uid: &str,
        spec: ContainerSpec,
    ) -> Result<ContainerInfo, PodError> {
        validate_name(pod_uid, "pod_uid")?;
        validate_name(&spec.name, "name")?;
        let mut registry = self.inner.pods.lock().unwrap();
        let pod = registry
            .get_mut(pod_uid)
            .ok_or_else(|| PodError::NotFound(format!("No pod with uid {pod_uid:?}")))?;
        if let Some(container) = pod.containers.get_mut(&spec.name) {
            if container.spec == spec {
                self.refresh(&mut container.endpoint).map_err(io_error)?;
                return Ok(container_info(pod_uid, container));
            }
            return Err(PodError::AlreadyExists(format!(
                "Container {} of pod {pod_uid} is already registered with another attempt ({})",
                spec.name, container.spec.attempt
            )));
        }
        let name = spec.name.clone();
        let container = self.open_container(pod, spec).map_err(io_error)?;
        pod.containers.insert(name.clone(), container);
        if let Err(e) = self.store(&registry) {
            let pod = registry.get_mut(pod_uid).expect("still there");
            if let Some(c) = pod.containers.remove(&name) {
                drop(close_endpoint(&c.endpoint));
            }
            return Err(io_error(e));
        }
        tracing::info!(uid = pod_uid, container = name, "container registered");
        Ok(container_info(
            pod_uid,
            &registry[pod_uid].containers[&name],
        ))
    }

    /// Revokes a container's endpoint and removes it.
    pub fn unregister_container(&self, pod_uid: &str, name: &str) -> Result<Revoked, PodError> {
        let mut registry = self.inner.pods.lock().unwrap();
        let container = registry
            .get_mut(pod_uid)
            .ok_or_else(|| PodError::NotFound(format!("No pod with uid {pod_uid:?}")))?
            .containers
            .remove(name)
            .ok_or_else(|| {
                PodError::NotFound(format!("Pod {pod_uid} has no container {name:?}"))
            })?;
        let scope = close_endpoint(&container.endpoint);
        self.store(&registry).map_err(io_error)?;
        tracing::info!(uid = pod_uid, container = name, "container unregistered");
        Ok(Revoked {
            scopes: vec![scope],
        })
    }

    fn open_pod(&self, spec: PodSpec) -> io::Result<Pod> {
        let (in_labels, out_labels) = pod_labels(&spec);
        let scope = self
            .inner
            .switchboard
            .counted_scope(self.inner.options.max_handles);
        let endpoint = self.open_endpoint(&spec.uid, scope, spec.rights, in_labels, out_labels)?;
        Ok(Pod {
            spec,
            endpoint,
            containers: BTreeMap::new(),
        })
    }

    fn open_container(&self, pod: &Pod, spec: ContainerSpec) -> io::Result<Container> {
        let mut in_labels = pod.endpoint.in_labels.clone();
        let mut out_labels = pod.endpoint.out_labels.clone();
        for (labels, side) in [(&mut in_labels, "server"), (&mut out_labels, "client")] {
            labels.insert(
                format!("{side}_kubernetes_container_name"),
                spec.name.clone(),
            );
            labels.insert(
                format!("{side}_kubernetes_container_attempt"),
                spec.attempt.to_string(),
            );
        }
        // Inside the pod's scope: revoking the pod revokes its containers.
        let scope = pod
            .endpoint
            .scope
            .counted_child(self.inner.options.max_handles)
            .expect("a pod's scope is counted");
        let dir_name = format!("{}@{}", pod.spec.uid, spec.name);
        let endpoint =
            self.open_endpoint(&dir_name, scope, pod.spec.rights, in_labels, out_labels)?;
        Ok(Container { spec, endpoint })
    }

    /// Creates (or re-creates) `PODS_DIR/<dir_name>/switchboard` and starts
    /// accepting on it into `scope`.
    fn open_endpoint(
        &self,
        dir_name: &str,
        scope: Scope,
        rights: Rights,
        in_labels: Labels,
        out_labels: Labels,
    ) -> io::Result<Endpoint> {
        let dir = self.inner.options.dir.join(dir_name);
        let (listener, socket) = self.place_socket(dir_name, &dir)?;
        let endpoint = Endpoint {
            dir,
            dir_name: dir_name.to_owned(),
            socket,
            accepting: tokio_util::sync::CancellationToken::new(),
            scope,
            rights,
            in_labels,
            out_labels,
        };
        self.accept(&endpoint, listener);
        Ok(endpoint)
    }

    /// Puts the endpoint's socket back when its file is gone or is no longer the one
    /// it listens on (removed or replaced by hand, or by a pod that can write its
    /// directory). Handles already given out are not touched.
    fn refresh(&self, endpoint: &mut Endpoint) -> io::Result<()> {
        let path = endpoint.dir.join(ENDPOINT_NAME);
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && (meta.dev(), meta.ino()) == endpoint.socket
        {
            return Ok(());
        }
        tracing::warn!(path = %path.display(), "endpoint socket was removed or replaced; putting it back");
        let (listener, socket) = self.place_socket(&endpoint.dir_name, &endpoint.dir)?;
        endpoint.accepting.cancel();
        endpoint.accepting = tokio_util::sync::CancellationToken::new();
        endpoint.socket = socket;
        self.accept(endpoint, listener);
        Ok(())
    }

    /// Binds a listening socket and moves it to `dir/switchboard`, creating `dir` if
    /// needed; returns it with the placed file's device and inode.
    fn place_socket(&self, dir_name: &str, dir: &Path) -> io::Result<(Listener, (u64, u64))> {
        let pods_dir = &self.inner.options.dir;
        match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(dir)
                    .map_err(|e| context(e, "cannot create", dir))?;
                // Only PODS_DIR's owner can swap this entry: a path is safe here.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
            }
            Err(e) => return Err(context(e, "cannot inspect", dir)),
        }
        // Bind and set the mode where no pod can interfere, then move the socket into
        // the pod's directory: rename replaces whatever non-directory entry is there
        // and follows no symlink.
        let staging = pods_dir.join(format!("@bind-{dir_name}"));
        match std::fs::remove_file(&staging) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(context(e, "cannot remove", &staging));
            }
            _ => {}
        }
        let listener = Listener::bind(&staging).map_err(|e| context(e, "cannot bind", &staging))?;
        let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o666))
            .and_then(|()| std::fs::symlink_metadata(&staging))
            .and_then(|meta| {
                std::fs::rename(&staging, dir.join(ENDPOINT_NAME))?;
                Ok((meta.dev(), meta.ino()))
            });
        match placed {
            Ok(socket) => Ok((listener, socket)),
            Err(e) => {
                let _ = std::fs::remove_file(&staging);
                Err(context(e, "cannot place the endpoint in", dir))
            }
        }
    }

    /// Accepts on `listener` until the endpoint's scope is revoked or the socket is
    /// replaced.
    fn accept(&self, endpoint: &Endpoint, listener: Listener) {
        let switchboard = self.inner.switchboard.clone();
        let scope = endpoint.scope.clone();
        let replaced = endpoint.accepting.clone();
        let (rights, in_labels, out_labels) = (
            endpoint.rights,
            endpoint.in_labels.clone(),
            endpoint.out_labels.clone(),
        );
        let path = endpoint.dir.join(ENDPOINT_NAME);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = scope.revoked() => break,
                    () = replaced.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        // A full scope refuses: the connection is closed at once.
                        Ok(channel) => if let Err(e) = switchboard.serve_in(
                            &scope, channel, rights, &in_labels, &out_labels,
                        ) {
                            tracing::warn!(path = %path.display(), "connection refused: {e}");
                        },
                        Err(e) => {
                            tracing::error!(path = %path.display(), "accept failed: {}",
                                crate::explain_io_error(&e));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
            // Dropping the listener here closes the listening socket.
        });
    }

    fn close_pod(&self, pod: Pod) -> Revoked {
        let mut scopes = vec![close_endpoint(&pod.endpoint)];
        scopes.extend(pod.containers.values().map(|c| close_endpoint(&c.endpoint)));
        Revoked { scopes }
    }

    /// Reads `@pods.json`: the registrations of a previous run.
    #[allow(clippy::type_complexity)]
    fn load(&self) -> io::Result<Vec<(PodSpec, Vec<ContainerSpec>)>> {
        let path = self.inner.options.dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(context(e, "cannot read", &path)),
        };
        let bad = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let state: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut pods = Vec::new();
        for pod in state["pods"].as_array().into_iter().flatten() {
            match parse_pod(pod) {
                Ok((spec, containers)) => pods.push((spec, containers)),
                Err(e) => tracing::error!("{}: skipping a registration: {e}", path.display()),
            }
        }
        Ok(pods)
    }

    /// Writes every registration to `@pods.json` (0600), atomically.
    fn store(&self, registry: &BTreeMap<String, Pod>) -> io::Result<()> {
        let pods: Vec<Value> = registry
            .values()
            .map(|pod| {
                let s = &pod.spec;
                json!({
                    "uid": s.uid,
                    "namespace": s.namespace,
                    "name": s.name,
                    "attempt": s.attempt,
                    "labels": s.labels,
                    "rights": s.rights.to_vec().iter().map(|r| r.as_str_name()).collect::<Vec<_>>(),
                    "containers": pod.containers.values().map(|c| json!({
                        "name": c.spec.name,
                        "attempt": c.spec.attempt,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&json!({ "version": 1, "pods": pods }))?;
        let dir = &self.inner.options.dir;
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = || -> io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            // No fsync: this guards against a crashed daemon, not a lost machine
            // (PODS_DIR is normally on a tmpfs, /run).
            file.write_all(text.as_bytes())?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| context(e, "cannot write", &path))
    }
}

/// Revokes an endpoint's scope and removes its directory; returns the scope to wait on.
fn close_endpoint(endpoint: &Endpoint) -> Scope {
    endpoint.scope.revoke();
    // The socket first: from here on nobody can connect, whatever else fails.
    let socket = endpoint.dir.join(ENDPOINT_NAME);
    if let Err(e) = std::fs::remove_file(&socket)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", socket.display());
    }
    // What the pod wrote there goes too; std's remove_dir_all follows no symlink.
    if let Err(e) = std::fs::remove_dir_all(&endpoint.dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", endpoint.dir.display());
    }
    endpoint.scope.clone()
}

fn endpoint_info(endpoint: &Endpoint) -> EndpointInfo {
    EndpointInfo {
        endpoint: endpoint.dir.join(ENDPOINT_NAME),
        in_labels: endpoint.in_labels.clone(),
        out_labels: endpoint.out_labels.clone(),
        rights: endpoint.rights,
        handles: endpoint.scope.handles(),
        targets: endpoint.scope.targets(),
    }
}

fn container_info(pod_uid: &str, container: &Container) -> ContainerInfo {
    ContainerInfo {
        pod_uid: pod_uid.to_owned(),
        spec: container.spec.clone(),
        endpoint: endpoint_info(&container.endpoint),
    }
}

fn info(pod: &Pod) -> PodInfo {
    let containers: Vec<ContainerInfo> = pod
        .containers
        .values()
        .map(|c| container_info(&pod.spec.uid, c))
        .collect();
    let mut endpoint = endpoint_info(&pod.endpoint);
    for c in &containers {
        endpoint.handles += c.endpoint.handles;
        endpoint.targets += c.endpoint.targets;
    }
    PodInfo {
        spec: pod.spec.clone(),
        endpoint,
        containers,
    }
}

/// The pod's forced labels: in = the four `server_kubernetes_*` identity labels plus
/// its extra labels; out = the four `client_kubernetes_*` ones.
pub fn pod_labels(spec: &PodSpec) -> (Labels, Labels) {
    let identity = |side: &str| -> Labels {
        [
            ("namespace", spec.namespace.clone()),
            ("pod_name", spec.name.clone()),
            ("pod_uid", spec.uid.clone()),
            ("pod_attempt", spec.attempt.to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (format!("{side}_kubernetes_{key}"), value))
        .collect()
    };
    let mut in_labels = identity("server");
    in_labels.extend(spec.labels.clone());
    (in_labels, identity("client"))
}

/// Checks every field of a pod spec; the error names the field.
pub fn validate_pod(spec: &PodSpec) -> Result<(), PodError> {
    validate_name(&spec.uid, "uid")?;
    for (value, field) in [(&spec.namespace, "namespace"), (&spec.name, "name")] {
        if value.is_empty() {
            return Err(invalid(format!("{field} is required")));
        }
        if value.len() > MAX_IDENTITY {
            return Err(invalid(format!(
                "{field} is longer than {MAX_IDENTITY} bytes"
            )));
        }
    }
    if spec.labels.len() > MAX_LABELS {
        return Err(invalid(format!("labels: more than {MAX_LABELS} labels")));
    }
    for (key, value) in &spec.labels {
        if key.is_empty() {
            return Err(invalid("labels: label keys must not be empty"));
        }
        if key.starts_with("server_kubernetes_") || key.starts_with("client_kubernetes_") {
            return Err(invalid(format!(
                "labels: key {key:?} is reserved: identity labels come only from the identity fields"
            )));
        }
        if key.len() > MAX_LABEL_KEY || value.len() > MAX_LABEL_VALUE {
            return Err(invalid(format!(
                "labels: key {key:?}: keys are at most {MAX_LABEL_KEY} bytes, values at most {MAX_LABEL_VALUE}"
            )));
        }
    }
    Ok(())
}

/// A uid or container name: it names a directory.
pub fn validate_name(value: &str, field: &str) -> Result<(), PodError> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    if value.len() > MAX_NAME {
        return Err(invalid(format!(
            "{field} is longer than {MAX_NAME} characters"
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(format!(
            "{field} contains {c:?}: only A-Z a-z 0-9 . _ - are allowed"
        )));
    }
    if value == "." || value == ".." {
        return Err(invalid(format!("{field} must not be {value:?}")));
    }
    Ok(())
}

/// Rights from the wire for a pod: empty means the default pod rights.
pub fn pod_rights(values: &[i32]) -> Result<Rights, PodError> {
    if values.is_empty() {
        return Ok(default_pod_rights());
    }
    Rights::from_wire(values).map_err(|s| invalid(format!("rights: {}", s.message)))
}

/// Which fields of two specs for the same uid differ, if any.
fn differences(old: &PodSpec, new: &PodSpec) -> Option<String> {
    let mut what = String::new();
    for (differs, field) in [
        (old.namespace != new.namespace, "namespace"),
        (old.name != new.name, "name"),
        (old.attempt != new.attempt, "attempt"),
        (old.labels != new.labels, "labels"),
        (old.rights != new.rights, "rights"),
    ] {
        if differs {
            if !what.is_empty() {
                what.push_str(", ");
            }
            let _ = write!(what, "{field}");
        }
    }
    (!what.is_empty()).then_some(what)
}

fn parse_pod(pod: &Value) -> Result<(PodSpec, Vec<ContainerSpec>), String> {
    let text = |key: &str| -> Result<String, String> {
        pod[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{key} is missing"))
    };
    let number = |value: &Value, key: &str| -> Result<u32, String> {
        value[key]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{key} is missing"))
    };
    let labels: Labels =
        serde_json::from_value(pod["labels"].clone()).map_err(|e| e.to_string())?;
    let mut rights = Vec::new();
    for name in pod["rights"].as_array().ok_or("rights are missing")? {
        let right = name
            .as_str()
            .and_then(Right::from_str_name)
            .ok_or_else(|| format!("unknown right {name}"))?;
        rights.push(right);
    }
    let spec = PodSpec {
        uid: text("uid")?,
        namespace: text("namespace")?,
        name: text("name")?,
        attempt: number(pod, "attempt")?,
        labels,
        rights: Rights::of(&rights),
    };
    validate_pod(&spec).map_err(|e| e.to_string())?;
    let mut containers = Vec::new();
    for c in pod["containers"].as_array().into_iter().flatten() {
        let spec = ContainerSpec {
            name: c["name"]
                .as_str()
                .ok_or("container name is missing")?
                .to_owned(),
            attempt: number(c, "attempt")?,
        };
        validate_name(&spec.name, "name").map_err(|e| e.to_string())?;
        containers.push(spec);
    }
    Ok((spec, containers))
}

fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn io_error(e: io::Error) -> PodError {
    PodError::Io(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    fn spec(uid: &str) -> PodSpec {
        PodSpec {
            uid: uid.into(),
            namespace: "ns".into(),
            name: "web".into(),
            attempt: 1,
            labels: [("app".to_owned(), "web".to_owned())].into(),
            rights: default_pod_rights(),
        }
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "a@b", "a b", "é", &"x".repeat(129)] {
            let e = validate_name(bad, "uid").unwrap_err();
            assert!(e.to_string().starts_with("uid"), "{bad:?}: {e}");
        }
        for good in [
            "a",
            "...",
            "6f1c2d3e-0000-4a4a-9b9b-123456789abc",
            &"x".repeat(128),
        ] {
            validate_name(good, "uid").unwrap();
        }
    }

    #[test]
    fn identity_labels_are_exactly_the_design_ones() {
        let (in_labels, out_labels) = pod_labels(&spec("u"));
        let keys: Vec<&str> = in_labels.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "app",
                "server_kubernetes_namespace",
                "server_kubernetes_pod_attempt",
                "server_kubernetes_pod_name",
                "server_kubernetes_pod_uid"
            ]
        );
        assert_eq!(out_labels["client_kubernetes_pod_attempt"], "1");
        assert_eq!(out_labels.len(), 4);
    }

    #[test]
    fn differing_fields_are_named() {
        let mut other = spec("u");
        other.attempt = 2;
        other.labels.clear();
        assert_eq!(
            differences(&spec("u"), &other).as_deref(),
            Some("attempt, labels")
        );
        assert_eq!(differences(&spec("u"), &spec("u")), None);
    }

    /// Registrations written by one registry are restored by the next, at the same
    /// paths; a registry never writes inside a pod's directory.
    #[tokio::test]
    async fn state_round_trips_outside_the_pod_directories() {
        let dir = std::env::temp_dir().join(format!(
            "flower-pods-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let options = Options {
            dir: dir.clone(),
            max_handles: 4,
        };
        let first = Pods::open(Switchboard::new(Config::default()), options.clone()).unwrap();
        let pod = first.register(spec("u1")).unwrap();
        first
            .register_container(
                "u1",
                ContainerSpec {
                    name: "c".into(),
                    attempt: 3,
                },
            )
            .unwrap();
        let entries: Vec<String> = std::fs::read_dir(dir.join("u1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(entries, [ENDPOINT_NAME]);
        drop(first);
        let second = Pods::open(Switchboard::new(Config::default()), options).unwrap();
        let listed = second.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].spec, spec("u1"));
        assert_eq!(listed[0].endpoint.endpoint, pod.endpoint.endpoint);
        assert_eq!(listed[0].containers[0].spec.attempt, 3);
        second.unregister("u1").unwrap().gone().await;
        assert!(!dir.join("u1").exists() && !dir.join("u1@c").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

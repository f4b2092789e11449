//! The runtime's side of NRI: what containerd's NRI adaptation does to an external
//! plugin that connects to its socket (upstream `pkg/adaptation/plugin.go`). It
//! accepts the connection, serves the `Runtime` service on connection 2, waits for
//! RegisterPlugin, configures the plugin and then relays pod and container events.
//!
//! Flower's tests use it as a stand-in for containerd, since no NRI-capable runtime
//! is at hand; it shares the framing modules with the plugin, and those are checked
//! byte by byte against the upstream protocol in their tests.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use prost::Message as _;
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use crate::api::{self, Event};
use crate::mux::{Mux, PLUGIN_CONN, RUNTIME_CONN};
use crate::ttrpc::{self, Status, code};

/// Upstream's defaults.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Every valid event bit (upstream `ValidEvents`).
pub const VALID_EVENTS: i32 = (1 << (Event::Last as i32 - 1)) - 1;

/// The NRI socket, listening for plugins.
pub struct Runtime {
    listener: UnixListener,
    pub request_timeout: Duration,
}

/// A registered and configured plugin.
pub struct Plugin {
    pub name: String,
    pub index: String,
    /// The events it subscribed to.
    pub events: i32,
    client: ttrpc::Client,
    request_timeout: Duration,
    _server: tokio::task::JoinHandle<()>,
    _mux: Mux,
}

type Registration = Arc<Mutex<Option<oneshot::Sender<api::RegisterPluginRequest>>>>;

struct RuntimeService(Registration);

impl ttrpc::Service for RuntimeService {
    fn call(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, Status>> {
        let result = match (service, method) {
            (api::RUNTIME_SERVICE, "RegisterPlugin") => {
                match api::RegisterPluginRequest::decode(payload.as_slice()) {
                    Err(e) => Err(Status::new(code::INVALID_ARGUMENT, e.to_string())),
                    Ok(request) => {
                        if let Some(tx) = self.0.lock().unwrap().take() {
                            let _ = tx.send(request);
                        }
                        Ok(api::Empty {}.encode_to_vec())
                    }
                }
            }
            (api::RUNTIME_SERVICE, "UpdateContainers") => {
                Ok(api::UpdateContainersResponse::default().encode_to_vec())
            }
            _ => Err(Status::new(
                code::UNIMPLEMENTED,
                format!("{service}/{method}"),
            )),
        };
        Box::pin(async move { result })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("accepting a plugin: {0}")]
    Accept(#[from] std::io::Error),
    #[error("plugin registration timed out")]
    RegistrationTimeout,
    #[error("configuring the plugin: {0}")]
    Configure(Status),
    #[error("invalid plugin events: {0:#x}")]
    Events(i32),
}

impl Runtime {
    pub fn bind(path: &Path) -> std::io::Result<Runtime> {
        Ok(Runtime {
            listener: UnixListener::bind(path)?,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    /// Accepts the next plugin, waits for its registration and configures it.
    pub async fn accept(&self) -> Result<Plugin, Error> {
        let (socket, _) = self.listener.accept().await?;
        let (mux, [plugin, runtime]) = Mux::new(socket, [PLUGIN_CONN, RUNTIME_CONN]);
        let (tx, rx) = oneshot::channel();
        let service = Arc::new(RuntimeService(Arc::new(Mutex::new(Some(tx)))));
        let server = tokio::spawn(ttrpc::serve(runtime, service));
        let client = ttrpc::Client::new(plugin);
        let registration = tokio::time::timeout(REGISTRATION_TIMEOUT, rx)
            .await
            .map_err(|_| Error::RegistrationTimeout)?
            .map_err(|_| Error::RegistrationTimeout)?;
        let mut plugin = Plugin {
            name: registration.plugin_name,
            index: registration.plugin_idx,
            events: 0,
            client,
            request_timeout: self.request_timeout,
            _server: server,
            _mux: mux,
        };
        let configure = api::ConfigureRequest {
            config: String::new(),
            runtime_name: "flower-test-runtime".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            registration_timeout: REGISTRATION_TIMEOUT.as_millis() as i64,
            request_timeout: self.request_timeout.as_millis() as i64,
            nri_version: String::new(),
        };
        let response: api::ConfigureResponse = plugin
            .call("Configure", &configure)
            .await
            .map_err(Error::Configure)?;
        plugin.events = match response.events {
            0 => VALID_EVENTS,
            e if e & !VALID_EVENTS != 0 => return Err(Error::Events(e & !VALID_EVENTS)),
            e => e,
        };
        Ok(plugin)
    }
}

impl Plugin {
    /// Calls a method of the plugin's service within the request timeout.
    pub async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, Status> {
        self.client
            .call(api::PLUGIN_SERVICE, method, request, self.request_timeout)
            .await
    }

    pub fn subscribed(&self, event: Event) -> bool {
        self.events & api::event_bit(event) != 0
    }

    /// Synchronize, in one message.
    pub async fn synchronize(
        &self,
        pods: Vec<api::PodSandbox>,
        containers: Vec<api::Container>,
    ) -> Result<api::SynchronizeResponse, Status> {
        let request = api::SynchronizeRequest {
            pods,
            containers,
            more: false,
        };
        self.call("Synchronize", &request).await
    }

    pub async fn run_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), Status> {
        if self.subscribed(Event::RunPodSandbox) {
            let request = api::RunPodSandboxRequest {
                pod: Some(pod.clone()),
            };
            let _: api::RunPodSandboxResponse = self.call("RunPodSandbox", &request).await?;
        }
        Ok(())
    }

    pub async fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
    ) -> Result<api::CreateContainerResponse, Status> {
        if !self.subscribed(Event::CreateContainer) {
            return Ok(Default::default());
        }
        let request = api::CreateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.call("CreateContainer", &request).await
    }

    pub async fn stop_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), Status> {
        if self.subscribed(Event::StopPodSandbox) {
            let request = api::StopPodSandboxRequest {
                pod: Some(pod.clone()),
            };
            let _: api::StopPodSandboxResponse = self.call("StopPodSandbox", &request).await?;
        }
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), Status> {
        if self.subscribed(Event::RemovePodSandbox) {
            let request = api::RemovePodSandboxRequest {
                pod: Some(pod.clone()),
            };
            let _: api::RemovePodSandboxResponse = self.call("RemovePodSandbox", &request).await?;
        }
        Ok(())
    }
}

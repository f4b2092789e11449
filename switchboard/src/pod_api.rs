//! The pod API over gRPC: [`Pods`] served with tonic on a Unix socket, beside the
//! standard `grpc.health.v1.Health` service (docs/PROTOCOL.md §11).
//!
//! There is no authentication: whoever can connect to the socket can register and
//! revoke pods. Only the socket file's mode protects it (0600, the daemon's user).

use std::io;
use std::path::Path;

use flower_pod_api as api;
use flower_pod_api::pods_server::{Pods as PodsService, PodsServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::pods::{
    ContainerInfo, ContainerSpec, EndpointInfo, PodError, PodInfo, PodSpec, Pods, pod_rights,
};

/// Serves the pod API and health on `listener` until `shutdown` resolves.
pub async fn serve(
    pods: Pods,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<PodsServer<PodApi>>().await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(PodsServer::new(PodApi { pods }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(io::Error::other)
}

/// Binds the pod API socket at `path` with `mode` (see [`crate::daemon::bind_stream`]).
pub fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    crate::daemon::bind_stream(path, mode)
}

/// The tonic service over the registry.
pub struct PodApi {
    pods: Pods,
}

impl PodApi {
    pub fn new(pods: Pods) -> PodApi {
        PodApi { pods }
    }

    /// Runs a registry change off the runtime (it does a little file-system work).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Pods) -> Result<T, PodError> + Send + 'static,
    ) -> Result<T, Status> {
        let pods = self.pods.clone();
        tokio::task::spawn_blocking(move || f(pods))
            .await
            .map_err(|e| Status::internal(format!("registry task failed: {e}")))?
            .map_err(status)
    }
}

#[tonic::async_trait]
impl PodsService for PodApi {
    async fn register_pod(
        &self,
        request: Request<api::RegisterPodRequest>,
    ) -> Result<Response<api::Pod>, Status> {
        let req = request.into_inner();
        let spec = PodSpec {
            rights: pod_rights(&req.rights).map_err(status)?,
            uid: req.uid,
            namespace: req.namespace,
            name: req.name,
            attempt: req.attempt,
            labels: req.labels,
        };
        let info = self.blocking(move |pods| pods.register(spec)).await?;
        Ok(Response::new(pod_message(&info)))
    }

    async fn unregister_pod(
        &self,
        request: Request<api::UnregisterPodRequest>,
    ) -> Result<Response<api::UnregisterPodResponse>, Status> {
        let uid = request.into_inner().uid;
        crate::pods::validate_name(&uid, "uid").map_err(status)?;
        let revoked = self.blocking(move |pods| pods.unregister(&uid)).await?;
        // Answer once the pod's targets are gone: a runtime that goes on to start the
        // pod's replacement never races its predecessor's registrations.
        revoked.gone().await;
        Ok(Response::new(api::UnregisterPodResponse {}))
    }

    async fn list_pods(
        &self,
        _request: Request<api::ListPodsRequest>,
    ) -> Result<Response<api::ListPodsResponse>, Status> {
        let pods = self.pods.list().iter().map(pod_message).collect();
        Ok(Response::new(api::ListPodsResponse { pods }))
    }

    async fn register_container(
        &self,
        request: Request<api::RegisterContainerRequest>,
    ) -> Result<Response<api::Container>, Status> {
        let req = request.into_inner();
        let spec = ContainerSpec {
            name: req.name,
            attempt: req.attempt,
        };
        let uid = req.pod_uid;
        let info = self
            .blocking(move |pods| pods.register_container(&uid, spec))
            .await?;
        Ok(Response::new(container_message(&info)))
    }

    async fn unregister_container(
        &self,
        request: Request<api::UnregisterContainerRequest>,
    ) -> Result<Response<api::UnregisterContainerResponse>, Status> {
        let req = request.into_inner();
        crate::pods::validate_name(&req.pod_uid, "pod_uid").map_err(status)?;
        crate::pods::validate_name(&req.name, "name").map_err(status)?;
        let revoked = self
            .blocking(move |pods| pods.unregister_container(&req.pod_uid, &req.name))
            .await?;
        revoked.gone().await;
        Ok(Response::new(api::UnregisterContainerResponse {}))
    }
}

fn status(e: PodError) -> Status {
    match e {
        PodError::InvalidArgument(m) => Status::invalid_argument(m),
        PodError::AlreadyExists(m) => Status::already_exists(m),
        PodError::NotFound(m) => Status::not_found(m),
        PodError::Io(m) => Status::internal(m),
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn rights(endpoint: &EndpointInfo) -> Vec<i32> {
    endpoint
        .rights
        .to_vec()
        .into_iter()
        .map(|r| r as i32)
        .collect()
}

pub fn pod_message(info: &PodInfo) -> api::Pod {
    let e = &info.endpoint;
    api::Pod {
        uid: info.spec.uid.clone(),
        endpoint: e.endpoint.display().to_string(),
        in_labels: e.in_labels.clone(),
        out_labels: e.out_labels.clone(),
        rights: rights(e),
        handles: count(e.handles),
        targets: count(e.targets),
        containers: info.containers.iter().map(container_message).collect(),
    }
}

pub fn container_message(info: &ContainerInfo) -> api::Container {
    let e = &info.endpoint;
    api::Container {
        pod_uid: info.pod_uid.clone(),
        name: info.spec.name.clone(),
        attempt: info.spec.attempt,
        endpoint: e.endpoint.display().to_string(),
        in_labels: e.in_labels.clone(),
        out_labels: e.out_labels.clone(),
        rights: rights(e),
        handles: count(e.handles),
        targets: count(e.targets),
    }
}

//! The switchboard's pod API as the plugin needs it: a small trait, so the plugin's
//! logic can be tested without a switchboard, and its gRPC implementation on the
//! pod API's Unix socket (`flower switchboard --pods-socket`).

use std::path::{Path, PathBuf};

use flower_pod_api::pods_client::PodsClient;
use flower_pod_api::{ListPodsRequest, Pod, RegisterPodRequest, UnregisterPodRequest};
use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint, Uri};

/// What the plugin calls. Errors are gRPC statuses; a switchboard that is down is
/// `UNAVAILABLE`.
pub trait PodApi: Send + Sync + 'static {
    fn register(&self, request: RegisterPodRequest) -> BoxFuture<'_, Result<Pod, tonic::Status>>;
    /// Unregisters `uid`; an unknown uid is `NOT_FOUND`.
    fn unregister(&self, uid: String) -> BoxFuture<'_, Result<(), tonic::Status>>;
    fn list(&self) -> BoxFuture<'_, Result<Vec<Pod>, tonic::Status>>;
    /// Where the API is, for log lines.
    fn location(&self) -> String;
}

/// The pod API over gRPC on a Unix socket. The channel connects lazily and again
/// after every failure, so a switchboard that restarts is picked up by itself.
pub struct GrpcPods {
    client: PodsClient<Channel>,
    path: PathBuf,
}

impl GrpcPods {
    pub fn new(path: &Path) -> GrpcPods {
        let socket = path.to_owned();
        // The URI is required by tonic and unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://pods.invalid").connect_with_connector_lazy(
            tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(&socket).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }),
        );
        GrpcPods {
            client: PodsClient::new(channel),
            path: path.to_owned(),
        }
    }
}

impl PodApi for GrpcPods {
    fn register(&self, request: RegisterPodRequest) -> BoxFuture<'_, Result<Pod, tonic::Status>> {
        let mut client = self.client.clone();
        Box::pin(async move { Ok(client.register_pod(request).await?.into_inner()) })
    }

    fn unregister(&self, uid: String) -> BoxFuture<'_, Result<(), tonic::Status>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            client.unregister_pod(UnregisterPodRequest { uid }).await?;
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Pod>, tonic::Status>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            Ok(client
                .list_pods(ListPodsRequest {})
                .await?
                .into_inner()
                .pods)
        })
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

/// A status in one line: its code and message, and the transport's root cause
/// when the message does not already say it.
pub fn describe(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut root = None;
    let mut source = status.source();
    while let Some(cause) = source {
        root = Some(cause.to_string());
        source = cause.source();
    }
    if let Some(root) = root.filter(|r| !text.contains(r.as_str())) {
        text.push_str(&format!(" ({root})"));
    }
    text
}

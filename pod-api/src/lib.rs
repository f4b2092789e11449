//! The pod API (`flower.protocol.pods`): what a container runtime calls to give each
//! pod a switchboard endpoint carrying its identity, and to revoke it.
//!
//! Generated from `proto/proto/flower/protocol/pods.proto`: the messages,
//! [`pods_client::PodsClient`] and [`pods_server::PodsServer`]. The health service
//! (`grpc.health.v1`) is re-exported from `tonic-health`.

#![forbid(unsafe_code)]

tonic::include_proto!("flower.protocol.pods");

pub use tonic_health as health;

use std::path::Path;

/// Makes each of tonic's connections to the Unix socket `path`; the URI tonic needs
/// is a placeholder.
fn connector(
    path: &Path,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::UnixStream>>>
             + Send,
> + Clone
+ Send
+ 'static {
    let path = path.to_owned();
    tower::service_fn(move |_| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// A gRPC channel to the Unix socket `path` (the pod API's), for
/// [`pods_client::PodsClient`] or the health client.
pub async fn channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector(path))
        .await
}

/// Like [`channel`], but connecting on first use and again after every failure: for
/// a long-lived client (an NRI plugin) that must start, and keep going, while the
/// switchboard is down.
pub fn lazy_channel(path: &Path) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector_lazy(connector(path))
}

/// A client of the pod API listening on the Unix socket `path`.
pub async fn connect(
    path: &Path,
) -> Result<pods_client::PodsClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(pods_client::PodsClient::new(channel(path).await?))
}

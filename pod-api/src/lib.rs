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

/// A gRPC channel to the Unix socket `path` (the pod API's), for
/// [`pods_client::PodsClient`] or the health client.
///
/// The URI tonic needs is a placeholder: every connection goes to `path`.
pub async fn channel(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// A client of the pod API listening on the Unix socket `path`.
pub async fn connect(
    path: &Path,
) -> Result<pods_client::PodsClient<tonic::transport::Channel>, tonic::transport::Error> {
    Ok(pods_client::PodsClient::new(channel(path).await?))
}

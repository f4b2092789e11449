//! The pod API (`flower.protocol.pods`): what a container runtime calls to give each
//! pod a switchboard endpoint carrying its identity, and to revoke it.
//!
//! Generated from `proto/proto/flower/protocol/pods.proto`: the messages,
//! [`pods_client::PodsClient`] and [`pods_server::PodsServer`]. The health service
//! (`grpc.health.v1`) is re-exported from `tonic-health`.

#![forbid(unsafe_code)]

tonic::include_proto!("flower.protocol.pods");

pub use tonic_health as health;

//! Flower's NRI plugin: the node agent that gives every Kubernetes pod its switchboard
//! endpoint, through the runtime's Node Resource Interface (containerd ≥ 1.7,
//! CRI-O ≥ 1.26).
//!
//! The layers, bottom up, each in one module:
//! * [`mux`] — NRI's connection multiplexer over the one Unix socket (upstream
//!   `pkg/net/multiplex`): connection 1 carries the plugin's service, 2 the runtime's.
//! * [`ttrpc`] — containerd's ttrpc framing and unary calls on one multiplexed
//!   connection (upstream `containerd/ttrpc`, `PROTOCOL.md`).
//! * [`api`] — the NRI messages, generated from the vendored upstream `api.proto`.
//! * [`pods`] — the switchboard's pod API as a small trait ([`pods::PodApi`]), and its
//!   gRPC implementation on the pod API's Unix socket.
//! * [`plugin`] — what Flower does on each NRI event.
//! * [`runtime`] — the runtime's side of the same protocol: what containerd does to a
//!   plugin. The tests use it as a stand-in for containerd.

#![forbid(unsafe_code)]

/// The NRI API (`nri.pkg.api.v1alpha1`), generated from upstream `pkg/api/api.proto`.
pub mod api {
    include!(concat!(env!("OUT_DIR"), "/nri.pkg.api.v1alpha1.rs"));

    /// The ttrpc service names NRI registers.
    pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
    pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";

    /// The bit of `event` in a `ConfigureResponse.events` mask (upstream
    /// `EventMask.Set`: bit `event - 1`).
    pub fn event_bit(event: Event) -> i32 {
        1 << (event as i32 - 1)
    }
}

/// ttrpc's envelope messages and the `google.rpc.Status` they carry.
#[allow(dead_code)] // the envelope has messages NRI does not use
pub(crate) mod wire {
    pub mod ttrpc {
        include!(concat!(env!("OUT_DIR"), "/ttrpc.rs"));
    }
    pub mod google {
        pub mod rpc {
            include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        }
    }
}

pub mod mux;
pub mod plugin;
pub mod pods;
pub mod runtime;
pub mod ttrpc;

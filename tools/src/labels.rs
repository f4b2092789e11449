//! The well-known connection labels: what ingress attaches to a connection, what
//! egress connects to, and what the resolver expands.
//!
//! | label | meaning | set by |
//! |---|---|---|
//! | `address_family` | `inet`, `inet6` or `unix` | ingress; read by egress |
//! | `client_address`, `client_port` | the TCP peer | ingress |
//! | `server_address`, `server_port` | the TCP address, numeric | ingress; read by egress |
//! | `server_path` | the Unix socket path | ingress; read by egress |
//! | `server_hostname`, `server_service` | a host name and a port or service name | clients; read by the resolver |

use flower_proto::{Labels, Status};

pub const ADDRESS_FAMILY: &str = "address_family";
pub const CLIENT_ADDRESS: &str = "client_address";
pub const CLIENT_PORT: &str = "client_port";
pub const SERVER_ADDRESS: &str = "server_address";
pub const SERVER_PORT: &str = "server_port";
pub const SERVER_PATH: &str = "server_path";
pub const SERVER_HOSTNAME: &str = "server_hostname";
pub const SERVER_SERVICE: &str = "server_service";

/// Values of [`ADDRESS_FAMILY`].
pub const INET: &str = "inet";
pub const INET6: &str = "inet6";
pub const UNIX: &str = "unix";

/// The value of `key`, or `INVALID_ARGUMENT` `Missing label {key}`.
pub fn required<'a>(labels: &'a Labels, key: &str) -> Result<&'a str, Status> {
    labels
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| Status::invalid_argument(format!("Missing label {key}")))
}

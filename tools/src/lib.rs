//! The `flower` tools: the conventions every subcommand shares and the client
//! commands themselves.
//!
//! * [`args`]: the `[PATH] LABELS...` arguments, the default switchboard path,
//!   usage errors and durations.
//! * [`labels`]: the well-known connection label names and the one way to require
//!   one.
//! * [`backoff`]: retrying with exponential backoff, for tools that outlive a
//!   switchboard restart (ingress, egress, resolver).
//! * [`ready`]: telling a script or service manager that a tool is ready.
//! * [`cat`], [`ls`], [`wait`]: `flower cat`, `flower ls` and `flower wait`.
#![forbid(unsafe_code)]

pub mod args;
pub mod backoff;
mod cat;
pub mod labels;
mod ls;
pub mod ready;
mod wait;

use std::time::Duration;

pub use cat::{CatOptions, cat};
pub use ls::{Format, ls, watch};
pub use wait::wait;

/// How long a client command waits for the switchboard when not told (`-w`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Runs `future` for at most `limit`; on timeout the error says what was awaited.
pub async fn bounded<T>(
    limit: Duration,
    what: impl std::fmt::Display,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!(?limit, "timed out {what}");
            Err(TimedOut(format!(
                "timed out after {} {what}",
                args::show_seconds(limit)
            ))
            .into())
        }
    }
}

/// A bounded wait ran out (`-w`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

//! `flower wait`: until a target matches, for scripts that start a server in the
//! background and must not connect before it registered.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use flower_proto::Labels;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;
use tokio::time::Instant;

use crate::args::show_seconds;
use crate::{TimedOut, backoff, bounded};

/// How often the listing is repeated while nothing matches.
const POLL: Duration = Duration::from_millis(20);

/// Returns once at least one target matches `labels`, or fails after `wait`. A
/// switchboard that is still starting is waited for too; if it never answers, the
/// error says why. With no labels, returns as soon as the switchboard answers.
pub async fn wait(path: &Path, labels: &Labels, wait: Duration) -> Result<()> {
    let deadline = Instant::now() + wait;
    let handle = bounded(wait, "connecting to the switchboard", async {
        Ok(
            backoff::retry("connecting to the switchboard", Some(wait), || {
                Switchboard::connect_as(path, &[Right::List], labels)
            })
            .await?,
        )
    })
    .await?;
    if labels.is_empty() {
        return Ok(());
    }
    let poll = async {
        loop {
            let mut targets = handle.list(&Labels::new()).await?;
            if let Some(first) = targets.next().await {
                tracing::debug!(target = ?first?, "a target matches");
                return anyhow::Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    };
    match tokio::time::timeout_at(deadline, poll).await {
        Ok(result) => result,
        Err(_) => Err(TimedOut(format!(
            "no target matching {} within {}",
            serde_json::to_string(labels)?,
            show_seconds(wait)
        ))
        .into()),
    }
}

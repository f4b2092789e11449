//! Retrying with exponential backoff: how the long-running tools (ingress, egress,
//! resolver) get back to a switchboard that restarted.

use std::time::Duration;

use tokio::time::Instant;

/// First delay after a failure; it doubles up to [`MAX`].
pub const MIN: Duration = Duration::from_millis(50);
/// Longest delay between two attempts.
pub const MAX: Duration = Duration::from_secs(2);

/// Calls `attempt` until it succeeds, sleeping [`MIN`], then twice as long each time
/// (at most [`MAX`]) between failures. With `patience`, gives up with the last error
/// once the next attempt would start after it ran out; `Some(Duration::ZERO)` makes
/// exactly one attempt. `what` names the attempt in the debug log.
pub async fn retry<T, E, Fut>(
    what: &str,
    patience: Option<Duration>,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let deadline = patience.map(|p| Instant::now() + p);
    let mut delay = MIN;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if deadline.is_none_or(|d| Instant::now() + delay < d) => {
                tracing::debug!("{what} failed, retrying in {delay:?}: {e:#}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_with_growing_delays_until_patience_runs_out() {
        let start = Instant::now();
        let mut times = Vec::new();
        let result: Result<(), &str> = retry("test", Some(Duration::from_secs(1)), || {
            times.push(start.elapsed());
            async { Err("no") }
        })
        .await;
        assert_eq!(result, Err("no"));
        let ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 50, 150, 350, 750]);
        let once: Result<(), &str> =
            retry("test", Some(Duration::ZERO), || async { Err("x") }).await;
        assert_eq!(once, Err("x"));
        let mut n = 0;
        let ok: Result<u32, &str> = retry("test", None, || {
            n += 1;
            let n = n;
            async move { if n < 5 { Err("not yet") } else { Ok(n) } }
        })
        .await;
        assert_eq!(ok, Ok(5));
    }
}

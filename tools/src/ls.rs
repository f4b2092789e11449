//! `flower ls`: the targets matching some labels.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use flower_proto::Labels;
use flower_proto::client::Switchboard;
use flower_proto::switchboard::Right;

use crate::bounded;

/// How `flower ls` prints a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    #[default]
    Json,
    /// `-l`: `key=value` words, quoted for the shell where needed, so a line can be
    /// pasted back as arguments (`flower cat $(flower ls -l pod=a)`, when unquoted).
    Words,
}

/// Prints the label sets of the targets matching `labels`, oldest first. The whole
/// listing (connecting, and every reply) takes at most `wait`.
pub async fn ls(
    path: &Path,
    labels: &Labels,
    format: Format,
    wait: Duration,
    out: &mut impl Write,
) -> Result<()> {
    let targets = bounded(wait, "listing the targets", async {
        let handle = Switchboard::connect_as(path, &[Right::List], labels).await?;
        list_all(&handle).await
    })
    .await?;
    tracing::debug!(?labels, count = targets.len(), "listed");
    for target in targets {
        let line = match format {
            Format::Json => serde_json::to_string(&target)?,
            Format::Words => words(&target),
        };
        if let Err(e) = writeln!(out, "{line}") {
            // `flower ls | head -1`: the reader has what it wanted.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(anyhow::Error::from(e).context("writing to stdout"));
        }
    }
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::from(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// Every target the handle may list (its out-labels apply), oldest first.
async fn list_all(handle: &Switchboard) -> Result<Vec<Labels>> {
    let mut stream = handle.list(&Labels::new()).await?;
    let mut targets = Vec::new();
    while let Some(target) = stream.next().await {
        targets.push(target?);
    }
    Ok(targets)
}

/// How often `--watch` lists again.
const WATCH_POLL: Duration = Duration::from_millis(100);

/// `flower ls --watch`: prints the matching targets as they come and go, one line
/// each, `{"added":{...}}` / `{"removed":{...}}` (or `+ key=value...` / `- ...` in
/// word format), until interrupted or the switchboard goes away. It lists again
/// every 100 ms, so a target that comes and goes between two listings is not seen.
pub async fn watch(
    path: &Path,
    labels: &Labels,
    format: Format,
    wait: Duration,
    out: &mut impl Write,
) -> Result<()> {
    let handle = bounded(wait, "connecting to the switchboard", async {
        Ok(Switchboard::connect_as(path, &[Right::List], labels).await?)
    })
    .await?;
    let mut known: Vec<Labels> = Vec::new();
    loop {
        let now = bounded(wait, "listing the targets", list_all(&handle)).await?;
        let removed = known
            .iter()
            .filter(|t| !now.contains(t))
            .map(|t| ("removed", t));
        let added = now
            .iter()
            .filter(|t| !known.contains(t))
            .map(|t| ("added", t));
        for (event, target) in removed.chain(added) {
            let line = match format {
                Format::Json => {
                    let mut object = serde_json::Map::new();
                    object.insert(event.into(), serde_json::to_value(target)?);
                    serde_json::Value::Object(object).to_string()
                }
                Format::Words => {
                    format!(
                        "{} {}",
                        if event == "added" { '+' } else { '-' },
                        words(target)
                    )
                }
            };
            if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(());
                }
                return Err(anyhow::Error::from(e).context("writing to stdout"));
            }
        }
        known = now;
        tokio::time::sleep(WATCH_POLL).await;
    }
}

/// `app=web pod='a b'`.
pub fn words(labels: &Labels) -> String {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:/@+%^".contains(&b))
    };
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    labels
        .iter()
        .map(|(k, v)| {
            let word = format!("{k}={v}");
            if plain(k) && (v.is_empty() || plain(v)) {
                word
            } else {
                quote(&word)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_needed() {
        let labels = Labels::from([
            ("app".into(), "web".into()),
            ("empty".into(), "".into()),
            ("note".into(), "it's a,b".into()),
        ]);
        assert_eq!(words(&labels), r#"app=web empty= 'note=it'\''s a,b'"#);
    }
}

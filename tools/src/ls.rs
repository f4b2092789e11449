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
        let mut stream = handle.list(&Labels::new()).await?;
        let mut targets = Vec::new();
        while let Some(target) = stream.next().await {
            targets.push(target?);
        }
        Ok(targets)
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

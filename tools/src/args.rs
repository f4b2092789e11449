//! Command-line conventions shared by every subcommand (and the examples and the
//! bench): the switchboard path, label arguments, durations and usage errors.
//!
//! `[PATH] LABELS...`: the first word is the switchboard path when it contains a `/`
//! (`./sb`, `/run/flower/switchboard`); otherwise every word is labels. A label word
//! is a JSON object of strings (`{"app":"web"}`) or `key=value`; one word may list
//! several pairs separated by commas, as kubectl selectors do (`app=web,pod=a`), so a
//! value containing a comma must be given in JSON. A word that is neither is a usage
//! error, never silently a path.

use std::path::PathBuf;
use std::time::Duration;

use flower_proto::Labels;

/// An error in the command line (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `$FLOWER_SWITCHBOARD`, else `/run/flower/switchboard` for root, else
/// `$XDG_RUNTIME_DIR/flower/switchboard`.
pub fn default_path() -> Result<PathBuf, UsageError> {
    if let Some(path) = std::env::var_os("FLOWER_SWITCHBOARD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/run/flower/switchboard"));
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir).join("flower/switchboard")),
        // The client library uses the inherited handle and never this path.
        None if flower_proto::inherited::is_set() => {
            Ok(PathBuf::from(flower_proto::inherited::ENV))
        }
        None => Err(UsageError(
            "no switchboard path: give PATH, or set FLOWER_SWITCHBOARD or XDG_RUNTIME_DIR".into(),
        )),
    }
}

/// Whether a word is a label argument: a JSON object or `key=value`.
fn is_label_word(word: &str) -> bool {
    word.trim_start().starts_with('{') || word.contains('=')
}

/// Splits `[PATH] LABELS...` (see the module documentation).
pub fn path_and_labels(words: &[String]) -> Result<(PathBuf, Labels), UsageError> {
    split(words, default_path)
}

/// [`path_and_labels`] with `default` giving the path when the words do not.
fn split(
    words: &[String],
    default: impl FnOnce() -> Result<PathBuf, UsageError>,
) -> Result<(PathBuf, Labels), UsageError> {
    let (path, labels) = match words.split_first() {
        Some((first, rest)) if !is_label_word(first) && first.contains('/') => {
            (PathBuf::from(first), rest)
        }
        Some((first, _)) if !is_label_word(first) => {
            return Err(UsageError(format!(
                "invalid label {first:?}: expected key=value or a JSON object \
                 (a switchboard PATH contains a '/', e.g. ./{first})"
            )));
        }
        _ => (default()?, words),
    };
    Ok((path, parse_labels(labels)?))
}

/// Merges label words: JSON objects of strings and `key=value[,key=value...]`.
pub fn parse_labels(words: &[String]) -> Result<Labels, UsageError> {
    let mut labels = Labels::new();
    for word in words {
        let parsed: Labels = if word.trim_start().starts_with('{') {
            serde_json::from_str(word).map_err(|e| {
                UsageError(format!(
                    "invalid labels {word:?}: {e} (expected a JSON object of strings)"
                ))
            })?
        } else if word.contains('=') {
            word.split(',')
                .map(|pair| match pair.split_once('=') {
                    Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
                    None => Err(UsageError(format!(
                        "invalid label {pair:?} in {word:?}: expected key=value \
                         (give a value containing ',' as JSON)"
                    ))),
                })
                .collect::<Result<_, _>>()?
        } else {
            return Err(UsageError(format!(
                "invalid label {word:?}: expected key=value or a JSON object"
            )));
        };
        for (key, value) in parsed {
            if key.is_empty() {
                return Err(UsageError(format!(
                    "invalid labels {word:?}: label keys must not be empty"
                )));
            }
            if let Some(old) = labels.insert(key.clone(), value.clone())
                && old != value
            {
                return Err(UsageError(format!(
                    "label {key:?} given twice: {old:?} and {value:?}"
                )));
            }
        }
    }
    Ok(labels)
}

/// A clap value parser for a positive, finite number of seconds (`-w 2.5`).
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| *v > 0.0)
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

/// `2.5s`, `30s`, `0.05s`: how durations are shown in messages.
pub fn show_seconds(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn path_is_optional_and_labels_combine() {
        let (path, labels) =
            path_and_labels(&words(&["/tmp/sb", r#"{"app":"web"}"#, "pod=1"])).unwrap();
        assert_eq!(path, PathBuf::from("/tmp/sb"));
        assert_eq!(labels.len(), 2);
        let (path, _) = path_and_labels(&words(&["./sb", "pod=1"])).unwrap();
        assert_eq!(path, PathBuf::from("./sb"));
        let (path, labels) = split(&words(&["app=web"]), || Ok("/x/y".into())).unwrap();
        assert_eq!(path, PathBuf::from("/x/y"));
        assert_eq!(labels["app"], "web");
    }

    #[test]
    fn a_bare_word_is_not_a_path() {
        let err = path_and_labels(&words(&["app"])).unwrap_err().0;
        assert!(
            err.contains("invalid label \"app\"") && err.contains("./app"),
            "{err}"
        );
        assert!(path_and_labels(&words(&["./sb", "app"])).is_err());
    }

    #[test]
    fn commas_separate_pairs() {
        let labels = parse_labels(&words(&["app=web,pod=a"])).unwrap();
        assert_eq!(labels.len(), 2);
        assert_eq!((&*labels["app"], &*labels["pod"]), ("web", "a"));
        let err = parse_labels(&words(&["note=a,b"])).unwrap_err().0;
        assert!(err.contains("\"b\"") && err.contains("JSON"), "{err}");
        let labels = parse_labels(&words(&[r#"{"note":"a,b"}"#])).unwrap();
        assert_eq!(labels["note"], "a,b");
    }

    #[test]
    fn bad_labels_are_usage_errors() {
        assert!(
            parse_labels(&words(&["{not json"]))
                .unwrap_err()
                .0
                .contains("invalid labels")
        );
        assert!(parse_labels(&words(&[r#"{"a":1}"#])).is_err());
        assert!(parse_labels(&words(&["a=1", "a=2"])).is_err());
        assert!(parse_labels(&words(&["=1"])).is_err());
    }

    #[test]
    fn seconds_are_positive() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        for bad in ["0", "-1", "nan", "inf", "x"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(show_seconds(Duration::from_millis(500)), "0.5s");
    }
}

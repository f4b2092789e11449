//! Command-line conventions shared by every subcommand: the switchboard path and
//! label arguments.

use std::path::PathBuf;

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

/// Whether a word is a label argument rather than a path.
fn is_label_word(word: &str) -> bool {
    word.trim_start().starts_with('{') || word.contains('=')
}

/// Splits `[PATH] LABELS...`: the first word is the path unless it looks like labels
/// (a JSON object or `key=value`).
pub fn path_and_labels(words: &[String]) -> Result<(PathBuf, Labels), UsageError> {
    let (path, labels) = match words.split_first() {
        Some((first, rest)) if !is_label_word(first) => (PathBuf::from(first), rest),
        _ => (default_path()?, words),
    };
    Ok((path, parse_labels(labels)?))
}

/// Merges label words: JSON objects of strings and `key=value` pairs.
pub fn parse_labels(words: &[String]) -> Result<Labels, UsageError> {
    let mut labels = Labels::new();
    for word in words {
        let parsed: Labels = if word.trim_start().starts_with('{') {
            serde_json::from_str(word).map_err(|e| {
                UsageError(format!(
                    "invalid labels {word:?}: {e} (expected a JSON object of strings)"
                ))
            })?
        } else if let Some((key, value)) = word.split_once('=') {
            Labels::from([(key.to_owned(), value.to_owned())])
        } else {
            return Err(UsageError(format!(
                "invalid label {word:?}: expected a JSON object or key=value"
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
        // SAFETY: tests in this module do not read the environment concurrently.
        unsafe { std::env::set_var("FLOWER_SWITCHBOARD", "/x/y") };
        let (path, labels) = path_and_labels(&words(&["app=web"])).unwrap();
        assert_eq!(path, PathBuf::from("/x/y"));
        assert_eq!(labels["app"], "web");
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
}

//! Label algebra (docs/PROTOCOL.md §6).

use std::sync::Arc;

use flower_proto::{Labels, Status};

/// Keys present in both sets with different values, sorted.
pub fn conflicting_keys<'a>(a: &'a Labels, b: &Labels) -> Vec<&'a str> {
    // Walk the smaller map; BTreeMap iteration keeps the result sorted either way.
    a.iter()
        .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k.as_str())
        .collect()
}

/// Whether some key has different values in the two sets.
pub fn contradict(a: &Labels, b: &Labels) -> bool {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    small
        .iter()
        .any(|(k, v)| large.get(k).is_some_and(|w| w != v))
}

/// The union of two sets, or the conflicting keys.
pub fn merge<'a>(base: &'a Labels, extra: &Labels) -> Result<Labels, Vec<&'a str>> {
    let conflicts = conflicting_keys(base, extra);
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let mut merged = base.clone();
    merged.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(merged)
}

/// Keys as a compact JSON array: `["dog","sheep"]`.
pub fn key_list<S: AsRef<str>>(keys: &[S]) -> String {
    let quoted: Vec<String> = keys.iter().map(|k| json_string(k.as_ref())).collect();
    format!("[{}]", quoted.join(","))
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Rejects label sets with an empty key.
pub fn validate(labels: &Labels) -> Result<(), Status> {
    if labels.contains_key("") {
        return Err(Status::invalid_argument("Label keys must not be empty"));
    }
    Ok(())
}

/// A handle's fixed labels (its in- or out-labels), stored compactly: handles carry
/// few labels and a node may hold 100 000 handles, where a `BTreeMap` starts at a
/// 544-byte node and this costs one small shared slice. Sorted by key; clones share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixedLabels(Option<Arc<[(String, String)]>>);

impl FixedLabels {
    pub fn new(labels: &Labels) -> FixedLabels {
        if labels.is_empty() {
            return FixedLabels(None);
        }
        FixedLabels(Some(
            labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0
            .iter()
            .flat_map(|pairs| pairs.iter().map(|(k, v)| (k, v)))
    }

    pub fn to_labels(&self) -> Labels {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Merges request labels into a handle's fixed ones; `which` is `In` or `Out`.
pub fn merge_fixed(fixed: &FixedLabels, request: &Labels, which: &str) -> Result<Labels, Status> {
    validate(request)?;
    // `fixed` is sorted, so the conflicting keys come out sorted.
    let conflicts: Vec<&str> = fixed
        .iter()
        .filter(|(k, v)| request.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k.as_str())
        .collect();
    if !conflicts.is_empty() {
        return Err(Status::permission_denied(format!(
            "{which}-labels {} are already defined with different values",
            key_list(&conflicts)
        )));
    }
    let mut merged = request.clone();
    merged.extend(fixed.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(merged)
}

/// The fixed labels of a handle derived by Constrain: shares the parent's when the
/// request adds none.
pub fn derive_fixed(
    fixed: &FixedLabels,
    request: &Labels,
    which: &str,
) -> Result<FixedLabels, Status> {
    if request.is_empty() {
        return Ok(fixed.clone());
    }
    Ok(FixedLabels::new(&merge_fixed(fixed, request, which)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn contradiction_needs_a_shared_key_with_different_values() {
        assert!(!contradict(&l(&[("a", "1")]), &l(&[("b", "2")])));
        assert!(!contradict(
            &l(&[("a", "1")]),
            &l(&[("a", "1"), ("b", "2")])
        ));
        assert!(contradict(&l(&[("a", "1")]), &l(&[("a", "2")])));
        assert!(!contradict(&l(&[]), &l(&[("a", "2")])));
    }

    #[test]
    fn merge_is_union_or_sorted_conflicts() {
        assert_eq!(
            merge(&l(&[("a", "1")]), &l(&[("b", "2")])).unwrap(),
            l(&[("a", "1"), ("b", "2")])
        );
        assert_eq!(
            merge(
                &l(&[("sheep", "1"), ("dog", "1"), ("x", "1")]),
                &l(&[("sheep", "2"), ("dog", "2"), ("x", "1")])
            ),
            Err(vec!["dog", "sheep"])
        );
    }

    #[test]
    fn fixed_labels_merge_and_report_sorted_conflicts() {
        let fixed = FixedLabels::new(&l(&[("sheep", "1"), ("dog", "1"), ("x", "1")]));
        assert_eq!(
            merge_fixed(&fixed, &l(&[("y", "2"), ("x", "1")]), "In").unwrap(),
            l(&[("sheep", "1"), ("dog", "1"), ("x", "1"), ("y", "2")])
        );
        let err = merge_fixed(&fixed, &l(&[("sheep", "2"), ("dog", "2")]), "Out").unwrap_err();
        assert_eq!(
            err.message,
            r#"Out-labels ["dog","sheep"] are already defined with different values"#
        );
        assert_eq!(derive_fixed(&fixed, &Labels::new(), "In").unwrap(), fixed);
        assert_eq!(fixed.to_labels().len(), 3);
        assert_eq!(FixedLabels::new(&Labels::new()), FixedLabels::default());
    }

    #[test]
    fn key_lists_are_compact_json() {
        assert_eq!(key_list(&["dog", "sheep"]), r#"["dog","sheep"]"#);
        assert_eq!(key_list(&["a\"b"]), r#"["a\"b"]"#);
        assert_eq!(key_list::<&str>(&[]), "[]");
    }
}

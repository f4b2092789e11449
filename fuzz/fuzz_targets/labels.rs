//! Labels: the command-line parser (JSON objects and key=value words) and the label
//! algebra the switchboard applies to what peers send (validation, contradiction,
//! merging, conflict lists, constraint derivation).
#![no_main]

use flower_proto::Labels;
use flower_switchboard::labels::{
    FixedLabels, conflicting_keys, contradict, derive_fixed, key_list, merge, validate,
};
use libfuzzer_sys::fuzz_target;

use flower_tools::args;

/// Two label sets from the fuzzer's words: before and after a `\x01` word.
fn sets(words: &[String]) -> (Labels, Labels) {
    let mut split = words.splitn(2, |w| w == "\u{1}");
    let a = split.next().map(|w| args::parse_labels(w).unwrap_or_default());
    let b = split.next().map(|w| args::parse_labels(w).unwrap_or_default());
    (a.unwrap_or_default(), b.unwrap_or_default())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let words: Vec<String> = text.split('\0').map(str::to_owned).collect();
    let _ = args::parse_labels(&words);
    let (a, b) = sets(&words);
    let conflicts = conflicting_keys(&a, &b);
    assert_eq!(contradict(&a, &b), !conflicts.is_empty());
    assert!(conflicts.windows(2).all(|w| w[0] < w[1]), "sorted");
    match merge(&a, &b) {
        Ok(merged) => {
            assert!(a.iter().chain(&b).all(|(k, v)| merged.get(k) == Some(v)));
            assert_eq!(merged.len(), a.keys().chain(b.keys()).collect::<std::collections::BTreeSet<_>>().len());
        }
        Err(keys) => assert_eq!(keys, conflicts),
    }
    let list = key_list(&conflicts);
    let parsed: Vec<String> = serde_json::from_str(&list).expect("key lists are JSON");
    assert_eq!(parsed, conflicts);
    let _ = validate(&a);
    // A constraint never drops or changes a fixed label.
    let fixed = FixedLabels::new(&a);
    if let Ok(derived) = derive_fixed(&fixed, &b, "In") {
        let derived = derived.to_labels();
        assert!(a.iter().all(|(k, v)| derived.get(k) == Some(v)));
    }
});

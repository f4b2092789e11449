//! Property test: the directory answers exactly as a naive scan over its targets
//! does (docs/PROTOCOL.md §6, ServerStart and Lookup), for random sequences of
//! registrations, removals, lookups and listings over many distinct key sets. Uses
//! only the public API, so it holds the index to the rules whatever its internals.
//!
//! The model: two label sets *contradict* when some key is in both with different
//! values. An insert is refused iff some existing target does not contradict it.
//! A lookup is `NotFound`, `Found(the only match)` or `Ambiguous(the two oldest
//! matches)`; `matching` is every match, oldest first.

use flower_proto::Labels;
use flower_switchboard::directory::{Directory, Lookup, TargetId};
use proptest::prelude::*;
use proptest::sample::Index;

/// Keys `k0`..`k59`; the first few are "hot" so that label sets overlap often.
const POOL: usize = 60;
const HOT: usize = 5;
/// Few values, so that sets both match and contradict often.
const VALUES: [&str; 3] = ["0", "1", "2"];

fn key(i: usize) -> String {
    format!("k{i}")
}

/// A label set: mostly a few hot keys, sometimes many keys (up to 50) from the pool.
fn label_set() -> impl Strategy<Value = Labels> {
    let hot = prop::collection::btree_map(
        (0..HOT).prop_map(key),
        prop::sample::select(&VALUES[..]).prop_map(str::to_owned),
        0..=HOT,
    );
    let wide = prop::collection::btree_map(
        (0..POOL).prop_map(key),
        prop::sample::select(&VALUES[..]).prop_map(str::to_owned),
        0..=50,
    );
    prop_oneof![4 => hot, 1 => wide]
}

#[derive(Debug, Clone)]
enum Op {
    Insert(Labels),
    /// Removes a live target (by position among the live ones), or, with none live,
    /// nothing.
    Remove(Index),
    /// Removes an id that is gone (or never was).
    RemoveGone(Index),
    /// Looks up random labels.
    Lookup(Labels),
    /// Looks up a live target's labels restricted to some of its keys, plus extras:
    /// lookups that find something.
    LookupNear(Index, Vec<bool>, Labels),
    Matching(Labels),
    MatchingNear(Index, Vec<bool>, Labels),
}

fn op() -> impl Strategy<Value = Op> {
    let mask = || prop::collection::vec(any::<bool>(), 0..50);
    prop_oneof![
        6 => label_set().prop_map(Op::Insert),
        2 => any::<Index>().prop_map(Op::Remove),
        1 => any::<Index>().prop_map(Op::RemoveGone),
        3 => label_set().prop_map(Op::Lookup),
        3 => (any::<Index>(), mask(), label_set())
            .prop_map(|(i, m, l)| Op::LookupNear(i, m, l)),
        1 => label_set().prop_map(Op::Matching),
        1 => (any::<Index>(), mask(), label_set())
            .prop_map(|(i, m, l)| Op::MatchingNear(i, m, l)),
    ]
}

fn contradict(a: &Labels, b: &Labels) -> bool {
    a.iter().any(|(k, v)| b.get(k).is_some_and(|w| w != v))
}

/// The naive directory: live targets in registration order.
#[derive(Default)]
struct Model {
    live: Vec<(TargetId, Labels)>,
    gone: Vec<TargetId>,
}

impl Model {
    fn matching(&self, labels: &Labels) -> Vec<TargetId> {
        let mut ids: Vec<TargetId> = self
            .live
            .iter()
            .filter(|(_, l)| !contradict(l, labels))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn lookup(&self, labels: &Labels) -> Lookup {
        match self.matching(labels)[..] {
            [] => Lookup::NotFound,
            [only] => Lookup::Found(only),
            [a, b, ..] => Lookup::Ambiguous(a, b),
        }
    }

    /// A live target's labels restricted by `mask`, merged under `extra` (the
    /// target's values win).
    fn near(&self, index: &Index, mask: &[bool], extra: &Labels) -> Labels {
        let mut labels = extra.clone();
        if !self.live.is_empty() {
            let (_, target) = &self.live[index.index(self.live.len())];
            for (n, (k, v)) in target.iter().enumerate() {
                if mask.get(n).copied().unwrap_or(true) {
                    labels.insert(k.clone(), v.clone());
                }
            }
        }
        labels
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut dir: Directory<usize> = Directory::new();
    let mut model = Model::default();
    let mut last_id: Option<TargetId> = None;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Insert(labels) => {
                let refused = model.live.iter().any(|(_, l)| !contradict(l, &labels));
                match dir.insert(labels.clone(), step) {
                    Ok(id) => {
                        prop_assert!(!refused, "step {step}: accepted {labels:?}");
                        prop_assert!(last_id.is_none_or(|last| id > last), "ids grow");
                        last_id = Some(id);
                        model.live.push((id, labels));
                    }
                    Err(value) => {
                        prop_assert!(refused, "step {step}: refused {labels:?}");
                        prop_assert_eq!(value, step, "a refused value is handed back");
                    }
                }
            }
            Op::Remove(index) => {
                if model.live.is_empty() {
                    continue;
                }
                let (id, labels) = model.live.remove(index.index(model.live.len()));
                let removed = dir.remove(id);
                prop_assert_eq!(removed.map(|e| e.labels), Some(labels));
                model.gone.push(id);
            }
            Op::RemoveGone(index) => {
                let id = match model.gone.is_empty() {
                    true => TargetId::MAX,
                    false => model.gone[index.index(model.gone.len())],
                };
                prop_assert!(dir.remove(id).is_none());
                prop_assert!(dir.get(id).is_none());
            }
            Op::Lookup(labels) => {
                prop_assert_eq!(dir.lookup(&labels), model.lookup(&labels), "{:?}", labels);
            }
            Op::LookupNear(index, mask, extra) => {
                let labels = model.near(&index, &mask, &extra);
                prop_assert_eq!(dir.lookup(&labels), model.lookup(&labels), "{:?}", labels);
            }
            Op::Matching(labels) => {
                prop_assert_eq!(dir.matching(&labels), model.matching(&labels));
            }
            Op::MatchingNear(index, mask, extra) => {
                let labels = model.near(&index, &mask, &extra);
                prop_assert_eq!(dir.matching(&labels), model.matching(&labels));
            }
        }
        prop_assert_eq!(dir.len(), model.live.len());
    }
    for (id, labels) in &model.live {
        prop_assert_eq!(dir.get(*id).map(|e| &e.labels), Some(labels));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn directory_answers_as_a_naive_scan(ops in prop::collection::vec(op(), 1..300)) {
        run(ops)?;
    }
}

/// Many targets in one wide key set, then lookups on many different subsets of its
/// keys: more projections than the index builds for one group.
#[test]
fn many_projections_of_one_key_set_answer_as_a_scan() {
    let keys: Vec<String> = (0..12).map(key).collect();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let values = prop::collection::vec(prop::collection::vec(0..3usize, 12), 1..60);
    let lookups = prop::collection::vec(prop::collection::vec(prop::option::of(0..3usize), 12), 64);
    runner
        .run(&(values, lookups), |(targets, lookups)| {
            let mut ops: Vec<Op> = targets
                .iter()
                .map(|vals| {
                    Op::Insert(
                        keys.iter()
                            .zip(vals)
                            .map(|(k, v)| (k.clone(), VALUES[*v].to_owned()))
                            .collect(),
                    )
                })
                .collect();
            ops.extend(lookups.iter().map(|vals| {
                Op::Lookup(
                    keys.iter()
                        .zip(vals)
                        .filter_map(|(k, v)| Some((k.clone(), VALUES[(*v)?].to_owned())))
                        .collect(),
                )
            }));
            run(ops)
        })
        .unwrap();
}

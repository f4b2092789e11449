//! The target directory and its index (DESIGN §3).
//!
//! Targets are grouped by their *key set*. Within a group, a lookup with labels `L`
//! constrains exactly the group keys that `L` also has (the *projection*), and a
//! target matches iff its values on the projection equal `L`'s. So each group keeps,
//! per projection in use, a hash index from projected values to targets. A lookup
//! costs one hash probe per group — O(groups × keys), independent of how many targets
//! share a key set. Projection indexes are built on first use and then maintained on
//! every insert and remove. Real lookups touch few projections, but a client could ask
//! for every subset of a group's keys, each costing a build over the group and upkeep
//! on every registration. So a group keeps at most [`MAX_COMPOSITE_INDEXES`]
//! multi-key projections (plus one per single key); a lookup on any other projection
//! probes the most selective index on a subset of its keys and filters that bucket.
//!
//! Buckets are keyed by a keyed (SipHash) hash of the projected values, and candidates
//! are re-checked, so collisions cost a comparison, never a wrong answer.
//! Ids grow with registration order; "the first two matches" are the two oldest.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use flower_proto::Labels;

pub type TargetId = u64;

/// A registered target: its labels and the registrant's payload.
#[derive(Debug)]
pub struct Entry<T> {
    pub labels: Labels,
    pub value: T,
}

/// The outcome of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    NotFound,
    Found(TargetId),
    /// The two oldest matches.
    Ambiguous(TargetId, TargetId),
}

/// Multi-key projection indexes a group builds; beyond them lookups filter a bucket.
pub const MAX_COMPOSITE_INDEXES: usize = 16;

type KeySet = Arc<[String]>;
/// Indices into a group's key set, ascending.
type Projection = Box<[u16]>;

#[derive(Debug, Default)]
struct Group {
    members: BTreeSet<TargetId>,
    indexes: HashMap<Projection, HashMap<u64, BTreeSet<TargetId>>>,
}

#[derive(Debug)]
pub struct Directory<T> {
    targets: HashMap<TargetId, (Entry<T>, KeySet)>,
    groups: HashMap<KeySet, Group>,
    hasher: RandomState,
    next_id: TargetId,
}

impl<T> Default for Directory<T> {
    fn default() -> Self {
        Directory {
            targets: HashMap::new(),
            groups: HashMap::new(),
            hasher: RandomState::new(),
            next_id: 1,
        }
    }
}

impl<T> Directory<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    pub fn get(&self, id: TargetId) -> Option<&Entry<T>> {
        self.targets.get(&id).map(|(t, _)| t)
    }

    /// Registers a target unless an existing one does not contradict it; on refusal the
    /// value is handed back.
    pub fn insert(&mut self, labels: Labels, value: T) -> Result<TargetId, T> {
        if self.lookup(&labels) != Lookup::NotFound {
            return Err(value);
        }
        let id = self.next_id;
        self.next_id += 1;
        let keys: KeySet = labels.keys().cloned().collect::<Vec<_>>().into();
        let keys = match self.groups.get_key_value(&keys) {
            Some((shared, _)) => shared.clone(),
            None => keys,
        };
        let group = self.groups.entry(keys.clone()).or_default();
        group.members.insert(id);
        for (projection, index) in &mut group.indexes {
            let hash = project_hash(&self.hasher, &keys, projection, &labels);
            index.entry(hash).or_default().insert(id);
        }
        self.targets.insert(id, (Entry { labels, value }, keys));
        Ok(id)
    }

    pub fn remove(&mut self, id: TargetId) -> Option<Entry<T>> {
        let (target, keys) = self.targets.remove(&id)?;
        let group = self
            .groups
            .get_mut(&keys)
            .expect("every target has a group");
        group.members.remove(&id);
        if group.members.is_empty() {
            self.groups.remove(&keys);
        } else {
            for (projection, index) in &mut group.indexes {
                let hash = project_hash(&self.hasher, &keys, projection, &target.labels);
                if let Some(bucket) = index.get_mut(&hash) {
                    bucket.remove(&id);
                    if bucket.is_empty() {
                        index.remove(&hash);
                    }
                }
            }
        }
        Some(target)
    }

    /// Finds the targets that do not contradict `labels`.
    pub fn lookup(&mut self, labels: &Labels) -> Lookup {
        let mut best: [Option<TargetId>; 2] = [None, None];
        self.for_each_match(labels, |bucket| {
            // Each bucket is ordered, so its first two matches are all it can offer.
            for id in bucket.take(2) {
                match best {
                    [None, _] => best[0] = Some(id),
                    [Some(a), _] if id < a => best = [Some(id), Some(a)],
                    [Some(_), None] => best[1] = Some(id),
                    [Some(_), Some(b)] if id < b => best[1] = Some(id),
                    _ => {}
                }
            }
        });
        match best {
            [None, _] => Lookup::NotFound,
            [Some(a), None] => Lookup::Found(a),
            [Some(a), Some(b)] => Lookup::Ambiguous(a, b),
        }
    }

    /// All targets that do not contradict `labels`, oldest first.
    pub fn matching(&mut self, labels: &Labels) -> Vec<TargetId> {
        let mut all = Vec::new();
        self.for_each_match(labels, |bucket| all.extend(bucket));
        all.sort_unstable();
        all
    }

    /// Calls `f` once per group with that group's matches, in id order.
    fn for_each_match(
        &mut self,
        labels: &Labels,
        mut f: impl FnMut(&mut dyn Iterator<Item = TargetId>),
    ) {
        let Directory {
            targets,
            groups,
            hasher,
            ..
        } = self;
        for (keys, group) in groups.iter_mut() {
            let projection = index_projection(keys, labels);
            if projection.is_empty() {
                f(&mut group.members.iter().copied());
                continue;
            }
            let composites = group.indexes.keys().filter(|p| p.len() > 1).count();
            let probe = if group.indexes.contains_key(&projection) {
                projection.clone()
            } else if projection.len() == 1 || composites < MAX_COMPOSITE_INDEXES {
                group.build_index(projection.clone(), keys, targets, hasher);
                projection.clone()
            } else {
                // Out of composite indexes: every single key of the projection gets
                // one (at most one per key, ever), then the smallest bucket among the
                // indexes on subsets of the projection is filtered.
                for &i in projection.iter() {
                    let single: Projection = Box::new([i]);
                    if !group.indexes.contains_key(&single) {
                        group.build_index(single, keys, targets, hasher);
                    }
                }
                group
                    .indexes
                    .iter()
                    .filter(|(q, _)| q.iter().all(|i| projection.contains(i)))
                    .min_by_key(|(q, index)| {
                        let hash = project_hash(hasher, keys, q, labels);
                        index.get(&hash).map_or(0, BTreeSet::len)
                    })
                    .map(|(q, _)| q.clone())
                    .expect("single-key indexes on the projection exist")
            };
            let index = &group.indexes[&probe];
            let hash = project_hash(hasher, keys, &probe, labels);
            if let Some(bucket) = index.get(&hash) {
                // Re-check on the whole projection: equal hashes need not mean equal
                // values, and the probed index may cover only some of its keys.
                let mut matches = bucket.iter().copied().filter(|id| {
                    let target = &targets[id].0.labels;
                    projection
                        .iter()
                        .all(|&i| target.get(&keys[i as usize]) == labels.get(&keys[i as usize]))
                });
                f(&mut matches);
            }
        }
    }
}

impl Group {
    /// Indexes the group's members on `projection`: O(group size), once.
    fn build_index<T>(
        &mut self,
        projection: Projection,
        keys: &[String],
        targets: &HashMap<TargetId, (Entry<T>, KeySet)>,
        hasher: &RandomState,
    ) {
        let mut index: HashMap<u64, BTreeSet<TargetId>> = HashMap::new();
        for &id in &self.members {
            let hash = project_hash(hasher, keys, &projection, &targets[&id].0.labels);
            index.entry(hash).or_default().insert(id);
        }
        self.indexes.insert(projection, index);
    }
}

fn index_projection(keys: &[String], labels: &Labels) -> Projection {
    keys.iter()
        .enumerate()
        .filter(|(_, k)| labels.contains_key(*k))
        .map(|(i, _)| i as u16)
        .collect()
}

/// Hash of `labels`' values on the projected keys (all present in `labels`).
fn project_hash(hasher: &RandomState, keys: &[String], projection: &[u16], labels: &Labels) -> u64 {
    let mut state = hasher.build_hasher();
    for &i in projection {
        labels[&keys[i as usize]].hash(&mut state);
    }
    state.finish()
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

    /// The obvious definition, for comparison with the index.
    fn scan(dir: &Directory<()>, labels: &Labels) -> Vec<TargetId> {
        let mut ids: Vec<_> = dir
            .targets
            .iter()
            .filter(|(_, (t, _))| !crate::labels::contradict(&t.labels, labels))
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn registration_refuses_non_contradicting_targets() {
        let mut dir = Directory::new();
        assert!(dir.insert(l(&[("app", "web"), ("pod", "1")]), ()).is_ok());
        assert!(dir.insert(l(&[("app", "web"), ("pod", "2")]), ()).is_ok());
        assert!(dir.insert(l(&[("app", "web")]), ()).is_err());
        assert!(dir.insert(l(&[("other", "x")]), ()).is_err());
        assert!(dir.insert(l(&[("app", "db")]), ()).is_ok());
    }

    #[test]
    fn lookup_reports_one_or_the_two_oldest() {
        let mut dir = Directory::new();
        let a = dir.insert(l(&[("app", "web"), ("pod", "1")]), ()).unwrap();
        let b = dir.insert(l(&[("app", "web"), ("pod", "2")]), ()).unwrap();
        let c = dir.insert(l(&[("app", "db")]), ()).unwrap();
        assert_eq!(
            dir.lookup(&l(&[("app", "web"), ("pod", "2")])),
            Lookup::Found(b)
        );
        assert_eq!(dir.lookup(&l(&[("app", "web")])), Lookup::Ambiguous(a, b));
        assert_eq!(dir.lookup(&l(&[])), Lookup::Ambiguous(a, b));
        assert_eq!(
            dir.lookup(&l(&[("app", "db"), ("pod", "9")])),
            Lookup::Found(c)
        );
        assert_eq!(dir.lookup(&l(&[("app", "mail")])), Lookup::NotFound);
        dir.remove(a);
        assert_eq!(dir.lookup(&l(&[("app", "web")])), Lookup::Found(b));
        assert!(dir.insert(l(&[("app", "web"), ("pod", "1")]), ()).is_ok());
    }

    #[test]
    fn index_agrees_with_a_scan() {
        agrees_with_a_scan(&["a", "b", "c", "d"]);
    }

    /// Seven keys have 120 multi-key subsets: lookups run out of composite indexes
    /// and must still answer exactly, with the index count bounded.
    #[test]
    fn index_agrees_with_a_scan_past_the_index_cap() {
        let keys = ["a", "b", "c", "d", "e", "f", "g"];
        let dir = agrees_with_a_scan(&keys);
        let composites = |g: &Group| g.indexes.keys().filter(|p| p.len() > 1).count();
        assert!(
            dir.groups
                .values()
                .all(|g| composites(g) <= MAX_COMPOSITE_INDEXES)
        );
        assert!(
            dir.groups
                .values()
                .any(|g| composites(g) == MAX_COMPOSITE_INDEXES),
            "the cap was never reached, so the fallback went untested"
        );
    }

    fn agrees_with_a_scan(keys: &[&str]) -> Directory<()> {
        // Deterministic pseudo-random targets over a few keys and values.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let random_labels = |next: &mut dyn FnMut() -> u64| -> Labels {
            let mut labels = Labels::new();
            for &k in keys {
                if !next().is_multiple_of(3) {
                    labels.insert(k.to_string(), (next() % 3).to_string());
                }
            }
            labels
        };
        let mut dir = Directory::new();
        let mut ids = Vec::new();
        for round in 0..2000 {
            let labels = random_labels(&mut next);
            let expect = scan(&dir, &labels);
            let matching = dir.matching(&labels);
            assert_eq!(matching, expect, "round {round} labels {labels:?}");
            let lookup = dir.lookup(&labels);
            match expect.as_slice() {
                [] => assert_eq!(lookup, Lookup::NotFound),
                [a] => assert_eq!(lookup, Lookup::Found(*a)),
                [a, b, ..] => assert_eq!(lookup, Lookup::Ambiguous(*a, *b)),
            }
            if let Ok(id) = dir.insert(labels, ()) {
                ids.push(id);
            }
            if next() % 4 == 0 && !ids.is_empty() {
                let victim = ids.swap_remove((next() % ids.len() as u64) as usize);
                assert!(dir.remove(victim).is_some());
            }
        }
        dir
    }
}

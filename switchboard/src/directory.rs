//! The target directory and its index (docs/PROTOCOL.md §6, "Lookup").
//!
//! Targets are grouped by their *key set*. Within a group, a lookup with labels `L`
//! constrains exactly the group keys that `L` also has (the *projection*), and a
//! target matches iff its values on the projection equal `L`'s. So each group keeps,
//! per projection in use, a hash index from projected values to targets: one hash
//! probe answers a group, however many targets share its key set.
//!
//! **Which groups to probe.** A group can hold a match only if it has no key of `L`
//! (then every member matches) or a member carries one of `L`'s pairs `k = L[k]`. So
//! the directory also keeps, per `key = value` pair, the groups with a member carrying
//! it, and per key, the groups whose key set has it (a bitmap of group slots). A
//! lookup then probes:
//!
//! * when some key of `L` is in every group's key set (the common case: a shared
//!   `app`, the labels a constrained handle forces): only the groups carrying that
//!   key's pair, taking the key whose pair is rarest — no group that lacks the pair
//!   can match;
//! * otherwise the groups carrying any of `L`'s pairs, plus the groups whose key set
//!   misses every key of `L` (all groups less the union of the key bitmaps: a few
//!   word operations per 64 groups, never a probe per group);
//! * with no labels at all, nothing: the oldest targets are kept in order.
//!
//! So a lookup costs what the groups that can match cost, not the number of key sets
//! (hardening finding 5: one registrant's thousands of key sets no longer slow
//! everyone's lookups, and registration — a lookup that stops at the first match —
//! stays flat as they grow).
//!
//! Projection indexes are built on first use and then maintained on every insert and
//! remove. Real lookups touch few projections, but a client could ask for every subset
//! of a group's keys, each costing a build over the group and upkeep on every
//! registration. So a group keeps at most [`MAX_COMPOSITE_INDEXES`] multi-key
//! projections (plus one per single key); a lookup on any other projection probes the
//! most selective index on a subset of its keys and filters that bucket.
//!
//! Buckets and pairs are keyed by a keyed (SipHash) hash, and candidates are
//! re-checked, so collisions cost a comparison, never a wrong answer.
//! Ids grow with registration order; "the first two matches" are the two oldest.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::ControlFlow;
use std::sync::Arc;

use flower_proto::Labels;
// Target ids and group slots are ours; pair and projection keys are keyed SipHash
// values already; projections are a few per group.
use flower_proto::hash::NumMap;
use roaring::RoaringBitmap;

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

/// Matching targets [`Directory::insert_over`] checks for being gone.
pub const MAX_GONE: usize = 4;

/// Multi-key projection indexes a group builds; beyond them lookups filter a bucket.
pub const MAX_COMPOSITE_INDEXES: usize = 16;

type KeySet = Arc<[String]>;
/// Indices into a group's key set, ascending.
type Projection = Box<[u16]>;
/// Where a group lives in [`Directory::groups`]; reused once the group is gone.
type Slot = u32;

#[derive(Debug)]
struct Group {
    keys: KeySet,
    members: BTreeSet<TargetId>,
    indexes: NumMap<Projection, NumMap<u64, BTreeSet<TargetId>>>,
}

#[derive(Debug)]
pub struct Directory<T> {
    targets: NumMap<TargetId, (Entry<T>, Slot)>,
    groups: Vec<Option<Group>>,
    free: Vec<Slot>,
    slots: HashMap<KeySet, Slot>,
    /// Every group's slot.
    live: RoaringBitmap,
    /// Per key: the groups whose key set has it.
    with_key: HashMap<String, RoaringBitmap>,
    /// Per `key = value` (its keyed hash): the groups with members carrying it, and
    /// how many.
    with_pair: NumMap<u64, NumMap<Slot, u32>>,
    /// Every target, oldest first: the answer to a lookup with no labels.
    all: BTreeSet<TargetId>,
    hasher: RandomState,
    next_id: TargetId,
    probes: u64,
}

impl<T> Default for Directory<T> {
    fn default() -> Self {
        Directory {
            targets: NumMap::default(),
            groups: Vec::new(),
            free: Vec::new(),
            slots: HashMap::new(),
            live: RoaringBitmap::new(),
            with_key: HashMap::new(),
            with_pair: NumMap::default(),
            all: BTreeSet::new(),
            hasher: RandomState::new(),
            next_id: 1,
            probes: 0,
        }
    }
}

/// The groups a lookup must probe.
enum Candidates {
    /// Every target matches (no labels).
    All,
    Groups(Vec<Slot>),
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

    /// The id the newest target got (0 before the first): ids only grow, so the
    /// targets registered by now are exactly those with ids up to it.
    pub fn newest(&self) -> TargetId {
        self.next_id - 1
    }

    /// Groups probed by lookups so far: what a lookup costs, for tests that check the
    /// index rather than time it.
    #[doc(hidden)]
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// [`Directory::insert`], except that matching targets for which `gone` holds
    /// (say, their registrant has exited and its removal is still on its way) do not
    /// refuse it: they are removed first. At most [`MAX_GONE`] are looked at.
    pub fn insert_over(
        &mut self,
        labels: Labels,
        value: T,
        gone: impl Fn(&T) -> bool,
    ) -> Result<TargetId, T> {
        if self.clashes(&labels) {
            // Every match is found (at most MAX_GONE), so once they are removed
            // nothing else clashes.
            let matches = self.matching_after(&labels, 0, MAX_GONE + 1);
            if matches.len() > MAX_GONE || !matches.iter().all(|id| gone(&self.targets[id].0.value))
            {
                return Err(value);
            }
            for id in matches {
                self.remove(id);
            }
        }
        Ok(self.add(labels, value))
    }

    /// Registers a target unless an existing one does not contradict it; on refusal the
    /// value is handed back.
    pub fn insert(&mut self, labels: Labels, value: T) -> Result<TargetId, T> {
        if self.clashes(&labels) {
            return Err(value);
        }
        Ok(self.add(labels, value))
    }

    /// Whether some target does not contradict `labels` (stops at the first).
    fn clashes(&mut self, labels: &Labels) -> bool {
        let mut clash = false;
        self.for_each_match(labels, 0, |bucket| {
            clash = bucket.next().is_some();
            if clash {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        clash
    }

    /// Adds a target that clashes with none.
    fn add(&mut self, labels: Labels, value: T) -> TargetId {
        let id = self.next_id;
        self.next_id += 1;
        let keys: KeySet = labels.keys().cloned().collect::<Vec<_>>().into();
        let slot = match self.slots.get(&keys) {
            Some(&slot) => slot,
            None => self.new_group(keys),
        };
        let group = self.groups[slot as usize]
            .as_mut()
            .expect("a slot in use holds its group");
        group.members.insert(id);
        for (projection, index) in &mut group.indexes {
            let hash = project_hash(&self.hasher, &group.keys, projection, &labels);
            index.entry(hash).or_default().insert(id);
        }
        for (k, v) in &labels {
            *self
                .with_pair
                .entry(pair_hash(&self.hasher, k, v))
                .or_default()
                .entry(slot)
                .or_insert(0) += 1;
        }
        self.all.insert(id);
        self.targets.insert(id, (Entry { labels, value }, slot));
        id
    }

    fn new_group(&mut self, keys: KeySet) -> Slot {
        // The projection on every key is the one registrations of this key set and
        // exact lookups use: index it from the start (while it is free to build).
        let every_key: Projection = (0..keys.len() as u16).collect();
        let group = Group {
            keys: keys.clone(),
            members: BTreeSet::new(),
            indexes: NumMap::from_iter([(every_key, NumMap::default())]),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.groups[slot as usize] = Some(group);
                slot
            }
            None => {
                self.groups.push(Some(group));
                Slot::try_from(self.groups.len() - 1).expect("fewer than 2^32 key sets")
            }
        };
        self.live.insert(slot);
        for k in keys.iter() {
            self.with_key.entry(k.clone()).or_default().insert(slot);
        }
        self.slots.insert(keys, slot);
        slot
    }

    pub fn remove(&mut self, id: TargetId) -> Option<Entry<T>> {
        let (target, slot) = self.targets.remove(&id)?;
        self.all.remove(&id);
        for (k, v) in &target.labels {
            let hash = pair_hash(&self.hasher, k, v);
            if let Some(groups) = self.with_pair.get_mut(&hash) {
                if let Some(n) = groups.get_mut(&slot) {
                    *n -= 1;
                    if *n == 0 {
                        groups.remove(&slot);
                    }
                }
                if groups.is_empty() {
                    self.with_pair.remove(&hash);
                }
            }
        }
        let group = self.groups[slot as usize]
            .as_mut()
            .expect("every target has a group");
        group.members.remove(&id);
        if group.members.is_empty() {
            let group = self.groups[slot as usize].take().expect("just seen");
            self.live.remove(slot);
            for k in group.keys.iter() {
                if let Some(bitmap) = self.with_key.get_mut(k.as_str()) {
                    bitmap.remove(slot);
                    if bitmap.is_empty() {
                        self.with_key.remove(k.as_str());
                    }
                }
            }
            self.slots.remove(&group.keys);
            self.free.push(slot);
        } else {
            for (projection, index) in &mut group.indexes {
                let hash = project_hash(&self.hasher, &group.keys, projection, &target.labels);
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
        self.for_each_match(labels, 0, |bucket| {
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
            ControlFlow::Continue(())
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
        self.for_each_match(labels, 0, |bucket| {
            all.extend(bucket);
            ControlFlow::Continue(())
        });
        all.sort_unstable();
        all
    }

    /// The (at most) `limit` oldest targets registered after `after` that do not
    /// contradict `labels`, oldest first: a List walks the directory this way, a page
    /// at a time, holding a page rather than every match.
    pub fn matching_after(
        &mut self,
        labels: &Labels,
        after: TargetId,
        limit: usize,
    ) -> Vec<TargetId> {
        let mut page = Vec::new();
        self.for_each_match(labels, after, |bucket| {
            // Each bucket is ordered: its first `limit` are all it can add to the page.
            page.extend(bucket.take(limit));
            if page.len() > 2 * limit {
                page.sort_unstable();
                page.truncate(limit);
            }
            ControlFlow::Continue(())
        });
        page.sort_unstable();
        page.truncate(limit);
        page
    }

    /// The groups that can hold a match for `labels` (module docs).
    fn candidates(&self, labels: &Labels) -> Candidates {
        if labels.is_empty() {
            return Candidates::All;
        }
        let groups = self.live.len();
        let pair = |k: &str, v: &str| self.with_pair.get(&pair_hash(&self.hasher, k, v));
        // A key every group has: only groups carrying its pair can match.
        let mut rarest: Option<Option<&NumMap<Slot, u32>>> = None;
        for (k, v) in labels {
            if self
                .with_key
                .get(k.as_str())
                .is_some_and(|g| g.len() == groups)
            {
                let carrying = pair(k, v);
                let size = carrying.map_or(0, HashMap::len);
                if rarest.is_none_or(|r| size < r.map_or(0, HashMap::len)) {
                    rarest = Some(carrying);
                }
            }
        }
        if let Some(carrying) = rarest {
            return Candidates::Groups(
                carrying.map_or_else(Vec::new, |g| g.keys().copied().collect()),
            );
        }
        let mut having = RoaringBitmap::new();
        let mut slots: Vec<Slot> = Vec::new();
        for (k, v) in labels {
            if let Some(g) = self.with_key.get(k.as_str()) {
                having |= g;
            }
            if let Some(g) = pair(k, v) {
                slots.extend(g.keys());
            }
        }
        let missing_every_key = &self.live - &having;
        slots.extend(missing_every_key.iter());
        slots.sort_unstable();
        slots.dedup();
        Candidates::Groups(slots)
    }

    /// Calls `f` once per candidate group with that group's matches, in id order, until
    /// it breaks.
    fn for_each_match(
        &mut self,
        labels: &Labels,
        after: TargetId,
        mut f: impl FnMut(&mut dyn Iterator<Item = TargetId>) -> ControlFlow<()>,
    ) {
        let slots = match self.candidates(labels) {
            Candidates::All => {
                let _ = f(&mut self.all.range(after + 1..).copied());
                return;
            }
            Candidates::Groups(slots) => slots,
        };
        let Directory {
            targets,
            groups,
            hasher,
            probes,
            ..
        } = self;
        for slot in slots {
            *probes += 1;
            let group = groups[slot as usize]
                .as_mut()
                .expect("candidates are live groups");
            let keys = group.keys.clone();
            let projection = index_projection(&keys, labels);
            if projection.is_empty() {
                if f(&mut group.members.range(after + 1..).copied()).is_break() {
                    return;
                }
                continue;
            }
            // `None`: the projection's own index.
            let other: Option<Projection> = if group.indexes.contains_key(&projection) {
                None
            } else if projection.len() == 1
                || group.indexes.keys().filter(|p| p.len() > 1).count() < MAX_COMPOSITE_INDEXES
            {
                group.build_index(projection.clone(), &keys, targets, hasher);
                None
            } else {
                // Out of composite indexes: every single key of the projection gets
                // one (at most one per key, ever), then the smallest bucket among the
                // indexes on subsets of the projection is filtered.
                for &i in projection.iter() {
                    let single: Projection = Box::new([i]);
                    if !group.indexes.contains_key(&single) {
                        group.build_index(single, &keys, targets, hasher);
                    }
                }
                group
                    .indexes
                    .iter()
                    .filter(|(q, _)| q.iter().all(|i| projection.contains(i)))
                    .min_by_key(|(q, index)| {
                        let hash = project_hash(hasher, &keys, q, labels);
                        index.get(&hash).map_or(0, BTreeSet::len)
                    })
                    .map(|(q, _)| Some(q.clone()))
                    .expect("single-key indexes on the projection exist")
            };
            let probe: &[u16] = other.as_deref().unwrap_or(&projection);
            let index = &group.indexes[probe];
            let hash = project_hash(hasher, &keys, probe, labels);
            if let Some(bucket) = index.get(&hash) {
                // Re-check on the whole projection: equal hashes need not mean equal
                // values, and the probed index may cover only some of its keys.
                let mut matches = bucket.range(after + 1..).copied().filter(|id| {
                    let target = &targets[id].0.labels;
                    projection
                        .iter()
                        .all(|&i| target.get(&keys[i as usize]) == labels.get(&keys[i as usize]))
                });
                if f(&mut matches).is_break() {
                    return;
                }
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
        targets: &NumMap<TargetId, (Entry<T>, Slot)>,
        hasher: &RandomState,
    ) {
        let mut index: NumMap<u64, BTreeSet<TargetId>> = NumMap::default();
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

/// Hash of one `key = value` pair (`str` hashes end with a marker, so the pair is
/// unambiguous).
fn pair_hash(hasher: &RandomState, key: &str, value: &str) -> u64 {
    let mut state = hasher.build_hasher();
    key.hash(&mut state);
    value.hash(&mut state);
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
                .iter()
                .flatten()
                .all(|g| composites(g) <= MAX_COMPOSITE_INDEXES)
        );
        assert!(
            dir.groups
                .iter()
                .flatten()
                .any(|g| composites(g) == MAX_COMPOSITE_INDEXES),
            "the cap was never reached, so the fallback went untested"
        );
    }

    /// With one key on every target the lookup takes the pair index's shortcut; the
    /// answers must not change.
    #[test]
    fn index_agrees_with_a_scan_with_a_shared_key() {
        agrees_with_a_scan_where(&["a", "b", "c", "d"], Some("s"));
    }

    /// Hardening finding 5: one registrant's 10 000 key sets must not make an
    /// unrelated lookup, or a registration, probe every group. The old index probed
    /// each of the 10 002 groups on every lookup.
    #[test]
    fn many_key_sets_do_not_slow_an_unrelated_lookup() {
        let mut dir = Directory::new();
        for i in 0..10_000 {
            let attacker = l(&[
                ("app", "evil"),
                ("id", &i.to_string()),
                (&format!("k{i}"), "x"),
            ]);
            dir.insert(attacker, ()).unwrap();
        }
        let web = dir.insert(l(&[("app", "web"), ("pod", "1")]), ()).unwrap();
        let other = dir.insert(l(&[("app", "web"), ("pod", "2")]), ()).unwrap();
        let probes = |dir: &mut Directory<()>, labels: &Labels| {
            let before = dir.probes();
            let answer = dir.lookup(labels);
            (answer, dir.probes() - before)
        };
        // `app` is on every target: only the bystander's group is probed.
        let (answer, cost) = probes(&mut dir, &l(&[("app", "web"), ("pod", "1")]));
        assert_eq!((answer, cost), (Lookup::Found(web), 1));
        let (answer, cost) = probes(&mut dir, &l(&[("app", "web")]));
        assert_eq!((answer, cost), (Lookup::Ambiguous(web, other), 1));
        let before = dir.probes();
        let fresh = dir.insert(l(&[("app", "web"), ("pod", "3")]), ()).unwrap();
        assert!(dir.probes() - before <= 1);
        dir.remove(fresh);
        // Two targets that leave out `app` and `pod` in turn: no key of the lookup is on
        // every target, so the groups missing both keys are found from the key bitmaps,
        // and only the groups carrying `app = web` or `pod = 1` are probed.
        dir.insert(l(&[("pod", "9"), ("id", "a"), ("j", "1")]), ())
            .unwrap();
        dir.insert(l(&[("app", "db"), ("id", "b"), ("j", "2")]), ())
            .unwrap();
        let (answer, cost) = probes(&mut dir, &l(&[("app", "web"), ("pod", "1")]));
        assert_eq!((answer, cost), (Lookup::Found(web), 1));
        assert_eq!(scan(&dir, &l(&[("app", "web"), ("pod", "1")])), vec![web]);
    }

    fn agrees_with_a_scan(keys: &[&str]) -> Directory<()> {
        agrees_with_a_scan_where(keys, None)
    }

    fn agrees_with_a_scan_where(keys: &[&str], shared: Option<&str>) -> Directory<()> {
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
            if let Some(k) = shared {
                labels.insert(k.to_string(), (next() % 3).to_string());
            }
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
            // Walked a page of 3 at a time, from the start and from the middle.
            let mut paged = Vec::new();
            while let Some(&last) = dir
                .matching_after(&labels, paged.last().copied().unwrap_or(0), 3)
                .last()
            {
                let page = dir.matching_after(&labels, paged.last().copied().unwrap_or(0), 3);
                assert!(page.len() <= 3);
                paged.extend(page);
                assert_eq!(paged.last(), Some(&last));
            }
            assert_eq!(paged, expect, "paged, round {round} labels {labels:?}");
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

//! Resolvers: registrants that expand one label set into weighted candidate label
//! sets before the directory is consulted (DNS names into addresses, later load
//! balancing). The rules are documented in docs/PROTOCOL.md, "Resolvers".
//!
//! * A resolver registers a non-empty set of *resolve keys*, `in_labels` and
//!   `out_labels`. Its *scope* is the registering handle's fixed in-labels: a
//!   constrained handle can only steer names inside its own label space. It
//!   *applies* to a connect whose labels carry every resolve key, carry every scope
//!   label with the same value, and do not contradict its `in_labels`.
//! * Registration is refused only by a resolver with the same keys and the same scope
//!   whose in-labels do not contradict: a tenant cannot block the operator's resolver
//!   or another tenant's.
//! * When several apply, the one whose scope strictly contains every other's wins
//!   (the most specific); otherwise it is a `FAILED_PRECONDITION`, like two targets.
//! * Its answer is cached per projected request for `max_cache_duration_seconds`
//!   (capped at [`MAX_CACHE`]); the cache goes with the resolver.
//! * Candidates are tried in a weighted random order (positive weights), then the
//!   zero-weight ones in the order given; the first that connects wins.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flower_proto::Labels;
use flower_proto::resolver::Candidate;
use flower_proto::rpc::Peer;

use crate::directory::{Directory, Lookup, TargetId};
use crate::labels::{conflicting_keys, key_list};
use crate::subsets::SubsetTrie;
use flower_proto::Status;

/// Longest a resolver's answer is reused, whatever it asks for.
pub const MAX_CACHE: Duration = Duration::from_secs(3600);
/// Answers cached per resolver; beyond this, expired ones are dropped, then all.
const CACHE_ENTRIES: usize = 4096;
/// Candidates tried per connect: each attempt may take a whole call timeout.
pub const MAX_ATTEMPTS: usize = 16;
/// Targets kept from one answer (the rest are dropped before caching).
pub const MAX_TARGETS: usize = 256;

/// A registered resolver.
pub(crate) struct Resolver {
    pub peer: Peer,
    /// Sorted, distinct.
    pub keys: Arc<[String]>,
    /// The registering handle's fixed in-labels: a connect must carry all of them.
    pub scope: Labels,
    /// Forced onto every candidate (the registering handle's and the request's).
    pub out_labels: Labels,
    cache: Mutex<HashMap<Labels, Answer>>,
}

/// A cached answer and when it expires.
type Answer = (Arc<[Candidate]>, Instant);

impl Resolver {
    pub fn new(peer: Peer, keys: Arc<[String]>, scope: Labels, out_labels: Labels) -> Resolver {
        Resolver {
            peer,
            keys,
            scope,
            out_labels,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The labels a resolve request carries: `labels` restricted to the resolve keys.
    pub fn project(&self, labels: &Labels) -> Labels {
        self.keys
            .iter()
            .filter_map(|k| labels.get_key_value(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn cached(&self, request: &Labels) -> Option<Arc<[Candidate]>> {
        let cache = self.cache.lock().unwrap();
        let (targets, expiry) = cache.get(request)?;
        (Instant::now() < *expiry).then(|| targets.clone())
    }

    pub fn remember(&self, request: Labels, targets: Arc<[Candidate]>, seconds: u32) {
        let lifetime = Duration::from_secs(seconds.into()).min(MAX_CACHE);
        if lifetime.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, expiry)| now < *expiry);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(request, (targets, now + lifetime));
    }
}

/// A group of resolvers: one resolve key set and one scope.
pub(crate) type GroupKey = (Arc<[String]>, Labels);

/// Registered resolvers, grouped by resolve key set and scope. Each group is a
/// directory over the resolvers' `in_labels`. The groups sit in a trie over the
/// items a connect must carry for them to apply — each resolve key and each scope
/// label, as keyed hashes — so a connect visits only the groups (and trie prefixes)
/// its labels contain, not every group: one registrant's many key sets or scopes
/// cost nobody else's connects anything. Hash collisions only add candidates, which
/// are checked exactly.
#[derive(Default)]
pub(crate) struct Resolvers {
    groups: SubsetTrie<u64, BTreeMap<GroupKey, Directory<Arc<Resolver>>>>,
    hasher: RandomState,
}

/// What one group offers a connect: its one resolver, or two that tie.
enum Applies {
    One(Arc<Resolver>),
    /// The two oldest, and the keys on which their in-labels differ.
    Tie(Vec<String>),
}

impl Resolvers {
    /// Registers `resolver` under `in_labels` (which include its scope); refused when
    /// another one with the same keys and the same scope would apply to the same
    /// connects.
    pub fn insert(&mut self, in_labels: Labels, resolver: Arc<Resolver>) -> Result<TargetId, ()> {
        let key = (resolver.keys.clone(), resolver.scope.clone());
        let items = self.group_items(&key);
        self.groups
            .entry(&items, BTreeMap::new)
            .entry(key)
            .or_default()
            .insert(in_labels, resolver)
            .map_err(drop)
    }

    /// Removes resolver `id` of the group `key` (its keys and scope).
    pub fn remove(&mut self, key: &GroupKey, id: TargetId) {
        let items = self.group_items(key);
        let Some(node) = self.groups.get_mut(&items) else {
            return;
        };
        if let Some(group) = node.get_mut(key) {
            group.remove(id);
            if group.is_empty() {
                node.remove(key);
            }
        }
        if node.is_empty() {
            self.groups.remove(&items);
        }
    }

    /// What a connect must carry for the group `key` to apply: each resolve key and
    /// each scope label.
    fn group_items(&self, (keys, scope): &GroupKey) -> Vec<u64> {
        self.items(
            keys.iter()
                .map(|k| (k.as_str(), None))
                .chain(scope.iter().map(|(k, v)| (k.as_str(), Some(v.as_str())))),
        )
    }

    /// The sorted, distinct hashes of `items`: a key (`None`: must be present) or a
    /// label (`Some(value)`: must be present with that value).
    fn items<'a>(&self, items: impl Iterator<Item = (&'a str, Option<&'a str>)>) -> Vec<u64> {
        let mut hashes: Vec<u64> = items.map(|item| self.hasher.hash_one(item)).collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    /// The one resolver that applies to `labels`, if any: of those that apply, the
    /// one whose scope strictly contains every other's.
    pub fn find(&mut self, labels: &Labels) -> Result<Option<Arc<Resolver>>, Status> {
        if self.groups.is_empty() {
            return Ok(None);
        }
        let query = self.items(
            labels
                .keys()
                .map(|k| (k.as_str(), None))
                .chain(labels.iter().map(|(k, v)| (k.as_str(), Some(v.as_str())))),
        );
        let mut applying: Vec<(GroupKey, Applies)> = Vec::new();
        self.groups.subsets_of(&query, |node| {
            for (key, group) in node.iter_mut() {
                let (keys, scope) = key;
                if !keys.iter().all(|k| labels.contains_key(k)) || !within(labels, scope) {
                    continue;
                }
                let applies = match group.lookup(labels) {
                    Lookup::NotFound => continue,
                    Lookup::Found(id) => Applies::One(group.get(id).unwrap().value.clone()),
                    Lookup::Ambiguous(a, b) => {
                        let (a, b) = (group.get(a).unwrap(), group.get(b).unwrap());
                        let keys = conflicting_keys(&a.labels, &b.labels);
                        Applies::Tie(keys.into_iter().map(str::to_owned).collect())
                    }
                };
                applying.push((key.clone(), applies));
            }
        });
        // In key order, as a scan of the groups would meet them: the messages below
        // name the same groups whatever the hashes.
        applying.sort_by(|a, b| a.0.cmp(&b.0));
        // The most specific: the largest scope (the first of equals, for the message).
        let Some(best) = (0..applying.len()).reduce(|best, i| {
            match applying[i].0.1.len() > applying[best].0.1.len() {
                true => i,
                false => best,
            }
        }) else {
            return Ok(None);
        };
        let (best_key, best_applies) = &applying[best];
        let resolver = match best_applies {
            Applies::One(resolver) => resolver,
            Applies::Tie(keys) => {
                return Err(Status::failed_precondition(format!(
                    "Labels match multiple resolvers, which can be resolved by adding one of the labels {}",
                    key_list(keys)
                )));
            }
        };
        let rival = applying.iter().enumerate().find(|(i, (key, _))| {
            *i != best && !(key.1.len() < best_key.1.len() && within(&best_key.1, &key.1))
        });
        if let Some((_, ((keys, scope), _))) = rival {
            return Err(Status::failed_precondition(if *keys != best_key.0 {
                format!(
                    "Labels match multiple resolvers, with keys {} and {}",
                    key_list(&best_key.0),
                    key_list(keys)
                )
            } else {
                let scope_keys = |s: &Labels| key_list(&s.keys().collect::<Vec<_>>());
                format!(
                    "Labels match multiple resolvers, scoped by the labels {} and {}",
                    scope_keys(&best_key.1),
                    scope_keys(scope)
                )
            }));
        }
        Ok(Some(resolver.clone()))
    }
}

/// Whether `labels` carries every label of `scope` with the same value.
fn within(labels: &Labels, scope: &Labels) -> bool {
    scope.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The order in which to try `targets`: positive weights in a weighted random order
/// (each pick proportional to weight among those left), then zero weights as listed.
/// At most [`MAX_ATTEMPTS`] entries.
pub fn attempt_order(targets: &[Candidate], rng: &mut fastrand::Rng) -> Vec<usize> {
    let mut weighted: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i].weight > 0)
        .collect();
    let mut order = Vec::with_capacity(targets.len().min(MAX_ATTEMPTS));
    let mut total: u64 = weighted.iter().map(|&i| u64::from(targets[i].weight)).sum();
    while !weighted.is_empty() && order.len() < MAX_ATTEMPTS {
        let mut ticket = rng.u64(0..total);
        let pos = weighted
            .iter()
            .position(|&i| {
                let w = u64::from(targets[i].weight);
                if ticket < w {
                    true
                } else {
                    ticket -= w;
                    false
                }
            })
            .expect("ticket below total weight");
        let i = weighted.remove(pos);
        total -= u64::from(targets[i].weight);
        order.push(i);
    }
    order.extend(
        (0..targets.len())
            .filter(|&i| targets[i].weight == 0)
            .take(MAX_ATTEMPTS - order.len()),
    );
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(weight: u32) -> Candidate {
        Candidate {
            out_labels: Labels::new(),
            weight,
        }
    }

    #[test]
    fn zero_weights_come_last_in_listed_order() {
        let targets = [target(0), target(5), target(0), target(1)];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100 {
            let order = attempt_order(&targets, &mut rng);
            assert_eq!(order.len(), 4);
            assert_eq!(&order[2..], &[0, 2]);
        }
    }

    #[test]
    fn picks_first_in_proportion_to_weight() {
        let targets = [target(1), target(3)];
        let mut rng = fastrand::Rng::with_seed(1);
        let runs = 40_000;
        let heavy_first = (0..runs)
            .filter(|_| attempt_order(&targets, &mut rng)[0] == 1)
            .count();
        let share = heavy_first as f64 / runs as f64;
        assert!((0.72..0.78).contains(&share), "share {share}");
    }

    #[test]
    fn caps_attempts() {
        let targets: Vec<Candidate> = (0..40).map(|i| target(i % 2)).collect();
        let order = attempt_order(&targets, &mut fastrand::Rng::with_seed(3));
        assert_eq!(order.len(), MAX_ATTEMPTS);
        assert!(order.iter().all(|&i| targets[i].weight == 1));
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let targets = [target(u32::MAX), target(u32::MAX), target(u32::MAX)];
        let mut order = attempt_order(&targets, &mut fastrand::Rng::with_seed(9));
        order.sort();
        assert_eq!(order, [0, 1, 2]);
    }
}

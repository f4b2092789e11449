//! A trie of sets that finds every stored set contained in a query set, visiting only
//! the stored sets' prefixes that are themselves contained in it.
//!
//! Sets are sorted sequences of items; a node's children are keyed by the next item.
//! A query walks from the root and, at each node, probes the children for each query
//! item after the node's own: a stored set that has an item the query lacks is never
//! reached past that item. So many stored sets cost a query nothing unless they are
//! (prefix-wise) inside it — unlike a scan of every stored set.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub(crate) struct SubsetTrie<K, V> {
    root: Node<K, V>,
}

#[derive(Debug)]
struct Node<K, V> {
    value: Option<V>,
    children: HashMap<K, Node<K, V>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            value: None,
            children: HashMap::new(),
        }
    }
}

impl<K, V> Default for SubsetTrie<K, V> {
    fn default() -> Self {
        SubsetTrie {
            root: Node::default(),
        }
    }
}

impl<K: Ord + Hash + Clone, V> SubsetTrie<K, V> {
    /// The value stored for the set `items` (sorted, distinct), created if absent.
    pub fn entry(&mut self, items: &[K], new: impl FnOnce() -> V) -> &mut V {
        debug_assert!(items.windows(2).all(|w| w[0] < w[1]), "items are sorted");
        let mut node = &mut self.root;
        for item in items {
            node = node.children.entry(item.clone()).or_default();
        }
        node.value.get_or_insert_with(new)
    }

    /// The value stored for exactly `items`.
    pub fn get_mut(&mut self, items: &[K]) -> Option<&mut V> {
        let mut node = &mut self.root;
        for item in items {
            node = node.children.get_mut(item)?;
        }
        node.value.as_mut()
    }

    /// Drops the value stored for `items`, and the nodes that then lead nowhere.
    pub fn remove(&mut self, items: &[K]) -> Option<V> {
        fn go<K: Hash + Eq, V>(node: &mut Node<K, V>, items: &[K]) -> Option<V> {
            let Some((first, rest)) = items.split_first() else {
                return node.value.take();
            };
            let child = node.children.get_mut(first)?;
            let value = go(child, rest);
            if child.value.is_none() && child.children.is_empty() {
                node.children.remove(first);
            }
            value
        }
        go(&mut self.root, items)
    }

    /// Calls `f` with every stored set contained in `query` (sorted, distinct), and
    /// its value.
    pub fn subsets_of(&mut self, query: &[K], mut f: impl FnMut(&mut V)) {
        fn go<K: Hash + Eq, V>(node: &mut Node<K, V>, query: &[K], f: &mut impl FnMut(&mut V)) {
            if let Some(value) = &mut node.value {
                f(value);
            }
            if node.children.is_empty() {
                return;
            }
            for (i, item) in query.iter().enumerate() {
                if let Some(child) = node.children.get_mut(item) {
                    go(child, &query[i + 1..], f);
                }
            }
        }
        debug_assert!(query.windows(2).all(|w| w[0] < w[1]), "query is sorted");
        go(&mut self.root, query, &mut f)
    }

    pub fn is_empty(&self) -> bool {
        self.root.value.is_none() && self.root.children.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn finds_exactly_the_stored_subsets() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut trie: SubsetTrie<u8, BTreeSet<u8>> = SubsetTrie::default();
        let mut stored: Vec<Vec<u8>> = Vec::new();
        for round in 0..3000 {
            let set: BTreeSet<u8> = (0..(next() % 5)).map(|_| (next() % 8) as u8).collect();
            let set: Vec<u8> = set.into_iter().collect();
            match next() % 3 {
                0 if !stored.is_empty() => {
                    let victim = stored.swap_remove((next() % stored.len() as u64) as usize);
                    assert!(trie.remove(&victim).is_some(), "round {round}");
                }
                1 => {
                    let mut found = Vec::new();
                    trie.subsets_of(&set, |v| found.push(v.iter().copied().collect::<Vec<_>>()));
                    found.sort();
                    let mut expect: Vec<Vec<u8>> = stored
                        .iter()
                        .filter(|s| s.iter().all(|i| set.contains(i)))
                        .cloned()
                        .collect();
                    expect.sort();
                    assert_eq!(found, expect, "round {round} query {set:?}");
                }
                _ => {
                    if !stored.contains(&set) {
                        let copy = set.iter().copied().collect();
                        trie.entry(&set, || copy);
                        stored.push(set);
                    }
                }
            }
        }
        for set in stored {
            assert!(trie.remove(&set).is_some());
        }
        assert!(trie.is_empty(), "removing everything prunes every node");
    }

    #[test]
    fn many_sets_outside_the_query_do_not_confuse_it() {
        // 10 000 stored sets that share the query's first item but each have one the
        // query lacks: a query visits the root and one child, not 10 000 nodes.
        let mut trie: SubsetTrie<String, u32> = SubsetTrie::default();
        for i in 0..10_000u32 {
            trie.entry(&["app".to_string(), format!("k{i:05}")], || i);
        }
        trie.entry(&["app".to_string()], || 7);
        let mut seen = Vec::new();
        trie.subsets_of(&["app".to_string(), "pod".to_string()], |v| seen.push(*v));
        assert_eq!(seen, [7]);
    }
}

//! What one peer may hold (docs/PROTOCOL.md §10): every handle and every registration is a
//! descriptor the switchboard keeps open, so each is charged to a [`Quota`] while it
//! lives — the connecting uid's on the main path, or the endpoint's for a handle an
//! embedder made (one per pod) — and to the switchboard's descriptor budget, which
//! leaves a reserve free so that `accept` and the embedder's own API keep working when
//! one client has used its share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use flower_proto::Status;
use std::collections::HashMap;

/// A counted limit, with an optional parent charged as well.
#[derive(Debug)]
pub(crate) struct Quota {
    used: AtomicUsize,
    limit: usize,
    /// The error when full.
    full: String,
    parent: Option<Arc<Quota>>,
    /// Calls in flight across every channel charged here (None: per channel only).
    pub calls: Option<Arc<tokio::sync::Semaphore>>,
    /// Targets and resolvers registered by everything charged here (None: unbounded
    /// but for the descriptors they hold).
    pub targets: Option<Arc<Quota>>,
}

impl Quota {
    pub fn new(limit: usize, full: String, parent: Option<Arc<Quota>>) -> Arc<Quota> {
        Quota::owner(limit, full, parent, None, None)
    }

    /// The quota of one owner (a uid, an endpoint): its channels also share `calls`
    /// calls in flight, and its registrations are also counted against `targets`
    /// (the limit and the error when it is full).
    pub fn owner(
        limit: usize,
        full: String,
        parent: Option<Arc<Quota>>,
        calls: Option<usize>,
        targets: Option<(usize, String)>,
    ) -> Arc<Quota> {
        Arc::new(Quota {
            used: AtomicUsize::new(0),
            limit,
            full,
            parent,
            calls: calls.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
            targets: targets.map(|(limit, full)| Quota::new(limit, full, None)),
        })
    }

    /// One more target or resolver of this owner, if it has a bound.
    pub fn target(&self) -> Result<Option<Ticket>, Status> {
        self.targets.as_ref().map(Quota::acquire).transpose()
    }

    /// One more, here and in every parent; `RESOURCE_EXHAUSTED` naming the first
    /// limit that is full.
    pub fn acquire(self: &Arc<Quota>) -> Result<Ticket, Status> {
        let mut level = Some(self);
        while let Some(q) = level {
            if q.used.fetch_add(1, Ordering::AcqRel) >= q.limit {
                // Undo this level and the ones below it.
                q.used.fetch_sub(1, Ordering::AcqRel);
                let mut undo = Some(self);
                while let Some(u) = undo.filter(|u| !Arc::ptr_eq(u, q)) {
                    u.used.fetch_sub(1, Ordering::AcqRel);
                    undo = u.parent.as_ref();
                }
                return Err(Status::resource_exhausted(q.full.clone()));
            }
            level = q.parent.as_ref();
        }
        Ok(Ticket(self.clone()))
    }

    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Descriptors in replies waiting for a peer that does not read count like handles.
impl flower_proto::rpc::Charge for Quota {
    fn take(&self, n: usize) -> bool {
        let mut taken: Vec<&Quota> = Vec::new();
        let mut level = Some(self);
        while let Some(q) = level {
            if q.used.fetch_add(n, Ordering::AcqRel) + n > q.limit {
                q.used.fetch_sub(n, Ordering::AcqRel);
                for t in taken {
                    t.used.fetch_sub(n, Ordering::AcqRel);
                }
                return false;
            }
            taken.push(q);
            level = q.parent.as_deref();
        }
        true
    }

    fn give(&self, n: usize) {
        let mut level = Some(self);
        while let Some(q) = level {
            q.used.fetch_sub(n, Ordering::AcqRel);
            level = q.parent.as_deref();
        }
    }
}

/// One unit of a [`Quota`] and its parents; returned on drop.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<Quota>);

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut level = Some(&self.0);
        while let Some(q) = level {
            q.used.fetch_sub(1, Ordering::AcqRel);
            level = q.parent.as_ref();
        }
    }
}

/// The quota of each connecting uid, created on first use and forgotten when the
/// uid holds nothing.
#[derive(Debug, Default)]
pub(crate) struct UidQuotas {
    by_uid: Mutex<HashMap<u32, Weak<Quota>>>,
}

impl UidQuotas {
    pub fn get(
        &self,
        uid: u32,
        limit: usize,
        calls: usize,
        targets: usize,
        budget: &Arc<Quota>,
    ) -> Arc<Quota> {
        let mut map = self.by_uid.lock().unwrap();
        if let Some(quota) = map.get(&uid).and_then(Weak::upgrade) {
            return quota;
        }
        map.retain(|_, q| q.strong_count() > 0);
        let quota = Quota::owner(
            limit,
            format!(
                "Uid {uid} holds {limit} handles and registrations, the most one uid may \
                 (--max-handles-per-uid)"
            ),
            Some(budget.clone()),
            Some(calls),
            Some((
                targets,
                format!(
                    "Uid {uid} has registered {targets} targets and resolvers, the most one \
                     uid may (--max-targets-per-uid)"
                ),
            )),
        );
        map.insert(uid, Arc::downgrade(&quota));
        quota
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_level_undoes_the_levels_below_it() {
        let budget = Quota::new(3, "budget".into(), None);
        let a = Quota::new(2, "a".into(), Some(budget.clone()));
        let b = Quota::new(5, "b".into(), Some(budget.clone()));
        let a1 = a.acquire().unwrap();
        let _a2 = a.acquire().unwrap();
        assert_eq!(a.acquire().unwrap_err().message, "a");
        let _b1 = b.acquire().unwrap();
        assert_eq!(b.acquire().unwrap_err().message, "budget");
        assert_eq!((a.used(), b.used(), budget.used()), (2, 1, 3));
        drop(a1);
        assert_eq!((a.used(), budget.used()), (1, 2));
        let _b2 = b.acquire().unwrap();
    }
}

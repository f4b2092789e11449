//! What one peer may hold (docs/PROTOCOL.md §10): every handle and every registration is a
//! descriptor the switchboard keeps open, so each is charged to a [`Quota`] while it
//! lives — the connecting uid's on the main path, or the endpoint's for a handle an
//! embedder made (one per pod) — and to the switchboard's descriptor budget, which
//! leaves a reserve free so that `accept` and the embedder's own API keep working when
//! one client has used its share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

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
    /// How fast everything charged here may make new handles and registrations
    /// (None: as fast as it likes).
    pub pace: Option<Arc<Pace>>,
}

/// How many new handles and registrations one owner may make per second, and how
/// many at once after a quiet spell (docs/PROTOCOL.md §10).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// A [`Rate`] enforced as a token bucket kept as one instant (GCRA): `due` is when the
/// bucket would be full again. Each new handle reserves the next free slot; one that
/// finds the bucket empty waits for its slot, so the waits of one owner are spread out
/// one interval apart and never wake together.
#[derive(Debug)]
pub(crate) struct Pace {
    interval: Duration,
    /// How far ahead of now `due` may be before a new handle must wait:
    /// `burst - 1` intervals.
    tolerance: Duration,
    due: Mutex<Instant>,
}

impl Pace {
    pub fn new(rate: Rate) -> Option<Pace> {
        if !(rate.per_second.is_finite() && rate.per_second > 0.0) {
            return None;
        }
        // Slower than one a year is as good as never; keeps the arithmetic in range.
        let interval = Duration::from_secs_f64((1.0 / rate.per_second).min(3.2e7));
        Some(Pace {
            interval,
            tolerance: interval.saturating_mul(rate.burst.max(1) - 1),
            due: Mutex::new(Instant::now()),
        })
    }

    /// Reserves the next slot: `None` when it is free now, else when it will be.
    pub fn reserve(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut due = self.due.lock().unwrap();
        let from = (*due).max(now);
        *due = from + self.interval;
        from.checked_sub(self.tolerance).filter(|&at| at > now)
    }

    /// Whether the bucket is full, as a new one would be: nothing to remember.
    fn is_rested(&self) -> bool {
        *self.due.lock().unwrap() <= Instant::now()
    }

    /// Gives back a slot reserved by a caller that stopped waiting for it (its
    /// channel closed), so that abandoned waits do not push everyone's turn later.
    fn refund(&self) {
        let now = Instant::now();
        let mut due = self.due.lock().unwrap();
        *due = due.checked_sub(self.interval).map_or(now, |d| d.max(now));
    }
}

impl Quota {
    pub fn new(limit: usize, full: String, parent: Option<Arc<Quota>>) -> Arc<Quota> {
        Quota::owner(limit, full, parent, None, None, None)
    }

    /// The quota of one owner (a uid, an endpoint): its channels also share `calls`
    /// calls in flight, and its registrations are also counted against `targets`
    /// (the limit and the error when it is full), and it makes new handles and
    /// registrations at most at `pace`.
    pub fn owner(
        limit: usize,
        full: String,
        parent: Option<Arc<Quota>>,
        calls: Option<usize>,
        targets: Option<(usize, String)>,
        pace: Option<Arc<Pace>>,
    ) -> Arc<Quota> {
        Arc::new(Quota {
            used: AtomicUsize::new(0),
            limit,
            full,
            parent,
            calls: calls.map(|n| Arc::new(tokio::sync::Semaphore::new(n.max(1)))),
            targets: targets.map(|(limit, full)| Quota::new(limit, full, None)),
            pace,
        })
    }

    /// Waits until this owner may make one more handle or registration (at once
    /// unless it is over its rate). The caller keeps whatever it holds meanwhile — a
    /// call its place among the calls in flight — so an owner over its rate is slowed
    /// down, not refused.
    pub async fn pace(&self) {
        /// Refunds the slot unless the wait ran to its end.
        struct Waiting<'a>(&'a Pace, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.refund();
                }
            }
        }
        let Some(pace) = &self.pace else { return };
        if let Some(at) = pace.reserve() {
            let mut waiting = Waiting(pace, false);
            tokio::time::sleep_until(at).await;
            waiting.1 = true;
        }
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
    /// Each uid's pace, kept while it is behind (its bucket not yet full again) even
    /// when the uid holds nothing: otherwise a client that hangs up everything
    /// between floods would start each one with a full burst.
    paces: Mutex<HashMap<u32, Arc<Pace>>>,
}

impl UidQuotas {
    pub fn get(
        &self,
        uid: u32,
        limit: usize,
        calls: usize,
        targets: usize,
        rate: Option<Rate>,
        budget: &Arc<Quota>,
    ) -> Arc<Quota> {
        let mut map = self.by_uid.lock().unwrap();
        if let Some(quota) = map.get(&uid).and_then(Weak::upgrade) {
            return quota;
        }
        map.retain(|_, q| q.strong_count() > 0);
        let pace = rate.and_then(|rate| {
            let mut paces = self.paces.lock().unwrap();
            paces.retain(|_, p| Arc::strong_count(p) > 1 || !p.is_rested());
            match paces.entry(uid) {
                std::collections::hash_map::Entry::Occupied(kept) => Some(kept.get().clone()),
                std::collections::hash_map::Entry::Vacant(new) => {
                    Some(new.insert(Arc::new(Pace::new(rate)?)).clone())
                }
            }
        });
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
            pace,
        );
        map.insert(uid, Arc::downgrade(&quota));
        quota
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_lets_a_burst_through_then_spaces_the_rest_one_interval_apart() {
        let rate = Rate {
            per_second: 0.001,
            burst: 3,
        };
        let pace = Pace::new(rate).unwrap();
        for _ in 0..3 {
            assert_eq!(pace.reserve(), None, "within the burst: at once");
        }
        let fourth = pace.reserve().expect("past the burst: later");
        let fifth = pace.reserve().expect("later still");
        assert!(
            fourth > Instant::now() + Duration::from_secs(900),
            "{fourth:?}"
        );
        assert_eq!(fifth - fourth, Duration::from_secs(1_000));
        // A slot given back is the next one handed out.
        pace.refund();
        assert_eq!(pace.reserve(), Some(fifth));
        // No rate, or a rate of zero: no pace at all.
        assert!(
            Pace::new(Rate {
                per_second: 0.0,
                burst: 3
            })
            .is_none()
        );
        assert!(
            Pace::new(Rate {
                per_second: f64::NAN,
                burst: 3
            })
            .is_none()
        );
        let one = Pace::new(Rate {
            per_second: 1e-3,
            burst: 1,
        })
        .unwrap();
        assert_eq!(one.reserve(), None);
        assert!(one.reserve().is_some(), "a burst of one: the second waits");
    }

    #[test]
    fn a_uid_that_lets_go_of_everything_keeps_its_pace() {
        let uids = UidQuotas::default();
        let budget = Quota::new(100, "budget".into(), None);
        let rate = Rate {
            per_second: 0.001,
            burst: 2,
        };
        let get = |uid| uids.get(uid, 10, 10, 10, Some(rate), &budget);
        let quota = get(7);
        let pace = quota.pace.clone().unwrap();
        assert_eq!((pace.reserve(), pace.reserve()), (None, None));
        drop((quota, pace));
        // Its quota is gone with its last handle, but not its debt.
        let again = get(7);
        assert!(again.pace.as_ref().unwrap().reserve().is_some());
        // Another uid has a bucket of its own.
        assert_eq!(get(8).pace.as_ref().unwrap().reserve(), None);
    }

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

//! Counting a scope: how many handles and targets it holds, with a bound on handles.
//!
//! Only scopes an embedder asked to count ([`crate::Switchboard::counted_scope`],
//! e.g. a pod's) pay for this; a handle of a plain scope carries `None`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use flower_proto::Status;
use tokio::sync::Notify;

use crate::State;
use crate::directory::TargetId;
use crate::quota::Quota;

pub(crate) struct ScopeCounts {
    handles: AtomicUsize,
    targets: AtomicUsize,
    max_handles: usize,
    /// Notified whenever a count drops.
    dropped: Notify,
    /// The scope's targets, so that revoking removes them from the directory at
    /// once rather than as each registration channel's task gets to run.
    target_ids: Mutex<HashSet<TargetId>>,
    shared: Arc<State>,
    /// What every handle served into the scope, and everything derived from them,
    /// is charged to: the scope is one endpoint.
    pub quota: Arc<Quota>,
}

impl std::fmt::Debug for ScopeCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopeCounts")
            .field("handles", &self.handles)
            .field("targets", &self.targets)
            .field("max_handles", &self.max_handles)
            .finish()
    }
}

impl ScopeCounts {
    pub fn new(shared: Arc<State>, max_handles: usize, quota: Arc<Quota>) -> Arc<ScopeCounts> {
        Arc::new(ScopeCounts {
            handles: AtomicUsize::new(0),
            targets: AtomicUsize::new(0),
            max_handles,
            dropped: Notify::new(),
            target_ids: Mutex::default(),
            shared,
            quota,
        })
    }

    pub fn shared(&self) -> Arc<State> {
        self.shared.clone()
    }

    /// Removes every target of the scope from the directory now (their channels
    /// close as the revoked scope's tasks run; removing twice is harmless, and
    /// target ids are never reused).
    pub fn remove_targets(&self) {
        let ids: Vec<TargetId> = self.target_ids.lock().unwrap().drain().collect();
        let mut directory = self.shared.directory.lock().unwrap();
        for id in ids {
            directory.remove(id);
        }
    }

    pub fn handles(&self) -> usize {
        self.handles.load(Ordering::Acquire)
    }

    pub fn targets(&self) -> usize {
        self.targets.load(Ordering::Acquire)
    }

    /// Counts one more handle, unless the scope is full.
    pub fn handle(self: &Arc<Self>) -> Result<HandleCount, Status> {
        let counted = self
            .handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_handles).then_some(n + 1)
            });
        match counted {
            Ok(_) => Ok(HandleCount(self.clone())),
            Err(_) => Err(Status::resource_exhausted(format!(
                "This endpoint has reached its limit of {} handles",
                self.max_handles
            ))),
        }
    }

    /// Counts one more target (bounded elsewhere, per scope, if at all).
    pub fn target(self: &Arc<Self>, id: TargetId) -> TargetCount {
        self.targets.fetch_add(1, Ordering::AcqRel);
        self.target_ids.lock().unwrap().insert(id);
        TargetCount(self.clone(), id)
    }

    /// Resolves once both counts are zero.
    pub async fn empty(&self) {
        loop {
            let dropped = self.dropped.notified();
            if self.handles() == 0 && self.targets() == 0 {
                return;
            }
            dropped.await;
        }
    }

    fn release(&self, count: &AtomicUsize) {
        count.fetch_sub(1, Ordering::AcqRel);
        self.dropped.notify_waiters();
    }
}

/// One counted handle: released when the handle's service is dropped (its channel
/// closed, by either side or by revocation).
#[derive(Debug)]
pub(crate) struct HandleCount(Arc<ScopeCounts>);

impl HandleCount {
    /// Another handle in the same scope (Constrain).
    pub fn another(&self) -> Result<HandleCount, Status> {
        self.0.handle()
    }

    pub fn target(&self, id: TargetId) -> TargetCount {
        self.0.target(id)
    }
}

impl Drop for HandleCount {
    fn drop(&mut self) {
        self.0.release(&self.0.handles);
    }
}

/// One counted target: released when its registration is removed.
#[derive(Debug)]
pub(crate) struct TargetCount(Arc<ScopeCounts>, TargetId);

impl Drop for TargetCount {
    fn drop(&mut self) {
        self.0.target_ids.lock().unwrap().remove(&self.1);
        self.0.release(&self.0.targets);
    }
}
